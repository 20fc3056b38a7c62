"""Muon: momentum orthogonalized by a Newton–Schulz iteration, with AdamW for the other parameters
in the same optimizer (docs/algorithms.md §10).

For a 2-D weight W with gradient G, step t (μ momentum, η lr, λ weight decay):

    B ← μ·B + (1−μ)·G                                   the momentum buffer (an EMA)
    U = (1−μ)·G + μ·B  (nesterov)   or   U = B
    O = NS_k(U)                                         k Newton–Schulz steps (fastgrad.ops.newton_schulz),
                                                        in ``ns_dtype`` (bf16 by default)
    W ← W·(1 − η·λ) − η'·O,   η' = η·√max(1, m/n)  ("original"),  η·0.2·√max(m, n)  ("match_rms_adamw")

which is torch.optim.Muon's update (the same hyper-parameters give the same weights). A group with
``use_muon=False`` takes torch.optim.AdamW's update instead (``betas``, ``adam_eps``; weight decay
before the update): the embedding, the output head and the 1-D parameters of a model, which Muon is
not meant for (:func:`muon_param_groups`).

State per Muon weight: the momentum buffer (m·n in the weight's dtype) and a step counter; per AdamW
parameter: the two moments. All of it is tensors and ints (``torch.load(..., weights_only=True)``),
and a non-finite gradient skips its parameter's step (``nonfinite="skip"``) or raises, as in every
fastgrad optimizer (:class:`~fastgrad.optim.base.LowRankOptimizer`).

Sharded (FSDP2) weights: the orthogonalization needs the whole matrix, so each step gathers the
update U of every Muon weight from all ranks (an all-gather of m·n elements, as much as FSDP's own
gradient reduce-scatter), every rank runs the same Newton–Schulz iteration and keeps its rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fastgrad.ops import NS_COEFFICIENTS, newton_schulz
from fastgrad.optim.base import LowRankOptimizer, ParamStep, adamw_update, check_adam_hyperparameters
from fastgrad.optim.param_groups import lowrank_and_rest, target_linear_weights

__all__ = ["Muon", "muon_param_groups", "adjusted_lr"]

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The learning rate of a Muon step on an m×n weight: η·√max(1, m/n) (None, "original"; keeps
    the update's RMS per input the same for tall matrices) or η·0.2·√max(m, n) ("match_rms_adamw";
    an update of AdamW's typical RMS, so AdamW's lr and weight decay carry over)."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


class Muon(LowRankOptimizer):
    """Muon for the 2-D weights of groups with ``use_muon`` (the default), AdamW for the others
    (module docstring). The constructor's arguments are every group's defaults; ``betas`` and
    ``adam_eps`` are the AdamW groups' (``eps`` is the Newton–Schulz normalization's floor, as in
    torch.optim.Muon)."""

    # the state with the parameter's shape: the AdamW groups' moments and the Muon weights' buffer
    moment_keys = ("exp_avg", "exp_avg_sq", "momentum_buffer")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        ns_dtype: torch.dtype = torch.bfloat16,
        nonfinite: str = "skip",
    ) -> None:
        check_adam_hyperparameters("Muon", lr, betas, adam_eps)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon: momentum must be in [0, 1), got {momentum}")
        if not eps > 0.0:
            raise ValueError(f"Muon: eps must be positive, got {eps}")
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
            raise ValueError(f"Muon: ns_steps must be a positive int, got {ns_steps!r}")
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Muon: adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")
        if ns_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"Muon: ns_dtype must be torch.bfloat16 or torch.float32, got {ns_dtype}")
        defaults = {
            "lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients), "eps": eps, "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn,
            "betas": betas, "adam_eps": adam_eps, "use_muon": True,
        }  # fmt: skip
        self.ns_dtype = ns_dtype
        super().__init__(params, defaults, nonfinite=nonfinite)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rank" in param_group:
            raise ValueError("Muon: param groups take no 'rank' (Muon orthogonalizes the whole update)")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["use_muon"]:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"Muon: a group with use_muon=True takes 2-D weights only; got a parameter of shape "
                        f"{tuple(p.shape)} (put it in a group with use_muon=False: AdamW)"
                    )

    def update_group(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0.0:  # decoupled, before the update (torch.optim.Muon and AdamW)
            torch._foreach_mul_([it.param for it in items], 1.0 - lr * wd)
        if not group["use_muon"]:
            self._step_items({**group, "eps": group["adam_eps"]}, items)
            return
        for it in items:  # one weight at a time: one m×n update U alive, not all of them
            self._orthogonal_step(group, it, self._momentum_update(group, it))

    def _step_items(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        """The AdamW items of a step (``group``'s ``eps`` is ``adam_eps``): the moments of all of
        them at once (foreach), then each weight's step (:meth:`_weight_step`)."""
        firsts, seconds = self._update_moments(group, items)
        for it, first, second in zip(items, firsts, seconds, strict=True):
            self._weight_step(group, it, first, second)

    def _weight_step(self, group: dict[str, Any], it: ParamStep, first: torch.Tensor, second: torch.Tensor) -> None:
        """t ← t + 1 and torch.optim.AdamW's update from the updated moments (decay is the caller's)."""
        it.low = None
        it.state["step"] += 1
        adamw_update(group, it, first, second, it.state["step"])

    def _momentum_update(self, group: dict[str, Any], it: ParamStep) -> torch.Tensor:
        """B ← μ·B + (1−μ)·G in the state (created at zero); returns U = (1−μ)·G + μ·B (nesterov) or
        B. Consumes ``it.low`` (G)."""
        momentum = group["momentum"]
        grad = it.low
        it.low = None
        buf = it.state.get("momentum_buffer")
        if buf is None:
            buf = it.state["momentum_buffer"] = torch.zeros_like(grad)
        buf.lerp_(grad, 1.0 - momentum)
        return grad.lerp(buf, momentum) if group["nesterov"] else buf

    def _orthogonal_step(self, group: dict[str, Any], it: ParamStep, update: torch.Tensor) -> None:
        """W ← W − η'·NS(U) (decay is the caller's), then t ← t + 1."""
        ortho = self._orthogonalize(group, it, update)
        it.param.add_(ortho, alpha=-adjusted_lr(group["lr"], group["adjust_lr_fn"], it.source.shape))
        it.state["step"] += 1

    def _orthogonalize(self, group: dict[str, Any], it: ParamStep, update: torch.Tensor) -> torch.Tensor:
        """NS(U) in ``ns_dtype``, this rank's rows of it. A U sharded by rows (a row-sharded weight's;
        under :class:`~fastgrad.optim.GaLoreMuon` a right-side R's) is gathered from every rank first,
        and every rank runs the same iteration."""
        if it.low_sharded:
            update = it.shard.gather_rows(update)
        ortho = newton_schulz(update.to(self.ns_dtype), group["ns_steps"], group["ns_coefficients"], group["eps"])
        del update  # U is freed before the caller's update
        return it.shard.rows_of(ortho) if it.low_sharded else ortho


def muon_param_groups(
    model: nn.Module, target_modules: str | Iterable[str] = ("attn", "mlp"), **adamw_options: Any
) -> list[dict[str, Any]]:
    """``[Muon group, AdamW group]`` for :class:`Muon`: the targeted Linear weights (the attention and
    MLP projections, :func:`~fastgrad.optim.param_groups.target_linear_weights`) are orthogonalized;
    every other trainable parameter (embeddings, norms, biases, the output head) takes AdamW with
    ``adamw_options`` (e.g. ``lr=3e-4``) over the optimizer's defaults."""
    return with_adamw_rest(lowrank_and_rest(model, target_linear_weights(model, target_modules), {}), adamw_options)


def with_adamw_rest(groups: list[dict[str, Any]], adamw_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``[Muon group, rest group]`` with the rest group made AdamW's (``use_muon=False``) with
    ``adamw_options`` over the optimizer's defaults: the rule of every Muon param-groups helper."""
    muon, rest = groups
    return [muon, {**rest, "use_muon": False, **(adamw_options or {})}]
