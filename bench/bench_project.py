"""Low-rank projection R = PᵀG / G Pᵀ and back-projection, dense and INT4/INT8 P.

    python -m pytest bench/bench_project.py --benchmark-only      # rows -> bench/results/project.csv

Providers: ``torch-matmul`` (a dense matmul of the same shape in the same dtype: fp32 on CPU,
bf16 cuBLAS on GPU, the bar to meet; for the update, matmul then ``add_``), ``reference-int4``
(dequantize P, then matmul), and the kernel that serves the op (``cpp``/``triton``) with a dense,
INT8 or INT4 P. Providers of a case are timed interleaved.
"""

from __future__ import annotations

import pytest
import torch

from fastgrad import _backends, ops
from fastgrad import _reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (m, n, r, side): LLaMA layer shapes with the side GaLore's std rule picks (right when m ≥ n), so P's
# rows run along min(m, n) or r: 7B attention (both sides), 7B MLP up and down, 1B MLP (odd 5461).
CASES = [
    (4096, 4096, 128, "left"),
    (4096, 4096, 128, "right"),
    (11008, 4096, 256, "right"),
    (4096, 11008, 256, "left"),
    (5461, 2048, 512, "right"),
]


def _dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def _operands(device, m, n, r, side):
    g = torch.randn(m, n, device=device, dtype=_dtype(device))
    p = torch.randn((m, r) if side == "left" else (r, n), device=device, dtype=_dtype(device)) / r**0.5
    return g, p


def _group(p: torch.Tensor) -> int:
    return 128 if p.shape[-1] % 128 == 0 else p.shape[-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("m", "n", "r", "side"), CASES)
def test_project(compare, device, m, n, r, side):
    g, p = _operands(device, m, n, r, side)
    q8 = ops.quantize_int8(p.float().contiguous(), _group(p))
    q4 = ops.quantize_int4(p.float().contiguous(), _group(p))
    served = _backends.SERVED_BY["lowrank_project"][device]
    served_q = _backends.SERVED_BY["lowrank_project_quantized"][device]
    providers = {
        "torch-matmul": (lambda: p.t() @ g) if side == "left" else (lambda: g @ p.t()),
        served: lambda: ops.lowrank_project(g, p, side),
        f"{served_q}-int8": lambda: ops.lowrank_project(g, q8, side),
        f"{served_q}-int4": lambda: ops.lowrank_project(g, q4, side),
        "reference-int4": lambda: ref.lowrank_project_quantized(g, q4.codes, q4.scales, q4.zeros, 4, side),
    }
    compare("project", f"project {side}", (m, n, r), g.dtype, device, providers, flops=2 * m * n * r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("m", "n", "r", "side"), CASES[:2])
def test_project_back_add(compare, device, m, n, r, side):
    """The optimizer's weight update W += s·up(R): torch's two steps vs the fused in-place op."""
    g, p = _operands(device, m, n, r, side)
    low = ops.lowrank_project(g, p, side)
    q4 = ops.quantize_int4(p.float().contiguous(), _group(p))
    w = torch.zeros(m, n, device=device, dtype=g.dtype)
    served = _backends.SERVED_BY["lowrank_project_back_add_"][device]
    served_q = _backends.SERVED_BY["lowrank_project_back_quantized_add_"][device]
    providers = {
        "torch-matmul": (lambda: w.add_(p @ low, alpha=-1e-3))
        if side == "left"
        else (lambda: w.add_(low @ p, alpha=-1e-3)),
        served: lambda: ops.lowrank_project_back_add_(w, low, p, side, -1e-3),
        f"{served_q}-int4": lambda: ops.lowrank_project_back_add_(w, low, q4, side, -1e-3),
    }
    compare("project", f"project_back_add {side}", (m, n, r), g.dtype, device, providers, flops=2 * m * n * r)
