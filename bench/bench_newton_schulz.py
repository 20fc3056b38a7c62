"""Newton–Schulz orthogonalization (Muon's update direction), ``fastgrad.ops.newton_schulz``.

    python -m pytest bench/bench_newton_schulz.py --benchmark-only   # rows -> bench/results/newton_schulz.csv

Providers: ``torch-sequence`` (torch.optim.Muon's op sequence in Python: norm, clamp, div, then per step
``y @ y.T`` and two ``torch.addmm``; the bar to meet, and bitwise the op's result), the kernel that
serves the op (``cpp`` on CPU), and on the small shapes ``reference`` (fastgrad/_reference.py, the
same sequence plus the copy into the output). Providers of a case are timed interleaved.

Shapes: LLaMA weights, (out, in): 60M attention 512×512, MLP down 512×1376 (wide) and gate/up 1376×512
(tall: transposed inside); 1B MLP 2048×5461 and 5461×2048; 7B MLP 4096×11008 with one step only. On
CPU the 7B case runs only with FASTGRAD_BENCH_LARGE=1 (seconds per call on 2 cores in fp32).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastgrad import _backends, ops
from fastgrad import _reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EPS = 1e-7
# (m, n, steps)
CASES = [
    (512, 512, 5),
    (512, 1376, 5),
    (1376, 512, 5),
    (2048, 5461, 5),
    (5461, 2048, 5),
    (4096, 11008, 1),
]
LARGE = 4096 * 11008


def _torch_sequence(x: torch.Tensor, steps, eps: float = EPS) -> torch.Tensor:
    """torch.optim.Muon (torch 2.13, ``_zeropower_via_newtonschulz``) on a 2-d x, out of place."""
    t = x.size(0) > x.size(1)
    y = x.T if t else x
    y = y.div(y.norm().clamp(min=eps))
    for a, b, c in steps:
        g = y @ y.T
        u = torch.addmm(g, g, g, beta=b, alpha=c)
        y = torch.addmm(y, u, y, beta=a)
    return y.T if t else y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("m", "n", "steps"), CASES)
def test_newton_schulz(compare, device, dtype, m, n, steps):
    if device == "cpu" and m * n >= LARGE and os.environ.get("FASTGRAD_BENCH_LARGE", "0") in ("", "0"):
        pytest.skip("7B shape on CPU: set FASTGRAD_BENCH_LARGE=1")
    x = torch.randn(m, n, device=device).to(dtype)
    triples = [ops.NS_COEFFICIENTS] * steps
    flat = list(ops.NS_COEFFICIENTS) * steps
    served = _backends.SERVED_BY["newton_schulz"][device]
    providers = {
        "torch-sequence": lambda: _torch_sequence(x, triples),
        served: lambda: ops.newton_schulz(x, steps),
    }
    small = m * n <= 1 << 20
    if small and served != "reference":
        providers["reference"] = lambda: ref.newton_schulz(x, flat, EPS)
    s, length = min(m, n), max(m, n)
    flops = steps * (4 * s * s * length + 2 * s**3)  # Y Yᵀ and B Y: 2·s²·l each; A·A: 2·s³
    compare(
        "newton_schulz",
        f"newton_schulz {steps} steps",
        (m, n),
        dtype,
        device,
        providers,
        flops=flops,
        rounds=10 if small else 5,
    )
