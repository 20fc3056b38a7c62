"""FRUGAL, GaLore-type subspace variant: AdamW in a low-rank subspace, signSGD on the residual
(Zaitsev et al., arXiv 2411.07837, ICML 2025; docs/algorithms.md §6.3)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fastgrad.ops import lowrank_project_back_add_
from fastgrad.optim.base import (
    LowRankOptimizer,
    ParamStep,
    adamw_update,
    check_adam_hyperparameters,
    options_signature,
    take_options,
)
from fastgrad.optim.projectors import RIGHT, resolve_side

__all__ = ["Frugal"]

INACTIVE_RULES = ("sign_sgd", "sgd", "no")
# Projectors whose P has orthonormal rows/columns: at full rank up(down(G)) = G exactly.
_ORTHONORMAL = ("svd", "randomized", "dct")


class FrugalBase(LowRankOptimizer):
    """What the two FRUGAL variants (:class:`Frugal`, :class:`~fastgrad.optim.FrugalBlock`) share:
    the constructor (Adam's hyper-parameters as every group's defaults, the variant's own options
    as the defaults of its FRUGAL groups only), the checks of those options, the state-free
    update rules and torch.optim.AdamW's step."""

    moment_keys = ("exp_avg", "exp_avg_sq")
    update_reads_grad = True  # the state-free update reads the full gradient
    #: the variant's keyword-only constructor options: the defaults of its FRUGAL groups (they show
    #: in the class's signature)
    options: dict[str, Any] = {}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        nonfinite: str = "skip",
        **options: Any,
    ) -> None:
        check_adam_hyperparameters(type(self).__name__, lr, betas, eps)
        # Defaults of FRUGAL groups only (torch's ``defaults`` would put them into every group).
        self.frugal_defaults = take_options(type(self).__name__, self.options, options)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, nonfinite=nonfinite)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = options_signature(FrugalBase.__init__, cls.options)

    def _check_options(self, group: dict[str, Any]) -> None:
        """A FRUGAL group's ``density`` (when set) and ``inactive_update_rule``."""
        name = type(self).__name__
        density = group.get("density")
        if density is not None and (
            isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0
        ):
            raise ValueError(f"{name}: 'density' must be in (0, 1], got {density!r}")
        if group["inactive_update_rule"] not in INACTIVE_RULES:
            raise ValueError(
                f"{name}: 'inactive_update_rule' must be one of {INACTIVE_RULES}, got {group['inactive_update_rule']!r}"
            )

    @staticmethod
    def _inactive_update(group: dict[str, Any], it: ParamStep, update: torch.Tensor, overwrite: bool) -> None:
        """The state-free step of the group's rule: W ← W − lr·s·sign(U) (sign_sgd), W − lr·s·U
        (sgd), nothing (no); s = ``inactive_lr_scale``. ``overwrite``: U may take its sign in place."""
        rule, alpha = group["inactive_update_rule"], -group["lr"] * group["inactive_lr_scale"]
        if rule == "sign_sgd":
            it.param.add_(update.sign_() if overwrite else update.sign(), alpha=alpha)
        elif rule == "sgd":
            it.param.add_(update, alpha=alpha)


class Frugal(FrugalBase):
    """FRUGAL gradient splitting with GaLore-type (projection) subspaces.

    Param groups: a group with ``rank`` or ``density`` is a FRUGAL group (every weight 2-D); any
    other group is plain torch-style AdamW. FRUGAL group keys and defaults:
      ``density`` ρ = the constructor's ``density`` (0.25), used when ``rank`` is absent or None:
      per weight r = max(1, round(ρ·c)), c the compressed dimension (n on the right side, m on the
      left; min(m, n) for the default "std" side); ``rank`` (int) instead fixes r for all weights
      (r' = min(r, m, n)); ``update_proj_gap`` T = 200; ``projector`` = "svd" (default) |
      "randomized" | "dct" | "random" (:mod:`fastgrad.optim.projectors`); ``proj_side`` = "std" |
      "reverse_std" | "left" | "right"; ``reset_statistics`` = True; ``inactive_update_rule`` =
      "sign_sgd" | "sgd" | "no"; ``inactive_lr_scale`` = 1.0 (0.1 is the reference's fine-tuning
      value); ``state_transfer`` = False (only used with ``reset_statistics=False``); ``seed`` = 0.
      The base class's ``scale`` key (GaLore's α) is ignored: scale the group's ``lr`` instead
      (the reference's ``proj_params_lr_scale``).

    Step for a weight W (m×n), gradient G, k its 0-based step count (``state["step"]``):
        if k % T == 0:  P = projector(G);  if reset_statistics: M, V ← 0, t ← 0     # refresh
        R = down(G, P)                                           # fastgrad.ops.lowrank_project
        E = G − up(R, P)        # one m×n buffer: copy of G, then lowrank_project_back_add_(−1)
        W ← W·(1 − lr·wd)                                        # decoupled decay, before the update
        t += 1;  M ← β1 M + (1−β1) R;  V ← β2 V + (1−β2) R⊙R
        W ← W − (lr/(1−β1^t)) · up(M / (√V/√(1−β2^t) + ε), P)     # lowrank_project_back_add_ into W
        W ← W − lr·s·sign(E)    (sign_sgd; sgd: − lr·s·E; no: nothing), s = inactive_lr_scale
    t is ``state["adam_step"]`` (restarts at each refresh); ``state["step"]`` keeps counting so that
    seeded projectors (random, randomized) draw a new subspace at every refresh. Other parameters:
    torch.optim.AdamW (decay first, bias-corrected, ε outside the corrected √V̂).

    Differences from the reference implementation (FRUGAL's ``GaloreOptimizer`` + AdamW):
      * defaults: weight_decay 0.0 (the reference's code default is 0.01; its pre-training recipe
        uses 0); no ``proj_params_lr_scale`` key (use the group's ``lr``);
      * the refresh is decided per weight (k % T == 0 on its own count), not from the group's first
        parameter: identical whenever all weights of a group step together;
      * with an orthonormal projector at full rank (r' = c) E is exactly zero and the state-free
        update is skipped instead of taking sign() of rounding noise;
      * "random" is fastgrad's seeded Gaussian N(0, 1/r') projector (regenerated, not stored), not
        ``nn.init.orthogonal_`` from the global RNG; "randperm" is not offered;
      * state is tensors and ints (``torch.load(..., weights_only=True)``), a non-finite gradient
        skips that weight's step (``nonfinite="skip"``) or raises (``"raise"``), as in the base class.

    Optimizer-state bytes (fp32; d = min(m,n), D = max(m,n), std side): Σ_FRUGAL [2·D·r'·4 (M, V)
    + P], P = r'·d·4 (svd, randomized), 4·r' (dct indices), 0 (random); Σ_other 2·m·n·4.
    :meth:`state_bytes` sums the actual tensors. Transient per weight and step: R, and the one m×n
    residual buffer E (freed before the next weight).
    """

    options = {"density": 0.25, "reset_statistics": True, "inactive_update_rule": "sign_sgd", "inactive_lr_scale": 1.0}

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "density" in param_group:
            if param_group.get("rank") is not None:
                raise ValueError("Frugal: give a group 'rank' or 'density', not both")
            param_group["rank"] = None
        super().add_param_group(param_group)

    def _normalize_lowrank_group(self, group: dict[str, Any]) -> None:
        for key in ("reset_statistics", "inactive_update_rule", "inactive_lr_scale"):
            group.setdefault(key, self.frugal_defaults[key])
        if group["rank"] is None:
            group.setdefault("density", self.frugal_defaults["density"])
            self._check_options(group)
            group["rank"] = 1  # the base class validates an int rank; r is per weight here
            try:
                super()._normalize_lowrank_group(group)
            finally:
                group["rank"] = None
        else:
            self._check_options(group)
            super()._normalize_lowrank_group(group)

    def rank_of(self, group: dict[str, Any], p: torch.Tensor) -> int:
        """The rank requested for weight ``p`` of FRUGAL group ``group`` (before clipping to min(m, n))."""
        if group["rank"] is not None:
            return group["rank"]
        side = resolve_side(group["proj_side"], p.shape)
        compressed = p.shape[1] if side == RIGHT else p.shape[0]
        return max(1, round(group["density"] * compressed))

    def _with_rank(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        return group if group["rank"] is not None else {**group, "rank": self.rank_of(group, p)}

    def prepare(self, group, p, proj, grad=None, low=None, **kw) -> ParamStep:
        # The base class reads group["rank"] only when it sets up a new parameter's projector.
        if proj is None or self.state[p] or group["rank"] is not None:
            return super().prepare(group, p, proj, grad, low, **kw)
        item = super().prepare(self._with_rank(group, p), p, proj, grad, low, **kw)
        item.group = group
        return item

    def _check_param_state(self, name, gi, idx, group, p, st) -> None:
        if "rank" in group:
            group = self._with_rank(group, p)
        super()._check_param_state(name, gi, idx, group, p, st)

    # ------------------------------------------------------------------ update
    def update_group(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        lowrank = "rank" in group
        step_key = "adam_step" if lowrank else "step"
        for it in items:
            st = it.state
            reset = lowrank and it.snapshot is not None and group["reset_statistics"] and "exp_avg" in st
            if reset:  # FRUGAL: fresh moments (not re-expressed in the new basis) at each refresh
                st["exp_avg"].zero_()
                st["exp_avg_sq"].zero_()
                it.proj_old = None
            if lowrank and (reset or "adam_step" not in st):
                st["adam_step"] = 0  # bias correction restarts with the moments
        params = [it.param for it in items]
        if wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        # Created at zero on a weight's first step; re-expressed after a refresh when state transfer is on.
        firsts, seconds = self._update_moments(group, items)
        for it, first, second in zip(items, firsts, seconds, strict=True):
            st = it.state
            if lowrank:
                st["step"] += 1  # schedule counter (refreshes); never reset
                p_mat = self.proj_matrix(it)
                self._state_free_update(group, it, p_mat, lr)  # reads R: before it is freed
            it.low = None
            st[step_key] += 1
            adamw_update(group, it, first, second, st[step_key], p_mat if lowrank else None)
            it.proj = it.proj_old = None

    def _state_free_update(self, group: dict[str, Any], it: ParamStep, p_mat: torch.Tensor, lr: float) -> None:
        """W ← W − lr·s·sign(E) (or ·E), E = G − up(down(G)) formed in one m×n buffer."""
        if group["inactive_update_rule"] == "no" or lr * group["inactive_lr_scale"] == 0.0:
            return
        st = it.state
        compressed = it.source.shape[1] if st["proj_side"] == RIGHT else it.source.shape[0]
        if st["proj_rank"] == compressed and group["projector"] in _ORTHONORMAL:
            return  # full rank, orthonormal P: E = 0 exactly
        resid = it.grad.clone(memory_format=torch.contiguous_format)
        lowrank_project_back_add_(resid, it.low, p_mat, it.side, -1.0)
        self._inactive_update(group, it, resid, overwrite=True)
