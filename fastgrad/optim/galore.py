"""GaLore: AdamW on low-rank projections of the gradients (Zhao et al., ICML 2024; docs/algorithms.md §2)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fastgrad.ops import galore_adam_step_, lowrank_project_back_add_
from fastgrad.optim.base import LowRankOptimizer, ParamStep, adam_scalars, check_adam_hyperparameters

__all__ = ["GaLoreAdamW"]


class GaLoreAdamW(LowRankOptimizer):
    """AdamW with GaLore gradient projection for the param groups that carry ``rank``.

    Param groups (as in galore-torch): a group with ``rank`` is low-rank, every weight in it must
    be 2-D; any other group is plain (HF-style) AdamW. Low-rank group keys and defaults:
      ``rank`` r; ``update_proj_gap`` T = 200; ``scale`` α = 0.25; ``projector`` = "svd" |
      "randomized" | "dct" | "random" (:mod:`fastgrad.optim.projectors`; options ``oversample``,
      ``power_iters``, ``dct_norm``); ``proj_side`` = "std" | "reverse_std" | "left" | "right"
      (galore-torch's ``proj_type`` is accepted as an alias); ``state_transfer`` = False;
      ``seed`` = 0 (random projectors; each parameter's seed mixes it with the parameter's index).

    Step for a weight W (m×n) with gradient G, k the 0-based step count of W, r' = min(r, m, n):
        if k % T == 0:  P = projector(G)                       # refresh, from this step's G
        R = down(G, P)  (right: G Pᵀ, m×r'; left: Pᵀ G, r'×n)   # fastgrad.ops.lowrank_project
        t = k + 1;  M ← β1 M + (1−β1) R;  V ← β2 V + (1−β2) R⊙R;  N = M / (√V + ε)
        η_t = lr·√(1−β2^t)/(1−β1^t)   (lr if not correct_bias)
        W ← W − η_t·α · up(N, P)
    The moment update, N, the back-projection and the weight decay of a low-rank weight are one
    fused op call, :func:`fastgrad.ops.galore_adam_step_` (one GEMM whose epilogue writes W; the
    m×n update is never materialized); 8-bit moments (:class:`GaLoreAdamW8bit`) take the unfused
    path through :func:`fastgrad.ops.lowrank_project_back_add_`.
    Full-rank parameters use R = G and W ← W − η_t·N. ε is added to √V without bias correction and
    defaults to 1e-6 (the HF-legacy AdamW of the GaLore recipes).

    ``faithful=True`` reproduces galore-torch 1.0 (to fp32 rounding, on finite gradients): weight
    decay after the update on the updated weight (W ← W − lr·wd·W), no state transfer at a refresh
    (GaLore-1: M and V are reinterpreted in the new basis and t keeps counting), SVD in fp32 with P,
    R, M and V in the gradient's dtype (GaLore-3).

    Differences of the default mode (``faithful=False``):
      * torch-style decoupled weight decay: W ← W·(1 − lr·wd) *before* the update.
      * ``state_transfer=True`` may be set per group: at a refresh M and V are re-expressed in the
        new basis (M ← M·P_old P_newᵀ, V with the squared weights; see
        :func:`fastgrad.optim.base.transfer_moments`) instead of being reinterpreted (GaLore-1,
        GaLore#54, Fira's loss spikes at multiples of T).
    Differences of both modes from galore-torch that change no number where galore-torch works:
      * the side is decided once from W's shape and remembered (GaLore-6: galore-torch re-guesses
        it from the low-rank shape in project_back and fails for ``reverse_std`` with r ≥ m);
      * P is a compact r'·d copy (galore-torch keeps a view of the whole fp32 SVD factor alive);
      * the state is tensors and ints: ``torch.load(..., weights_only=True)`` reads a checkpoint,
        and loading one saved for other shapes/ranks/sides/projectors raises ValueError;
      * a non-finite gradient skips that parameter's step (``nonfinite="skip"``, counted in
        ``nonfinite_steps``) or raises (``"raise"``) instead of writing NaN into W or failing in
        the SVD; a parameter of the wrong dimension in a ``rank`` group is rejected up front.

    Optimizer-state bytes (b = bytes per element of the gradient dtype, d = min(m,n), D = max(m,n)):
      GaLoreAdamW: Σ_lowrank [2·D·r'·b (M, V) + P] + Σ_full 2·m·n·b, with P = r'·d·b (svd,
      randomized), 4·r' (dct: int32 indices), 0 (random: regenerated from its seed); for std/
      reverse_std/forced sides the moments are m·r' (right) or r'·n (left) elements each.
      (dct also keeps one shared s×s basis per size and dtype outside the state.)
    :meth:`state_bytes` sums the actual tensors.

    Step cost of a low-rank weight between refreshes: two products of m·n·r' (down, or R from
    :class:`fastgrad.nn.LowRankGradLinear`'s backward, and up), and the fused step. No m×n
    temporary is formed by the compiled kernels, and P Pᵀ never is. The projected
    gradients of all parameters are held until the single finiteness check of the step
    (transiently the size of one moment).
    """

    moment_keys = ("exp_avg", "exp_avg_sq")
    #: group defaults a subclass adds to Adam's (QGaLoreAdamW: its rounding seed and switch)
    extra_defaults: dict[str, Any] = {}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        faithful: bool = False,
        nonfinite: str = "skip",
    ) -> None:
        check_adam_hyperparameters(type(self).__name__, lr, betas, eps)
        self.faithful = faithful
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults | self.extra_defaults, nonfinite=nonfinite)

    @property
    def scalar_policy(self) -> str:
        """Where the step puts Adam's bias corrections (:func:`~fastgrad.optim.base.adam_scalars`):
        the HF-legacy AdamW of the GaLore recipes."""
        return "hf"

    def _normalize_lowrank_group(self, group: dict[str, Any]) -> None:
        super()._normalize_lowrank_group(group)
        if self.faithful and group["state_transfer"]:
            raise ValueError(
                f"{type(self).__name__}: state_transfer=True is not galore-torch behaviour; use faithful=False"
            )

    def _fuses(self, it: ParamStep) -> bool:
        """Whether ``it``'s whole step (moments, back-projection, decay) is one fused op call."""
        return it.lowrank

    def update_group(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        # The fused op decays its own weight; an INT8 weight decays on its decoded values.
        params = [it.param for it in items if not self._fuses(it) and it.param.is_floating_point()]
        if wd != 0.0 and not self.faithful and params:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        self._step_items(group, items)
        if wd != 0.0 and self.faithful and params:
            torch._foreach_add_(params, params, alpha=-lr * wd)

    def _step_items(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        """Low-rank weights through the fused step (:meth:`_fused_step`); the others: moments of
        every item at once (foreach), then each weight's step (:meth:`_weight_step`)."""
        rest = [it for it in items if not self._fuses(it)]
        if rest:
            firsts, seconds = self._update_moments(group, rest)
            for it, first, second in zip(rest, firsts, seconds, strict=True):
                it.low = None  # R is no longer needed: free it before the m×n back-projection
                self._weight_step(group, it, first, second)
        for it in items:
            if self._fuses(it):
                self._fused_step(group, it, *self._moment_tensors([it]))

    def _fused_step(self, group: dict[str, Any], it: ParamStep, firsts: list, seconds: list) -> None:
        """t ← t + 1, then one :func:`fastgrad.ops.galore_adam_step_` call on the weight with its
        moments (``firsts``, ``seconds``: one tensor each, not yet updated): the moments from R,
        N = M/(denom_scale·√V + ε), W ← decay·W − η_t·α·up(N, P) with the decay of the mode
        (torch-style: W decays before the update; faithful: the updated weight decays, so the update
        is scaled too), and for an INT8 weight its re-quantization (:meth:`_fused_target`)."""
        beta1, beta2 = group["betas"]
        it.state["step"] += 1
        scalars = adam_scalars(group, it.state["step"], self.scalar_policy)
        decay = 1.0 - group["lr"] * group["weight_decay"]
        step_scale = -scalars.step_size * group["scale"] * (decay if self.faithful else 1.0)
        p_mat = self.proj_matrix(it)
        low = it.low.to(p_mat.dtype) if isinstance(p_mat, torch.Tensor) else it.low
        low = low.contiguous()
        it.low = None
        weight, rounding = self._fused_target(group, it)
        galore_adam_step_(
            weight, firsts[0], seconds[0], low, p_mat, it.side,
            beta1=beta1, beta2=beta2, eps=scalars.eps, denom_scale=scalars.denom_scale, step_scale=step_scale,
            decay=decay, **rounding,
        )  # fmt: skip
        it.proj = it.proj_old = None

    def _fused_target(self, group: dict[str, Any], it: ParamStep) -> tuple[Any, dict[str, Any]]:
        """The weight the fused op updates and the arguments of its re-quantization (none for a
        float weight; :class:`QGaLoreAdamW` passes an INT8 weight and its rounding stream)."""
        return it.param, {}

    def _direction(
        self, group: dict[str, Any], step: int, first: torch.Tensor, second: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        """(η_t, N) of step t = ``step`` from the updated moments M, V under :attr:`scalar_policy`:
        N = M / (denom_scale·√V + ε). M and V are not modified."""
        scalars = adam_scalars(group, step, self.scalar_policy)
        denom = second.sqrt()
        if scalars.denom_scale != 1.0:
            denom.mul_(scalars.denom_scale)
        denom.add_(scalars.eps)
        return scalars.step_size, torch.div(first, denom, out=denom)

    def _weight_step(self, group: dict[str, Any], it: ParamStep, first: torch.Tensor, second: torch.Tensor) -> None:
        """One weight's step once its moments are updated: t ← t + 1, then the update of N
        (:meth:`_apply_direction`). Weight decay is the caller's."""
        it.low = None
        it.state["step"] += 1
        step_size, normed = self._direction(group, it.state["step"], first, second)
        self._apply_direction(group, it, normed, step_size)
        it.proj = it.proj_old = None

    def _apply_direction(self, group: dict[str, Any], it: ParamStep, normed: torch.Tensor, step_size: float) -> None:
        """W ← W − η_t·α·up(N, P) (low-rank, accumulated straight into W: no m×n temporary) or
        W ← W − η_t·N (full-rank)."""
        if it.lowrank:
            p_mat = self.proj_matrix(it)
            low = normed.to(p_mat.dtype) if isinstance(p_mat, torch.Tensor) else normed
            lowrank_project_back_add_(it.param, low, p_mat, it.side, -step_size * group["scale"])
        else:
            it.param.add_(normed, alpha=-step_size)
