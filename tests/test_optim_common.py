"""Behaviour every optimizer shares, one test each, parametrized over the optimizers (the test ids
name them): the NaN/Inf policy of fastgrad.optim.base (``nonfinite="skip"`` leaves a poisoned
parameter's weight and state, projector included, exactly as they were and steps every other
parameter; ``"raise"`` raises FloatingPointError naming the parameter and changes nothing) and exact
resume from a checkpoint (the same losses, weights and ops as a run that was never interrupted).
What only one optimizer has (8-bit codes, the limiter norm, Q-GaLore's adaptive interval, the layers
that deliver projected gradients) is checked by that optimizer's case."""

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from optim_common import (
    FIRA_APOLLO,
    N_LOWRANK,
    OpCounter,
    assert_same_state,
    make_adamw8bit,
    make_frugal,
    make_frugal_block,
    make_galore,
    make_galore8,
    make_galore_muon,
    make_muon,
    make_muon8,
    make_qgalore,
    make_qgalore8,
    make_qgalore_muon,
    quantized_model,
    roundtrip,
    state_tensors,
    tiny_model,
    token_batches,
    train,
)

from fastgrad import optim
from fastgrad.nn import QLinear, lowrank_grad_model, projected_grad, qlinear_of
from fastgrad.optim.galore8bit import M_CODES
from fastgrad.optim.muon8bit import B_CODES

pytestmark = pytest.mark.usefixtures("single_thread")

NAN, INF = float("nan"), float("inf")
EMBED = "model.embed_tokens.weight"  # dense (full-rank moments)
Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"  # tall, 160×64
GATE1 = "model.layers.1.mlp.gate_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"  # wide, 64×160: left side
DOWN1 = "model.layers.1.mlp.down_proj.weight"


def _grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient the optimizer will read: ``p.grad``, or the R = down(G) a layer delivered instead."""
    return p.grad if p.grad is not None else projected_grad(p)


def _weights(p: torch.Tensor) -> list[torch.Tensor]:
    """A copy of the weight ``p``: for a QLinear its codes, scales and zeros."""
    layer = qlinear_of(p)
    return [t.detach().clone() for t in ((p, layer.scales, layer.zeros) if layer is not None else (p,))]


def _assert_same_weights(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    assert len(a) == len(b), what
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), what


def _assert_state_kept(now: dict, before: dict, what: str) -> None:
    """The state is as it was; a parameter that had none may have gained only the tensor-free
    initial state its first step sets up (step 0, the projector's side, rank and seed): no moment
    or projector tensor, and the next step starts from it exactly as it would have from nothing."""
    if before:
        assert_same_state(now, before)
    else:
        assert now.get("step", 0) == 0 and not any(isinstance(v, torch.Tensor) for v in now.values()), what


def _warmed_up(case, steps_after: int):
    """The case's model and optimizer after ``case.warm`` clean steps, and the next ``steps_after`` batches."""
    model = case.model()
    opt = case.make(model)
    batches = token_batches(case.warm + steps_after)
    train(model, opt, batches[: case.warm])
    return model, opt, batches[case.warm :]


def _poisoned_backward(model, opt, ids, poison: dict[str, float]) -> None:
    opt.zero_grad()
    model(ids, ids).backward()
    for name, value in poison.items():
        _grad(model.get_parameter(name))[0, 0] = value


# ------------------------------------------------------------------------------------------------
# NaN / Inf: nonfinite="skip"
# ------------------------------------------------------------------------------------------------


def _eight_bit_moments(case, opt, model, before) -> None:
    """The poisoned and the healthy weights all have 8-bit moments; the healthy one's codes moved."""
    assert all(M_CODES in state for _, state in before.values())
    now = opt.state[model.get_parameter(case.healthy)][M_CODES]
    assert not torch.equal(now, before[case.healthy][1][M_CODES])


def _eight_bit_momentum(case, opt, model, before) -> None:
    """Muon8bit: the poisoned Muon weight and the healthy one keep 8-bit momenta (the poisoned
    embedding 8-bit AdamW moments); the healthy one's codes moved."""
    assert all(B_CODES in state for name, (_, state) in before.items() if name != EMBED)
    assert M_CODES in before[EMBED][1]
    now = opt.state[model.get_parameter(case.healthy)][B_CODES]
    assert not torch.equal(now, before[case.healthy][1][B_CODES])


def _no_moments_created(case, opt, model, before) -> None:
    """FrugalBlock's poisoned tensor is state-full at step 0: skipping it creates no moments."""
    assert all("exp_avg" not in opt.state[model.get_parameter(name)] for name in case.poison)


@dataclass(frozen=True)
class Skip:
    make: Callable  # model -> optimizer (nonfinite="skip", the default)
    warm: int  # clean steps before the poisoned one
    poison: dict  # parameter name -> the value written into its gradient at [0, 0]
    healthy: str  # a parameter with a finite gradient: it must take its step
    refresh: bool  # the poisoned step refreshes the projectors
    model: Callable = tiny_model
    projected: bool = False  # at the poisoned step the layers deliver R = down(G), not G
    check: Callable | None = None  # an optimizer-specific check: (case, opt, model, before) -> None


SKIP = {
    "galore-refresh": Skip(lambda m: make_galore(m, gap=3), 3, {DOWN0: NAN, EMBED: INF}, Q1, refresh=True),
    "galore-between-refreshes": Skip(lambda m: make_galore(m, gap=10), 1, {GATE1: -INF}, Q1, refresh=False),
    "galore8bit": Skip(
        lambda m: make_galore8(m, gap=3), 2, {DOWN0: NAN, EMBED: INF}, Q1, refresh=False, check=_eight_bit_moments
    ),
    "adamw8bit": Skip(make_adamw8bit, 2, {DOWN0: NAN, EMBED: INF}, Q1, refresh=False, check=_eight_bit_moments),
    "fira": Skip(lambda m: FIRA_APOLLO["fira"](m, gap=3), 3, {DOWN0: NAN, EMBED: INF}, Q1, refresh=True),
    "apollo": Skip(lambda m: FIRA_APOLLO["apollo"](m, gap=3), 3, {DOWN0: NAN, EMBED: INF}, Q1, refresh=True),
    "apollo-mini": Skip(lambda m: FIRA_APOLLO["apollo-mini"](m, gap=3), 3, {DOWN0: NAN, EMBED: INF}, Q1, refresh=True),
    "qgalore-refresh": Skip(lambda m: make_qgalore(m, gap=3), 3, {DOWN0: NAN}, Q1, refresh=True, model=quantized_model),
    "qgalore-between-refreshes": Skip(
        lambda m: make_qgalore(m, gap=10), 3, {DOWN0: NAN}, Q1, refresh=False, model=quantized_model, projected=True
    ),
    "qgalore8bit": Skip(make_qgalore8, 3, {DOWN0: NAN, EMBED: INF}, Q1, refresh=True, model=quantized_model),
    "frugal": Skip(lambda m: make_frugal(m, gap=2), 2, {Q0: NAN}, DOWN1, refresh=True),
    "frugal-block": Skip(make_frugal_block, 0, {DOWN1: NAN}, Q0, refresh=False, check=_no_moments_created),
    "muon": Skip(make_muon, 2, {DOWN0: NAN, EMBED: INF}, Q1, refresh=False),
    "galore-muon": Skip(make_galore_muon, 3, {DOWN0: NAN, EMBED: INF}, Q1, refresh=True),
    "qgalore-muon": Skip(make_qgalore_muon, 3, {DOWN0: NAN, EMBED: INF}, Q1, refresh=True, model=quantized_model),
    "muon8bit": Skip(make_muon8, 2, {DOWN0: NAN, EMBED: INF}, Q1, refresh=False, check=_eight_bit_momentum),
}


@pytest.mark.parametrize("case", list(SKIP))
def test_nonfinite_gradient_skips_that_parameter(case):
    c = SKIP[case]
    model, opt, (poisoned_ids, clean_ids) = _warmed_up(c, 2)
    states = state_tensors(opt)
    watched = {n: model.get_parameter(n) for n in [*c.poison, c.healthy]}
    before = {n: (_weights(p), states.get(id(p), {})) for n, p in watched.items()}

    _poisoned_backward(model, opt, poisoned_ids, c.poison)
    for name in c.poison:
        assert (model.get_parameter(name).grad is None) == c.projected, name
    opt.step()
    assert opt.nonfinite_steps == 1
    for name in c.poison:  # weight and state (moments, projector, limiter norm, ...) untouched
        p = model.get_parameter(name)
        _assert_same_weights(_weights(p), before[name][0], name)
        _assert_state_kept(state_tensors(opt).get(id(p), {}), before[name][1], name)
    healthy = model.get_parameter(c.healthy)
    assert not torch.equal(healthy, before[c.healthy][0][0])
    assert opt.state[healthy]["step"] == before[c.healthy][1].get("step", 0) + 1
    if c.refresh:
        assert opt.state[healthy]["proj_step"] == c.warm
    if c.check is not None:
        c.check(c, opt, model, before)

    train(model, opt, [clean_ids])  # clean again: the skipped weights step (and refresh) now
    assert opt.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point())
    for name in c.poison:
        st = opt.state[model.get_parameter(name)]
        assert st["step"] == before[name][1].get("step", 0) + 1, name
        if c.refresh and name != EMBED:
            assert st["proj_step"] == c.warm, name


# ------------------------------------------------------------------------------------------------
# NaN / Inf: nonfinite="raise"
# ------------------------------------------------------------------------------------------------


RAISE = {"nonfinite": "raise"}


@dataclass(frozen=True)
class Raise:
    make: Callable  # model -> optimizer with nonfinite="raise"
    warm: int  # clean steps before the poisoned one
    bad: str  # the parameter whose gradient gets a NaN
    model: Callable = tiny_model


RAISES = {
    "galore-refresh": Raise(lambda m: make_galore(m, gap=2, opt_kwargs=RAISE), 2, UP1),
    "galore8bit": Raise(lambda m: make_galore8(m, gap=2, **RAISE), 3, UP1),
    "adamw8bit": Raise(lambda m: make_adamw8bit(m, **RAISE), 2, UP1),
    "fira": Raise(lambda m: FIRA_APOLLO["fira"](m, gap=2, **RAISE), 3, UP1),  # k = 3: no refresh
    "apollo": Raise(lambda m: FIRA_APOLLO["apollo"](m, gap=2, **RAISE), 2, UP1),
    "apollo-mini": Raise(lambda m: FIRA_APOLLO["apollo-mini"](m, gap=2, **RAISE), 3, UP1),
    "qgalore-first-step": Raise(lambda m: make_qgalore(m, opt_kwargs=RAISE), 0, Q0, model=quantized_model),
    "qgalore-between-refreshes": Raise(lambda m: make_qgalore(m, opt_kwargs=RAISE), 1, UP1, model=quantized_model),
    "qgalore8bit": Raise(lambda m: make_qgalore8(m, **RAISE), 2, UP1, model=quantized_model),
    "frugal": Raise(lambda m: make_frugal(m, gap=2, opt_kwargs=RAISE), 2, UP1),
    "frugal-block": Raise(lambda m: make_frugal_block(m, opt_kwargs=RAISE), 1, DOWN1),
    "muon": Raise(lambda m: make_muon(m, opt_kwargs=RAISE), 2, UP1),
    "galore-muon": Raise(lambda m: make_galore_muon(m, opt_kwargs=RAISE), 2, UP1),
    "qgalore-muon": Raise(lambda m: make_qgalore_muon(m, opt_kwargs=RAISE), 2, UP1, model=quantized_model),
    "muon8bit": Raise(lambda m: make_muon8(m, opt_kwargs=RAISE), 2, UP1),
}


@pytest.mark.parametrize("case", list(RAISES))
def test_nonfinite_gradient_raise_changes_nothing(case):
    c = RAISES[case]
    model, opt, (ids,) = _warmed_up(c, 1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # QLinear codes, scales and zeros too
    states = state_tensors(opt)
    _poisoned_backward(model, opt, ids, {c.bad: NAN})
    shape = tuple(model.get_parameter(c.bad).shape)
    with pytest.raises(FloatingPointError, match=re.escape(str(shape))):
        opt.step()
    assert opt.nonfinite_steps == 1
    for name, w in model.state_dict().items():
        assert torch.equal(w, weights[name]), name
    now = state_tensors(opt)
    for p in model.parameters():
        _assert_state_kept(now.get(id(p), {}), states.get(id(p), {}), str(tuple(p.shape)))


# ------------------------------------------------------------------------------------------------
# checkpoints: exact resume
# ------------------------------------------------------------------------------------------------


def _tensors_and_ints_only(saved: dict) -> None:
    for st in saved["state"].values():
        assert all(isinstance(v, torch.Tensor | int) for v in st.values())


def _has_limiter_norm(saved: dict) -> None:
    assert any("limiter_norm" in st for st in saved["state"].values())


def _has_8bit_momentum(saved: dict) -> None:
    assert sum(B_CODES in st for st in saved["state"].values()) == N_LOWRANK


def _interval_has_grown(saved: dict) -> None:
    """Q-GaLore: T, its cosine queue and a pending decision are part of the checkpoint."""
    assert any(st.get("proj_gap", 1) > 1 for st in saved["state"].values())


@dataclass(frozen=True)
class Resume:
    make: Callable  # model -> optimizer
    model: Callable = tiny_model
    check_saved: Callable | None = None  # an optimizer-specific check of the saved optimizer state dict
    first_resumed_ops: dict = field(default_factory=dict)  # op -> calls in the first resumed step


RESUME = {
    "galore-svd": Resume(lambda m: make_galore(m, gap=3)),
    "galore-randomized": Resume(lambda m: make_galore(m, gap=3, projector="randomized")),
    "galore-dct-transfer": Resume(lambda m: make_galore(m, gap=3, projector="dct", state_transfer=True)),
    "galore-random": Resume(lambda m: make_galore(m, gap=3, projector="random")),
    # LowRankGradLinear layers: the loaded optimizer must publish its projections again (step 5 is no
    # refresh, so R comes from the layers)
    "galore-lowrank-grad-layers": Resume(
        lambda m: make_galore(m, gap=3),
        model=lambda seed=0: lowrank_grad_model(tiny_model(seed)),
        first_resumed_ops={"fastgrad.lowrank_grad": N_LOWRANK},
    ),
    "galore8bit-svd": Resume(lambda m: make_galore8(m, gap=3)),
    "galore8bit-dct-transfer": Resume(
        lambda m: make_galore8(m, gap=3, group_kwargs={"projector": "dct", "state_transfer": True})
    ),
    "adamw8bit": Resume(make_adamw8bit),
    **{
        flavour: Resume(lambda m, f=flavour: FIRA_APOLLO[f](m, gap=3), check_saved=_has_limiter_norm)
        for flavour in ("fira", "fira-paper", "apollo", "apollo-svd", "apollo-mini")
    },
    # cos_threshold 0 and queue 2: T grows from the 4th refresh on, so T, the queue and a pending
    # decision are all in the checkpoint at step 5
    "qgalore": Resume(
        lambda m: make_qgalore(m, gap=1, queue_size=2, cos_threshold=0.0),
        model=quantized_model,
        check_saved=_interval_has_grown,
    ),
    "qgalore8bit": Resume(make_qgalore8, model=quantized_model),
    "frugal": Resume(lambda m: make_frugal(m, gap=2)),
    "frugal-block": Resume(lambda m: make_frugal_block(m, lr=3e-3, update_proj_gap=3, block_order="random")),
    "muon": Resume(make_muon),
    "galore-muon": Resume(make_galore_muon),
    "qgalore-muon": Resume(
        lambda m: make_qgalore_muon(m, gap=1, queue_size=2, cos_threshold=0.0), model=quantized_model
    ),
    "muon8bit": Resume(make_muon8, check_saved=_has_8bit_momentum),
}
STEPS, SAVED_AT = 9, 5  # a refresh at step 6 (T = 3) after the checkpoint


@pytest.mark.parametrize("case", list(RESUME))
def test_a_step_vouched_finite_trains_exactly_like_a_checked_one(case):
    """``step(grads_finite=True)`` (fastgrad pretrain's call after a finite clipped norm) skips the
    finiteness check and nothing else: with finite gradients the training is bitwise that of
    ``step()``, across refreshes (state transfer, FRUGAL's statistics reset and the 8-bit moments'
    transfer, which read whether the step refreshed)."""
    c = RESUME[case]
    batches = token_batches(7)
    runs = []
    for grads_finite in (False, True):
        model = c.model()
        opt = c.make(model)
        for ids in batches:
            opt.zero_grad(set_to_none=True)
            model(ids, ids).backward()
            opt.step(grads_finite=grads_finite)
        runs.append((model, opt))
    (checked, opt_c), (vouched, opt_v) = runs
    for (name, a), b in zip(checked.state_dict().items(), vouched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    saved_c, saved_v = opt_c.state_dict()["state"], opt_v.state_dict()["state"]
    assert saved_c.keys() == saved_v.keys()
    for index, state in saved_c.items():
        assert_same_state(saved_v[index], state)


def _train_counting_ops(model, opt, batches):
    """``train``, also returning the ops each step (forward, backward and optimizer) dispatched."""
    losses, ops = [], []
    for ids in batches:
        with OpCounter() as counter:
            losses += train(model, opt, [ids])
        ops.append(counter.calls)
    return losses, ops


@pytest.mark.parametrize("case", list(RESUME))
def test_state_dict_resume_is_exact(case):
    c = RESUME[case]
    batches = token_batches(STEPS)
    model = c.model()
    losses, ops = _train_counting_ops(model, c.make(model), batches)

    first = c.model()
    opt1 = c.make(first)
    train(first, opt1, batches[:SAVED_AT])
    saved = roundtrip({"model": first.state_dict(), "opt": opt1.state_dict()})
    _tensors_and_ints_only(saved["opt"])
    if c.check_saved is not None:
        c.check_saved(saved["opt"])

    resumed = c.model(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = c.make(resumed)
    opt2.load_state_dict(saved["opt"])
    resumed_losses, resumed_ops = _train_counting_ops(resumed, opt2, batches[SAVED_AT:])
    assert resumed_losses == losses[SAVED_AT:]
    assert resumed_ops == ops[SAVED_AT:]  # the same work: no projection lost, nothing recomputed
    for op, calls in c.first_resumed_ops.items():
        assert resumed_ops[0][op] == calls, op
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for layer in resumed.modules():
        if isinstance(layer, QLinear):
            assert qlinear_of(layer.weight) is layer


# The constructors that take their class's keyword options through one shared signature
# (fastgrad.optim.base.options_signature): what inspect.signature shows, and Python's TypeError.
OPTIONS = {
    optim.FiraAdamW: {"variant": "code"},
    optim.Apollo: {"scale_front": False, "disable_nl": False, "index_offset": 0},
    optim.Frugal: {"density": 0.25, "reset_statistics": True, "inactive_update_rule": "sign_sgd",
                   "inactive_lr_scale": 1.0},
    optim.FrugalBlock: {"density": 0.25, "update_proj_gap": 200, "block_order": "descending",
                        "inactive_update_rule": "sign_sgd", "inactive_lr_scale": 1.0, "seed": 0},
}  # fmt: skip


@pytest.mark.parametrize("cls", list(OPTIONS), ids=lambda c: c.__name__)
def test_declared_options_show_in_the_signature_and_unknown_ones_are_refused(cls):
    params = inspect.signature(cls).parameters
    assert list(params)[:5] == ["params", "lr", "betas", "eps", "weight_decay"]
    declared = {k: q.default for k, q in params.items() if k in OPTIONS[cls]}
    assert declared == OPTIONS[cls]
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in declared)
    assert list(params)[-1] == "nonfinite"
    weight = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="unexpected keyword argument 'rnak'"):
        cls([weight], rnak=2)
