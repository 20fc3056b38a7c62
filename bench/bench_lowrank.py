"""The low-rank weight gradient R = down(dyᵀx, P) without forming G, and the INT8-weight linear.

    python -m pytest bench/bench_lowrank.py --benchmark-only      # rows -> bench/results/lowrank.csv

``test_lowrank_grad``: providers ``full-G-then-project`` (what every GaLore-type optimizer does:
G = dyᵀx, m×n, then ``lowrank_project``), and the kernel serving ``lowrank_grad`` with a dense or
an INT4 P. Shapes: LLaMA-60M/1B/7B layers with the side GaLore's std rule picks, T tokens of one
step (2048 on CPU: the issue's target case is 4096×4096, r = 128).

``test_galore_adam_step``: one GaLore weight step between refreshes from R (moments, N,
back-projection, decay): ``unfused`` is the sequence the optimizers ran before the fused op
(elementwise moment ops, N, W·decay, ``lowrank_project_back_add_``), against the kernel serving
``galore_adam_step_``. ``int8`` does the same for a Q-GaLore INT8 weight with an INT4 P:
``unfused`` decodes the weight a block of rows at a time, adds the update and re-quantizes with
SR (dequantize_int8 + lowrank_project_back_add_ + quantize_int8), against
``galore_adam_step_int8_``.

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


STEP_HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-6, step_scale=-1e-3, decay=0.9999)
UNFUSED_BLOCK_ELEMS = 1 << 18  # rows decoded at once by the unfused INT8 update (as the fused kernel)


def _unfused_moments(first, second, low, beta1, beta2, eps):
    first.mul_(beta1).add_(low, alpha=1 - beta1)
    second.mul_(beta2).addcmul_(low, low, value=1 - beta2)
    return first / (second.sqrt() + eps)


def _unfused_step(w, first, second, low, p, side, hyper):
    normed = _unfused_moments(first, second, low, hyper["beta1"], hyper["beta2"], hyper["eps"])
    w.mul_(hyper["decay"])
    ops.lowrank_project_back_add_(w, normed, p, side, hyper["step_scale"])


def _unfused_int8_step(w, first, second, low, p, side, hyper):
    normed = _unfused_moments(first, second, low, hyper["beta1"], hyper["beta2"], hyper["eps"])
    m, n = w.codes.shape
    block = max(1, UNFUSED_BLOCK_ELEMS // n)
    for r0 in range(0, m, block):
        rows = slice(r0, min(m, r0 + block))
        wf = ops.dequantize_int8(w.codes[rows], w.scales[rows], w.zeros[rows], torch.float32).mul_(hyper["decay"])
        if side == "left":
            p_rows = ops.QuantizedTensor(p.codes[rows], p.scales[rows], p.zeros[rows], p.bits)
            ops.lowrank_project_back_add_(wf, normed, p_rows, side, hyper["step_scale"])
        else:
            ops.lowrank_project_back_add_(wf, normed[rows], p, side, hyper["step_scale"])
        q = ops.quantize_int8(wf, n // w.scales.shape[1], stochastic=True, seed=1, offset=r0 * n)
        w.codes[rows].copy_(q.codes)
        w.scales[rows].copy_(q.scales)
        w.zeros[rows].copy_(q.zeros)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("model", "m", "n", "r", "side"), CASES)
@pytest.mark.parametrize("weight", ["float", "int8"])
def test_galore_adam_step(compare, device, model, m, n, r, side, weight):
    dtype = _dtype(device)
    low = torch.randn((r, n) if side == "left" else (m, r), device=device)
    first, second = torch.zeros_like(low), torch.zeros_like(low)
    p = torch.randn((m, r) if side == "left" else (r, n), device=device) / r**0.5
    if weight == "float":
        w = torch.randn(m, n, device=device, dtype=dtype)
        p, low = p.to(dtype), low.to(dtype)
        first, second = first.to(dtype), second.to(dtype)
        op = "galore_adam_step_"

        def fused():
            ops.galore_adam_step_(w, first, second, low, p, side, **STEP_HYPER)

        def unfused():
            _unfused_step(w, first, second, low, p, side, STEP_HYPER)

    else:
        w = ops.quantize_int8(torch.randn(m, n, device=device), 256 if n % 256 == 0 else n)
        p = ops.quantize_int4(p.contiguous(), 128 if p.shape[1] % 128 == 0 else p.shape[1])
        op = "galore_adam_step_int8_"

        def fused():
            ops.galore_adam_step_(w, first, second, low, p, side, **STEP_HYPER, seed=1)

        def unfused():
            _unfused_int8_step(w, first, second, low, p, side, STEP_HYPER)

    served = _backends.SERVED_BY[op][device]
    rounds = 5 if device == "cpu" else 20
    compare(
        "lowrank", f"galore_adam_step {weight} W {side} ({model})", (m, n, r), dtype, device,
        {"unfused": unfused, f"{served}-fused": fused}, flops=2 * m * n * r, rounds=rounds,
    )  # fmt: skip
