"""The 8-bit-moment optimizers (GaLoreAdamW8bit, AdamW8bit, Muon8bit) on FSDP2 parameters (``fully_shard``:
DTensors sharded by rows), 2 CPU processes (gloo) against 1 process with the same global batch, as
tests/test_fsdp.py does for the fp32-moment optimizers (one spawn for every case).

A row-sharded moment's blocks and rounding positions are those of the whole flattened moment (the
module docstring of fastgrad.optim.galore8bit), so a rank's codes are exactly the slice of one
process's codes when both see the same moments: checked bitwise with fixed gradients. The tiny
LLaMA below (hidden 64, intermediate 128, vocab 256, rank 16, block 256; min_8bit_size 1024) makes
every 8-bit moment start a block on both ranks (rank 1 starts at row c = m/2):

  galore8bit: q, k, v, o 64×64 right side, R 64×16: 32·16 = 512 (2 blocks); gate, up 128×64 right
  side, R 128×16: 64·16 = 1024; down 64×128 left side: R 16×128 (2048) whole on both ranks;
  embedding and head 256×64 (full-rank group): 128·64 = 8192.
  adamw8bit: q, k, v, o 32·64 = 2048; gate, up 64·64 = 4096; down 32·128 = 4096; embedding and head 8192.
  muon8bit: the momenta of the 14 projections as adamw8bit's moments, the embedding and head's AdamW
  moments 8192 (Newton–Schulz in fp32, as tests/test_fsdp.py runs Muon).
  The norms (64) stay fp32.
"""

import gc
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_common import WORLD, run_on_ranks
from optim_common import make_adamw8bit, make_galore8, make_muon8, make_qgalore8, token_batches
from test_fsdp import GAP, ROWS, STEPS

from fastgrad.models import LlamaConfig, LlamaForCausalLM
from fastgrad.nn import fully_shard_model, quantize_model
from fastgrad.optim import AdamW8bit, GaLoreAdamW8bit, Muon8bit
from fastgrad.optim.galore8bit import M_CODES, M_SCALES, QSEED, V_CODES, V_SCALES, V_ZEROS
from fastgrad.optim.muon8bit import B_CODES, B_QSEED, B_SCALES
from fastgrad.optim.sharding import row_shard

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not dist.is_available(), reason="gloo")

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)
CASES = {
    "galore8bit": lambda model: make_galore8(model, rank=16, gap=GAP),
    "adamw8bit": lambda model: make_adamw8bit(model),
    "muon8bit": lambda model: make_muon8(model, opt_kwargs={"ns_dtype": torch.float32, "min_8bit_size": 1024}),
    # INT8 weights too (sharded and all-gathered as INT8), refreshes at steps 1, 4, 7, ...
    "q-galore8bit": make_qgalore8,
}
N_8BIT = {
    "galore8bit": 16,
    "adamw8bit": 16,
    "muon8bit": 16,
    "q-galore8bit": 16,
}  # 14 projections + embedding + head (norms: fp32)
SAVE_AT = STEPS // 2  # the sharded checkpoint the resume tests start from
EIGHT = (M_CODES, M_SCALES, V_CODES, V_SCALES, V_ZEROS)
MOMENTUM = (B_CODES, B_SCALES)
PER_BLOCK = (M_SCALES, V_SCALES, V_ZEROS)
# The losses of 2 processes against 1 (measured on this 2-core CPU, torch 2.13): equal at the first
# steps, then apart by the fp32 rounding of the two runs' gradients (two half-batch forward passes,
# FSDP's average, the all-reduced left-side projections), which stochastic rounding turns into a
# whole code where an element's fp32 input moved across a rounding boundary; the training carries
# that on. Largest relative difference over the 20 steps (at the last ones): galore8bit 1.9e-4,
# adamw8bit 1.3e-4 with this batch; over 6 batch seeds at most 2.7e-4 (the fp32 optimizers of
# test_fsdp agree to 1e-5). The bound is ~2.7× this batch's worst. It is a guard against gross
# errors (moments decoded from other rows or blocks; 8-bit against fp32 AdamW differ by 1.4e-3 after
# 50 steps in test_optim_8bit), not against a different but equally random rounding stream (with
# positions from the local numel the 2-process losses are 0.6e-4 to 1.4e-3 from 1 process, depending
# on the batch): the codes test below is the exact check of the streams, blocks and 8-bit decision.
LOSS_RTOL = 5e-4
# Muon8bit: Newton–Schulz raises the small singular values of the update, where those rounding-level
# differences (and the codes they flip) sit: 6.1e-4 with this batch (Muon in fp32, tests/test_fsdp.py:
# 1e-5). The fixed-gradient test below is its exact check.
CASE_LOSS_RTOL = {"muon8bit": 2e-3}


def _model(case: str | None = None) -> LlamaForCausalLM:
    """The tiny LLaMA; for Q-GaLore with INT8 weights (QLinear, groups of 32)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    if case == "q-galore8bit":
        quantize_model(model, group_size=32)
    return model


def _eight_bit_state(opt) -> dict[int, dict[str, torch.Tensor]]:
    """The 8-bit tensors of every parameter that has them (this rank's), by parameter index: Adam's
    moments, or Muon8bit's momentum."""
    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        keys = EIGHT if M_CODES in st else MOMENTUM if B_CODES in st else ()
        if keys:
            out[i] = {k: st[k].clone() for k in keys}
    return out


def _run(case: str, rank: int | None, ckpt=None, *, steps: int = STEPS, resume=None) -> dict:
    """``steps`` steps of ``case``: one process with the global batch (rank None) or this rank of an
    FSDP2 run with its ROWS sequences. ``ckpt``: save a sharded checkpoint there after step SAVE_AT;
    ``resume``: start from that checkpoint. Returns the losses (global means) and the state."""
    from fastgrad.train.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint

    ckpt, resume = (Path(x) if x is not None else None for x in (ckpt, resume))

    model = _model(case)
    if rank is not None:
        fully_shard_model(model)
    opt = CASES[case](model)
    if resume is not None:
        load_sharded_checkpoint(resume, model, opt)
    losses, saved = [], None
    for ids in token_batches(1, rows=ROWS * WORLD, seed=3) * steps:  # one batch, learnt by heart
        if rank is not None and dist.get_world_size() > 1:
            ids = ids[rank * ROWS : (rank + 1) * ROWS]
        opt.zero_grad(set_to_none=True)
        loss = model(ids, ids)
        loss.backward()
        opt.step()  # averages the QLinear layers' R over the ranks itself (no reduce_projected_grads here)
        loss = loss.detach()
        if rank is not None:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
        if ckpt is not None and len(losses) == SAVE_AT:
            save_sharded_checkpoint(ckpt, model, opt, {"step": SAVE_AT})
            saved = _eight_bit_state(opt)
    sharded = [p for g in opt.param_groups for p in g["params"] if row_shard(p) is not None]
    return {
        "losses": losses,
        "state_bytes": opt.state_bytes(),
        "sharded": len(sharded),
        "eight_bit": sorted(_eight_bit_state(opt)),
        "saved": saved,
        "loaded": _eight_bit_state(opt) if resume is not None and steps == 0 else None,
    }


# ------------------------------------------------------------------------------------------------
# fixed gradients: the codes of each rank are the slices of one process's codes, bitwise
# ------------------------------------------------------------------------------------------------

# (79, 32): the global tail is padded (2528 elements, 10 blocks), rank 1 holds rows [40, 79) from
# element 1280 = 5 blocks; and with min_8bit_size 2048 its 40·32 = 1280 local elements are below the
# threshold, its 2528 global ones above. (127, 100): rows straddle blocks (a row touches up to 2),
# rank 1 starts at 64·100 = 6400 = 25 blocks. (64, 48): 32·48 = 1536 = 6 blocks, a row of 48 can
# straddle two blocks too. (128, 64) in a GaLore group (rank 16, right side): R 128×16, rank 1 at
# 1024; its R = G·Pᵀ of a rank's rows is bitwise the rows of one process's R only if the CPU matmul
# sums each element in the same order whatever the number of rows (it does here: each element is a
# dot product of 64 terms); the subspace is the same (rank 0's, from the same gathered G).
FIXED = {"tail": (79, 32), "straddle": (127, 100), "even": (64, 48), "tall": (128, 64)}
FIXED_STEPS = 3  # the decode at steps 2 and 3, and stream offsets past the first step


def _weights(shapes: dict[str, tuple[int, int]], seed: int) -> torch.nn.Module:
    """A module whose parameters are random weights of these names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    module = torch.nn.Module()
    for name, shape in shapes.items():
        module.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=gen)))
    return module


def _fixed_optimizers(model: torch.nn.Module) -> list:
    full = [p for n, p in model.named_parameters() if n != "tall"]
    return [
        AdamW8bit(full, lr=1e-2, min_8bit_size=2048),
        GaLoreAdamW8bit([{"params": [model.tall], "rank": 16, "update_proj_gap": 2}], lr=1e-2, min_8bit_size=1024),
    ]


def _fixed_run(rank: int | None) -> dict:
    """FIXED_STEPS steps with the same global gradients (seeded per step and parameter) in one
    process (rank None) or on this rank of an FSDP2 run: the 8-bit state and weights per name."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _weights(FIXED, seed=5)
    if rank is not None:
        fully_shard(model)
    opts = _fixed_optimizers(model)
    for t in range(FIXED_STEPS):
        for i, p in enumerate(model.parameters()):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * t + i))
            shard = row_shard(p)
            if shard is not None:
                g = DTensor.from_local(
                    shard.rows_of(g).clone(), p.device_mesh, p.placements, shape=p.shape, stride=g.stride()
                )
            p.grad = g
        for opt in opts:
            opt.step()
    out = {}
    for name, p in model.named_parameters():
        opt = opts[1] if name == "tall" else opts[0]
        st = opt.state[p]
        shard = row_shard(p)
        out[name] = {
            "state": {k: v.clone() for k, v in st.items() if k in EIGHT},
            "seed": st.get(QSEED),
            "weight": (shard.rows_of(p.full_tensor()) if shard is not None else p).detach().clone(),
            "rows": (shard.offset, shard.rows) if shard is not None else None,
        }
    return out


def _fixed_muon_run(rank: int | None) -> dict:
    """:func:`_fixed_run` for Muon8bit (fp32 Newton–Schulz) on the full-rank FIXED shapes: the 8-bit
    momentum's state and the weights per name."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _weights({k: v for k, v in FIXED.items() if k != "tall"}, seed=7)
    if rank is not None:
        fully_shard(model)
    opt = Muon8bit(model.parameters(), lr=1e-2, ns_dtype=torch.float32, min_8bit_size=2048)
    for t in range(FIXED_STEPS):
        for i, p in enumerate(model.parameters()):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * t + i))
            shard = row_shard(p)
            if shard is not None:
                g = DTensor.from_local(
                    shard.rows_of(g).clone(), p.device_mesh, p.placements, shape=p.shape, stride=g.stride()
                )
            p.grad = g
        opt.step()
    out = {}
    for name, p in model.named_parameters():
        st = opt.state[p]
        shard = row_shard(p)
        out[name] = {
            "state": {k: v.clone() for k, v in st.items() if k in MOMENTUM},
            "seed": st.get(B_QSEED),
            "weight": (shard.rows_of(p.full_tensor()) if shard is not None else p).detach().clone(),
            "rows": (shard.offset, shard.rows) if shard is not None else None,
        }
    return out


# ------------------------------------------------------------------------------------------------
# a split that does not start a block: a clear error before anything changes
# ------------------------------------------------------------------------------------------------

MISALIGNED = {"first": (64, 48), "odd": (165, 64)}  # 165 rows: rank 1 from row 83, element 83·64 = 5312


def _misaligned(rank: int) -> dict:
    """The error of a first AdamW8bit step whose (165, 64) moments would start rank 1 mid-block
    (the aligned parameter before it must not have been stepped either), and the two remedies."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    results = {}
    for label, kwargs in {
        "default": {},
        "block 64": {"block_size": 64},  # divides 83·64
        "fp32": {"min_8bit_size": 165 * 64 + 1},  # the (165, 64) moments stay fp32
    }.items():
        model = _weights(MISALIGNED, seed=6)
        fully_shard(model)
        opt = AdamW8bit(model.parameters(), lr=1e-2, **{"min_8bit_size": 1024, **kwargs})
        for p in model.parameters():
            p.grad = distribute_tensor(torch.ones(p.shape), p.device_mesh, p.placements)
        before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        error = None
        try:
            opt.step()
        except ValueError as e:
            error = str(e)
        after = {n: p.full_tensor() for n, p in model.named_parameters()}
        results[label] = {
            "error": error,
            "state_entries": sum(len(st) for st in opt.state.values()),
            "unchanged": [n for n in before if torch.equal(before[n], after[n])],
            "eight_bit": sorted(n for n, p in model.named_parameters() if M_CODES in opt.state.get(p, {})),
        }
    return results


def _collect(rank: int, ckpt: str) -> dict:
    """What the tests below check, as this rank computed it."""
    results = {case: _run(case, rank, f"{ckpt}-{case}") for case in CASES}
    results["resumed"] = {
        case: _run(case, rank, steps=STEPS - SAVE_AT, resume=f"{ckpt}-{case}/checkpoint") for case in CASES
    }
    results["fixed"] = _fixed_run(rank)
    results["fixed_muon"] = _fixed_muon_run(rank)
    results["misaligned"] = _misaligned(rank)
    return results


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Every case under FSDP2 with 2 processes (one launch for all of them): each rank's results."""
    tmp = tmp_path_factory.mktemp("fsdp8")
    return {"ranks": run_on_ranks(_collect, tmp, str(tmp / "run")), "ckpt": tmp / "run"}


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("case", list(CASES))
def test_two_sharded_processes_train_like_one(sharded_runs, case):
    single, sharded = _run(case, None), sharded_runs["ranks"][0][case]
    trained = [p for g in CASES[case](_model(case)).param_groups for p in g["params"]]
    assert sharded["sharded"] == len(trained)  # every parameter the optimizer steps was a DTensor
    # the 8-bit decision is the global one: the same parameters on both ranks as in one process
    assert single["eight_bit"] == sharded["eight_bit"] == sharded_runs["ranks"][1][case]["eight_bit"]
    assert len(single["eight_bit"]) == N_8BIT[case]
    assert single["losses"][-1] < single["losses"][0] - 0.5  # it learns
    assert sharded["losses"] == pytest.approx(single["losses"], rel=CASE_LOSS_RTOL.get(case, LOSS_RTOL))
    # each rank keeps the codes of its rows only (a left-side weight's r'×n ones excepted)
    assert sharded["state_bytes"] < 0.75 * single["state_bytes"]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", list(FIXED))
def test_each_rank_encodes_the_slice_of_one_process_codes(sharded_runs, name):
    """Same gradients: every rank's codes are the global flat range of its rows in one process's
    codes, and its (rows, t) scale tables hold the scales of the blocks each row touches."""
    single = _fixed_run(None)[name]
    ref = single["state"]
    assert set(ref) == set(EIGHT)
    m, *rest = FIXED[name] if name != "tall" else (128, 16)
    cols = math.prod(rest)
    for result in (r["fixed"][name] for r in sharded_runs["ranks"]):
        row0, rows = result["rows"]
        mine = result["state"]
        assert set(mine) == set(EIGHT), f"{name}: rank holding rows from {row0} has no 8-bit state"
        assert result["seed"] == single["seed"]
        start, n = row0 * cols, rows * cols
        for key in (M_CODES, V_CODES):
            assert mine[key].shape == (rows, cols)
            assert torch.equal(mine[key].reshape(-1), ref[key][start : start + n]), (name, row0, key)
        blocks = [
            list(range((r * cols) // 256, ((r + 1) * cols - 1) // 256 + 1)) for r in range(m)
        ]  # the blocks each global row touches
        width = max(len(b) for b in blocks)
        for key in PER_BLOCK:
            assert mine[key].shape == (rows, width)
            for i in range(rows):
                touched = blocks[row0 + i] + [blocks[row0 + i][-1]] * (width - len(blocks[row0 + i]))
                assert torch.equal(mine[key][i], ref[key][touched]), (name, row0, key, i)
        assert torch.equal(result["weight"], single["weight"][row0 : row0 + rows])


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", [n for n in FIXED if n != "tall"])
def test_each_rank_encodes_the_slice_of_one_process_momentum_codes(sharded_runs, name):
    """Muon8bit, same gradients: every rank's momentum codes are its rows' range of one process's
    codes, its (rows, t) scale table holds the scales of the blocks each row touches, and its rows
    of the weights (U gathered, the same Newton–Schulz iteration on every rank) are one process's."""
    single = _fixed_muon_run(None)[name]
    ref = single["state"]
    assert set(ref) == set(MOMENTUM)
    m, cols = FIXED[name]
    blocks = [list(range((r * cols) // 256, ((r + 1) * cols - 1) // 256 + 1)) for r in range(m)]
    width = max(len(b) for b in blocks)
    for result in (r["fixed_muon"][name] for r in sharded_runs["ranks"]):
        row0, rows = result["rows"]
        mine = result["state"]
        assert set(mine) == set(MOMENTUM), f"{name}: rank holding rows from {row0} has no 8-bit momentum"
        assert result["seed"] == single["seed"]
        assert mine[B_CODES].shape == (rows, cols)
        assert torch.equal(mine[B_CODES].reshape(-1), ref[B_CODES][row0 * cols : (row0 + rows) * cols]), (name, row0)
        assert mine[B_SCALES].shape == (rows, width)
        for i in range(rows):
            touched = blocks[row0 + i] + [blocks[row0 + i][-1]] * (width - len(blocks[row0 + i]))
            assert torch.equal(mine[B_SCALES][i], ref[B_SCALES][touched]), (name, row0, i)
        assert torch.equal(result["weight"], single["weight"][row0 : row0 + rows])


def test_a_split_that_does_not_start_a_block_is_refused_before_anything_changes(sharded_runs):
    for rank_results in (r["misaligned"] for r in sharded_runs["ranks"]):
        refused = rank_results["default"]
        error = refused["error"]
        assert error is not None, "the misaligned split was not refused"
        for part in ("(165, 64)", "[0, 83), [83, 165)", "block_size=256", "5312", "min_8bit_size > 10560"):
            assert part in error, (part, error)
        assert refused["state_entries"] == 0
        assert refused["unchanged"] == list(MISALIGNED)  # the aligned parameter before it too
        # what the message suggests works
        assert rank_results["block 64"]["error"] is None and rank_results["block 64"]["eight_bit"] == ["first", "odd"]
        assert rank_results["fp32"]["error"] is None and rank_results["fp32"]["eight_bit"] == []
        assert rank_results["fp32"]["unchanged"] == []


@pytest.mark.parametrize("case", list(CASES))
def test_a_sharded_checkpoint_resumes_exactly_and_on_one_process(sharded_runs, case):
    """The 8-bit state of a row-sharded weight is saved by rows (codes and per-row scale tables as
    DTensors laid out as the parameter): 2 processes resume bitwise, and 1 process reads the
    concatenation of both ranks' rows and trains on like them."""
    ranks = sharded_runs["ranks"]
    whole = ranks[0][case]
    assert ranks[0]["resumed"][case]["losses"] == whole["losses"][SAVE_AT:]  # bitwise: positions follow the step
    path = sharded_runs["ckpt"].parent / f"{sharded_runs['ckpt'].name}-{case}" / "checkpoint"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        loaded = _run(case, 0, steps=0, resume=path)["loaded"]
        one = _run(case, 0, steps=STEPS - SAVE_AT, resume=path)
    finally:
        gc.collect()
        dist.destroy_process_group()
    saved = [r[case]["saved"] for r in ranks]
    assert sorted(loaded) == sorted(saved[0]) == sorted(saved[1])
    for i, state in loaded.items():
        for key, value in state.items():
            if saved[0][i][key].shape == value.shape:  # a left-side weight's state: whole on both ranks
                expected = saved[0][i][key]
                assert torch.equal(saved[1][i][key], expected)
            else:
                expected = torch.cat([saved[0][i][key], saved[1][i][key]])
            assert torch.equal(value, expected), (i, key)
    assert one["losses"] == pytest.approx(whole["losses"][SAVE_AT:], rel=CASE_LOSS_RTOL.get(case, LOSS_RTOL))
