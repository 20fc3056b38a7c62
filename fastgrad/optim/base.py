"""Shared machinery of the low-rank optimizers: param groups, projection, NaN/Inf policy, checkpoints.

:class:`LowRankOptimizer` does everything that does not depend on the update rule:

* param groups: a group with ``rank`` is low-rank; its keys are normalised and validated once
  (``proj_type`` is accepted as galore-torch's name for ``proj_side``);
* per step: refresh the subspace when due (``k % update_proj_gap == 0``, k the 0-based step),
  project every gradient through :func:`fastgrad.ops.lowrank_project`, then decide for all
  parameters at once whether their projected gradient is finite (one host synchronisation per
  step, whatever the devices, plus one per refreshed parameter), and hand the finite ones to the
  subclass's ``update_group``. ``step(grads_finite=True)`` is for a caller that has already
  established that every gradient is finite (``fastgrad pretrain`` reads the total gradient norm
  once per step): no check and no host synchronisation then, refreshes included (a finite G
  projects to a finite R: |R_ij| ≤ ‖G‖·‖P_j‖);
* non-finite gradients: ``nonfinite="skip"`` leaves that parameter's weight and state (projector
  included) exactly as they were and counts the step in ``nonfinite_steps``; ``"raise"`` raises
  ``FloatingPointError`` before any weight, moment or projector of the step is changed;
* checkpoints: all state is tensors and ints, so ``torch.load(..., weights_only=True)`` reads it,
  and ``load_state_dict`` rejects a state saved for other shapes, ranks, sides or projectors.

* projected gradients (:mod:`fastgrad.nn.lowrank`): when the update reads only R
  (``update_reads_grad`` False), after every step the projection of each low-rank weight's next
  gradient is published to its layer if that layer can compute R itself (LowRankGradLinear,
  QLinear) and the next step is not a refresh; ``step`` then uses (and clears) the R the layer
  accumulated instead of projecting ``p.grad`` (both are added if both exist).

The driver protocol. :meth:`LowRankOptimizer.step` is one driver of the update; the layer-wise one
(:mod:`fastgrad.optim.layerwise`) runs the same pieces per parameter, in gradient hooks, through
these public methods (and only these): :meth:`~LowRankOptimizer.projector` (a group's projector),
:meth:`~LowRankOptimizer.index_of` (a parameter's stable position), :meth:`~LowRankOptimizer.prepare`
(refresh if due, then R), :meth:`~LowRankOptimizer.refresh_due`, :meth:`~LowRankOptimizer.update_group`
(the update rule), :meth:`~LowRankOptimizer.update_writes` (the tensors outside the state an update
writes), :meth:`~LowRankOptimizer.rollback` (undo a refresh), :meth:`~LowRankOptimizer.publish_grad_projections`
and :func:`finite_flags`. Subclasses override ``update_group`` (and, where their rule needs it,
``prepare``, ``refresh_due``, ``projector``, ``update_writes``).

Subclasses implement ``update_group(group, items)``. For a non-finite check the low-rank gradient is
enough: a NaN or Inf in G reaches every entry of R = down(G) that it touches (NaN·x = NaN, Inf·0 =
NaN), so the full gradient is only read again on refresh steps (where the SVD would fail on it).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fastgrad.nn.lowrank import (
    GradProjection,
    accepts_projected_grad,
    pop_projected_grad,
    projected_grad,
    reduce_projected_grads,
    set_grad_projection,
    zero_projected_grads,
)
from fastgrad.ops import lowrank_project, lowrank_project_back_add_
from fastgrad.optim.projectors import (
    LEFT,
    PROJECTOR_OPTIONS,
    RIGHT,
    SIDE_NAMES,
    SIDE_RULES,
    Projector,
    effective_rank,
    lowrank_shape,
    make_projector,
    mix_seed,
    resolve_side,
)
from fastgrad.optim.sharding import RowShard, local, row_shard

__all__ = ["LowRankOptimizer", "ParamStep", "name_key", "transfer_moments"]

# Defaults of the keys of a low-rank group (a group with "rank").
LOWRANK_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "projector": "svd",
    "state_transfer": False,
    "seed": 0,
}
NONFINITE_POLICIES = ("skip", "raise")


@dataclass(eq=False)
class ParamStep:
    """One parameter's share of a step, between projection and update.

    lowrank:   whether the parameter is in a low-rank group.
    low:       R = down(G) (the gradient itself for a full-rank parameter); None once consumed.
    proj:      the stored dense P (svd, randomized); None where P is regenerated on use (dct,
               random), so that the P of all parameters are never alive at once.
    proj_old:  P before this step's refresh, when the moments must be carried over.
    snapshot:  the projector's state before this step's refresh (restored if the step is dropped).
    source:    the optimizer's parameter (the key of its state); ``param`` is the tensor the update
               writes: the parameter itself, or the local rows of a row-sharded (FSDP2) one.
    shard:     where those rows sit (:mod:`fastgrad.optim.sharding`); None for a plain parameter.
    """

    group: dict[str, Any]
    param: torch.Tensor
    state: dict[str, Any]
    index: int
    lowrank: bool = False
    low: torch.Tensor | None = None
    proj: torch.Tensor | None = None
    proj_old: torch.Tensor | None = None
    snapshot: dict[str, Any] | None = None
    source: torch.Tensor | None = None
    shard: RowShard | None = None

    def __post_init__(self) -> None:
        if self.source is None:
            self.source = self.param

    @property
    def side(self) -> str:
        return SIDE_NAMES[self.state["proj_side"]]

    @property
    def grad(self) -> torch.Tensor | None:
        """The gradient of the rows this step writes (``param``'s shape)."""
        return local(self.source.grad)

    @property
    def low_sharded(self) -> bool:
        """Whether R (and the moments) hold only this rank's rows: a full-rank or right-side
        parameter sharded by rows. A left-side R is the same on every rank."""
        return self.shard is not None and (not self.lowrank or self.state["proj_side"] == RIGHT)


def transfer_moments(
    first: torch.Tensor, second: torch.Tensor | None, proj_old: torch.Tensor, proj_new: torch.Tensor, side: int
) -> None:
    """Re-express Adam moments kept in the basis ``proj_old`` in the basis ``proj_new``, in place
    (``second`` None: a first moment alone, e.g. Muon's momentum).

    Right side (P r'×n, moments m×r'): C = P_old P_newᵀ, M ← M C, V ← V (C∘C).
    Left side (P m×r', moments r'×n):  C = P_newᵀ P_old, M ← C M, V ← (C∘C) V.
    M is mapped exactly (up(M) projected on the new basis); V, a per-coordinate second moment, is
    mapped with the squared weights, which keeps it non-negative and is exact for a permutation of
    basis vectors (a DCT refresh that keeps some frequencies).
    """
    rot = lowrank_project(proj_old, proj_new, SIDE_NAMES[side]).float()  # r'×r'
    if side == LEFT:
        first.copy_(rot @ first.float())
        if second is not None:
            second.copy_(rot.square() @ second.float())
    else:
        first.copy_(first.float() @ rot)
        if second is not None:
            second.copy_(second.float() @ rot.square())


def name_key(name: str) -> int:
    """A stable 63-bit integer from a parameter name (BLAKE2b; Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor is all-finite, with one host synchronisation (none for no tensors):
    the flags of every device are gathered on the first tensor's device and read at once."""
    if not tensors:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel():  # an empty tensor (a rank holding no rows of a parameter) is finite
            by_device.setdefault(t.device, []).append(i)
    first = tensors[0].device
    order: list[int] = []
    parts: list[torch.Tensor] = []
    for device, idx in by_device.items():
        if device.type == "cpu":
            # An fp32 tensor's sum propagates NaN and ±inf, in a quarter of aminmax's time and a fiftieth
            # of linalg's inf-norm's (torch 2.13); it overflows only for elements near fp32's max/numel,
            # which count as non-finite then. A 16-bit tensor: min and max (its fp32 sum would first
            # make an fp32 copy of it).
            ok = [
                torch.isfinite(t.sum() if t.dtype == torch.float32 else torch.stack(torch.aminmax(t))).all()
                for t in (tensors[i] for i in idx)
            ]
            parts.append(torch.stack(ok).to(first))
        else:  # one kernel launch for the list; max |x| propagates NaN and never overflows
            norms = torch._foreach_norm([tensors[i] for i in idx], math.inf)
            parts.append(torch.isfinite(torch.stack([n.float() for n in norms])).to(first))
        order += idx
    flags: list[bool] = [True] * len(tensors)
    for i, ok in zip(order, torch.cat(parts).tolist() if parts else [], strict=True):
        flags[i] = ok
    return flags


@dataclass(frozen=True)
class AdamScalars:
    """The scalars of Adam step t: W ← W − step_size·N with N = M / (√V / v_divisor + eps).
    ``denom_scale`` = 1/v_divisor is the form :func:`fastgrad.ops.galore_adam_step_` takes."""

    step_size: float
    v_divisor: float
    eps: float

    @property
    def denom_scale(self) -> float:
        return 1.0 / self.v_divisor


def adam_scalars(group: dict[str, Any], step: int, policy: str) -> AdamScalars:
    """Where each Adam variant puts its bias corrections, for step t = ``step`` (1-based) of a param
    group with ``lr``, ``betas``, ``eps`` (bc1 = 1 − β1^t, bc2 = 1 − β2^t):

    - ``"hf"`` (GaLore, Fira, APOLLO: the HF-legacy AdamW): η = lr·√bc2/bc1, N = M/(√V + ε);
      ``group["correct_bias"]`` False: η = lr.
    - ``"torch"`` (torch.optim.AdamW, FRUGAL): η = lr/bc1, N = M/(√V/√bc2 + ε).
    - ``"bnb"`` (bitsandbytes, Q-GaLore's reference): η = lr·√bc2/bc1, N = M/(√V + ε·√bc2).

    The one place these are computed; every optimizer applies them in its own (tested, bitwise)
    operation order."""
    lr, eps = group["lr"], group["eps"]
    beta1, beta2 = group["betas"]
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    if policy == "hf":
        if not group.get("correct_bias", True):
            return AdamScalars(lr, 1.0, eps)
        return AdamScalars(lr * math.sqrt(bc2) / bc1, 1.0, eps)
    if policy == "torch":
        return AdamScalars(lr / bc1, math.sqrt(bc2), eps)
    if policy == "bnb":
        return AdamScalars(lr * math.sqrt(bc2) / bc1, 1.0, eps * math.sqrt(bc2))
    raise ValueError(f"adam_scalars: policy must be 'hf', 'torch' or 'bnb', got {policy!r}")


def proj_like(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """What a projector makes P for (only shape, dtype and device are read): the gradient ``grad``
    of ``p``, or for a row-sharded ``p`` a memory-less tensor of its global shape."""
    shard = row_shard(p)
    return shard.like(local(grad)) if shard is not None else grad


def _agree_across_shards(items: list[ParamStep], flags: list[bool], grads_finite: bool) -> list[bool]:
    """The finiteness flags of a step as every rank sees them: a row-sharded R is finite only if
    every rank's rows are (one all-reduce of the flags when a parameter is sharded)."""
    shard = next((it.shard for it in items if it.shard is not None), None)
    if shard is None or grads_finite:
        return flags
    agreed = torch.tensor(flags, dtype=torch.float32, device=items[0].low.device)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=shard.group)
    return [bool(ok) for ok in agreed.tolist()]


def _share_subspace(proj: Projector, state: dict[str, Any], shard: RowShard) -> None:
    """After a refresh from the gathered G, every rank takes the first rank's subspace (the tensors
    the refresh wrote), so no rank depends on a bitwise-deterministic SVD or QR."""
    for key in proj.refresh_keys:
        value = state.get(key)
        if isinstance(value, torch.Tensor):
            shard.broadcast_(value)
    proj.subspace_shared(state)


def adamw_update(
    group: dict[str, Any], it: ParamStep, first: torch.Tensor, second: torch.Tensor, t: int,
    p_mat: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """torch.optim.AdamW's update of ``it``'s weight from its updated moments at Adam step t (decay
    is the caller's): W ← W − lr/(1−β1^t) · N, N = M / (√V/√(1−β2^t) + ε); with ``p_mat`` the
    projected weight's W ← W − lr/(1−β1^t) · up(N, P), added straight into W."""
    scalars = adam_scalars(group, t, "torch")
    denom = second.sqrt().div_(scalars.v_divisor).add_(scalars.eps)
    if p_mat is None:
        it.param.addcdiv_(first, denom, value=-scalars.step_size)
    else:
        normed = torch.div(first, denom, out=denom)
        lowrank_project_back_add_(it.param, normed, p_mat, it.side, -scalars.step_size)


def take_options(name: str, declared: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """A constructor's ``declared`` keyword options (name -> default) with the ``given`` values; an
    unknown name raises the TypeError Python raises for an unexpected keyword argument."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise TypeError(f"{name}.__init__() got an unexpected keyword argument {unknown[0]!r}")
    return {key: given.get(key, default) for key, default in declared.items()}


def options_signature(init: Any, options: dict[str, Any]) -> inspect.Signature:
    """The signature (without ``self``) of a constructor ``init`` that takes its class's keyword
    ``options`` through ``**options``: those as keyword-only parameters with their defaults, before
    its other keyword-only ones. What ``help()`` and ``inspect.signature`` show for the class."""
    params = [q for q in inspect.signature(init).parameters.values() if q.kind is not inspect.Parameter.VAR_KEYWORD]
    cut = next((i for i, q in enumerate(params) if q.kind is inspect.Parameter.KEYWORD_ONLY), len(params))
    declared = [
        inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=type(default).__name__)
        for key, default in options.items()
    ]
    return inspect.Signature([*params[1:cut], *declared, *params[cut:]])


def check_adam_hyperparameters(name: str, lr: float, betas: tuple[float, float], eps: float) -> None:
    """The constructor checks every Adam-based optimizer here shares."""
    if lr < 0.0:
        raise ValueError(f"{name}: invalid learning rate {lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"{name}: betas must be in [0, 1), got {betas}")
    if eps < 0.0:
        raise ValueError(f"{name}: invalid eps {eps}")


class LowRankOptimizer(torch.optim.Optimizer, ABC):
    """Base class; see the module docstring. ``nonfinite`` is "skip" (default) or "raise"."""

    #: state keys of the moments, with the shape of the low-rank (or full) gradient
    moment_keys: tuple[str, ...] = ()
    #: whether ``update_group`` reads the full gradient ``item.param.grad`` besides ``item.low``
    #: (e.g. a residual or channel scaling of G). The layer-wise driver then keeps every full
    #: gradient until the update instead of only the projected one.
    update_reads_grad: bool = False
    #: floating-point state keys that keep their own dtype across load_state_dict (not cast to the param's)
    keep_dtype_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, nonfinite: str = "skip") -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.nonfinite_steps = 0
        self._projector_cache: dict[tuple, Projector] = {}
        self._param_index: dict[torch.Tensor, int] | None = None
        super().__init__(params, defaults)
        self.publish_grad_projections()  # withdraws any projection a previous optimizer left

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(f"{type(self).__name__}: parameters must be an ordered collection, not a set")
        param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        named = [p for p in param_group["params"] if isinstance(p, tuple)]
        if named:  # (name, tensor) pairs, as from model.named_parameters(): torch keeps the names
            if len(named) != len(param_group["params"]) or "param_names" in param_group:
                raise ValueError(f"{type(self).__name__}: give names for all parameters of a group, or none")
            param_group["param_names"] = [name for name, _ in named]
            param_group["params"] = [p for _, p in named]
        if "param_names" in param_group and len(param_group["param_names"]) != len(param_group["params"]):
            raise ValueError(f"{type(self).__name__}: 'param_names' must name every parameter of its group")
        for i, p in enumerate(param_group["params"]):
            try:
                row_shard(p)  # a DTensor layout the update cannot step is refused before any step
            except ValueError as e:
                where = f"parameter {i} {tuple(p.shape)} of param group {len(self.param_groups)}"
                raise ValueError(f"{type(self).__name__}: {where}: {e}") from None
        if "rank" in param_group:
            self._normalize_lowrank_group(param_group)
        super().add_param_group(param_group)
        self._param_index = None

    def _normalize_lowrank_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        rank = group["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"{name}: 'rank' must be a positive int, got {rank!r}")
        side = group.get("proj_side", group.get("proj_type", "std"))
        if "proj_type" in group and group["proj_type"] != side:
            raise ValueError(f"{name}: proj_type={group['proj_type']!r} contradicts proj_side={side!r}")
        if side == "full":
            raise ValueError(f"{name}: proj_type='full' (two-sided projection) is not supported")
        if side not in SIDE_RULES:
            raise ValueError(f"{name}: proj_side must be one of {SIDE_RULES}, got {side!r}")
        group["proj_side"] = side
        for key, value in LOWRANK_DEFAULTS.items():
            group.setdefault(key, value)
        if group["projector"] not in PROJECTOR_OPTIONS:
            raise ValueError(f"{name}: projector must be one of {tuple(PROJECTOR_OPTIONS)}, got {group['projector']!r}")
        for key, value in PROJECTOR_OPTIONS[group["projector"]].items():
            group.setdefault(key, value)
        gap = group["update_proj_gap"]
        if not isinstance(gap, int) or gap < 1:
            raise ValueError(f"{name}: 'update_proj_gap' must be a positive int, got {gap!r}")
        if group["state_transfer"] and group["projector"] == "random":
            raise ValueError(f"{name}: state_transfer needs an orthonormal projector (svd, randomized, dct)")
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(
                    f"{name}: a group with 'rank' takes 2-D weights only; got a parameter of shape "
                    f"{tuple(p.shape)} (put it in a group without 'rank')"
                )

    def projector(self, group: dict[str, Any]) -> Projector:
        options = {k: group[k] for k in PROJECTOR_OPTIONS[group["projector"]]}
        key = (group["projector"], *sorted(options.items()))
        proj = self._projector_cache.get(key)
        if proj is None:
            proj = self._projector_cache[key] = make_projector(group["projector"], **options)
        return proj

    def index_of(self, p: torch.Tensor) -> int:
        """Position of ``p`` among all parameters (the per-parameter seed is derived from it)."""
        if self._param_index is None:
            params = (q for g in self.param_groups for q in g["params"])
            self._param_index = {q: i for i, q in enumerate(params)}
        return self._param_index[p]

    def _param_seed(self, group: dict[str, Any], p: torch.Tensor, index: int) -> int:
        """Seed of ``p``'s random streams (its projector; salted, its stochastic rounding): the
        group's ``seed`` (0 if it has none) mixed with the parameter's name when the group has
        ``param_names`` (stable across optimizer instances: one optimizer per parameter gets
        different seeds for same-shaped weights), else with its index in this optimizer."""
        seed = group.get("seed", 0)
        names = group.get("param_names")
        if names:
            name = next(n for q, n in zip(group["params"], names, strict=True) if q is p)
            return mix_seed(seed, name_key(name))
        return mix_seed(seed, index)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None, *, grads_finite: bool = False):
        """One optimisation step; returns the closure's loss if a closure is given.

        ``grads_finite=True``: the caller guarantees that every gradient (``p.grad`` and projected)
        is finite, e.g. from a finite total norm (``fastgrad.nn.clip_grad_norm_``), so the step does
        not check (nor synchronise with the device); a non-finite gradient would then reach the
        weights. Default: the NaN/Inf policy of the module docstring, one host synchronisation."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items: list[ParamStep] = []
        bad: list[ParamStep] = []
        # sharded weights' R, averaged over the ranks unless the training loop has done it already
        reduce_projected_grads(p for group in self.param_groups if "rank" in group for p in group["params"])
        for group in self.param_groups:
            proj = self.projector(group) if "rank" in group else None
            for p in group["params"]:
                low = projected_grad(p) if proj is not None else None
                if p.grad is None and low is None:
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                item = self.prepare(group, p, proj, low=low, grads_finite=grads_finite)
                (items if item.low is not None else bad).append(item)
        flags = [True] * len(items) if grads_finite else finite_flags([it.low for it in items])
        flags = _agree_across_shards(items, flags, grads_finite)
        bad += [it for it, ok in zip(items, flags, strict=True) if not ok]
        items = [it for it, ok in zip(items, flags, strict=True) if ok]
        if bad:
            self.nonfinite_steps += 1
            if self.nonfinite == "raise":
                for item in items + bad:
                    self.rollback(item)
                where = ", ".join(f"#{it.index} {tuple(it.source.shape)}" for it in bad)
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite gradient in parameter(s) {where}; "
                    "no weight, moment or projector was changed"
                )
            for item in bad:
                self.rollback(item)
        for item in items + bad:  # consumed (a skipped step drops them, as the loop drops p.grad)
            pop_projected_grad(item.source)
        by_group: dict[int, list[ParamStep]] = {}
        for item in items:
            by_group.setdefault(id(item.group), []).append(item)
        for group_items in by_group.values():
            self.update_group(group_items[0].group, group_items)
        self.publish_grad_projections()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` (as torch does) and the projected gradients of every parameter."""
        super().zero_grad(set_to_none)
        zero_projected_grads(p for g in self.param_groups for p in g["params"])

    def publish_grad_projections(self) -> None:
        """Tell low-rank-gradient layers the projection of each weight's next gradient: the current
        P when the next step will not refresh it, else nothing (the refresh needs the whole G). An
        optimizer whose update reads G (``update_reads_grad``) withdraws every projection."""
        for group in self.param_groups:
            proj = self.projector(group) if "rank" in group and not self.update_reads_grad else None
            for p in group["params"]:
                if not accepts_projected_grad(p):
                    continue
                state = self.state[p]
                if proj is not None and state and proj.has_basis(state) and not self.refresh_due(group, state):
                    set_grad_projection(p, GradProjection(proj.matrix(state, p), SIDE_NAMES[state["proj_side"]]))
                else:
                    set_grad_projection(p, None)

    def prepare(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        proj: Projector | None,
        grad: torch.Tensor | None = None,
        low: torch.Tensor | None = None,
        *,
        grads_finite: bool = False,
    ) -> ParamStep:
        """Refresh the subspace if due and project the gradient; ``low`` stays None if G is non-finite.

        ``grad`` defaults to ``p.grad`` (the layer-wise driver passes an accumulated gradient).
        ``low``: a projected gradient computed by the layer (only between refreshes), added to
        the projection of ``grad`` if there is one too. ``grads_finite``: G is known to be finite
        (see :meth:`step`): a refresh does not check it.
        """
        state = self.state[p]
        shard = row_shard(p)
        item = ParamStep(group, local(p), state, self.index_of(p), source=p, shard=shard)
        grad = p.grad if grad is None else grad
        if low is not None:
            return self._prepare_projected(item, proj, grad, low)
        if not state:
            state["step"] = 0
            if proj is not None:
                side = resolve_side(group["proj_side"], p.shape)
                proj.init_state(state, p.shape, group["rank"], side, self._param_seed(group, p, item.index))
        if proj is None:
            item.low = local(grad)
            return item
        item.lowrank = True
        low = None
        like = proj_like(p, grad)
        if not proj.has_basis(state) or self.refresh_due(group, state):
            if proj.refresh_reads_grad:
                full = grad.full_tensor() if shard is not None else grad  # a sharded G is gathered from every rank
                # Refresh steps read G once more (and synchronise): an SVD of a non-finite G would fail.
                if not grads_finite and not finite_flags([full])[0]:
                    return item
            else:  # nothing to gather; a non-finite G shows in R, and the step's checks roll the refresh back
                full = like
            if group["state_transfer"] and self.moment_keys and self.moment_keys[0] in state:
                item.proj_old = proj.matrix(state, like)
            item.snapshot = proj.snapshot(state)
            low = proj.refresh(state, full, state["step"])
            del full
            if shard is not None:
                _share_subspace(proj, state, shard)
                if low is not None and item.low_sharded:
                    low = shard.rows_of(low).clone()  # not a view that keeps the whole R alive
        p_mat = proj.matrix(state, like)
        item.low = low if low is not None else self._project(item, grad, p_mat)
        if proj.stores_matrix:
            item.proj = p_mat
        return item

    def _prepare_projected(
        self, item: ParamStep, proj: Projector, grad: torch.Tensor | None, low: torch.Tensor
    ) -> ParamStep:
        state = item.state
        if not state or not proj.has_basis(state) or self.refresh_due(item.group, state):
            raise RuntimeError(
                f"{type(self).__name__}: parameter #{item.index} {tuple(item.param.shape)} has a projected gradient "
                "but its subspace is refreshed at this step, which needs the full gradient (was the projection "
                "published by another optimizer, or the optimizer state reloaded mid-accumulation?)"
            )
        item.lowrank = True
        p_mat = proj.matrix(state, proj_like(item.source, item.source if grad is None else grad))
        low = local(low)  # a sharded R: this rank's rows (fastgrad.nn.lowrank.reduce_projected_grads)
        item.low = low if grad is None else low + self._project(item, grad, p_mat)
        if proj.stores_matrix:
            item.proj = p_mat
        return item

    def _project(self, item: ParamStep, grad: torch.Tensor, p_mat: torch.Tensor) -> torch.Tensor:
        """R = down(G, P) of the rows this rank holds; for a sharded left-side parameter the
        partial sums Pᵀ·G of every rank's rows are added up (an all-reduce of r'×n)."""
        low = lowrank_project(local(grad), self.proj_matrix(item, p_mat), item.side)
        if item.shard is not None and not item.low_sharded:
            item.shard.sum_(low)
        return low

    def refresh_due(self, group: dict[str, Any], state: dict[str, Any]) -> bool:
        """Whether a parameter that has a basis refreshes it at this step (k % update_proj_gap == 0).

        Subclasses with a per-parameter interval (Q-GaLore's adaptive T) override this."""
        return state["step"] % group["update_proj_gap"] == 0

    def _moment_tensors(self, items: list[ParamStep]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each item's Adam moments (M, V), not yet updated: created at zero (R's shape and dtype) on
        a weight's first step, re-expressed in the new basis after a refresh when state transfer is
        on. Returns the lists (M, V) in the order of ``items``."""
        for it in items:
            st = it.state
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(it.low)
                st["exp_avg_sq"] = torch.zeros_like(it.low)
            elif it.proj_old is not None:
                proj_new = self.full_proj_matrix(it)
                transfer_moments(st["exp_avg"], st["exp_avg_sq"], it.proj_old, proj_new, st["proj_side"])
        return [it.state["exp_avg"] for it in items], [it.state["exp_avg_sq"] for it in items]

    def _update_moments(
        self, group: dict[str, Any], items: list[ParamStep]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Adam's moments from each item's low-rank gradient R, in place (:meth:`_moment_tensors`):
        M ← β1·M + (1−β1)·R,  V ← β2·V + (1−β2)·R⊙R.  Returns the lists (M, V) in the order of ``items``."""
        beta1, beta2 = group["betas"]
        firsts, seconds = self._moment_tensors(items)
        lows = [it.low for it in items]
        torch._foreach_mul_(firsts, beta1)
        torch._foreach_add_(firsts, lows, alpha=1.0 - beta1)
        torch._foreach_mul_(seconds, beta2)
        torch._foreach_addcmul_(seconds, lows, lows, value=1.0 - beta2)
        return firsts, seconds

    def proj_matrix(self, item: ParamStep, full: torch.Tensor | None = None) -> torch.Tensor:
        """The dense P of a low-rank ``item`` for this step (the stored one, or regenerated), as the
        update applies it: for a sharded left-side parameter (P m×r') only its rows of P.
        ``full``: the whole P if the caller has it already."""
        if full is None:
            full = self.full_proj_matrix(item)
        if item.shard is not None and item.state["proj_side"] == LEFT:
            return item.shard.rows_of(full)
        return full

    def full_proj_matrix(self, item: ParamStep) -> torch.Tensor:
        """The whole dense P of a low-rank ``item`` for this step (the stored one, or regenerated)."""
        if item.proj is not None:
            return item.proj
        grad = item.source.grad  # only its shape, dtype and device matter (they are the parameter's)
        like = proj_like(item.source, item.source if grad is None else grad)
        return self.projector(item.group).matrix(item.state, like)

    def update_writes(self, item: ParamStep) -> list[torch.Tensor]:
        """The tensors outside ``self.state`` that the update of ``item`` writes in place: its weight
        (subclasses add others, e.g. a quantized layer's scales). The streaming layer-wise driver
        copies these and the state's tensors to undo an update on the device."""
        return [item.param]

    def rollback(self, item: ParamStep) -> None:
        if item.snapshot is not None:
            keys = self.projector(item.group).refresh_keys
            Projector.restore(item.state, item.snapshot, keys)
            item.snapshot = None
        item.low = item.proj = item.proj_old = None

    @abstractmethod
    def update_group(self, group: dict[str, Any], items: list[ParamStep]) -> None:
        """Apply the update rule to the finite ``items`` of ``group`` (all from one step)."""

    # ------------------------------------------------------------------ memory
    def state_bytes(self) -> int:
        """Bytes held by the tensors of the optimizer state (moments, projectors, indices)."""
        return sum(
            t.numel() * t.element_size()
            for st in self.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor)
        )

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_keys(self, p: torch.Tensor) -> tuple[str, ...]:
        """The state keys of a row-sharded (FSDP2) parameter ``p`` that hold only this rank's rows:
        the moments of a full-rank or right-side weight. A left-side weight's moments, projectors and
        counters are the same on every rank (a sharded checkpoint saves them once)."""
        return () if self.state[p].get("proj_side") == LEFT else self.moment_keys

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["nonfinite_steps"] = self.nonfinite_steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by the same optimizer class for the same parameters and low-rank setup.

        Raises ValueError naming the group/parameter when the saved state was made for other
        shapes, ranks, sides or projectors (torch would otherwise load it and fail, or silently
        misbehave, at the next step).
        """
        self._check_state_dict(state_dict)
        saved = state_dict["state"]
        super().load_state_dict({"state": saved, "param_groups": state_dict["param_groups"]})
        # torch casts every state tensor of a float parameter to its dtype; indices must stay integers
        # and the keys in ``keep_dtype_keys`` (fp32 scalars) keep their saved dtype.
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for idx, p in zip(saved_group["params"], group["params"], strict=True):
                for key, value in saved.get(idx, {}).items():
                    if isinstance(value, torch.Tensor) and (
                        not value.is_floating_point() or key in self.keep_dtype_keys
                    ):
                        self.state[p][key] = value.to(p.device)
        for st in self.state.values():  # a sharded checkpoint gives a parameter's rows as a DTensor
            st.update({k: local(v) for k, v in st.items() if isinstance(v, torch.Tensor)})
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))
        self._param_index = None
        self.publish_grad_projections()

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = f"{type(self).__name__}.load_state_dict"
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}: the saved state has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}"
            )
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{name}: group {gi} has {len(group['params'])} parameters, the saved one {len(saved['params'])}"
                )
            for key in ("rank", "proj_side", "projector"):
                if saved.get(key) != group.get(key):
                    raise ValueError(
                        f"{name}: group {gi} was saved with {key}={saved.get(key)!r}, this optimizer has "
                        f"{key}={group.get(key)!r}"
                    )
            for idx, p in zip(saved["params"], group["params"], strict=True):
                st = state_dict["state"].get(idx)
                if st:
                    self._check_param_state(name, gi, idx, group, p, st)

    def _check_param_state(
        self, name: str, gi: int, idx: int, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any]
    ) -> None:
        where = f"{name}: parameter {idx} (group {gi}, shape {tuple(p.shape)})"
        expected: dict[str, tuple[int, ...]] = {}
        if "rank" in group:
            side = resolve_side(group["proj_side"], p.shape)
            rank = effective_rank(group["rank"], p.shape)
            if st.get("proj_side") != side or st.get("proj_rank") != rank:
                raise ValueError(
                    f"{where}: saved for side {st.get('proj_side')} and rank {st.get('proj_rank')}, expected "
                    f"side {side} ({SIDE_NAMES[side]}) and rank {rank}: a different model or rank?"
                )
            low_shape = lowrank_shape(p.shape, side, rank)
            expected.update(self.projector(group).stored_shapes(p.shape, side, rank))
        else:
            low_shape = tuple(p.shape)
        expected.update({k: low_shape for k in self.moment_keys})
        for key, shape in expected.items():
            t = st.get(key)
            if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"{where}: saved '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}: "
                    "the state was saved for a different model or rank"
                )
