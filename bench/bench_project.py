"""Low-rank projection R = PᵀG / G Pᵀ and back-projection, dense and INT4/INT8 P.

    python -m pytest bench/bench_project.py --benchmark-only      # rows -> bench/results/project.csv

Providers: ``torch-matmul`` (a dense matmul of the same shape in the same dtype: fp32 on CPU,
bf16 cuBLAS on GPU, the bar to meet), ``reference-int4`` (dequantize P, then matmul), and the
kernel that serves the op (``cpp``/``triton``) with a dense, INT8 or INT4 P.
"""

from __future__ import annotations

import pytest
import torch

from fastgrad import _backends, ops
from fastgrad import _reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(4096, 4096, 128), (4096, 11008, 256), (2048, 5461, 512)]  # LLaMA-7B attn, 7B MLP, 1B MLP (odd n)


def _dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def _operands(device, m, n, r, side):
    g = torch.randn(m, n, device=device, dtype=_dtype(device))
    p = torch.randn((m, r) if side == "left" else (r, n), device=device, dtype=_dtype(device)) / r**0.5
    return g, p


def _group(p: torch.Tensor) -> int:
    return 128 if p.shape[-1] % 128 == 0 else p.shape[-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("m", "n", "r"), CASES)
@pytest.mark.parametrize("provider", ["torch-matmul", "dense", "int8", "int4", "reference-int4"])
def test_project(measure, device, side, m, n, r, provider):
    g, p = _operands(device, m, n, r, side)
    flops = 2 * m * n * r
    served = _backends.SERVED_BY["lowrank_project"][device]
    served_q = _backends.SERVED_BY["lowrank_project_quantized"][device]
    if provider == "torch-matmul":
        fn = (lambda: p.t() @ g) if side == "left" else (lambda: g @ p.t())
    elif provider == "dense":
        fn, provider = (lambda: ops.lowrank_project(g, p, side)), served
    elif provider == "reference-int4":
        q = ops.quantize_int4(p.float().contiguous(), _group(p))
        fn = lambda: ref.lowrank_project_quantized(g, q.codes, q.scales, q.zeros, 4, side)  # noqa: E731
    else:
        bits = 8 if provider == "int8" else 4
        q = ops.quantize(p.float().contiguous(), bits, _group(p))
        fn, provider = (lambda: ops.lowrank_project(g, q, side)), f"{served_q}-{provider}"
    measure("project", f"project {side}", (m, n, r), g.dtype, provider, device, fn, flops=flops)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("m", "n", "r"), CASES[:1])
@pytest.mark.parametrize("provider", ["torch-matmul", "dense", "int4"])
def test_project_back(measure, device, side, m, n, r, provider):
    g, p = _operands(device, m, n, r, side)
    low = ops.lowrank_project(g, p, side)
    flops = 2 * m * n * r
    if provider == "torch-matmul":
        fn = (lambda: p @ low) if side == "left" else (lambda: low @ p)
    elif provider == "dense":
        fn, provider = (
            (lambda: ops.lowrank_project_back(low, p, side, 0.25)),
            _backends.SERVED_BY["lowrank_project_back"][device],
        )
    else:
        q = ops.quantize_int4(p.float().contiguous(), _group(p))
        served = _backends.SERVED_BY["lowrank_project_back_quantized"][device]
        fn, provider = (lambda: ops.lowrank_project_back(low, q, side, 0.25)), f"{served}-int4"
    measure("project", f"project_back {side}", (m, n, r), g.dtype, provider, device, fn, flops=flops)
