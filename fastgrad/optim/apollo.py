"""APOLLO and APOLLO-Mini: SGD-like memory, AdamW-level performance (Zhu et al., MLSys 2025; docs/algorithms.md §5).

Implemented from the maths of docs/algorithms.md §5 only (the reference code is CC-BY-NC: not read, not
used). The optimizer keeps Adam moments of a random projection R of each gradient and uses them
only to estimate a per-channel (or per-tensor) learning-rate scale for the raw gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fastgrad.optim.base import ParamStep
from fastgrad.optim.fira import ScaledLowRankAdam, channel_dim, channel_ratio, norm_growth_limiter
from fastgrad.optim.param_groups import galore_param_groups
from fastgrad.optim.sharding import sharded_norm

__all__ = ["Apollo", "ApolloMini", "apollo_param_groups"]

SCALE_TYPES = ("channel", "tensor")


class Apollo(ScaledLowRankAdam):
    """APOLLO: AdamW whose update for a low-rank weight is the raw gradient scaled by a low-rank estimate.

    Param groups: a group with ``rank`` is low-rank (2-D weights only), any other group is plain
    HF-AdamW. Low-rank group keys and defaults:
      ``rank`` r; ``update_proj_gap`` T = 200; ``scale`` α = 1 (enters as √α, QUIRK AP-4);
      ``scale_type`` = "channel" | "tensor"; ``projector`` = "random" (default) | "svd" |
      "randomized" | "dct" (``proj`` is accepted as APOLLO's alias); ``proj_side``/``proj_type`` =
      "std"; ``seed`` = 0 (see *Seeds*); ``scale_front`` and ``disable_nl`` (the constructor's
      values unless a group sets them).

    Step for a weight W (m×n), gradient G, k the 0-based step, r' = min(r, m, n):
        if k % T == 0:  P = projector(G)    random: P_ij ~ N(0, 1/r'), redrawn from (seed, k)
        R = down(G, P)  (right side, m ≥ n: G Pᵀ, m×r';  left side, m < n: Pᵀ G, r'×n)
        t = k + 1;  M, V ← HF-Adam moments of R;  N = M/(√V + ε)
        channel: s_c = ‖N_c‖/(‖R_c‖ + 1e-8) per channel c (rows if m ≥ n, columns if m < n: the
                 non-compressed dimension)          tensor: s = ‖N‖_F/(‖R‖_F + 1e-8)
        U = G ⊙ s;   if scale_front: U ← √α·U
        if not disable_nl: first step s_prev = ‖U‖; then ρ = max(‖U‖/(s_prev + 1e-8), 1.01)/1.01,
                 U ← U/ρ, s_prev = ‖U‖
        if not scale_front: U ← √α·U
        W ← W − η_t·U,  η_t = lr·√(1−β2^t)/(1−β1^t)  (lr if not correct_bias)
    ``scale_front`` only changes whether the limiter's remembered norm includes √α.

    Weight decay: torch-style by default (W ← W·(1 − lr·wd) before the update); ``faithful=True``
    applies it after the update on the updated weight, W ← W − lr·wd·W, as the reference does.

    Seeds (QUIRK AP-2 fixed): each parameter's projector seed is ``mix(seed, key)`` with the
    group's ``seed`` and a per-parameter key: the BLAKE2b hash of its name when the group carries
    ``param_names`` (give ``model.named_parameters()``-style ``(name, tensor)`` pairs), else its
    position among this optimizer's parameters plus ``index_offset``. So same-shaped weights get
    different projections also with one optimizer per parameter (layer-wise mode) as long as each
    instance gets the parameter's name, its global index as ``index_offset``, or its own group
    ``seed``. The seed is stored in the state (``proj_seed``) and restored by load_state_dict.

    Differences from the reference (apollo-torch 1.0.3, per docs/algorithms.md §5):
      * P is never stored (AP-3): it is redrawn from (seed, step) for each projection, in fp32 on
        the gradient's device then cast (so, like the reference, CPU and CUDA draw different P: AP-1);
        the stream is fastgrad's (SplitMix-mixed torch generator), not the reference's seed chain;
      * r is clipped to d = min(m, n) (the reference's random P may have r > d) and P ~ N(0, 1/r');
      * channels follow the projection side (identical to the reference's "rows if m ≥ n" for the
        default std side);
      * the limiter runs on the device (no host synchronisation), its norm is kept in fp32, and
        ‖U‖ is formed from G's per-channel norms (‖G ⊙ s‖² = Σ_c s_c²·‖G_c‖²); s is fp32;
      * no m×n temporary: U is never formed; W ← W − η_t·(√α/ρ)·s ⊙ G is one fused multiply-add
        (the reference materialises G ⊙ s and its scaled copies).

    Optimizer-state bytes (b = bytes per element of the gradient dtype, d = min(m,n), D = max(m,n)):
      Σ_lowrank [2·D·r'·b (M, V) + 4 (limiter norm, fp32; 0 with disable_nl) + P]
      + Σ_full 2·m·n·b, with P = 0 (random: regenerated), r'·d·b (svd, randomized), 4·r' (dct).
      APOLLO-Mini (r' = 1): 2·D·b + 4 per weight. The seed and step are Python ints.
    :meth:`state_bytes` sums the actual tensors.
    """

    #: group defaults of the low-rank groups (ApolloMini overrides them)
    group_defaults: dict[str, Any] = {"scale": 1.0, "scale_type": "channel", "projector": "random"}

    options = {"scale_front": False, "disable_nl": False, "index_offset": 0}

    def _check_options(self) -> None:
        if isinstance(self.index_offset, bool) or not isinstance(self.index_offset, int) or self.index_offset < 0:
            raise ValueError(
                f"{type(self).__name__}: index_offset must be a non-negative int, got {self.index_offset!r}"
            )

    def _option_defaults(self) -> dict[str, Any]:
        return {"scale_front": self.scale_front, "disable_nl": self.disable_nl}

    def _normalize_lowrank_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        if "proj" in group:  # APOLLO's name for the projector
            proj = group.pop("proj")
            if "projector" in group and group["projector"] != proj:
                raise ValueError(f"{name}: proj={proj!r} contradicts projector={group['projector']!r}")
            group["projector"] = proj
        for key, value in self.group_defaults.items():
            group.setdefault(key, value)
        super()._normalize_lowrank_group(group)
        if group["scale_type"] not in SCALE_TYPES:
            raise ValueError(f"{name}: scale_type must be one of {SCALE_TYPES}, got {group['scale_type']!r}")
        scale = group["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0.0:
            raise ValueError(f"{name}: scale must be a number >= 0 (it enters as sqrt(scale)), got {scale!r}")

    def _param_seed(self, group: dict[str, Any], p: torch.Tensor, index: int) -> int:
        return super()._param_seed(group, p, index + self.index_offset)

    def _lowrank_update(self, group: dict[str, Any], it: ParamStep, normed: torch.Tensor, step_size: float) -> None:
        grad = it.grad
        sqrt_scale = math.sqrt(group["scale"])
        dim = channel_dim(it.state["proj_side"]) if group["scale_type"] == "channel" else None
        # fp32: (m, 1) / (1, n) per channel, 0-d per tensor
        s = channel_ratio(normed, it.low, dim, it.shard, it.low_sharded)
        it.low = None
        coef = s * sqrt_scale
        if not group["disable_nl"]:
            # ‖G ⊙ s‖ without forming G ⊙ s: from G's per-channel (or whole) norm.
            g_norm = sharded_norm(grad, dim, it.shard, rows_sharded=True, keepdim=dim is not None)
            # s ⊙ ‖G_c‖ holds this rank's rows only for norms along rows (dim 1)
            u_norm = sharded_norm(s * g_norm, None, it.shard, rows_sharded=dim == 1)
            if group["scale_front"]:
                u_norm = u_norm * sqrt_scale
            rho = norm_growth_limiter(it.state, u_norm)
            if rho is not None:
                coef = coef.div_(rho)
        it.param.addcmul_(grad, coef, value=-step_size)


class ApolloMini(Apollo):
    """APOLLO-Mini: :class:`Apollo` with the rank-1 recipe's group defaults: ``scale_type="tensor"``
    and ``scale`` = 128 (so the update is scaled by √128 ≈ 11.3). Give its low-rank groups
    ``rank=1`` (e.g. ``apollo_param_groups(model, rank=1)``). State per weight: 2·D·b + 4 bytes."""

    group_defaults = {"scale": 128.0, "scale_type": "tensor", "projector": "random"}


def apollo_param_groups(
    model: nn.Module,
    rank: int,
    update_proj_gap: int = 200,
    scale: float | None = None,
    target_modules: str | Iterable[str] = ("attn", "mlp"),
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """``[low-rank group, rest group]`` as :func:`fastgrad.optim.galore_param_groups`, but without a
    ``scale`` unless one is given, so that the optimizer's default applies (Apollo 1, ApolloMini 128;
    galore_param_groups would put GaLore's 0.25 there)."""
    groups = galore_param_groups(
        model, rank, update_proj_gap, 1.0 if scale is None else scale, target_modules, **group_kwargs
    )
    if scale is None:
        del groups[0]["scale"]
    return groups
