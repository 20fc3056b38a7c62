"""FiraAdamW, Apollo and ApolloMini: fira 1.0.2 equivalence, the formulas against direct computations,
seeds, regenerated projections, the state-memory formula, fast path, the limiter norm in bf16
checkpoints, a limiter without host synchronisation, and convergence on a tiny model. Exact resume
and the NaN/Inf policy are tested for every optimizer in test_optim_common."""

import copy
import itertools
import math

import pytest
import torch
from conftest import assert_close_report
from optim_common import (
    CONFIG,
    FIRA_APOLLO,
    N_LOWRANK,
    adam_bytes,
    make_apollo,
    make_fira,
    roundtrip,
    step_op_counts,
    tiny_model,
    token_batches,
    train,
)
from torch.utils._python_dispatch import TorchDispatchMode

from fastgrad.optim import Apollo, ApolloMini, FiraAdamW, galore_param_groups, make_projector
from fastgrad.optim.projectors import LEFT, RIGHT

pytestmark = pytest.mark.usefixtures("single_thread")

BETAS, EPS = (0.9, 0.999), 1e-6


# ------------------------------------------------------------------------------------------------
# FiraAdamW(variant="code", faithful=True) == fira 1.0.2
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fira_code_faithful_matches_fira():
    import fira

    steps, gap = 50, 20
    ours_model = tiny_model()
    ref_model = copy.deepcopy(ours_model)
    ours = make_fira(ours_model, gap=gap, variant="code", faithful=True)
    ref_groups = galore_param_groups(ref_model, rank=16, update_proj_gap=gap, scale=0.25)
    ref_groups[0]["alpha"] = ref_groups[0].pop("scale")  # fira's key names
    ref_groups[0]["proj_type"] = "std"
    ref = fira.FiraAdamW(ref_groups, lr=3e-3, weight_decay=0.1)
    lowrank = ref_groups[0]["params"]
    assert {(160, 64), (64, 160)} <= {tuple(p.shape) for p in lowrank}  # tall and wide weights
    ours_lowrank = dict(zip(lowrank, ours.param_groups[0]["params"], strict=True))

    limited = 0
    for step, ids in enumerate(token_batches(steps)):
        prev = {p: ref.state[p]["scaling_grad"].clone() for p in lowrank if "scaling_grad" in ref.state[p]}
        train(ours_model, ours, [ids])
        train(ref_model, ref, [ids])
        for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
            assert_close_report(a.detach(), b.detach(), 1e-5, f"step {step} {name}")
        for p in lowrank:
            new = ref.state[p]["scaling_grad"]
            ours_norm = ours.state[ours_lowrank[p]]["limiter_norm"]
            assert_close_report(ours_norm, new, 1e-5, f"step {step} limiter norm")
            # the limiter clipped iff the remembered norm is exactly γ·(s_prev + 1e-8)
            if p in prev and torch.isclose(new, 1.01 * (prev[p] + 1e-8), rtol=1e-6, atol=0.0):
                limited += 1
    assert limited >= 1, "the norm-growth limiter never activated in the comparison run"
    refreshes = {st["proj_step"] for st in ours.state.values() if "proj_step" in st}
    assert refreshes == {40} and steps // gap >= 2  # refreshed at steps 0, 20, 40


# ------------------------------------------------------------------------------------------------
# formulas against direct computations (fp64) on small matrices
# ------------------------------------------------------------------------------------------------


def _down(g, p, side):
    return g @ p.t() if side == RIGHT else p.t() @ g


def _up(x, p, side):
    return x @ p if side == RIGHT else p @ x


def _channel_norms(x, side):
    return x.norm(dim=1, keepdim=True) if side == RIGHT else x.norm(dim=0, keepdim=True)


def _limit(norm, prev, gamma=1.01):
    """(ρ, new remembered norm) of the norm-growth limiter; ρ = None on the first step."""
    if prev is None:
        return None, norm
    rho = max(norm / (prev + 1e-8), gamma) / gamma
    return rho, norm / rho


def _grads(m, n, seed):
    """G1, G1 + small noise (the Adam-normalised update grows: the limiter clips), then a new G."""
    gen = torch.Generator().manual_seed(seed)
    g1 = torch.randn(m, n, generator=gen)
    return [g1, g1 + 0.1 * torch.randn(m, n, generator=gen), 2.0 * torch.randn(m, n, generator=gen)]


def _projected_adam(grads, p, side):
    """Per step t (from 1): G and R = down(G) in fp64 and Adam's N = M/(√V + ε) of R (no bias correction)."""
    mom = vel = 0.0
    for t, g in enumerate(grads, start=1):
        g = g.double()
        r = _down(g, p, side)
        mom = BETAS[0] * mom + (1 - BETAS[0]) * r
        vel = BETAS[1] * vel + (1 - BETAS[1]) * r * r
        yield t, g, r, mom / (vel.sqrt() + EPS)


def _run(opt, w, grads):
    for g in grads:
        w.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize(("m", "n"), [(40, 24), (24, 40)])
def test_fira_formula(variant, m, n):
    lr, wd, alpha, rank = 0.05, 0.1, 0.25, 6
    grads = _grads(m, n, seed=m + 3 * n)
    w = torch.nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(7)))
    w0 = w.detach().double().clone()
    opt = FiraAdamW(
        [{"params": [w], "rank": rank, "update_proj_gap": 100, "alpha": alpha}], lr=lr, weight_decay=wd, variant=variant
    )
    _run(opt, w, grads)
    st = opt.state[w]
    side = st["proj_side"]
    assert side == (RIGHT if m >= n else LEFT)
    p = st["proj"].double()  # the SVD basis of G1 (tested in test_optim_galore), kept: T = 100

    wexp, prev, rhos = w0, None, []
    for t, g, r, nrm in _projected_adam(grads, p, side):
        phi = _channel_norms(nrm, side) / (_channel_norms(r, side) + 1e-8)
        c = alpha if variant == "code" else 1.0
        s = (g - c * _up(r, p, side)) * phi
        rho, prev = _limit(float(s.norm()), prev)
        rhos.append(rho)
        if rho is not None:
            s = s / rho
        u = alpha * _up(nrm, p, side) + s if variant == "code" else alpha * (_up(nrm, p, side) + s)
        eta = lr * math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)
        wexp = wexp * (1 - lr * wd) - eta * u  # torch-style decay first (default, faithful=False)
    assert rhos[0] is None and rhos[1] > 1.05  # recorded, then clipped
    assert_close_report(w.detach(), wexp, 1e-5, f"Fira {variant} weight after 3 steps")
    assert_close_report(st["limiter_norm"], torch.tensor(prev), 1e-5, "remembered norm")
    assert st["limiter_norm"].dtype == torch.float32 and st["limiter_norm"].dim() == 0

    # the other variant is measurably different on the same data
    w2 = torch.nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(7)))
    other = "paper" if variant == "code" else "code"
    group2 = {"params": [w2], "rank": rank, "update_proj_gap": 100, "alpha": alpha}
    _run(FiraAdamW([group2], lr=lr, weight_decay=wd, variant=other), w2, grads)
    assert (w2.detach() - w.detach()).abs().max() > 1e-3


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize(("m", "n"), [(40, 24), (24, 40)])
@pytest.mark.parametrize(("scale_front", "disable_nl"), [(False, False), (True, False), (False, True)])
def test_apollo_formula(scale_type, m, n, scale_front, disable_nl):
    lr, wd, alpha, rank = 0.05, 0.1, 4.0, 5
    grads = _grads(m, n, seed=m + 5 * n)
    w = torch.nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(7)))
    w0 = w.detach().double().clone()
    group = {"params": [w], "rank": rank, "update_proj_gap": 100, "scale": alpha, "scale_type": scale_type}
    opt = Apollo([group], lr=lr, weight_decay=wd, scale_front=scale_front, disable_nl=disable_nl)
    _run(opt, w, grads)
    st = opt.state[w]
    side = st["proj_side"]
    assert side == (RIGHT if m >= n else LEFT)
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 2 and v.numel() == rank * min(m, n) for v in st.values())
    p = make_projector("random").matrix(st, w.grad).double()  # regenerated from (seed, step 0)
    assert p.shape == ((rank, n) if side == RIGHT else (m, rank))

    wexp, prev, rhos = w0, None, []
    sqa = math.sqrt(alpha)  # AP-4: the scale enters as its square root
    for t, g, r, nrm in _projected_adam(grads, p, side):
        if scale_type == "channel":  # rows if m ≥ n, columns if m < n
            s = _channel_norms(nrm, side) / (_channel_norms(r, side) + 1e-8)
            assert s.shape == ((m, 1) if m >= n else (1, n))
        else:
            s = nrm.norm() / (r.norm() + 1e-8)
        u = g * s
        if scale_front:
            u = u * sqa
        if not disable_nl:
            rho, prev = _limit(float(u.norm()), prev)
            rhos.append(rho)
            if rho is not None:
                u = u / rho
        if not scale_front:
            u = u * sqa
        eta = lr * math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)
        wexp = wexp * (1 - lr * wd) - eta * u
    assert_close_report(w.detach(), wexp, 1e-5, f"APOLLO {scale_type} weight after 3 steps")
    if disable_nl:
        assert "limiter_norm" not in st
    else:
        assert rhos[0] is None and rhos[1] > 1.05  # recorded, then clipped
        # with scale_front the remembered norm includes √α (a factor 2 here)
        assert_close_report(st["limiter_norm"], torch.tensor(prev), 1e-5, "remembered norm")


def test_apollo_faithful_decays_after_the_update():
    grads = _grads(30, 20, seed=0)[:1]
    results = {}
    for faithful in (False, True):
        w = torch.nn.Parameter(torch.ones(30, 20))
        group = {"params": [w], "rank": 4, "scale_type": "tensor"}
        _run(Apollo([group], lr=0.1, weight_decay=0.5, faithful=faithful), w, grads)
        results[faithful] = w.detach().clone()
    # W1 = W0(1 − lr·wd) − ηU  vs  W1 = (W0 − ηU)(1 − lr·wd): they differ by lr·wd·ηU
    w_torch, w_hf = results[False], results[True]
    update = 0.95 - w_torch  # ηU, with W0 = 1 and 1 − lr·wd = 0.95
    assert_close_report(w_hf, (torch.ones(30, 20) - update) * 0.95, 1e-5, "HF-style decay")


def test_apollo_mini_defaults():
    model = tiny_model()
    opt = make_apollo(model, rank=1, cls=ApolloMini)
    group = opt.param_groups[0]
    assert (group["rank"], group["scale"], group["scale_type"], group["projector"]) == (1, 128.0, "tensor", "random")
    apollo_group = make_apollo(tiny_model()).param_groups[0]
    assert (apollo_group["scale"], apollo_group["scale_type"]) == (1.0, "channel")
    # the Mini update is scaled by √128
    w = torch.nn.Parameter(torch.zeros(12, 8))
    w2 = torch.nn.Parameter(torch.zeros(12, 8))
    g = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    _run(ApolloMini([{"params": [w], "rank": 1}], lr=0.1), w, [g])
    _run(Apollo([{"params": [w2], "rank": 1, "scale_type": "tensor", "scale": 1.0}], lr=0.1), w2, [g])
    assert_close_report(w.detach(), w2.detach() * math.sqrt(128), 1e-6, "√128 scaling")


# ------------------------------------------------------------------------------------------------
# seeds and the regenerated projection (AP-2, AP-3)
# ------------------------------------------------------------------------------------------------


def _random_p(opt, p):
    return make_projector("random").matrix(opt.state[p], p.grad)


def test_apollo_seeds_differ_across_parameters_and_instances():
    model = tiny_model()
    ids = token_batches(1)[0]
    model(ids, ids).backward()
    opt = make_apollo(model)
    opt.step()
    lowrank = opt.param_groups[0]["params"]
    seeds = [opt.state[p]["proj_seed"] for p in lowrank]
    assert len(set(seeds)) == N_LOWRANK

    # layer-wise: one optimizer per parameter, several same-shaped weights (q, k, v, o: 64×64)
    named = [(n, p) for n, p in model.named_parameters() if "self_attn" in n]
    assert len({tuple(p.shape) for _, p in named}) == 1 and len(named) == 8
    for how in ("names", "index_offset", "group seed"):
        per_param = []
        for i, (name, p) in enumerate(named):
            if how == "names":
                o = Apollo([{"params": [(name, p)], "rank": 8}])
            elif how == "index_offset":
                o = Apollo([{"params": [p], "rank": 8}], index_offset=i)
            else:
                o = Apollo([{"params": [p], "rank": 8, "seed": 1000 + i}])
            o.step()
            per_param.append((o.state[p]["proj_seed"], _random_p(o, p)))
        assert len({s for s, _ in per_param}) == len(named), how
        for (_, a), (_, b) in itertools.combinations(per_param, 2):
            assert not torch.equal(a, b), how
    # names make the seed independent of the optimizer layout: same name, same seed
    name, p = named[3]
    a = Apollo([{"params": [(name, p)], "rank": 8}])
    b = Apollo([{"params": [(n, q) for n, q in named], "rank": 8}])
    a.step()
    b.step()
    assert a.state[p]["proj_seed"] == b.state[p]["proj_seed"]


def test_apollo_projection_regenerated_identically_after_load():
    model = tiny_model()
    opt = make_apollo(model, gap=3)
    train(model, opt, token_batches(4))  # refreshed at steps 0 and 3
    before = {id(p): _random_p(opt, p) for p in opt.param_groups[0]["params"]}

    resumed = tiny_model(seed=5)
    resumed.load_state_dict(model.state_dict())
    opt2 = make_apollo(resumed, gap=3)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        if id(p) in before:
            q.grad = p.grad.clone()
            assert opt2.state[q]["proj_step"] == 3
            assert torch.equal(_random_p(opt2, q), before[id(p)]), name


@pytest.mark.parametrize("flavour", ["fira", "apollo", "apollo-svd", "apollo-mini"])
def test_state_bytes_matches_formula(flavour):
    model = tiny_model()
    opt = FIRA_APOLLO[flavour](model)
    train(model, opt, token_batches(2))
    stores_p = flavour in ("fira", "apollo-svd")
    if not stores_p:
        assert not any("proj" in opt.state[p] for p in opt.param_groups[0]["params"])
    # moments + fp32 limiter norm + P
    expected = adam_bytes(opt, model, lambda p, r, d, b: 4 + (r * d * b if stores_p else 0))
    assert opt.state_bytes() == expected


# ------------------------------------------------------------------------------------------------
# fast path, host synchronisation
# ------------------------------------------------------------------------------------------------


class NoHostSync(TorchDispatchMode):
    """Fails on a device→host read of a tensor value (``.item()``, ``bool(t)``, ``float(t)``,
    a Python comparison of a 0-d tensor): all of them dispatch ``aten._local_scalar_dense``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._local_scalar_dense:
            raise AssertionError("host synchronisation (_local_scalar_dense)")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("flavour", ["fira", "apollo", "apollo-mini"])
def test_step_runs_through_fastgrad_ops(flavour):
    model = tiny_model()
    opt = FIRA_APOLLO[flavour](model, gap=2)
    for calls in step_op_counts(model, opt, token_batches(3)):  # steps 0 (refresh), 1, 2 (refresh)
        assert calls["fastgrad.lowrank_project"] == N_LOWRANK
        back = calls["fastgrad.lowrank_project_back_add_"] + calls["fastgrad.lowrank_project_back"]
        # Fira: −α·up(R) into the residual buffer and α·up(N) into W; APOLLO has no up-projection
        assert back == (2 * N_LOWRANK if flavour == "fira" else 0)


def test_no_host_sync_detector_works():
    """The detector catches the references' limiter (a Python max() over a device scalar)."""
    norm, prev = torch.tensor(3.0), torch.tensor(1.0)
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        max(norm / (prev + 1e-8), 1.01)


@pytest.mark.parametrize("flavour", ["fira", "fira-paper", "apollo", "apollo-mini"])
def test_limiter_and_update_do_not_synchronise(flavour):
    model = tiny_model()
    opt = FIRA_APOLLO[flavour](model, gap=20)
    batches = token_batches(4)
    train(model, opt, batches[:1])  # step 0: refresh (reads G once on the host) and first limiter norm
    before = {p: st["limiter_norm"].clone() for p, st in opt.state.items() if "limiter_norm" in st}
    assert len(before) == N_LOWRANK
    for ids in batches[1:]:  # no refresh: projection, moments, φ/s, limiter and update only
        opt.zero_grad()
        model(ids, ids).backward()
        with NoHostSync():
            opt.step()
    assert any(not torch.equal(opt.state[p]["limiter_norm"], v) for p, v in before.items())


# ------------------------------------------------------------------------------------------------
# checkpoints (exact resume: test_optim_common)
# ------------------------------------------------------------------------------------------------


def test_limiter_norm_stays_fp32_on_load_for_bf16_weights():
    w = torch.nn.Parameter(torch.randn(24, 16, dtype=torch.bfloat16))
    opt = Apollo([{"params": [w], "rank": 4}])
    _run(opt, w, [torch.randn(24, 16).bfloat16()])
    assert opt.state[w]["limiter_norm"].dtype == torch.float32
    opt2 = Apollo([{"params": [w], "rank": 4}])
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    assert torch.equal(opt2.state[w]["limiter_norm"], opt.state[w]["limiter_norm"])
    assert opt2.state[w]["exp_avg"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# convergence, param groups, bad input
# ------------------------------------------------------------------------------------------------


def pattern_batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    """Random-but-learnable data: one random 8-token pattern, repeated, at a random phase per row."""
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, CONFIG["vocab_size"], (8,), generator=gen)
    return [pattern[(torch.arange(33) + torch.randint(0, 8, (4, 1), generator=gen)) % 8] for _ in range(n)]


@pytest.mark.parametrize("flavour", ["fira", "fira-paper", "apollo", "apollo-mini"])
def test_loss_decreases(flavour):
    model = tiny_model()
    opt = FIRA_APOLLO[flavour](model, gap=10, lr=1e-2, weight_decay=0.0)
    losses = train(model, opt, pattern_batches(30))
    assert losses[0] > 5.0  # ≈ ln 256
    assert sum(losses[-5:]) / 5 < 0.25 * losses[0], losses


def test_bad_groups_are_rejected():
    w = torch.nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(ValueError, match="orthonormal"):
        FiraAdamW([{"params": [w], "rank": 2, "projector": "random"}])
    with pytest.raises(ValueError, match="variant"):
        FiraAdamW([{"params": [w], "rank": 2}], variant="alg1")
    with pytest.raises(ValueError, match="alpha"):
        FiraAdamW([{"params": [w], "rank": 2, "alpha": 0.5, "scale": 0.25}])
    with pytest.raises(ValueError, match="state_transfer"):
        FiraAdamW([{"params": [w], "rank": 2, "state_transfer": True}], faithful=True)
    with pytest.raises(ValueError, match="scale_type"):
        Apollo([{"params": [w], "rank": 2, "scale_type": "row"}])
    with pytest.raises(ValueError, match="scale"):
        Apollo([{"params": [w], "rank": 2, "scale": -1.0}])
    with pytest.raises(ValueError, match="contradicts"):
        Apollo([{"params": [w], "rank": 2, "proj": "svd", "projector": "random"}])
    with pytest.raises(ValueError, match="state_transfer"):
        Apollo([{"params": [w], "rank": 2, "state_transfer": True}])  # random P is not orthonormal
    with pytest.raises(ValueError, match="index_offset"):
        Apollo([w], index_offset=-1)
    assert Apollo([{"params": [w], "rank": 2, "proj": "svd"}]).param_groups[0]["projector"] == "svd"
    assert FiraAdamW([{"params": [w], "rank": 2, "alpha": 0.5}]).param_groups[0]["scale"] == 0.5
