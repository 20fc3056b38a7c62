"""The launch plans of kernels/plans.py, which the memory model uses for its GPU estimates, name the
bytes the Triton launchers really allocate: each launcher runs on CPU under the Triton interpreter
(with the interpreter's knobs: the same plan code, smaller tiles) while the profiler records the
allocator, and its peak above the outputs must be the plan's workspace, byte for byte."""

import gc

import pytest
import torch

from fastgrad import _backends, ops
from fastgrad.train.profiling import live_peak, measured_memory_events

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not _backends.triton_interpret(), reason="the launchers run on CPU under TRITON_INTERPRET=1"),
]

if _backends.triton_interpret():
    from fastgrad.kernels import plans, project, quant

    SLOTS = project.parallel_slots(torch.device("cpu"))


def _peak(fn) -> int:
    gc.collect()  # no tensor of an earlier test freed while this one is measured
    return live_peak(measured_memory_events(fn))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_projection_workspace_is_the_split_k_plan(side, dtype):
    m, n, r = (512, 48, 8) if side == "left" else (48, 512, 8)
    g = torch.randn(m, n).to(dtype)
    p = torch.randn(m, r).to(dtype) if side == "left" else torch.randn(r, n).to(dtype)
    M, N, K = (r, n, m) if side == "left" else (m, r, n)
    workspace = project.SPLIT_K.workspace_bytes(M, N, K, g.element_size(), SLOTS)
    assert workspace > 0, "the shapes must take the split-K path"
    assert _peak(lambda: ops.lowrank_project(g, p, side)) == M * N * g.element_size() + workspace


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_accumulating_projection_workspace_is_the_split_k_plan(dtype):
    """W += up(R, P) with K = r split: the workspace, its fp32 sum, W's fp32 copy (16-bit W) and the sum."""
    m, n, r = 16, 24, 64
    w = torch.randn(m, n).to(dtype)
    rr, p = torch.randn(m, r).to(dtype), torch.randn(r, n).to(dtype)
    workspace = project.SPLIT_K.workspace_bytes(m, n, r, rr.element_size(), SLOTS, True, dtype == torch.float32)
    assert project.SPLIT_K.plan(m, n, r, rr.element_size(), SLOTS)[0] > 1
    assert _peak(lambda: ops.lowrank_project_back_add_(w, rr, p, "right", 0.5)) == workspace


@pytest.mark.parametrize("side", ["left", "right"])
def test_lowrank_grad_workspace_is_the_plan(side):
    T, m, n, r = 640, 32, 40, 8
    dy, x = torch.randn(T, m), torch.randn(T, n)
    p = torch.randn(m, r) if side == "left" else torch.randn(r, n)
    workspace = plans.lowrank_grad_workspace_bytes(project.SPLIT_K, T, m, n, r, side, 4, SLOTS)
    assert workspace > T * r * 4, "the second product (K = T) must take the split-K path"
    out = (r * n if side == "left" else m * r) * 4
    assert _peak(lambda: ops.lowrank_grad(dy, x, p, side)) == out + workspace


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_quantize_workspace_is_the_plan(symmetric):
    """Few groups much longer than a chunk: partial statistics per split, then the reduced ones."""
    rows, n = 2, 3 * quant.TILING.max_block + 8
    x = torch.randn(rows, n)
    assert quant.TILING.plan(rows, n, SLOTS).splits > 1
    workspace = quant.TILING.quantize_workspace_bytes(rows, n, SLOTS, symmetric)
    outputs = rows * n + 2 * rows * 4  # codes, scales, zeros
    assert _peak(lambda: ops.quantize_int8(x, -1, symmetric=symmetric)) == outputs + workspace


def test_adam_step_workspace_is_n():
    m, n, r = 24, 40, 8
    w, rr, p = torch.randn(m, n), torch.randn(m, r), torch.randn(r, n)
    exp_avg, exp_avg_sq = torch.zeros(m, r), torch.zeros(m, r)
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, step_scale=-1e-3)
    peak = _peak(lambda: ops.galore_adam_step_(w, exp_avg, exp_avg_sq, rr, p, "right", **hyper))
    assert peak == plans.adam_step_workspace_bytes(rr.numel())
