"""GaLoreMuon: Muon in a GaLore subspace (docs/algorithms.md §10.4).

For a weight W (m×n) of a group with ``rank``, P its projector (r'×n right, m×r' left; any GaLore
projector: svd, randomized, dct, random), step t:

    R = down(G, P)                          R = G·Pᵀ (m×r') or Pᵀ·G (r'×n): from the gradient, or
                                            computed by a LowRankGradLinear layer without forming G
    B ← μ·B + (1−μ)·R                       the momentum, kept in the subspace (r'·max(m, n) values)
    U = (1−μ)·R + μ·B  (nesterov)  or  B
    O = NS_k(U)                             Newton–Schulz on the r'-wide matrix: O(r'²·max(m, n))
                                            multiply-adds per step instead of O(min(m, n)²·max(m, n))
    W ← W·(1 − η·λ) − η'·α·up(O, P)         back-projected into W in place (no m×n temporary)

with η' Muon's adjusted lr of the whole m×n weight (:func:`~fastgrad.optim.muon.adjusted_lr`) and α
the group's ``scale`` (1 by default: P has orthonormal rows or columns, so up(O, P) has the unit
singular values of O, as a Muon step). At a refresh the momentum is carried into the new basis (B ←
B·P_oldP_newᵀ on the right, P_newᵀP_old·B on the left: the part of up(B) the new subspace keeps)
unless the group sets ``state_transfer=False``. Groups without ``rank`` are Muon's (``use_muon``) or
AdamW's (``use_muon=False``), as in :class:`~fastgrad.optim.Muon`.

State per low-rank weight: the momentum B (r'·max(m, n)) and the projector's (P: r'·min(m, n) for
svd/randomized, r' indices for dct, a seed for random). FSDP2: a right-side R is sharded by rows and
gathered (m×r') for the iteration; a left-side R is the same on every rank (docs/algorithms.md §11).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fastgrad.ops import lowrank_project_back, lowrank_project_back_add_
from fastgrad.optim.base import LowRankOptimizer, ParamStep, transfer_moments
from fastgrad.optim.muon import Muon, adjusted_lr, with_adamw_rest
from fastgrad.optim.param_groups import galore_param_groups
from fastgrad.optim.qgalore import QuantizedWeights, qgalore_param_groups

__all__ = ["GaLoreMuon", "galore_muon_param_groups", "QGaLoreMuon", "qgalore_muon_param_groups"]


class GaLoreMuon(Muon):
    """Muon whose momentum and orthogonalization live in each weight's GaLore subspace (module
    docstring). Same constructor as :class:`~fastgrad.optim.Muon`; a group with ``rank`` takes the
    GaLore group keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_side``, ``projector``,
    ``state_transfer``, ...); build the groups with :func:`galore_muon_param_groups`."""

    # momentum_buffer first: the refresh keeps the old basis for the transfer when it exists
    moment_keys = ("momentum_buffer", "exp_avg", "exp_avg_sq")
    default_state_transfer = True  # of a group with rank that does not set it

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rank" not in param_group:
            super().add_param_group(param_group)
            return
        if not param_group.get("use_muon", True):
            raise ValueError("GaLoreMuon: a group with 'rank' is a Muon group (use_muon=True)")
        param_group.setdefault("state_transfer", self.default_state_transfer)
        param_group.setdefault("scale", 1.0)
        LowRankOptimizer.add_param_group(self, param_group)

    def _momentum_update(self, group: dict[str, Any], it: ParamStep) -> torch.Tensor:
        """Muon's momentum on R; after a refresh the buffer is first carried into the new basis."""
        buf = it.state.get("momentum_buffer")
        if buf is not None and it.proj_old is not None:
            transfer_moments(buf, None, it.proj_old, self.full_proj_matrix(it), it.state["proj_side"])
        return super()._momentum_update(group, it)

    def _orthogonal_step(self, group: dict[str, Any], it: ParamStep, update: torch.Tensor) -> None:
        """W ← W − η'·α·up(NS(U), P) for a low-rank weight (decay is the caller's), then t ← t + 1."""
        if not it.lowrank:
            super()._orthogonal_step(group, it, update)
            return
        ortho = self._orthogonalize(group, it, update)
        p_mat = self.proj_matrix(it)
        step = adjusted_lr(group["lr"], group["adjust_lr_fn"], it.source.shape) * group["scale"]
        lowrank_project_back_add_(it.param, ortho.to(p_mat.dtype).contiguous(), p_mat, it.side, -step)
        it.proj = it.proj_old = None
        it.state["step"] += 1


def galore_muon_param_groups(
    model: nn.Module,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    target_modules: str | Iterable[str] = ("attn", "mlp"),
    *,
    adamw_options: dict[str, Any] | None = None,
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """``[low-rank Muon group, AdamW group]`` for :class:`GaLoreMuon`: the targeted Linear weights
    (:func:`~fastgrad.optim.param_groups.target_linear_weights`) with ``rank``, ``update_proj_gap``,
    ``scale`` and ``group_kwargs`` (e.g. ``projector="dct"``); every other trainable parameter with
    ``use_muon=False`` and ``adamw_options`` (e.g. ``{"lr": 1e-3}``)."""
    groups = galore_param_groups(model, rank, update_proj_gap, scale, target_modules, **group_kwargs)
    return with_adamw_rest(groups, adamw_options)


class QGaLoreMuon(QuantizedWeights, GaLoreMuon):
    """:class:`GaLoreMuon` with Q-GaLore's storage: the uint8 weights of :class:`fastgrad.nn.QLinear`
    layers, updated by stochastic rounding, and the INT4 SVD projector with the adaptive refresh
    interval (:class:`~fastgrad.optim.QGaLoreAdamW`'s group keys and defaults, ``scale`` 1). Step
    of an INT8 weight, a block of rows at a time (no m×n temporary):

        Ŵ = dequant(codes) (fp32);  Ŵ ← Ŵ·(1 − η·λ) − η'·α·up(O, P̂);  codes ← SR-quantize(Ŵ)

    with O the Newton–Schulz iteration of the projected momentum, as GaLoreMuon's. The momentum is
    not carried into a new basis at a refresh (Q-GaLore keeps its states; ``state_transfer`` is
    refused), and a QLinear weight in a Muon group without ``rank`` takes Muon's full update the
    same way. State per INT8 weight: the momentum r'·max(m, n) fp32, the INT4 projector r'·d/2 +
    8·r'·d/g, the past vector and the queue (:class:`~fastgrad.optim.QGaLoreAdamW`). Build the
    groups with :func:`qgalore_muon_param_groups`."""

    default_state_transfer = False

    def update_group(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        """Muon's update for the float weights; the INT8 ones decay inside their re-quantization."""
        floats = [it for it in items if it.param.dtype != torch.uint8]
        if floats:
            super().update_group(group, floats)
        for it in items:
            if it.param.dtype == torch.uint8:
                self._orthogonal_step(group, it, self._momentum_update(group, it))

    def _orthogonal_step(self, group: dict[str, Any], it: ParamStep, update: torch.Tensor) -> None:
        if it.param.dtype != torch.uint8:
            super()._orthogonal_step(group, it, update)
            return
        ortho = self._orthogonalize(group, it, update).float()
        step = adjusted_lr(group["lr"], group["adjust_lr_fn"], it.source.shape)
        if not it.lowrank:

            def delta(r0: int, r1: int) -> torch.Tensor:
                return ortho[r0:r1]

        else:
            step *= group["scale"]
            p_mat = self.proj_matrix(it)  # INT4; a sharded left-side weight's: its rows

            def delta(r0: int, r1: int) -> torch.Tensor:  # rows r0..r1 of up(O, P)
                if it.side == "left":  # P's rows · O
                    return lowrank_project_back(ortho, p_mat.narrow_rows(r0, r1 - r0), "left")
                return lowrank_project_back(ortho[r0:r1].contiguous(), p_mat, "right")  # O's rows · P

        self._update_int8(group, it, delta, step)
        it.proj = it.proj_old = None
        it.state["step"] += 1


def qgalore_muon_param_groups(
    model: nn.Module,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    *,
    adamw_options: dict[str, Any] | None = None,
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """``[low-rank Muon group, AdamW group]`` for :class:`QGaLoreMuon` on a model converted with
    :func:`fastgrad.nn.quantize_model`: the uint8 weights of its QLinear layers with ``rank`` and
    the Q-GaLore keys (``group_kwargs``, e.g. ``cos_threshold``), every other trainable parameter
    with ``use_muon=False`` and ``adamw_options``."""
    return with_adamw_rest(qgalore_param_groups(model, rank, update_proj_gap, scale, **group_kwargs), adamw_options)
