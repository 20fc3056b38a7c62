"""Fira: GaLore plus a norm-scaled full-rank residual (Chen et al., arXiv 2410.01623; docs/algorithms.md §4).

Also home of what Fira shares with APOLLO (:mod:`fastgrad.optim.apollo`): the HF-Adam core on
low-rank gradients with a per-method low-rank update (:class:`ScaledLowRankAdam`), the channel-wise
norm ratio ``‖N_c‖ / (‖R_c‖ + 1e-8)`` (:func:`channel_ratio`) and the norm-growth limiter
(:func:`norm_growth_limiter`), which runs on the device without a host synchronisation.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from typing import Any

import torch

from fastgrad.ops import lowrank_project_back_add_
from fastgrad.optim.base import (
    LowRankOptimizer,
    ParamStep,
    adam_scalars,
    check_adam_hyperparameters,
    options_signature,
    take_options,
)
from fastgrad.optim.projectors import RIGHT
from fastgrad.optim.sharding import RowShard, sharded_norm

__all__ = ["FiraAdamW", "ScaledLowRankAdam", "channel_ratio", "norm_growth_limiter"]

#: floor added to a norm in a denominator (hard-coded in fira and apollo-torch)
NORM_FLOOR = 1e-8
#: allowed growth of the residual/update norm per step (hard-coded 1.01 in fira and apollo-torch)
LIMITER_GAMMA = 1.01
#: state key of the limiter's remembered norm (a 0-d fp32 tensor)
LIMITER_KEY = "limiter_norm"


def channel_dim(side: int) -> int:
    """The dimension reduced over for per-channel norms: the compressed one (r' of R).

    Right side (R is m×r'): channels are rows, reduce dim 1; left side (R is r'×n): channels are
    columns, reduce dim 0. The same dim of the full m×n gradient gives its per-channel norms.
    """
    return 1 if side == RIGHT else 0


def channel_ratio(
    normed: torch.Tensor, low: torch.Tensor, dim: int | None, shard: RowShard | None = None, rows_sharded: bool = False
) -> torch.Tensor:
    """fp32 ``‖N_c‖₂ / (‖R_c‖₂ + 1e-8)`` per channel (norms over ``dim``, kept for broadcasting
    against the m×n gradient), or of the whole tensors (Frobenius; a 0-d tensor) if dim is None.
    ``shard``/``rows_sharded``: N and R hold only this rank's rows (:func:`sharded_norm`)."""
    keep = dim is not None
    num = sharded_norm(normed, dim, shard, rows_sharded=rows_sharded, keepdim=keep)
    den = sharded_norm(low, dim, shard, rows_sharded=rows_sharded, keepdim=keep)
    return num.div_(den.add_(NORM_FLOOR))


def norm_growth_limiter(state: dict[str, Any], norm: torch.Tensor, gamma: float = LIMITER_GAMMA) -> torch.Tensor | None:
    """Norm-growth limiter of Fira/APOLLO on a 0-d ``norm`` = ‖X‖ of this step's tensor X.

    First call: remember ``‖X‖`` (fp32, in ``state["limiter_norm"]``) and return None (X unchanged).
    Later calls: ρ = max(‖X‖ / (s_prev + 1e-8), γ) / γ; remember s_prev = ‖X‖ / ρ; return ρ, by
    which the caller divides X. ρ = 1 unless the norm grew by more than γ since the last step.
    Pure tensor arithmetic on 0-d tensors: no ``.item()`` and no Python comparison, so no host
    synchronisation (the references compare a device scalar in Python, one sync per weight per step).
    """
    norm = norm.float()
    prev = state.get(LIMITER_KEY)
    if prev is None:
        state[LIMITER_KEY] = norm.clone()
        return None
    rho = torch.clamp_min(norm / (prev + NORM_FLOOR), gamma).div_(gamma)
    prev.copy_(norm / rho)
    return rho


class ScaledLowRankAdam(LowRankOptimizer):
    """HF-Adam on projected gradients with a method-specific update of the low-rank weights.

    Shared by :class:`FiraAdamW` and :class:`fastgrad.optim.apollo.Apollo`: constructor checks, the
    moments (in the low-rank gradient's dtype, with state transfer at a refresh if asked), the
    bias-corrected step size η_t = lr·√(1−β2^t)/(1−β1^t), N = M/(√V + ε), weight decay (torch-style
    before the update, or after it on the updated weight with ``faithful=True``) and plain HF-Adam
    for parameters of groups without ``rank``. Subclasses implement :meth:`_lowrank_update`.
    """

    moment_keys = ("exp_avg", "exp_avg_sq")
    keep_dtype_keys = (LIMITER_KEY,)
    update_reads_grad = True  # Fira's residual and APOLLO's G ⊙ s read the full gradient
    #: the subclass's own keyword-only constructor options and their defaults (attributes of the
    #: optimizer; they show in the class's signature)
    options: dict[str, Any] = {}

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
        **options: Any,
    ) -> None:
        name = type(self).__name__
        for key, value in take_options(name, self.options, options).items():
            setattr(self, key, value)
        self._check_options()
        check_adam_hyperparameters(name, lr, betas, eps)
        self.faithful = faithful
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults | self._option_defaults(), nonfinite=nonfinite)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = options_signature(ScaledLowRankAdam.__init__, cls.options)

    def _check_options(self) -> None:
        """Validate the subclass's options (set as attributes)."""

    def _option_defaults(self) -> dict[str, Any]:
        """The options that are also param-group defaults (read per group by the update)."""
        return {}

    def _normalize_lowrank_group(self, group: dict[str, Any]) -> None:
        super()._normalize_lowrank_group(group)
        if self.faithful and group["state_transfer"]:
            raise ValueError(
                f"{type(self).__name__}: state_transfer=True is not the reference's behaviour; use faithful=False"
            )

    def update_group(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        params = [it.param for it in items]
        if wd != 0.0 and not self.faithful:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        firsts, seconds = self._update_moments(group, items)
        for it, first, second in zip(items, firsts, seconds, strict=True):
            it.state["step"] += 1
            step = it.state["step"]
            step_size = adam_scalars(group, step, "hf").step_size
            denom = second.sqrt().add_(eps)
            normed = torch.div(first, denom, out=denom)
            if it.lowrank:
                self._lowrank_update(group, it, normed, step_size)
            else:
                it.param.add_(normed, alpha=-step_size)
            it.low = it.proj = it.proj_old = None
        if wd != 0.0 and self.faithful:
            torch._foreach_add_(params, params, alpha=-lr * wd)

    @abstractmethod
    def _lowrank_update(self, group: dict[str, Any], it: ParamStep, normed: torch.Tensor, step_size: float) -> None:
        """W ← W − step_size·U for a low-rank ``it``: ``it.low`` is R, ``normed`` is N = M/(√V+ε)."""


class FiraAdamW(ScaledLowRankAdam):
    """Fira: GaLore's projected Adam plus the norm-scaled residual of the gradient outside the subspace.

    Param groups as :class:`fastgrad.optim.GaLoreAdamW` (a group with ``rank`` is low-rank, others
    are plain HF-AdamW; keys ``rank``, ``update_proj_gap`` T = 200, ``scale`` α = 0.25 (fira's
    ``alpha`` is accepted as an alias), ``projector`` svd | randomized | dct, ``proj_side``/
    ``proj_type``, ``state_transfer``). The ``random`` projector is refused: the residual
    G − up(down(G)) is the part of G outside the subspace only for an orthonormal P.

    Step for a weight W (m×n), gradient G, k the 0-based step, r' = min(r, m, n):
        if k % T == 0:  P = projector(G)
        R = down(G, P);  t = k + 1;  M, V ← HF-Adam moments of R;  N = M/(√V + ε)
        φ_c = ‖N_c‖ / (‖R_c‖ + 1e-8) per channel c of the non-compressed dimension (rows of R and
              G on the right side, m of them; columns on the left side, n of them)
        variant "code":  S = (G − α·up(R)) ⊙ φ           variant "paper":  S = (G − up(R)) ⊙ φ
        limiter: first step s = ‖S‖; then ρ = max(‖S‖/(s + 1e-8), 1.01)/1.01, S ← S/ρ, s = ‖S‖
        variant "code":  U = α·up(N) + S                 variant "paper":  U = α·(up(N) + S)
        W ← W − η_t·U,  η_t = lr·√(1−β2^t)/(1−β1^t)  (lr if not correct_bias)
    φ uses N and R without bias correction; η_t scales the whole update, S included.

    ``variant="code"`` (default) is fira 1.0.2's released code (QUIRK Fira-1: it subtracts α·PPᵀG,
    so with α = 0.25 three quarters of the in-subspace gradient stay in the residual, and S is not
    multiplied by α); ``variant="paper"`` is Algorithm 1 of the paper (the true projection residual
    (I − PPᵀ)G, and α on both terms).

    ``faithful=True`` with ``variant="code"`` reproduces ``fira.FiraAdamW`` (to fp32 rounding, on
    finite gradients): weight decay after the update on the updated weight (W ← W − lr·wd·W), no
    state transfer, P/R/M/V in the gradient's dtype. The default (``faithful=False``) decays
    torch-style, W ← W·(1 − lr·wd) before the update, and allows ``state_transfer``.

    Differences from fira that change no number where fira works (besides GaLoreAdamW's: the side
    is remembered, P is a compact copy, weights_only checkpoints, the NaN/Inf policy):
      * channels follow the remembered side; fira re-derives them from R's shape (rows < cols ⇒
        columns), which disagrees only for a square R on the left side (reverse_std/left with
        r' = n), where fira's φ does not broadcast against G;
      * the limiter runs on the device (Fira-2: fira compares a device scalar in Python), its norm
        is kept in fp32, and ‖S‖ is formed from per-channel norms, ‖S‖² = Σ_c φ_c²·‖(G − α·up(R))_c‖²;
      * norms and φ are computed in fp32 (fira: in the gradient's dtype);
      * memory: fira allocates a new m×n tensor for each of α·up(R), the residual, S, S/ρ, α·up(N)
        and U. Here the residual is formed in one m×n buffer (a copy of G, with −α·up(R)
        accumulated in place by ``fastgrad.ops.lowrank_project_back_add_``), applied to W with φ/ρ
        in one fused multiply-add and freed; then α·up(N) is accumulated straight into W. One m×n
        temporary per weight (plus whatever the serving kernel of the ``_add_`` op needs inside).

    Optimizer-state bytes (b = bytes per element of the gradient dtype, d = min(m,n), D = max(m,n)):
      Σ_lowrank [2·D·r'·b (M, V) + P + 4 (limiter norm, fp32)] + Σ_full 2·m·n·b, with P = r'·d·b
      (svd, randomized) or 4·r' (dct indices); forced sides give m·r' (right) or r'·n (left)
      elements per moment. :meth:`state_bytes` sums the actual tensors.
    """

    options = {"variant": "code"}

    def _check_options(self) -> None:
        if self.variant not in ("code", "paper"):
            raise ValueError(f"FiraAdamW: variant must be 'code' or 'paper', got {self.variant!r}")

    def _normalize_lowrank_group(self, group: dict[str, Any]) -> None:
        if "alpha" in group:  # fira's name for GaLore's scale
            alpha = group.pop("alpha")
            if "scale" in group and group["scale"] != alpha:
                raise ValueError(f"FiraAdamW: alpha={alpha!r} contradicts scale={group['scale']!r}")
            group["scale"] = alpha
        super()._normalize_lowrank_group(group)
        if group["projector"] == "random":
            raise ValueError(
                "FiraAdamW: the residual G - up(down(G)) needs an orthonormal projector (svd, randomized, dct), "
                "not 'random'"
            )

    def _lowrank_update(self, group: dict[str, Any], it: ParamStep, normed: torch.Tensor, step_size: float) -> None:
        alpha = group["scale"]
        paper = self.variant == "paper"
        dim = channel_dim(it.state["proj_side"])
        p_mat = self.proj_matrix(it)
        grad, low, w = it.grad, it.low, it.param
        phi = channel_ratio(normed, low, dim)  # fp32, (m, 1) right / (1, n) left: along rows, or of a whole R
        # The residual G − c·up(R) (c = α in the code, 1 in the paper) in one m×n buffer.
        resid = grad.clone(memory_format=torch.contiguous_format)
        lowrank_project_back_add_(resid, low, p_mat, it.side, -1.0 if paper else -alpha)
        it.low = None
        # ‖S‖ = ‖φ ⊙ residual‖ from the residual's per-channel norms: no m×n S is formed.
        resid_norms = sharded_norm(resid, dim, it.shard, rows_sharded=True, keepdim=True)
        s_norm = sharded_norm(phi * resid_norms, None, it.shard, rows_sharded=it.low_sharded)
        rho = norm_growth_limiter(it.state, s_norm)
        coef = phi if rho is None else phi.div_(rho)
        w.addcmul_(resid, coef, value=-step_size * (alpha if paper else 1.0))
        del resid
        lowrank_project_back_add_(w, normed, p_mat, it.side, -step_size * alpha)
