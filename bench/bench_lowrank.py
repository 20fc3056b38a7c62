"""The low-rank weight gradient R = down(dyᵀx, P) without forming G, and the INT8-weight linear.

    python -m pytest bench/bench_lowrank.py --benchmark-only      # rows -> bench/results/lowrank.csv

``test_lowrank_grad``: providers ``full-G-then-project`` (what every GaLore-type optimizer does:
G = dyᵀx, m×n, then ``lowrank_project``), and the kernel serving ``lowrank_grad`` with a dense or
an INT4 P. Shapes: LLaMA-60M/1B/7B layers with the side GaLore's std rule picks, T tokens of one
step (2048 on CPU: the issue's target case is 4096×4096, r = 128).

``test_int8_linear``: y = x Ŵᵀ and dx = dy Ŵ of a QLinear (INT8 codes, groups of 256 along rows):
``dequantize-then-matmul`` (Ŵ formed, as before) against the quantized-P ops that decode Ŵ inside
the matmul (what QLinear runs now).
"""

from __future__ import annotations

import pytest
import torch

from fastgrad import _backends, ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOKENS = {"cpu": 2048, "cuda": 8192}
# (model, m, n, r, side)
CASES = [
    ("60m-attn", 512, 512, 128, "right"),
    ("60m-mlp-up", 1376, 512, 128, "right"),
    ("1b-mlp-down", 2048, 5461, 512, "left"),
    ("7b-attn", 4096, 4096, 128, "right"),
    ("7b-attn", 4096, 4096, 128, "left"),
]


def _dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("model", "m", "n", "r", "side"), CASES)
def test_lowrank_grad(compare, device, model, m, n, r, side):
    t, dtype = TOKENS[device], _dtype(device)
    dy = torch.randn(t, m, device=device, dtype=dtype)
    x = torch.randn(t, n, device=device, dtype=dtype)
    p = torch.randn((m, r) if side == "left" else (r, n), device=device, dtype=dtype) / r**0.5
    q4 = ops.quantize_int4(p.float().contiguous(), 128 if p.shape[1] % 128 == 0 else p.shape[1])
    served = _backends.SERVED_BY["lowrank_grad"][device]
    served_q = _backends.SERVED_BY["lowrank_grad_quantized"][device]
    providers = {
        "full-G-then-project": lambda: ops.lowrank_project(dy.t() @ x, p, side),
        served: lambda: ops.lowrank_grad(dy, x, p, side),
        f"{served_q}-int4": lambda: ops.lowrank_grad(dy, x, q4, side),
    }
    rounds = 5 if device == "cpu" else 20
    compare(
        "lowrank", f"lowrank_grad {side} ({model})", (t, m, n, r), dtype, device, providers,
        flops=2 * t * (m + n) * r, rounds=rounds,
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("model", "m", "n"), [("60m-mlp-up", 1376, 512), ("7b-attn", 4096, 4096)])
@pytest.mark.parametrize("direction", ["forward", "dx"])
def test_int8_linear(compare, device, model, m, n, direction):
    t, dtype = TOKENS[device], _dtype(device)
    q = ops.quantize_int8(torch.randn(m, n, device=device), 256)
    served = _backends.SERVED_BY["lowrank_project_quantized" if direction == "forward" else
                                 "lowrank_project_back_quantized"][device]  # fmt: skip
    if direction == "forward":  # y = x Ŵᵀ (T×m)
        x = torch.randn(t, n, device=device, dtype=dtype)
        providers = {
            "dequantize-then-matmul": lambda: x @ q.dequantize(dtype).t(),
            f"{served}-fused": lambda: ops.lowrank_project(x, q, "right"),
        }
    else:  # dx = dy Ŵ (T×n)
        dy = torch.randn(t, m, device=device, dtype=dtype)
        providers = {
            "dequantize-then-matmul": lambda: dy @ q.dequantize(dtype),
            f"{served}-fused": lambda: ops.lowrank_project_back(dy, q, "right"),
        }
    rounds = 5 if device == "cpu" else 20
    compare("lowrank", f"int8_linear {direction} ({model})", (t, m, n), dtype, device, providers,
            flops=2 * t * m * n, rounds=rounds)  # fmt: skip
