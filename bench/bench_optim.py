"""Optimizer step time: fastgrad vs the reference packages, per weight shape.

    python -m pytest bench/bench_optim.py --benchmark-only      # rows -> bench/results/optim.csv

One weight of each LLaMA layer shape (60M attention, 1B attention and MLP), rank per the recipes,
fp32 on CPU. Non-refresh steps only (update_proj_gap = ∞ after one refresh); the refresh is
timed separately per projector. galore-torch and fira are test dependencies. Optimizer-state bytes
are checked against each optimizer's formula in tests/test_convergence.py, not here.

Cases and their baselines (``bench/report.py`` divides by the ``galore-torch`` row of a case):
  * GaLoreAdamW step: galore-torch vs fastgrad, and torch.optim.AdamW's full-rank step on the
    same weight (what the low-rank step replaces: its moments are m×n).
  * FiraAdamW step: fira 1.0.2 (``fira.FiraAdamW``, α = 0.25 as ``alpha``) vs fastgrad
    ``FiraAdamW`` (default variant "code", the same update); flops count fira's three m·n·r'
    products (down(G), up(R), up(N)). The report has no speed-up column for this case (its
    baseline is ``galore-torch``): read the fira row.
  * APOLLO step: galore-torch's and fastgrad's GaLoreAdamW step on the same weight and rank as
    the baseline, fastgrad ``Apollo`` (rank r, channel scaling, random projection redrawn from its
    seed at every step, as in APOLLO) and ``ApolloMini`` (rank 1, tensor scaling), and, when it is
    installed (``pip install apollo-torch``; benchmark only, non-commercial licence: called, its
    code never read or used), apollo-torch 1.0.3's ``APOLLOAdamW`` with the same settings.
  * QGaLoreAdamW step: a ``fastgrad.nn.QLinear`` (INT8 weight, groups of 256) with its fp32 m×n
    gradient in ``weight.grad``, rank r, INT4 projector: projection, moments, de-quantization,
    update and stochastic-rounding re-quantization of the whole weight. q-galore-torch is not
    timed: 1.0 fails with bitsandbytes 0.50 (``KeyError: 'percentile_clipping'``) and its
    optimizer builds on bitsandbytes' CUDA 8-bit Adam. As context the case also times the fp32
    GaLoreAdamW step of galore-torch and fastgrad on the same shape and rank. (Between refreshes of
    a real Q-GaLore run the layer's backward already delivers R = down(G), so the optimizer's
    projection is skipped; this case includes it.)
  * Muon step: one optimizer over the seven weights of one LLaMA 60M decoder layer (q, k, v, o
    512×512; gate, up 1376×512; down 512×1376), lr 0.02, μ 0.95, nesterov, 5 Newton–Schulz steps:
    ``torch.optim.Muon`` (the baseline) vs fastgrad ``Muon`` with ``ns_dtype`` bf16 (torch's
    behaviour, bitwise the same weights) and fp32, and ``Muon8bit`` (8-bit momentum, bf16 NS).
    Steps after the first (the buffers exist); flops count the iteration's products.
"""

from __future__ import annotations

import pytest
import torch

from fastgrad.nn import QLinear
from fastgrad.optim import Apollo, ApolloMini, FiraAdamW, GaLoreAdamW, Muon, Muon8bit, QGaLoreAdamW

SHAPES = {"60m-attn": (512, 512, 128), "1b-attn": (2048, 2048, 128), "1b-mlp": (5461, 2048, 512)}
# The attention and MLP weights of one LLaMA 60M decoder layer (fastgrad.models.get_config("60m", ...)).
MUON_LAYER_60M = [(512, 512)] * 4 + [(1376, 512), (1376, 512), (512, 1376)]


def _galore_torch():
    return pytest.importorskip("galore_torch").GaLoreAdamW


def _optimizer(cls, shape, projector=None, scale_key="scale", scale=0.25, rank=None, group_extra=None, **opt_kwargs):
    m, n, r = shape
    w = torch.nn.Parameter(torch.randn(m, n))
    group = {"params": [w], "rank": rank or r, "update_proj_gap": 10**9, scale_key: scale, "proj_type": "std"}
    group.update(group_extra or {})
    if projector is not None:
        group["projector"] = projector
    opt = cls([group], lr=1e-3, **opt_kwargs)
    w.grad = torch.randn(m, n) * 1e-3
    opt.step()  # the refresh step: not timed
    return opt


def _torch_adamw(shape):
    """torch.optim.AdamW (foreach) on the same m×n weight: the full-rank step GaLore replaces."""
    m, n, _ = shape
    w = torch.nn.Parameter(torch.randn(m, n))
    opt = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.randn(m, n) * 1e-3
    opt.step()
    return opt


def _galore_steps(shape, fastgrad_label="fastgrad GaLoreAdamW") -> dict:
    """The GaLoreAdamW steps of galore-torch (``bench/report.py``'s baseline) and fastgrad on one weight."""
    return {
        "galore-torch": _optimizer(_galore_torch(), shape).step,
        fastgrad_label: _optimizer(GaLoreAdamW, shape).step,
    }


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_galore_step(compare, shape_name):
    shape = SHAPES[shape_name]
    m, n, r = shape
    providers = {**_galore_steps(shape, "fastgrad"), "torch AdamW (full rank)": _torch_adamw(shape).step}
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


@pytest.mark.parametrize("shape_name", ["1b-attn", "1b-mlp"])
def test_fira_step(compare, shape_name):
    fira = pytest.importorskip("fira")
    shape = SHAPES[shape_name]
    m, n, r = shape
    providers = {
        "fira": _optimizer(fira.FiraAdamW, shape, scale_key="alpha", no_deprecation_warning=True).step,
        "fastgrad": _optimizer(FiraAdamW, shape).step,
    }
    compare("optim", "FiraAdamW step", shape, torch.float32, "cpu", providers, flops=6 * m * n * r, rounds=20)


@pytest.mark.parametrize("shape_name", ["1b-attn", "1b-mlp"])
def test_apollo_step(compare, shape_name):
    shape = SHAPES[shape_name]
    providers = {
        **_galore_steps(shape),
        "fastgrad Apollo": _optimizer(Apollo, shape, scale=1.0).step,
        "fastgrad ApolloMini (r=1)": _optimizer(ApolloMini, shape, scale=128.0, rank=1).step,
    }
    note = "baseline: GaLoreAdamW at the same rank"
    try:  # benchmark-only reference (CC-BY-NC: called, never read): pip install apollo-torch
        from apollo_torch import APOLLOAdamW
    except ImportError:
        note += "; apollo-torch not installed"
    else:
        channel = {"proj": "random", "scale_type": "channel"}
        tensor = {"proj": "random", "scale_type": "tensor"}
        providers["apollo-torch APOLLO"] = _optimizer(APOLLOAdamW, shape, scale=1.0, group_extra=channel).step
        providers["apollo-torch APOLLO-Mini (r=1)"] = _optimizer(
            APOLLOAdamW, shape, scale=128.0, rank=1, group_extra=tensor
        ).step
    compare("optim", "APOLLO step", shape, torch.float32, "cpu", providers, note=note, rounds=20)


def _qgalore_step(shape):
    """A non-refresh QGaLoreAdamW step of a QLinear(n -> m) weight whose fp32 gradient is set."""
    m, n, r = shape
    layer = QLinear(n, m, group_size=256, weight=torch.randn(m, n) * 0.02)
    opt = QGaLoreAdamW([{"params": [layer.weight], "rank": r, "update_proj_gap": 10**9, "scale": 0.25}], lr=1e-3)
    layer.weight.grad_dtype = torch.float32
    layer.weight.grad = torch.randn(m, n) * 1e-3
    opt.step()  # the refresh step (fp32 SVD, INT4 P): not timed

    def step():
        opt.step()
        return layer  # keeps the layer alive: the optimizer reaches its scales/zeros through a weak reference

    return step


@pytest.mark.parametrize("shape_name", ["1b-attn", "1b-mlp"])
def test_qgalore_step(compare, shape_name):
    shape = SHAPES[shape_name]
    m, n, r = shape
    providers = {**_galore_steps(shape), "fastgrad QGaLoreAdamW (INT8 W)": _qgalore_step(shape)}
    note = "q-galore-torch not timed (fails with bitsandbytes 0.50; CUDA 8-bit Adam); GaLore fp32 as context"
    compare(
        "optim", "QGaLoreAdamW step", shape, torch.float32, "cpu", providers, flops=4 * m * n * r, note=note, rounds=20
    )


def _muon_step(make):
    """``make(weights)``'s step on fresh weights of MUON_LAYER_60M with fixed fp32 gradients, after
    one untimed step (which creates the momentum buffers)."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(m, n, generator=gen) * 0.02) for m, n in MUON_LAYER_60M]
    for w in weights:
        w.grad = torch.randn(w.shape, generator=gen) * 1e-3
    opt = make(weights)
    opt.step()
    return opt.step


def test_muon_step(compare):
    options = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True}
    steps = 5
    flops = sum(2 * steps * (2 * min(s) ** 2 * max(s) + min(s) ** 3) for s in MUON_LAYER_60M)
    providers = {
        "torch.optim.Muon": _muon_step(lambda ws: torch.optim.Muon(ws, **options)),
        "fastgrad Muon (bf16 NS)": _muon_step(lambda ws: Muon(ws, **options)),
        "fastgrad Muon (fp32 NS)": _muon_step(lambda ws: Muon(ws, **options, ns_dtype=torch.float32)),
        "fastgrad Muon8bit (bf16 NS)": _muon_step(lambda ws: Muon8bit(ws, **options)),
    }
    note = "one LLaMA 60M layer: 4x512x512, 2x1376x512, 512x1376; baseline torch.optim.Muon"
    compare(
        "optim", "Muon step", ("llama60m-layer",), torch.float32, "cpu", providers, flops=flops, note=note, rounds=10
    )
