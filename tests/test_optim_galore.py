"""GaLoreAdamW and the projectors: galore-torch 1.0 equivalence, default-mode semantics, fast path,
checkpoint mismatches, projector quality and the state-memory formula. Exact resume and the NaN/Inf
policy are tested for every optimizer in test_optim_common."""

import copy
import math

import pytest
import torch
from conftest import assert_close_report
from optim_common import CONFIG, N_LOWRANK, adam_bytes, roundtrip, step_op_counts, tiny_model, token_batches, train
from optim_common import make_galore as make_opt

from fastgrad.models import LlamaConfig, LlamaForCausalLM
from fastgrad.ops import lowrank_project, lowrank_project_back
from fastgrad.optim import GaLoreAdamW, galore_param_groups, make_projector, transfer_moments
from fastgrad.optim.projectors import LEFT, RIGHT, dct_basis

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------
# faithful mode == galore-torch 1.0
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("proj_type", "steps", "gap"), [("std", 50, 20), ("reverse_std", 25, 10)])
def test_faithful_matches_galore_torch(proj_type, steps, gap):
    import galore_torch

    ours_model = tiny_model()
    ref_model = copy.deepcopy(ours_model)
    ours = make_opt(ours_model, gap=gap, proj_side=proj_type, opt_kwargs={"faithful": True})
    ref_groups = galore_param_groups(ref_model, rank=16, update_proj_gap=gap, scale=0.25, proj_type=proj_type)
    ref = galore_torch.GaLoreAdamW(ref_groups, lr=3e-3, weight_decay=0.1)
    shapes = {tuple(p.shape) for p in ref_groups[0]["params"]}
    assert (160, 64) in shapes and (64, 160) in shapes  # tall and wide weights
    for step, ids in enumerate(token_batches(steps)):
        train(ours_model, ours, [ids])
        train(ref_model, ref, [ids])
        for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
            assert_close_report(a.detach(), b.detach(), 1e-5, f"step {step} {name}")
    refreshes = {st["proj_step"] for st in ours.state.values() if "proj_step" in st}
    assert refreshes == {(steps - 1) // gap * gap}
    assert steps // gap >= 2  # at least two refreshes after the first projector


# ------------------------------------------------------------------------------------------------
# default mode: documented differences
# ------------------------------------------------------------------------------------------------


def _one_step_expected(w0, g, *, side, rank, lr, wd, scale, faithful, beta=(0.9, 0.999), eps=1e-6):
    """Hand-written first GaLore step (t = 1) with the SVD basis."""
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    if side == LEFT:
        p = u[:, :rank]
        low = p.t() @ g
        up = lambda x: p @ x
    else:
        p = vh[:rank]
        low = g @ p.t()
        up = lambda x: x @ p
    m = (1 - beta[0]) * low
    v = (1 - beta[1]) * low * low
    eta = lr * math.sqrt(1 - beta[1]) / (1 - beta[0])
    update = eta * scale * up(m / (v.sqrt() + eps))
    if faithful:
        w1 = w0 - update
        return w1 - lr * wd * w1
    return w0 * (1 - lr * wd) - update


@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize(("m", "n"), [(40, 24), (24, 40)])
def test_weight_decay_order(faithful, m, n):
    gen = torch.Generator().manual_seed(m * n)
    w = torch.nn.Parameter(torch.randn(m, n, generator=gen))
    w.grad = torch.randn(m, n, generator=gen)
    w0, g = w.detach().clone(), w.grad.clone()
    opt = GaLoreAdamW(
        [{"params": [w], "rank": 6, "update_proj_gap": 5, "scale": 0.5}], lr=0.1, weight_decay=0.5, faithful=faithful
    )
    opt.step()
    side = RIGHT if m >= n else LEFT
    expected = _one_step_expected(w0, g, side=side, rank=6, lr=0.1, wd=0.5, scale=0.5, faithful=faithful)
    other = _one_step_expected(w0, g, side=side, rank=6, lr=0.1, wd=0.5, scale=0.5, faithful=not faithful)
    assert_close_report(w.detach(), expected, 1e-6, "weight after one step")
    assert (w.detach() - other).abs().max() > 1e-3  # the two orders are distinguishable here


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_side_is_remembered():
    """GaLore-6: reverse_std on a wide weight with r ≥ m. galore-torch re-guesses the side from the
    (square) low-rank shape and fails; the remembered side back-projects on the right."""
    import galore_torch

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(32, 96, generator=gen)
    group = {"rank": 48, "update_proj_gap": 2, "scale": 1.0, "proj_type": "reverse_std"}
    ref_w = torch.nn.Parameter(torch.zeros(32, 96))
    ref_w.grad = g.clone()
    with pytest.raises(RuntimeError):
        galore_torch.GaLoreAdamW([{"params": [ref_w], **group}], lr=0.1).step()

    w = torch.nn.Parameter(torch.zeros(32, 96))
    opt = GaLoreAdamW([{"params": [w], **group}], lr=0.1)
    for k in range(5):  # crosses refreshes at k = 0, 2, 4
        w.grad = g * (k + 1)
        opt.step()
        st = opt.state[w]
        assert st["proj_side"] == RIGHT and st["proj_rank"] == 32
        assert st["proj"].shape == (32, 96) and st["exp_avg"].shape == (32, 32)
    w1 = torch.nn.Parameter(torch.zeros(32, 96))
    w1.grad = g.clone()
    GaLoreAdamW([{"params": [w1], **group}], lr=0.1).step()
    expected = _one_step_expected(
        torch.zeros(32, 96), g, side=RIGHT, rank=32, lr=0.1, wd=0.0, scale=1.0, faithful=False
    )
    assert_close_report(w1.detach(), expected, 1e-5, "reverse_std wide step")

    # a forced side is honoured for any shape
    w2 = torch.nn.Parameter(torch.zeros(96, 32))
    w2.grad = g.t().contiguous()
    opt2 = GaLoreAdamW([{"params": [w2], "rank": 8, "proj_side": "left"}])
    opt2.step()
    assert opt2.state[w2]["proj"].shape == (96, 8) and opt2.state[w2]["exp_avg"].shape == (8, 32)


def test_state_transfer_reexpresses_moments():
    gen = torch.Generator().manual_seed(0)
    p_old = torch.linalg.qr(torch.randn(50, 6, generator=gen)).Q.t().contiguous()  # right side: 6×50
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    first, second = torch.randn(20, 6, generator=gen), torch.rand(20, 6, generator=gen)
    m, v = first.clone(), second.clone()
    transfer_moments(m, v, p_old, p_old[perm].contiguous(), RIGHT)
    assert_close_report(m, first[:, perm], 1e-6, "permuted M")
    assert_close_report(v, second[:, perm], 1e-6, "permuted V")
    # general case, left side: M' are the new-basis coordinates of up(M)
    q_old = torch.linalg.qr(torch.randn(30, 5, generator=gen)).Q
    q_new = torch.linalg.qr(torch.randn(30, 5, generator=gen)).Q
    first, second = torch.randn(5, 12, generator=gen), torch.rand(5, 12, generator=gen)
    m, v = first.clone(), second.clone()
    transfer_moments(m, v, q_old, q_new, LEFT)
    assert_close_report(m, q_new.t() @ (q_old @ first), 1e-5, "left M")
    assert (v >= 0).all()


# ------------------------------------------------------------------------------------------------
# the fast path runs: fastgrad ops, counted at the dispatcher
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector", ["svd", "dct"])
def test_step_runs_through_fastgrad_ops(projector):
    model = tiny_model()
    opt = make_opt(model, gap=2, projector=projector)
    for calls in step_op_counts(model, opt, token_batches(3)):  # steps 0 (refresh), 1, 2 (refresh)
        assert calls["fastgrad.lowrank_project"] == N_LOWRANK
        # moments, N, back-projection and decay in one fused op per weight, straight into W
        assert calls["fastgrad.galore_adam_step_"] == N_LOWRANK
        assert calls["fastgrad.lowrank_project_back_add_"] == 0


# ------------------------------------------------------------------------------------------------
# checkpoints (exact resume: test_optim_common)
# ------------------------------------------------------------------------------------------------


def test_load_state_dict_mismatch_is_a_clear_error():
    model = tiny_model()
    opt = make_opt(model)
    train(model, opt, token_batches(1))
    saved = roundtrip(opt.state_dict())

    with pytest.raises(ValueError, match="rank=16.*rank=8"):
        make_opt(tiny_model(), rank=8).load_state_dict(saved)
    with pytest.raises(ValueError, match="projector"):
        make_opt(tiny_model(), projector="dct").load_state_dict(saved)

    other = LlamaForCausalLM(LlamaConfig(**{**CONFIG, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"exp_avg' has shape \(160, 16\), expected \(128, 16\)"):
        make_opt(other).load_state_dict(saved)
    bigger_vocab = LlamaForCausalLM(LlamaConfig(**{**CONFIG, "vocab_size": 300}))
    with pytest.raises(ValueError, match="different model or rank"):
        make_opt(bigger_vocab).load_state_dict(saved)
    with pytest.raises(ValueError, match="param groups"):
        GaLoreAdamW(tiny_model().parameters()).load_state_dict(saved)


# ------------------------------------------------------------------------------------------------
# projectors
# ------------------------------------------------------------------------------------------------


def _basis(projector, g, rank, side, seed=0, step=0):
    proj = make_projector(projector)
    state = {}
    proj.init_state(state, g.shape, rank, side, seed)
    low = proj.refresh(state, g, step)
    return proj, state, low


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of a and b (orthonormal rows)."""
    return float((a @ b.t()).square().sum() / a.shape[0])


def test_randomized_projector_matches_svd_subspace():
    # (1) real gradients of the tiny model, every targeted weight (tall, square and wide)
    model = tiny_model()
    ids = token_batches(1)[0]
    model(ids, ids).backward()
    for name, p in model.named_parameters():
        if p.dim() != 2 or not any(k in name for k in ("attn", "mlp")):
            continue
        side = RIGHT if p.shape[0] >= p.shape[1] else LEFT
        _, exact, _ = _basis("svd", p.grad, 16, side)
        _, approx, _ = _basis("randomized", p.grad, 16, side, seed=7)
        a, b = (exact["proj"], approx["proj"]) if side == RIGHT else (exact["proj"].t(), approx["proj"].t())
        assert _overlap(a, b) >= 0.9, name
        assert_close_report(b @ b.t(), torch.eye(16), 1e-5, "orthonormal basis")
    # (2) synthetic rank-24 signal with a decaying spectrum plus noise
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(300, 24, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(200, 24, generator=gen)).Q
    g = u @ torch.diag(0.8 ** torch.arange(24.0)) @ v.t() + 1e-3 * torch.randn(300, 200, generator=gen)
    _, exact, _ = _basis("svd", g, 16, RIGHT)
    _, approx, _ = _basis("randomized", g, 16, RIGHT, seed=3)
    assert _overlap(exact["proj"], approx["proj"]) >= 0.99
    # deterministic in (seed, step)
    _, again, _ = _basis("randomized", g, 16, RIGHT, seed=3)
    assert torch.equal(approx["proj"], again["proj"])


@pytest.mark.parametrize(("m", "n"), [(48, 32), (32, 48)])
def test_dct_projector_selects_top_l1_columns(m, n):
    gen = torch.Generator().manual_seed(m)
    g = torch.randn(m, n, generator=gen) * torch.linspace(0.1, 3.0, n) + torch.randn(m, 1, generator=gen)
    side = RIGHT if m >= n else LEFT
    s = min(m, n)
    rank = 6
    # the DCT-II matrix from its textbook formula
    k = torch.arange(s, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(s, dtype=torch.float64).unsqueeze(0)
    basis = torch.cos(math.pi * k * (2 * j + 1) / (2 * s)) * math.sqrt(2 / s)
    basis[0] /= math.sqrt(2)
    assert_close_report(dct_basis(s, torch.float32, "cpu"), basis.float(), 1e-6, "DCT basis")
    assert_close_report(basis @ basis.t(), torch.eye(s, dtype=torch.float64), 1e-12, "orthonormal")

    proj, state, low = _basis("dct", g, rank, side)
    coeffs = g.double() @ basis.t() if side == RIGHT else basis @ g.double()  # all s coefficients
    score = coeffs.abs().sum(dim=0 if side == RIGHT else 1)
    idx = state["proj_idx"]
    assert idx.dtype == torch.int32 and idx.shape == (rank,)
    assert "proj" not in state  # only the indices are stored
    assert set(idx.tolist()) == set(score.topk(rank).indices.tolist())
    assert idx.tolist() == sorted(idx.tolist())

    p = proj.matrix(state, g)
    side_name = "right" if side == RIGHT else "left"
    expected_p = basis[idx.long()] if side == RIGHT else basis[idx.long()].t()
    assert_close_report(p, expected_p.float(), 1e-6, "selected basis")
    assert_close_report(low, lowrank_project(g, p, side_name), 1e-5, "refresh low-rank == projection")
    x = torch.randn(low.shape, generator=gen)
    back = lowrank_project_back(x, p, side_name, 1.0)
    expected_back = x.double() @ expected_p if side == RIGHT else expected_p @ x.double()
    assert_close_report(back, expected_back.float(), 1e-5, "back-projection")
    assert_close_report(lowrank_project(back, p, side_name), x, 1e-5, "down(up(X)) == X")


def test_random_projector_is_regenerated_not_stored():
    g = torch.randn(400, 300)
    proj, state, low = _basis("random", g, 8, RIGHT, seed=5, step=3)
    assert low is None and not any(isinstance(v, torch.Tensor) for v in state.values())
    p1, p2 = proj.matrix(state, g), proj.matrix(state, g)
    assert torch.equal(p1, p2) and p1.shape == (8, 300)
    assert abs(p1.var().item() * 8 - 1.0) < 0.15  # N(0, 1/r) entries (2400 draws: 5 standard errors)
    _, other, _ = _basis("random", g, 8, RIGHT, seed=5, step=6)
    assert not torch.equal(proj.matrix(other, g), p1)  # a new draw at each refresh


# ------------------------------------------------------------------------------------------------
# memory formula, param groups, bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector", ["svd", "randomized", "dct", "random"])
def test_state_bytes_matches_formula(projector):
    model = tiny_model()
    rank = 16
    opt = make_opt(model, rank=rank, projector=projector)
    train(model, opt, token_batches(1))
    proj_bytes = {"svd": lambda r, d, b: r * d * b, "randomized": lambda r, d, b: r * d * b}
    proj_bytes |= {"dct": lambda r, d, b: 4 * r, "random": lambda r, d, b: 0}  # int32 indices; regenerated
    expected = adam_bytes(opt, model, lambda p, r, d, b: proj_bytes[projector](r, d, b))
    assert opt.state_bytes() == expected


def test_galore_param_groups():
    model = tiny_model()
    low, rest = galore_param_groups(model, rank=8, update_proj_gap=50, scale=1.0, projector="dct")
    assert len(low["params"]) == N_LOWRANK and low["rank"] == 8 and low["projector"] == "dct"
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("proj.weight") for p in low["params"])
    assert {names[id(p)] for p in rest["params"]} >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert len(low["params"]) + len(rest["params"]) == len(list(model.parameters()))
    only_first_layer = galore_param_groups(model, 8, target_modules=[r"layers\.0\..*(q|v)_proj"])[0]
    assert len(only_first_layer["params"]) == 2


def test_bad_groups_are_rejected():
    w, b = torch.nn.Parameter(torch.zeros(8, 4)), torch.nn.Parameter(torch.zeros(8))
    with pytest.raises(ValueError, match="2-D"):
        GaLoreAdamW([{"params": [w, b], "rank": 2}])
    with pytest.raises(ValueError, match="full"):
        GaLoreAdamW([{"params": [w], "rank": 2, "proj_type": "full"}])
    with pytest.raises(ValueError, match="state_transfer"):
        GaLoreAdamW([{"params": [w], "rank": 2, "state_transfer": True}], faithful=True)
    with pytest.raises(ValueError, match="projector"):
        GaLoreAdamW([{"params": [w], "rank": 2, "projector": "qr"}])
    with pytest.raises(ValueError, match="nonfinite"):
        GaLoreAdamW([w], nonfinite="ignore")
