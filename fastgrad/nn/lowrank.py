"""Low-rank weight gradients: Linear layers that hand the optimizer R = down(G, P), never G.

Between projector refreshes a GaLore-type optimizer only reads the projected gradient R of a weight
W (m×n). For ``y = x Wᵀ`` the gradient is G = dyᵀ x, so R can be computed from dy and x directly
(:func:`fastgrad.ops.lowrank_grad`): T·(m+n)·r multiply-adds and a T×r intermediate instead of
T·m·n and an m×n gradient. The pieces:

* the **optimizer** (:class:`fastgrad.optim.LowRankOptimizer` whose update needs only R: GaLoreAdamW,
  QGaLoreAdamW) publishes, after each step, the projection the next gradient of each weight will
  be projected with (:func:`set_grad_projection`), or withdraws it when the next step refreshes
  the subspace (the refresh needs the whole G, once every T steps);
* the **layer** (:class:`LowRankGradLinear`, or :class:`fastgrad.nn.QLinear` for INT8 weights) reads
  it in backward: with a projection it accumulates R into the weight's *projected gradient* (see
  :func:`projected_grad`) and produces no ``weight.grad``; without one it produces G as usual;
* the optimizer's ``step`` consumes the projected gradient (and clears it), exactly as it would
  have used ``lowrank_project(weight.grad, P)``; ``optimizer.zero_grad()`` clears it too.

Gradient accumulation over micro-batches adds the R's (down(·, P) is linear, so Σ down(G_i) =
down(Σ G_i)). The layer-wise driver (:func:`fastgrad.optim.layerwise`) is told through
:func:`register_grad_ready_hook`. :func:`clip_grad_norm_` clips ordinary and projected gradients
together. ``model.zero_grad()`` does not know projected gradients: use ``optimizer.zero_grad()`` or
:func:`zero_projected_grads` to drop a partial accumulation.

Convert a model with :func:`lowrank_grad_model` (fastgrad's LLaMA or a Hugging Face Llama: the
attention and MLP projections by default). The converted layers are ``nn.Linear`` subclasses with
the same parameters and ``state_dict``; with no optimizer publishing projections they behave
exactly like ``nn.Linear``.

Under FSDP2 (``fully_shard``): convert before sharding, then call :func:`bind_sharded_weights`; the
layer computes R of its whole (gathered) weight from this rank's batch and averages it over the
ranks instead of FSDP reduce-scattering G (m×n): a reduce-scatter of R's rows (m×r', right side)
or an all-reduce of R (r'×n, left side), n/r' or m/r' times fewer bytes. The average is taken in
the layer's backward, as soon as R is complete, whenever the weight's FSDP unit reduces the
gradients of this backward pass (``set_requires_gradient_sync``: the last micro-batch), so each
rank holds the whole R of one weight at a time and its rows of the others'; R accumulated while
the unit does not reduce is averaged with the next one that does, or by
:func:`reduce_projected_grads`, which the optimizer's ``step`` calls for what is left.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from fastgrad.ops import QuantizedTensor, lowrank_grad

__all__ = [
    "GradProjection",
    "LowRankGradLinear",
    "lowrank_grad_model",
    "set_grad_projection",
    "grad_projection",
    "projected_grad",
    "pop_projected_grad",
    "zero_projected_grads",
    "register_grad_ready_hook",
    "clip_grad_norm_",
    "accepts_projected_grad",
    "bind_sharded_weights",
    "reduce_projected_grads",
]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GradProjection:
    """The projection of a weight's next gradient: R = lowrank_project(G, proj, side)."""

    proj: torch.Tensor | QuantizedTensor
    side: str


# weight -> state, keyed weakly by the Parameter (a weight that dies takes its entries with it).
_CAPABLE: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # weight -> True: a layer computes R itself
_PROJECTIONS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # weight -> GradProjection
_PROJECTED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # weight -> accumulated R
_REDUCED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # sharded weight -> its R is averaged
_HOOKS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # weight -> {handle id: hook}
# sharded weight -> weakref to the FSDP2 unit (FSDPModule) that reduces its gradients: its R is
# averaged in backward when that unit reduces the gradients of the pass (a strong reference to the
# unit, which holds the weight, would keep the key alive).
_UNIT: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
# layer -> its sharded (FSDP2) weight: the key of the entries above, which the optimizer holds,
# while the layer's forward and backward see the gathered weight FSDP registers in its place.
_SHARDED_WEIGHT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mark_accepts_projected_grad(weight: torch.Tensor) -> None:
    """Called by layers whose backward honours :func:`grad_projection` (at construction and forward)."""
    _CAPABLE[weight] = True


def accepts_projected_grad(weight: torch.Tensor) -> bool:
    """Whether ``weight`` belongs to a layer that can compute its projected gradient itself."""
    return _CAPABLE.get(weight, False)


def set_grad_projection(weight: torch.Tensor, projection: GradProjection | None) -> None:
    """Publish (or withdraw, with None) the projection of ``weight``'s next gradient."""
    if projection is None:
        _PROJECTIONS.pop(weight, None)
    else:
        _PROJECTIONS[weight] = projection


def grad_projection(weight: torch.Tensor) -> GradProjection | None:
    return _PROJECTIONS.get(weight)


def projected_grad(weight: torch.Tensor) -> torch.Tensor | None:
    """The projected gradient accumulated for ``weight`` since the optimizer last consumed it."""
    return _PROJECTED.get(weight)


def pop_projected_grad(weight: torch.Tensor) -> torch.Tensor | None:
    _REDUCED.pop(weight, None)
    return _PROJECTED.pop(weight, None)


def zero_projected_grads(params: Iterable[torch.Tensor]) -> None:
    """Drop the projected gradients of ``params`` (e.g. ``model.parameters()``)."""
    for p in params:
        _PROJECTED.pop(p, None)
        _REDUCED.pop(p, None)


class _HookHandle:
    _ids = itertools.count()

    def __init__(self, weight: torch.Tensor) -> None:
        self._weight = weight
        self.id = next(_HookHandle._ids)

    def remove(self) -> None:
        _HOOKS.get(self._weight, {}).pop(self.id, None)


def register_grad_ready_hook(weight: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> _HookHandle:
    """Call ``hook(weight)`` whenever a fastgrad layer has delivered a gradient of ``weight`` that
    autograd's ``register_post_accumulate_grad_hook`` does not see: a projected gradient (read it
    with :func:`projected_grad`), or the full gradient a :class:`~fastgrad.nn.QLinear` writes into
    its uint8 weight's ``.grad``. Returns a handle with ``remove()``."""
    handle = _HookHandle(weight)
    _HOOKS.setdefault(weight, {})[handle.id] = hook
    return handle


def deliver_grad(weight: torch.Tensor) -> None:
    """For layers: run the grad-ready hooks of ``weight``."""
    for hook in list(_HOOKS.get(weight, {}).values()):
        hook(weight)


def deliver_projected_grad(weight: torch.Tensor, low: torch.Tensor) -> None:
    """For layers: add ``low`` to ``weight``'s projected gradient, then run its grad-ready hooks. A
    sharded weight whose FSDP unit reduces this backward's gradients has the sum averaged over the
    ranks at once (the module docstring)."""
    sync = _unit_reduces_grads(weight)
    acc = _PROJECTED.get(weight)
    if weight in _REDUCED:
        if not sync:
            raise RuntimeError(
                "a projected gradient was delivered, with gradient sync off, after the ranks' ones were averaged: "
                "step the optimizer (or zero the gradients) before the next backward, or turn the sync off "
                "(set_requires_gradient_sync(False)) from the first micro-batch of the accumulation on"
            )
        acc.add_(_average_over_ranks(weight, low))  # every micro-batch synced: the sum of the averages, as FSDP
    else:
        total = low if acc is None else acc.add_(low)
        _PROJECTED[weight] = _average_over_ranks(weight, total) if sync else total
        if sync:
            _REDUCED[weight] = True
    deliver_grad(weight)


def project_weight_grad(
    weight: torch.Tensor, dy2: torch.Tensor, x2: torch.Tensor, dtype: torch.dtype, grad_dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """For layers: if a projection is published for ``weight``, compute R from dy2 (T×m) and x2
    (T×n) in ``dtype`` (the matmuls' operand dtype; they accumulate in fp32), deliver it as
    ``grad_dtype`` (default ``dtype``: R is m×r or r×n, so converting it is cheap, unlike converting
    dy2 and x2) and return it; else return None (the caller forms G)."""
    route = _PROJECTIONS.get(weight)
    if route is None:
        return None
    proj = route.proj
    if isinstance(proj, torch.Tensor) and proj.dtype != dtype:
        proj = proj.to(dtype)
    low = lowrank_grad(dy2.to(dtype), x2.to(dtype), proj, route.side)
    if grad_dtype is not None and low.dtype != grad_dtype:
        low = low.to(grad_dtype)
    deliver_projected_grad(weight, low)
    return low


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the ordinary *and* projected gradients of
    ``parameters``: the 2-norm of all of them (what the optimizer will consume), and, when
    ``max_norm`` is given, all scaled by ``min(1, max_norm / (norm + 1e-6))``. Returns the norm, a
    0-d fp32 tensor on the first gradient's device (NaN/Inf if any gradient is non-finite; nothing
    is scaled then). No host synchronisation: the norm and the factor stay on the device.

    Gradients of row-sharded (FSDP2) parameters are DTensors: each rank's squared norm of its rows
    is all-reduced (one scalar), and each rank scales its rows."""
    from fastgrad.optim.sharding import is_dtensor  # here: fastgrad.optim imports this module

    grads = []
    for p in parameters:
        if p.grad is not None:
            grads.append(p.grad)
        low = _PROJECTED.get(p)
        if low is not None:
            grads.append(low)
    if not grads:
        return torch.tensor(0.0)
    group = next((g.device_mesh.get_group() for g in grads if is_dtensor(g)), None)
    rows = [is_dtensor(g) for g in grads]
    grads = [g.to_local() if row else g for g, row in zip(grads, rows, strict=True)]
    device = grads[0].device
    norms = torch._foreach_norm(grads, 2.0)
    if group is None:
        total = torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]), 2.0)
    else:  # Σ‖rows‖² of the sharded gradients over the ranks, plus the others' ‖G‖² once
        squares = torch.stack([n.float().to(device) for n in norms]).square_()
        is_row = torch.tensor(rows, device=device)
        total = torch.where(is_row, squares, 0.0).sum()
        torch.distributed.all_reduce(total, group=group)
        total = total.add_(torch.where(is_row, 0.0, squares).sum()).sqrt_()
    if max_norm is not None:
        # The factor in float64 (the arithmetic of Python floats), then fp32; 1 where the norm is not finite.
        coef = (float(max_norm) / (total.double() + 1e-6)).clamp_(max=1.0)
        coef = torch.where(torch.isfinite(total), coef, 1.0).float()
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for dev, group in by_device.items():
            # GradScaler's unscale op: g·coef in fp32 for every gradient dtype, with the factor read on
            # the device (a _foreach_mul_ by a device tensor would round it to a 16-bit gradient's dtype).
            found_inf = torch.zeros(1, device=dev)  # not used: the norm says it
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, coef.to(dev).reshape(1))
    return total


class _LowRankGradLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module):  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        # The projection is looked up through the module: activation checkpointing's recomputation
        # hands the saved weight back as another tensor object, unknown to the registry.
        ctx.module = module
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight = ctx.saved_tensors
        m, n = weight.shape
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ weight.to(dy.dtype)
        dy2 = dy.reshape(-1, m)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, n)
            key = _grad_key(ctx.module)  # its dtype: the gathered weight's, or under FSDP2 mixed precision fp32
            if project_weight_grad(key, dy2, x2, weight.dtype, key.dtype) is None:
                dw = (dy2.t() @ x2.to(dy2.dtype)).to(weight.dtype)  # a refresh step (or no optimizer): G
        return dx, dw, db, None


class LowRankGradLinear(nn.Linear):
    """``nn.Linear`` whose backward produces the projected weight gradient R = down(G, P) with
    :func:`fastgrad.ops.lowrank_grad` whenever the optimizer has published a projection for its
    weight, and the ordinary gradient otherwise (see the module docstring). Same parameters,
    ``state_dict`` and forward as ``nn.Linear``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        mark_accepts_projected_grad(self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> LowRankGradLinear:
        """A LowRankGradLinear sharing ``linear``'s weight and bias Parameters (no copy)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        mark_accepts_projected_grad(layer.weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mark_accepts_projected_grad(self.weight)  # a deep copy / reloaded model has new Parameters
        return _LowRankGradLinearFunction.apply(x, self.weight, self.bias, self)

    def bind_sharded_weight(self) -> None:
        """See :func:`bind_sharded_weights`."""
        register_sharded_weight(self)


def _grad_key(layer: nn.Module) -> torch.Tensor:
    """The weight under which ``layer``'s projection and projected gradient are registered."""
    return _SHARDED_WEIGHT.get(layer, layer.weight)


def register_sharded_weight(layer: nn.Module) -> None:
    """For layers: ``layer.weight``, the sharded Parameter FSDP2 registers on the layer outside its
    forward and backward, is the key the layer's backward delivers R under."""
    _SHARDED_WEIGHT[layer] = layer.weight
    mark_accepts_projected_grad(layer.weight)


def bind_sharded_weights(model: nn.Module) -> None:
    """After ``fully_shard``: for each layer of ``model`` that computes its projected gradient
    (:class:`LowRankGradLinear`, :class:`~fastgrad.nn.QLinear`) and whose weight is sharded, make
    the sharded weight (the DTensor Parameter the optimizer steps) the key its backward delivers R
    under (in forward and backward the layer sees the gathered weight FSDP registers in its place),
    and record the FSDP unit that reduces its gradients (the nearest ``fully_shard``-ed module at or
    above the layer), whose gradient sync decides when R is averaged.
    :func:`fastgrad.nn.fully_shard_model` calls it."""
    from torch.distributed.fsdp import FSDPModule

    from fastgrad.optim.sharding import is_dtensor  # here: fastgrad.optim imports this module

    def bind(module: nn.Module, unit: nn.Module | None) -> None:
        unit = module if isinstance(module, FSDPModule) else unit
        bind_weight = getattr(module, "bind_sharded_weight", None)
        if bind_weight is not None and is_dtensor(module.weight):
            bind_weight()
            if unit is not None:  # (else R is averaged by reduce_projected_grads alone)
                _unit_reduces_grads_of(unit)  # fails here, at setup, on an FSDP2 it cannot read
                _UNIT[module.weight] = weakref.ref(unit)
        for child in module.children():
            bind(child, unit)

    bind(model, None)


def _unit_reduces_grads(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is sharded and its FSDP unit reduces the gradients of the current
    backward pass (its ``set_requires_gradient_sync``, True unless turned off)."""
    ref = _UNIT.get(weight)
    unit = ref() if ref is not None else None
    return unit is not None and _unit_reduces_grads_of(unit)


def _unit_reduces_grads_of(unit: nn.Module) -> bool:
    """FSDP2's gradient sync flag of ``unit``, which ``set_requires_gradient_sync`` sets and FSDP2
    offers no reader of: its parameter group's ``reduce_grads`` (torch 2.4 to 2.13)."""
    try:
        group = unit._get_fsdp_state()._fsdp_param_group
        return group is None or bool(group.reduce_grads)
    except AttributeError as error:
        raise RuntimeError(
            f"fastgrad cannot read FSDP2's gradient sync flag in torch {torch.__version__} ({error}); it reads "
            "FSDPModule._get_fsdp_state()._fsdp_param_group.reduce_grads"
        ) from error


@torch.no_grad()
def reduce_projected_grads(params: Iterable[torch.Tensor]) -> None:
    """Average the projected gradients of sharded ``params`` over the ranks, in place of FSDP's
    reduce-scatter of their G: R (computed from this rank's batch for the whole weight) becomes the
    rank's rows of the mean R, a DTensor laid out as the weight (right side: a reduce-scatter of
    m×r'), or the mean R itself (left side, r'×n: an all-reduce), as the optimizer reads them.
    Once per accumulation: a weight whose R is averaged already is left as it is, so a training loop
    calls this after its last micro-batch (before clipping), and the optimizer's ``step`` calls it
    again, which then sends nothing."""
    from fastgrad.optim.sharding import row_shard

    for p in params:
        low = _PROJECTED.get(p)
        if low is None or p in _REDUCED or row_shard(p) is None:
            continue
        _REDUCED[p] = True
        _PROJECTED[p] = _average_over_ranks(p, low)


def _average_over_ranks(weight: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The mean over the ranks of the whole R ``low`` of the row-sharded ``weight``, as the optimizer
    reads it: this rank's rows of it as a DTensor laid out as the weight (right side, m×r': a
    reduce-scatter), or all of it (left side, r'×n: an all-reduce, in place)."""
    from fastgrad.optim.sharding import row_shard

    shard = row_shard(weight)
    world = torch.distributed.get_world_size(shard.group)
    if _PROJECTIONS[weight].side == "left":
        return shard.sum_(low).div_(world)
    chunk = -(-shard.shape[0] // world)  # FSDP's rows per rank; the last ones may hold fewer
    padded = low.new_zeros((chunk * world, low.shape[1]))
    padded[: low.shape[0]] = low
    rows = low.new_empty((chunk, low.shape[1]))
    # reduce_scatter_single is reduce_scatter_tensor's name from torch 2.13 on
    reduce_scatter = (
        getattr(torch.distributed, "reduce_scatter_single", None) or torch.distributed.reduce_scatter_tensor
    )
    reduce_scatter(rows, padded, group=shard.group)
    return shard.as_dtensor(rows[: shard.rows].div_(world))


def lowrank_grad_model(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` child whose attribute name is in ``targets`` by a
    :class:`LowRankGradLinear` sharing its parameters; returns ``model``.

    The default targets are the attention and MLP projections of fastgrad's LLaMA and of Hugging
    Face's ``LlamaForCausalLM`` (``q_proj`` … ``down_proj``); embeddings, norms and the head stay.
    Build the optimizer after converting (or before: the parameters are the same objects).
    """
    targets = set(targets)
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in targets and type(child) is nn.Linear
    ]
    for parent, name, child in swaps:
        setattr(parent, name, LowRankGradLinear.from_linear(child))
    return model
