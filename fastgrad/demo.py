"""``python -m fastgrad.demo``: a one-minute tour of the ops on this machine.

Quantizes a weight and shows that stochastic rounding keeps updates smaller than half a
quantization step (round-to-nearest drops them), projects a gradient through an INT4 projector
without ever forming a dense copy of it, and prints which backend served each op.
"""

from __future__ import annotations

import time

import torch

import fastgrad
from fastgrad import ops
from fastgrad.env import report


def _timed(fn, repeats: int = 5) -> tuple[float, object]:
    fn()  # warm-up (Triton compile on GPU)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3, out


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    print(f"fastgrad {fastgrad.__version__} on {device}\n")

    # 1. Sub-step updates: 100 updates of ±1/10 of a quantization step per element (a random but
    # fixed direction u), re-quantized after each one as an INT8-weight optimizer does.
    w = torch.randn(1024, 1024, device=device) * 0.02
    direction = torch.randint(0, 2, w.shape, device=device).float() * 2 - 1
    delta = ops.quantize_int8(w, 128).scales.repeat_interleave(128, dim=-1) * 0.1 * direction
    steps = 100
    q_sr = q_rtn = ops.quantize_int8(w, 128)
    for k in range(steps):
        q_sr = ops.quantize_int8(q_sr.dequantize() + delta, 128, stochastic=True, seed=1, offset=k * w.numel())
        q_rtn = ops.quantize_int8(q_rtn.dequantize() + delta, 128)
    start = ops.quantize_int8(w, 128).dequantize()
    intended = (steps * delta * direction).sum()
    print(f"INT8 weight, {steps} updates of 0.1 quantization step each: share of the total update kept")
    print(f"  round-to-nearest     {((q_rtn.dequantize() - start) * direction).sum() / intended:6.1%}")
    print(f"  stochastic rounding  {((q_sr.dequantize() - start) * direction).sum() / intended:6.1%}\n")

    # 2. Projection through an INT4 projector, dequantized inside the matmul.
    m, n, r = 2048, 2048, 128
    g = torch.randn(m, n, device=device)
    p = torch.linalg.qr(torch.randn(n, r, device=device))[0].t().contiguous()  # r×n, orthonormal rows
    p4 = ops.quantize_int4(p, 128)
    ms_dense, low_dense = _timed(lambda: ops.lowrank_project(g, p, "right"))
    ms_int4, low_int4 = _timed(lambda: ops.lowrank_project(g, p4, "right"))
    rel = (low_int4 - low_dense).norm() / low_dense.norm()
    print(f"Projection R = G·Pᵀ, G {m}×{n}, rank {r}:")
    print(f"  dense fp32 P  {p.numel() * 4 / 2**20:6.2f} MiB  {ms_dense:7.2f} ms")
    print(f"  INT4 P        {p4.nbytes / 2**20:6.2f} MiB  {ms_int4:7.2f} ms  (relative difference {rel:.3f})\n")
    print(report())


if __name__ == "__main__":
    main()
