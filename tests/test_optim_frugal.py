"""Frugal (FRUGAL, GaLore-type subspaces): the update against a direct torch computation of the
formulas, statistics reset at refresh, inactive rules, fast path, training. Exact resume and the
NaN/Inf policy are tested for every optimizer in test_optim_common."""

import pytest
import torch
from optim_common import N_LOWRANK, step_op_counts, tiny_model, token_batches, train
from optim_common import make_frugal as make_opt

from fastgrad.optim import Frugal

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------
# the update == the formulas
# ------------------------------------------------------------------------------------------------


def _down(g, p, right):
    return g @ p.T if right else p.T @ g


def _up(x, p, right):
    return x @ p if right else p @ x


@pytest.mark.parametrize(("rule", "inactive_scale"), [("sign_sgd", 1.0), ("sgd", 0.5), ("no", 1.0)])
def test_update_matches_formulas(rule, inactive_scale):
    lr, wd, (b1, b2), eps, gap, steps = 1e-2, 0.1, (0.9, 0.999), 1e-8, 3, 5
    gen = torch.Generator().manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(12, 8, generator=gen))  # right side, r = round(0.5·8) = 4
    wide = torch.nn.Parameter(torch.randn(6, 10, generator=gen))  # left side, r = round(0.5·6) = 3
    bias = torch.nn.Parameter(torch.randn(5, generator=gen))  # plain AdamW
    params = [tall, wide, bias]
    opt = Frugal(
        [{"params": [tall, wide], "density": 0.5, "update_proj_gap": gap}, {"params": [bias]}],
        lr=lr,
        weight_decay=wd,
        inactive_update_rule=rule,
        inactive_lr_scale=inactive_scale,
    )
    ref = [{"w": p.detach().clone(), "m": None, "v": None, "t": 0} for p in params]
    for k in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, (p, g, r) in enumerate(zip(params, grads, ref, strict=True)):
            st = opt.state[p]
            r["w"].mul_(1 - lr * wd)
            if i == 2:
                low = g
            else:
                right = i == 0
                proj = st["proj"]
                if k % gap == 0:  # refresh: P spans the top-r singular subspace of this G
                    u, _, vh = torch.linalg.svd(g, full_matrices=False)
                    basis = vh[: st["proj_rank"]].T if right else u[:, : st["proj_rank"]]
                    mine = proj.T if right else proj
                    torch.testing.assert_close(mine @ mine.T, basis @ basis.T, atol=1e-5, rtol=0)
                    r["m"] = r["v"] = None  # reset_statistics
                    r["t"] = 0
                low = _down(g, proj, right)
            if r["m"] is None:
                r["m"], r["v"] = torch.zeros_like(low), torch.zeros_like(low)
            r["t"] += 1
            t = r["t"]
            r["m"] = b1 * r["m"] + (1 - b1) * low
            r["v"] = b2 * r["v"] + (1 - b2) * low * low
            n = (r["m"] / (1 - b1**t)) / ((r["v"] / (1 - b2**t)).sqrt() + eps)
            if i == 2:
                r["w"] -= lr * n
            else:
                r["w"] -= lr * _up(n, proj, right)
                resid = g - _up(low, proj, right)
                if rule == "sign_sgd":
                    r["w"] -= lr * inactive_scale * resid.sign()
                elif rule == "sgd":
                    r["w"] -= lr * inactive_scale * resid
                assert st["adam_step"] == t and st["step"] == k + 1
            torch.testing.assert_close(p.detach(), r["w"], atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(st["exp_avg"], r["m"], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(st["exp_avg_sq"], r["v"], atol=1e-6, rtol=1e-5)
        if k == gap:  # statistics restarted at the refresh: one fresh Adam step
            assert opt.state[tall]["adam_step"] == 1 and opt.state[bias]["step"] == k + 1
            low = _down(grads[0], opt.state[tall]["proj"], True)
            torch.testing.assert_close(opt.state[tall]["exp_avg"], (1 - b1) * low)
    assert opt.state[tall]["exp_avg"].shape == (12, 4) and opt.state[wide]["exp_avg"].shape == (3, 10)


def test_random_projector_draws_new_subspace_and_rank_options():
    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = Frugal([{"params": [w], "rank": 3, "projector": "random", "update_proj_gap": 2}], lr=1e-2)
    proj = opt.projector(opt.param_groups[0])
    mats = []
    for _ in range(3):
        w.grad = torch.randn(16, 8)
        opt.step()
        mats.append(proj.matrix(opt.state[w], w))
    assert opt.state[w]["proj_rank"] == 3 and torch.equal(mats[0], mats[1])
    assert not torch.allclose(mats[1], mats[2])  # refresh at step 2 draws a new P
    with pytest.raises(ValueError, match="not both"):
        Frugal([{"params": [w], "rank": 3, "density": 0.5}])
    with pytest.raises(ValueError, match="density"):
        Frugal([{"params": [w], "density": 1.5}])
    with pytest.raises(ValueError, match="inactive_update_rule"):
        Frugal([{"params": [w], "density": 0.5}], inactive_update_rule="adam")


def test_state_bytes_formula():
    model = tiny_model()
    opt = make_opt(model)
    train(model, opt, token_batches(1))
    expected = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if "rank" in group:
                r = opt.state[p]["proj_rank"]
                expected += 2 * max(p.shape) * r * 4 + r * min(p.shape) * 4
            else:
                expected += 2 * p.numel() * 4
    assert opt.state_bytes() == expected


# ------------------------------------------------------------------------------------------------
# fast path, training
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rule", "back_adds"), [("sign_sgd", 2 * N_LOWRANK), ("no", N_LOWRANK)])
def test_step_runs_through_fastgrad_ops(rule, back_adds):
    model = tiny_model()
    opt = make_opt(model, gap=2, inactive_update_rule=rule)
    for calls in step_op_counts(model, opt, token_batches(3)):  # steps 0 (refresh), 1, 2 (refresh)
        assert calls["fastgrad.lowrank_project"] == N_LOWRANK
        # one back-projection into W, plus one into the residual buffer E for the state-free part
        assert calls["fastgrad.lowrank_project_back_add_"] == back_adds


def test_loss_decreases_on_tiny_llama():
    model = tiny_model()
    opt = make_opt(model, gap=10, lr=3e-3, weight_decay=0.0)
    ids = (torch.arange(33 * 4) % 8).reshape(4, 33)  # a repeated 8-token pattern
    losses = train(model, opt, [ids] * 30)
    assert losses[-1] < 0.5 * losses[0], losses
