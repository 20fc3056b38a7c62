"""Quantize / dequantize / bf16 stochastic rounding: reference vs naive torch vs fastgrad kernels.

    python -m pytest bench/bench_quant.py --benchmark-only        # rows -> bench/results/quant.csv

Providers: ``reference`` (fastgrad/_reference.py, the spec, Philox in torch ops), ``torch-eager``
(what a user writes by hand: ``torch.rand_like`` noise, as Q-GaLore does), ``copy`` (a device
copy of the input: the bandwidth ceiling for these memory-bound ops; timed interleaved with the
stochastic quantizers, so their ratio to it comes from one run), and the kernel that serves the
op on the device (``cpp``, ``triton`` or ``cuda``, as ``python -m fastgrad.env`` says).
"""

from __future__ import annotations

import pytest
import torch

from fastgrad import _backends
from fastgrad import _reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPE = (4096, 4096)
GROUP = 128


def eager_quantize(x: torch.Tensor, bits: int, group: int, stochastic: bool) -> torch.Tensor:
    """The usual hand-written min/max quantizer with torch.rand_like stochastic rounding."""
    qmax = 2**bits - 1
    xg = x.float().reshape(-1, group)
    lo, hi = xg.amin(1, keepdim=True), xg.amax(1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    u = (xg - lo) / scale
    u = u + torch.rand_like(u) if stochastic else u + 0.5
    return u.floor_().clamp_(0, qmax).to(torch.uint8)


def _quant_bytes(numel: int, bits: int, in_bytes: int) -> int:
    return numel * in_bytes + numel * bits // 8 + 2 * 4 * numel // GROUP


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_stochastic(compare, device, bits, dtype):
    op = f"quantize_int{bits}"
    x = torch.randn(SHAPE, device=device).to(dtype)
    copied = torch.empty_like(x)
    providers = {
        "torch-eager": lambda: eager_quantize(x, bits, GROUP, True),
        _backends.SERVED_BY[op][device]: lambda: getattr(torch.ops.fastgrad, op)(x, GROUP, False, True, 1, 0),
        # The bandwidth ceiling, interleaved with the kernel: a copy of the same tensor.
        "copy": lambda: copied.copy_(x),
    }
    rounds = 10
    if device == "cpu" and dtype == torch.float32:  # the spec, timed once per bit width as the baseline
        providers = {"reference": lambda: ref.quantize(x, bits, GROUP, False, True, 1, 0), **providers}
        rounds = 3
    moved = _quant_bytes(x.numel(), bits, x.element_size())
    compare("quant", f"{op} SR", SHAPE, dtype, device, providers, bytes_moved=moved, rounds=rounds)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize(compare, device, bits):
    op = f"dequantize_int{bits}"
    q = getattr(torch.ops.fastgrad, f"quantize_int{bits}")(torch.randn(SHAPE, device=device), GROUP, False, False, 0, 0)
    numel = SHAPE[0] * SHAPE[1]
    impl = ref.dequantize_int8 if bits == 8 else ref.dequantize_int4
    providers = {
        "reference": lambda: impl(*q, torch.bfloat16),
        _backends.SERVED_BY[op][device]: lambda: getattr(torch.ops.fastgrad, op)(*q, torch.bfloat16),
    }
    moved = numel * bits // 8 + 2 * 4 * numel // GROUP + numel * 2  # bf16 out
    compare("quant", op, SHAPE, torch.bfloat16, device, providers, bytes_moved=moved)


@pytest.mark.parametrize("device", DEVICES)
def test_round_bf16_stochastic(compare, device):
    op = "round_bf16_stochastic"
    x = torch.randn(SHAPE, device=device)
    providers = {
        "reference": lambda: ref.round_bf16_stochastic(x, 1, 0),
        _backends.SERVED_BY[op][device]: lambda: torch.ops.fastgrad.round_bf16_stochastic(x, 1, 0),
    }
    compare("quant", op, SHAPE, torch.float32, device, providers, bytes_moved=x.numel() * 6, rounds=3)


@pytest.mark.parametrize("device", DEVICES)
def test_copy_bandwidth(compare, device):
    """The ceiling for these memory-bound ops: read 4 bytes and write 4 bytes per element."""
    x = torch.randn(SHAPE, device=device)
    out = torch.empty_like(x)
    compare("quant", "copy", SHAPE, torch.float32, device, {"copy": lambda: out.copy_(x)}, bytes_moved=x.numel() * 8)
