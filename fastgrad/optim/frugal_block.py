"""FRUGAL with block subspaces, the paper's default ("BlockAdamW"): AdamW on a rotating window of
whole weight tensors, signSGD on all the others (Zaitsev et al., arXiv 2411.07837; docs/algorithms.md §6.4)."""

from __future__ import annotations

from typing import Any

import torch

from fastgrad.optim.base import ParamStep, adamw_update
from fastgrad.optim.frugal import FrugalBase
from fastgrad.optim.projectors import mix_seed

__all__ = ["FrugalBlock", "BLOCK_ORDERS"]

BLOCK_ORDERS = ("descending", "ascending", "random")
# Keys of a block group: options (with the constructor's defaults) and the group's counters.
_BLOCK_OPTIONS = ("density", "update_proj_gap", "block_order", "inactive_update_rule", "inactive_lr_scale", "seed")
_COUNTERS = {"block_step": 0, "block_refreshes": 0, "block_active": None}


class FrugalBlock(FrugalBase):
    """FRUGAL gradient splitting with block subspaces: whole tensors are state-full or state-free.

    Param groups: a group with ``density`` is a block group (its tensors: the attention and MLP
    weights, e.g. the first group of :func:`fastgrad.optim.galore_param_groups` with ``rank``
    replaced by ``density``); any other group is plain torch-style AdamW. Block-group keys and
    defaults (the constructor's): ``density`` ρ = 0.25; ``update_proj_gap`` T = 200;
    ``block_order`` = "descending" (the paper's pre-training recipe) | "ascending" | "random";
    ``inactive_update_rule`` = "sign_sgd" | "sgd" | "no"; ``inactive_lr_scale`` s = 1.0; ``seed`` = 0
    ("random" order).

    Step of a block group (N tensors, k its 0-based step count ``group["block_step"]``):
        if k % T == 0:  the j-th refresh (``group["block_refreshes"]``) makes the window
            A = {order(j·a + i mod N) : i < a} of a = max(1, round(ρ·N)) tensors state-full, where
            order lists the tensors last to first (descending), first to last (ascending), or is a
            permutation drawn from (seed, j) (random); every moment of the group is dropped, and
            the tensors of A start from M = V = 0, t = 0
        tensor in A:  W ← W·(1 − lr·wd);  t += 1;  M, V ← Adam moments of G;
                      W ← W − (lr/(1−β1^t)) · M / (√V/√(1−β2^t) + ε)
        otherwise:    W ← W − lr·s·sign(G)   (sgd: − lr·s·G; no: nothing)
    Other groups: torch.optim.AdamW. Decoupled weight decay acts in the AdamW core only, as in
    the reference's BlockOptimizer (state-free tensors get the sign step alone).

    Optimizer-state bytes: 2·numel·b for the a state-full tensors of each block group (the others
    hold none) and for every tensor of the other groups; b is the parameter's element size.

    Differences from the reference implementation: ``mirror`` order is not offered; a = max(1, ·)
    (the reference can make no tensor state-full for tiny groups); the state is tensors, ints and
    lists of ints (``torch.load(..., weights_only=True)``); a non-finite gradient skips the step of
    its tensor (``nonfinite="skip"``) or raises (``"raise"``); a group whose every gradient is
    skipped does not advance its counters.
    """

    options = {
        "density": 0.25, "update_proj_gap": 200, "block_order": "descending", "inactive_update_rule": "sign_sgd",
        "inactive_lr_scale": 1.0, "seed": 0,
    }  # fmt: skip

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rank" in param_group:
            raise ValueError("FrugalBlock: block groups take 'density', not 'rank' (see Frugal for subspaces)")
        if "density" in param_group:
            self._normalize_block_group(param_group)
        super().add_param_group(param_group)

    def _normalize_block_group(self, group: dict[str, Any]) -> None:
        for key in _BLOCK_OPTIONS:
            group.setdefault(key, self.frugal_defaults[key])
        for key, value in _COUNTERS.items():
            group.setdefault(key, value)
        self._check_options(group)
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"FrugalBlock: 'update_proj_gap' must be a positive int, got {gap!r}")
        if group["block_order"] not in BLOCK_ORDERS:
            raise ValueError(f"FrugalBlock: 'block_order' must be one of {BLOCK_ORDERS}, got {group['block_order']!r}")

    # ------------------------------------------------------------------ subspace
    @staticmethod
    def active_window(group: dict[str, Any], refresh: int) -> list[int]:
        """Positions (in ``group["params"]``) of the state-full tensors after refresh number ``refresh``."""
        n = len(group["params"])
        a = min(n, max(1, round(group["density"] * n)))
        if group["block_order"] == "random":
            gen = torch.Generator().manual_seed(mix_seed(group["seed"], refresh))
            return sorted(torch.randperm(n, generator=gen)[:a].tolist())
        positions = [(refresh * a + i) % n for i in range(a)]
        if group["block_order"] == "descending":
            positions = [n - 1 - i for i in positions]
        return sorted(positions)

    def _refresh(self, group: dict[str, Any]) -> None:
        group["block_active"] = self.active_window(group, group["block_refreshes"])
        group["block_refreshes"] += 1
        for p in group["params"]:  # every statistic is dropped: the new window starts from zero
            for key in (*self.moment_keys, "adam_step"):
                self.state[p].pop(key, None)

    # ------------------------------------------------------------------ update
    def update_group(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        if "density" not in group:
            self._adamw(group, items)
            return
        if group["block_step"] % group["update_proj_gap"] == 0:
            self._refresh(group)
        group["block_step"] += 1
        position = {id(p): i for i, p in enumerate(group["params"])}
        active_set = set(group["block_active"])
        active = [it for it in items if position[id(it.source)] in active_set]
        inactive = [it for it in items if position[id(it.source)] not in active_set]
        self._adamw(group, active)
        for it in inactive:
            self._inactive_update(group, it, it.low, overwrite=False)
            it.state["step"] += 1
            it.low = None

    def _adamw(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        """torch.optim.AdamW on the full gradients ``item.low``: decay first, bias-corrected."""
        if not items:
            return
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0.0:
            torch._foreach_mul_([it.param for it in items], 1.0 - lr * wd)
        firsts, seconds = self._update_moments(group, items)
        for it, first, second in zip(items, firsts, seconds, strict=True):
            st = it.state
            st["step"] += 1
            st["adam_step"] = st.get("adam_step", 0) + 1
            adamw_update(group, it, first, second, st["adam_step"])
            it.low = None
