"""FrugalBlock: the block-subspace FRUGAL (docs/algorithms.md §6.4): window selection, the update
formulas against torch AdamW and signSGD, state reset at refreshes, state bytes, training. Exact
resume and the NaN/Inf policy are tested for every optimizer in test_optim_common."""

import pytest
import torch
from optim_common import N_LOWRANK, block_groups, tiny_model, token_batches, train

from fastgrad.optim import FrugalBlock, galore_param_groups


def _group(n, density, order, seed=0):
    return {"params": [None] * n, "density": density, "block_order": order, "seed": seed}


def test_windows_rotate_over_all_tensors():
    assert [FrugalBlock.active_window(_group(8, 0.25, "descending"), j) for j in range(5)] == [
        [6, 7], [4, 5], [2, 3], [0, 1], [6, 7],
    ]  # fmt: skip
    assert [FrugalBlock.active_window(_group(8, 0.25, "ascending"), j) for j in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert FrugalBlock.active_window(_group(14, 0.25, "ascending"), 3) == [0, 1, 12, 13]  # a = round(3.5) = 4; wraps
    assert FrugalBlock.active_window(_group(3, 0.01, "ascending"), 0) == [0]  # at least one tensor
    random = [FrugalBlock.active_window(_group(14, 0.25, "random", seed=5), j) for j in range(4)]
    assert all(len(w) == 4 and len(set(w)) == 4 for w in random) and len({tuple(w) for w in random}) > 1
    assert random == [FrugalBlock.active_window(_group(14, 0.25, "random", seed=5), j) for j in range(4)]


def test_update_formulas_and_state_reset():
    """Step 0 (refresh 0, descending): tensors 10..13 of 14 state-full (a = round(3.5) = 4; AdamW,
    as torch's), the others W − lr·sign(G); embeddings/norms/head torch AdamW. T = 2: step 2 moves
    the window to 6..9 and drops every moment."""
    lr, wd = 1e-2, 0.1
    model = tiny_model()
    reference = tiny_model()
    opt = FrugalBlock(block_groups(model, update_proj_gap=2), lr=lr, weight_decay=wd)
    lowrank = opt.param_groups[0]["params"]
    ref_params = dict(zip(model.parameters(), reference.parameters(), strict=True))
    torch_adamw = torch.optim.AdamW(
        [ref_params[p] for p in lowrank[10:]] + [ref_params[p] for p in opt.param_groups[1]["params"]],
        lr=lr,
        weight_decay=wd,
        eps=1e-8,
    )
    ids = token_batches(1)[0]
    for m in (model, reference):
        m(ids, ids).backward()
    before = {p: p.detach().clone() for p in lowrank}
    opt.step()
    torch_adamw.step()
    for i, p in enumerate(lowrank):
        if i >= 10:
            torch.testing.assert_close(p, ref_params[p], rtol=1e-6, atol=1e-7)
            assert opt.state[p]["exp_avg"].shape == p.shape
        else:
            torch.testing.assert_close(p, before[p] - lr * ref_params[p].grad.sign(), rtol=0, atol=1e-7)
            assert "exp_avg" not in opt.state[p]
    for p in opt.param_groups[1]["params"]:
        torch.testing.assert_close(p, ref_params[p], rtol=1e-6, atol=1e-7)
    state_full = list(lowrank[10:]) + list(opt.param_groups[1]["params"])
    assert opt.state_bytes() == sum(2 * p.numel() * 4 for p in state_full)
    train(model, opt, token_batches(2, seed=4))  # steps 1 and 2 (a refresh)
    assert opt.param_groups[0]["block_active"] == [6, 7, 8, 9]
    assert [("exp_avg" in opt.state[p]) for p in lowrank] == [6 <= i <= 9 for i in range(N_LOWRANK)]
    assert all(opt.state[p]["adam_step"] == 1 for p in lowrank[6:10])  # restarted at the refresh


def test_training_decreases_the_loss():
    batches = token_batches(10, seed=2)
    model = tiny_model()
    opt = FrugalBlock(block_groups(model, update_proj_gap=3, block_order="random"), lr=3e-3)
    losses = train(model, opt, batches * 2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"density": 0.0}, "'density' must be in"),
        ({"update_proj_gap": 0}, "'update_proj_gap' must be a positive int"),
        ({"block_order": "mirror"}, "'block_order' must be one of"),
        ({"inactive_update_rule": "adam"}, "'inactive_update_rule' must be one of"),
    ],
)
def test_bad_group_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FrugalBlock(block_groups(tiny_model(), **kwargs))
    with pytest.raises(ValueError, match="'density', not 'rank'"):
        FrugalBlock(galore_param_groups(tiny_model(), rank=4))
