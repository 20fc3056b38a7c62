"""Optimizer step time and state bytes: fastgrad vs the reference packages, per weight shape.

    python -m pytest bench/bench_optim.py --benchmark-only      # rows -> bench/results/optim.csv

One weight of each LLaMA layer shape (60M attention, 1B attention and MLP), rank per the recipes,
fp32 on CPU. Non-refresh steps only (update_proj_gap = ∞ after one refresh); the refresh is
timed separately per projector. galore-torch is a test dependency; apollo-torch is not used.
"""

from __future__ import annotations

import pytest
import torch

from fastgrad.optim import GaLoreAdamW

SHAPES = {"60m-attn": (512, 512, 128), "1b-attn": (2048, 2048, 128), "1b-mlp": (5461, 2048, 512)}


def _galore_torch():
    return pytest.importorskip("galore_torch").GaLoreAdamW


def _optimizer(cls, shape, projector=None):
    m, n, r = shape
    w = torch.nn.Parameter(torch.randn(m, n))
    group = {"params": [w], "rank": r, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}
    if projector is not None:
        group["projector"] = projector
    opt = cls([group], lr=1e-3)
    w.grad = torch.randn(m, n) * 1e-3
    opt.step()  # the refresh step: not timed
    return opt


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_galore_step(compare, shape_name):
    shape = SHAPES[shape_name]
    m, n, r = shape
    providers = {
        "galore-torch": _optimizer(_galore_torch(), shape).step,
        "fastgrad": _optimizer(GaLoreAdamW, shape).step,
    }
    compare("optim", "GaLoreAdamW step", shape, torch.float32, "cpu", providers, flops=4 * m * n * r, rounds=20)


def test_refresh(compare):
    m, n, r = SHAPES["1b-attn"]
    providers = {}
    for projector in ("svd", "randomized", "dct"):
        w = torch.nn.Parameter(torch.randn(m, n))
        opt = GaLoreAdamW([{"params": [w], "rank": r, "update_proj_gap": 1, "projector": projector}], lr=1e-3)
        w.grad = torch.randn(m, n)
        providers[projector] = opt.step
    compare("optim", "GaLoreAdamW refresh step", (m, n, r), torch.float32, "cpu", providers, rounds=3)
