"""Q-GaLore: GaLore with an INT4 projector, an adaptive refresh interval and INT8 weights updated
by stochastic rounding (Zhang et al. 2024; docs/algorithms.md §3).

Pieces (§3.2–3.4), all per parameter of a ``rank`` group:

(A) after each fp32 SVD the projector P (r'×n right / m×r' left) is quantized to packed INT4
    (:func:`fastgrad.ops.quantize_int4`, asymmetric, round to nearest, groups of
    ``proj_group_size`` values along P's rows, capped at the row length) and only the codes,
    scales and zeros are kept. Every projection and back-projection passes that
    :class:`~fastgrad.ops.QuantizedTensor` to :func:`fastgrad.ops.lowrank_project` /
    :func:`~fastgrad.ops.lowrank_project_back_add_`, i.e. the ``lowrank_project_quantized`` and
    ``lowrank_project_back_quantized_add_`` ops, with the dequantization fused into the matmul: a
    dense P is never formed by the optimizer.
(B) adaptive interval T: at each refresh, c = cos(v_prev, v) of the first singular vector used
    for projection (first row of P right, first column left, on the un-quantized P); c enters a
    queue of ``queue_size``; when the queue is full and its mean ≥ ``cos_threshold``,
    T ← int(T·``gamma_proj``). The next refresh is the next k with k % T == 0 (QG schedule).
(C) INT8 weights (:class:`fastgrad.nn.QLinear`): Ŵ = dequant(codes) in fp32,
    W_new = Ŵ − η·α·up(N), re-quantized with stochastic rounding (fresh per-group min/max,
    ``seed`` per parameter, ``offset`` advanced by m·n every step) into the layer's
    codes/scales/zeros in place. With the moment update this is one fused op per weight,
    :func:`fastgrad.ops.galore_adam_step_` (``galore_adam_step_int8_``), which works a block of
    rows at a time, so no m×n float copy of the weight is ever formed; with 8-bit moments
    (:class:`QGaLoreAdamW8bit`) the op updates the decoded moments, which are then re-encoded.
(D) Between refreshes a QLinear computes only the projected gradient R in backward, with the INT4
    P (:mod:`fastgrad.nn.lowrank`): with (C), a non-refresh step has no m×n tensor at all.

Float parameters are updated too (QG-8 fixed): non-``rank`` groups (embeddings, norms, the head,
biases) get AdamW; a float 2-D weight placed in a ``rank`` group gets the GaLore update with
the INT4 projector, in place in its own dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fastgrad.nn.qlinear import QLinear, qlinear_of
from fastgrad.ops import (
    QuantizedTensor,
    dequantize_int8,
    quantize_int8,
)
from fastgrad.optim.base import ParamStep
from fastgrad.optim.galore import GaLoreAdamW
from fastgrad.optim.galore8bit import EightBitMoments
from fastgrad.optim.param_groups import lowrank_and_rest
from fastgrad.optim.projectors import (
    QuantizedSVDProjector,
    effective_rank,
    mix_seed,
    proj_group_size,
    proj_shape,
    resolve_side,
)
from fastgrad.optim.sharding import local

__all__ = ["QGaLoreAdamW", "QGaLoreAdamW8bit", "qgalore_param_groups"]

# Q-GaLore keys of a rank group, with their defaults (run_pretrain.py / projector class).
QGALORE_DEFAULTS: dict[str, Any] = {
    "proj_group_size": 256,
    "cos_threshold": 0.4,
    "gamma_proj": 2.0,
    "queue_size": 5,
    "stochastic_round": True,
}
_SR_SALT = 0x5152_4F55_4E44  # separates the SR stream's seed from the projector's
# fp32 elements of a full-rank INT8 weight (a QLinear weight in a group without ``rank``)
# dequantized at once by its update (whole rows): no m×n float copy of a quantized weight.
UPDATE_BLOCK_ELEMS = 1 << 20


class QuantizedWeights:
    """What Q-GaLore's optimizers share, over a :class:`~fastgrad.optim.base.LowRankOptimizer`: the
    uint8 weights of :class:`fastgrad.nn.QLinear` layers, updated by stochastic rounding (each
    weight's own Philox stream), and the low-rank groups' INT4 SVD projector with the adaptive
    refresh interval (module docstring, (A)-(C)). Subclasses: :class:`QGaLoreAdamW` and
    :class:`QGaLoreMuon`."""

    keep_dtype_keys = ("proj_scales", "proj_zeros", "proj_past", "proj_queue")

    # the refresh statistic's cosine: signed, or its absolute value (QG-4)
    signed_cosine = False

    def _normalize_lowrank_group(self, group: dict[str, Any]) -> None:
        if group.get("state_transfer"):
            raise ValueError(f"{type(self).__name__}: state_transfer is not supported (Q-GaLore keeps the moments)")
        super()._normalize_lowrank_group(group)
        if group["projector"] != "svd":
            raise ValueError(f"{type(self).__name__}: only projector='svd' is supported, got {group['projector']!r}")
        for key, value in QGALORE_DEFAULTS.items():
            group.setdefault(key, value)
        if not isinstance(group["queue_size"], int) or group["queue_size"] < 1:
            raise ValueError(f"{type(self).__name__}: queue_size must be a positive int, got {group['queue_size']!r}")
        if group["gamma_proj"] <= 0:
            raise ValueError(f"{type(self).__name__}: gamma_proj must be > 0, got {group['gamma_proj']!r}")
        if not isinstance(group["proj_group_size"], int) or group["proj_group_size"] < 2:
            size = group["proj_group_size"]
            raise ValueError(f"{type(self).__name__}: proj_group_size must be an int >= 2, got {size!r}")
        for p in group["params"]:  # INT4 rows must have an even length: fail here, not at the first step
            side = resolve_side(group["proj_side"], p.shape)
            proj_group_size(proj_shape(p.shape, side, effective_rank(group["rank"], p.shape))[1], 2)

    def projector(self, group: dict[str, Any]) -> QuantizedSVDProjector:
        opts = (group["proj_group_size"], group["cos_threshold"], group["gamma_proj"], group["queue_size"])
        key = ("qsvd", *opts, self.signed_cosine)
        proj = self._projector_cache.get(key)
        if proj is None:
            proj = self._projector_cache[key] = QuantizedSVDProjector(*opts, signed_cos=self.signed_cosine)
        return proj

    def refresh_due(self, group: dict[str, Any], state: dict[str, Any]) -> bool:
        """k % T == 0 with the parameter's own T; resolves a pending growth of T first.

        A growth decided at the last refresh (a host bool) is applied at the first step that is a
        multiple of the old or of the grown T: the schedule of applying it at the refresh."""
        gap = state.setdefault("proj_gap", group["update_proj_gap"])
        k = state["step"]
        pending = state.get("proj_pending")
        if pending is not None:
            grown = max(1, int(gap * group["gamma_proj"]))
            if k % gap == 0 or k % grown == 0:
                if pending:
                    gap = state["proj_gap"] = grown
                del state["proj_pending"]
        return k % gap == 0

    def update_writes(self, it: ParamStep) -> list[torch.Tensor]:
        """An INT8 weight's update rewrites its layer's scales and zeros too."""
        if it.param.dtype == torch.uint8:
            return list(self._int8_rows(it)[0][:3])
        return [it.param]

    def _int8_rows(self, it: ParamStep) -> tuple[QuantizedTensor, int]:
        """The INT8 weight this rank updates: its rows of the layer's codes, scales and zeros (all
        of them unless the layer is row-sharded by FSDP2), and the index of their first element in
        the whole m×n weight. Stochastic rounding draws element (i, j) of the weight at stream
        position offset + i·n + j, so the codes do not depend on how the rows are split."""
        layer = qlinear_of(it.source)
        if layer is None:
            raise RuntimeError(
                f"{type(self).__name__}: uint8 parameter #{it.index} {tuple(it.source.shape)} is not the weight of "
                "a live fastgrad.nn.QLinear (run a forward/backward through the layer before stepping; under "
                "FSDP2 shard the model with fastgrad.nn.fully_shard_model)"
            )
        first_row = it.shard.offset if it.shard is not None else 0
        rows = QuantizedTensor(it.param, local(layer.scales), local(layer.zeros), 8)
        return rows, first_row * it.source.shape[1]

    def _sr_stream(self, group: dict[str, Any], it: ParamStep) -> tuple[int, int]:
        """(seed, offset) of the weight's stochastic-rounding stream (seeded on its first update)."""
        st = it.state
        if "sr_seed" not in st:
            st["sr_seed"] = mix_seed(self._param_seed(group, it.param, it.index), _SR_SALT)
            st["sr_offset"] = 0
        return st["sr_seed"], st["sr_offset"]

    def _update_int8(
        self,
        group: dict[str, Any],
        it: ParamStep,
        delta_rows: Callable[[int, int], torch.Tensor],
        step_size: float,
        *,
        decay_after: bool = False,
    ) -> None:
        """An INT8 weight's step, a block of its rows at a time: Ŵ dequantized to fp32, decayed by
        (1 − lr·wd) (before the update, or ``decay_after`` it), Ŵ − ``step_size``·Δ with Δ's rows
        [r0, r1) from ``delta_rows(r0, r1)`` (fp32), re-quantized with stochastic rounding into the
        layer's codes/scales/zeros in place; the stream then advances by the whole weight's m·n.
        Groups lie within rows and element (i, j) is drawn at stream position offset + i·n + j, so
        the result is that of updating the whole matrix at once, with no m×n temporary."""
        (codes, scales, zeros, _), first = self._int8_rows(it)
        group_size = qlinear_of(it.source).group_size
        seed, offset = self._sr_stream(group, it)
        decay = 1.0 - group["lr"] * group["weight_decay"]
        stochastic = bool(group.get("stochastic_round", True))
        m, n = codes.shape
        block = max(1, UPDATE_BLOCK_ELEMS // max(n, 1))
        for r0 in range(0, m, block):
            r1 = min(m, r0 + block)
            w = dequantize_int8(codes[r0:r1], scales[r0:r1], zeros[r0:r1], torch.float32)
            if decay != 1.0 and not decay_after:
                w.mul_(decay)
            w.add_(delta_rows(r0, r1), alpha=-step_size)
            if decay != 1.0 and decay_after:
                w.add_(w, alpha=-group["lr"] * group["weight_decay"])  # Ŵ − lr·wd·Ŵ, as the reference writes it
            q = quantize_int8(w, group_size, stochastic=stochastic, seed=seed, offset=offset + first + r0 * n)
            codes[r0:r1].copy_(q.codes)
            scales[r0:r1].copy_(q.scales)
            zeros[r0:r1].copy_(q.zeros)
        it.state["sr_offset"] += it.source.numel()


class QGaLoreAdamW(QuantizedWeights, GaLoreAdamW):
    """Q-GaLore AdamW: INT4 projector, adaptive refresh, INT8 weights with stochastic rounding.

    Param groups: a group with ``rank`` is low-rank (build them with :func:`qgalore_param_groups`):
    it takes the uint8 ``weight`` of :class:`fastgrad.nn.QLinear` layers (or float 2-D weights).
    Keys and defaults: ``rank``; ``update_proj_gap`` initial T = 200; ``scale`` α = 0.25;
    ``proj_side`` = "std" (any rule of :mod:`~fastgrad.optim.projectors`); ``proj_group_size`` 256;
    ``cos_threshold`` 0.4; ``gamma_proj`` 2; ``queue_size`` 5; ``stochastic_round`` True (False:
    RTN re-quantization, for ablations); ``seed`` 0. Only ``projector="svd"`` is supported and
    ``state_transfer`` is not. Groups without ``rank`` are plain AdamW (a uint8 QLinear weight in
    such a group gets a full-rank AdamW step on Ŵ and is re-quantized the same way).

    The weight gradient of a QLinear is ``weight.grad`` (fp32 m×n, accumulated by the layer's
    backward; see :mod:`fastgrad.nn.qlinear`); the layer's scales/zeros are found with
    :func:`fastgrad.nn.qlinear_of`, so the layer must be alive (it registers its weight when built
    and at each forward, a copied or reloaded model at its first forward).

    FSDP2 (:func:`fastgrad.nn.fully_shard_model`): each rank updates its rows of the codes, scales and
    zeros, at the stochastic-rounding stream positions of their elements in the whole weight, so the
    codes do not depend on the number of ranks (docs/algorithms.md §11).

    Step of a QLinear weight (codes q, scales s, zeros z; k the 0-based step; t = k + 1):
        if k % T == 0:  P = INT4(top-r' singular vectors of G), adapt T (module docstring, (B))
        R = down(G, P̂)                              # lowrank_project_quantized
        M ← β1 M + (1−β1) R ;  V ← β2 V + (1−β2) R⊙R
        default (torch AdamW):   N = M / (√V/√(1−β2^t) + ε),     η = lr/(1−β1^t)
        faithful (bnb, §1.4):    N = M / (√V + ε·√(1−β2^t)),     η = lr·√(1−β2^t)/(1−β1^t)
        Ŵ = q·s + z (fp32);  Ŵ ← Ŵ·(1 − lr·wd)   (default; faithful: Ŵ ← Ŵ − lr·wd·Ŵ after the update)
        Ŵ ← Ŵ − η·α·up(N, P̂)
        (q, s, z) ← quantize_int8(Ŵ, g, stochastic=True, seed=sr_seed, offset=sr_offset)
        sr_offset += m·n
    (from the moment update on: one fused ``galore_adam_step_int8_`` call per weight)
    ``faithful=True`` also uses the *signed* cosine for the refresh statistic (QG-4: an SVD that
    returns −v gives c ≈ −1 and can keep T from growing); the default uses |c|. Defaults
    β = (0.9, 0.999), ε = 1e-8, wd = 0 (Q-GaLore's scripts use β2 = 0.95, QG-1: pass it).

    Differences from q-galore-torch that are not mode switches: P codes are packed two per byte
    (QG-3) and the quantizer's range always includes the group (no QG-2 clipping); weight
    scales/zeros stay fp32 (no QG-5 drift); SR draws from a counter-based Philox stream keyed on
    (seed, offset) in fp32 (reproducible, no QG-6 bf16 resolution loss); float parameters are
    updated (QG-8); the cosine/queue test runs on the device and its outcome is read on the host at
    the refresh (one sync per refreshed weight once the queue is full, where the SVD synchronises
    anyway) and applied at the next step that could be a refresh under either the old or the grown
    T, giving the same schedule as q-galore-torch's eager ``.item()``: steps between refreshes do
    not synchronise. Adam states are fp32 (not bnb 8-bit).

    NaN/Inf: as :class:`~fastgrad.optim.base.LowRankOptimizer`: a non-finite gradient skips that
    parameter (codes, scales, zeros, moments, projector, queue, T, SR offset unchanged) or raises.
    Checkpoints: the state is tensors and ints (``torch.load(weights_only=True)``); with the
    model's state_dict (codes, scales, zeros) a resume is bitwise exact.

    Optimizer-state bytes, per low-rank weight m×n (d = min, D = max, r' = min(r, d), g the
    projector group along P's rows (≤ ``proj_group_size``), Q = queue_size):
        moments 2·D·r'·4  +  INT4 projector r'·d/2 + 8·r'·d/g  +  past vector 4·(n or m: the
        length of P's first row/column)  +  queue 4·Q
    plus 2·numel·4 per full-rank (AdamW) parameter. :meth:`state_bytes` sums the actual tensors.
    Transient per step: on refresh steps the fp32 gradient m×n (the layer's ``weight.grad``);
    between refreshes only R (the layer computes it, :mod:`fastgrad.nn.lowrank`); and during a
    weight's update the fused op's fp32 block of its rows (≤ 1 MiB on CPU).
    """

    extra_defaults = {"seed": 0, "stochastic_round": True}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        faithful: bool = False,
        nonfinite: str = "skip",
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, faithful=faithful, nonfinite=nonfinite)

    @property
    def scalar_policy(self) -> str:
        """torch.optim.AdamW's bias corrections; bitsandbytes' (Q-GaLore's reference) if faithful."""
        return "bnb" if self.faithful else "torch"

    @property
    def signed_cosine(self) -> bool:
        return self.faithful

    # ------------------------------------------------------------------ update
    def _fused_target(self, group: dict[str, Any], it: ParamStep) -> tuple[Any, dict[str, Any]]:
        """An INT8 weight is updated in its codes, scales and zeros, re-quantized from the weight's
        stochastic-rounding stream, whose next m·n positions the update takes (:meth:`_fused_step`
        advances the stream once the op has run)."""
        if it.param.dtype != torch.uint8:
            return it.param, {}
        weight, first = self._int8_rows(it)
        seed, offset = self._sr_stream(group, it)
        rounding = dict(stochastic=bool(group.get("stochastic_round", True)), seed=seed, offset=offset + first)
        return weight, rounding

    def _fused_step(self, group: dict[str, Any], it: ParamStep, firsts: list, seconds: list) -> None:
        super()._fused_step(group, it, firsts, seconds)
        if it.param.dtype == torch.uint8:
            it.state["sr_offset"] += it.source.numel()  # the whole weight's m·n, whatever rows this rank holds

    def _apply_direction(self, group: dict[str, Any], it: ParamStep, normed: torch.Tensor, step_size: float) -> None:
        """A full-rank INT8 weight (a QLinear weight in a group without ``rank``): −η·N applied by
        :meth:`~QuantizedWeights._update_int8` (decayed first, or after the update if
        :attr:`faithful`). Low-rank INT8 weights take the fused op (:meth:`_fused_target`); float
        weights GaLoreAdamW's update."""
        if it.param.dtype != torch.uint8:
            super()._apply_direction(group, it, normed, step_size)
            return
        self._update_int8(group, it, lambda r0, r1: normed[r0:r1], step_size, decay_after=self.faithful)


class QGaLoreAdamW8bit(EightBitMoments, QGaLoreAdamW):
    """:class:`QGaLoreAdamW` with 8-bit Adam moments, as in the Q-GaLore recipe (whose optimizer
    builds on bitsandbytes' 8-bit Adam; docs/algorithms.md §3): INT8 weights, INT4 projector, and the
    moments of every tensor of at least ``min_8bit_size`` elements (the projected D×r' moments of
    the QLinear weights, the embeddings and the head) in the representation of
    :class:`~fastgrad.optim.GaLoreAdamW8bit` (V^(1/4) and M/√V̂ per block of ``block_size``,
    stochastic rounding; about 2.05 bytes per element instead of 8). Everything else — groups,
    defaults, update rule, ``faithful``, adaptive interval, NaN/Inf policy, checkpoints — is
    QGaLoreAdamW's. Optimizer-state bytes: QGaLoreAdamW's with each 8-bit tensor's moments
    replaced by 2·n_pad + 12·blocks (n_pad = n rounded up to ``block_size``)."""

    keep_dtype_keys = QGaLoreAdamW.keep_dtype_keys + EightBitMoments.keep_dtype_keys


def qgalore_param_groups(
    model: nn.Module, rank: int, update_proj_gap: int = 200, scale: float = 0.25, **group_kwargs: Any
) -> list[dict[str, Any]]:
    """``[low-rank group, rest group]`` for :class:`QGaLoreAdamW` on a model converted with
    :func:`fastgrad.nn.quantize_model`.

    The low-rank group holds the uint8 ``weight`` of every :class:`~fastgrad.nn.QLinear` (once,
    in module order) with ``rank``, ``update_proj_gap`` (initial T), ``scale`` and
    ``group_kwargs`` (e.g. ``proj_group_size``, ``cos_threshold``, ``lr``); the rest group holds
    every other trainable parameter (embeddings, norms, biases, the head) for plain AdamW.
    """
    seen: set[int] = set()
    lowrank = []
    for module in model.modules():
        if isinstance(module, QLinear) and module.weight_trainable and id(module.weight) not in seen:
            seen.add(id(module.weight))
            lowrank.append(module.weight)
    group = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, **group_kwargs}
    return lowrank_and_rest(model, lowrank, group)
