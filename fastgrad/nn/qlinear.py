"""QLinear: a Linear layer whose weight is stored only as group-wise INT8 codes (Q-GaLore, docs/algorithms.md §3.4).

Storage (no float copy of the weight anywhere):

    weight  Parameter(uint8, (m, n), requires_grad=False)   the codes
    scales  Parameter(fp32, (m, n // g), requires_grad=False) per group of g consecutive values of a row
    zeros   Parameter(fp32, (m, n // g), requires_grad=False) the value code 0 decodes to
    bias    optional float Parameter (m,)

``scales`` and ``zeros`` are Parameters that never require grad rather than buffers so that FSDP2
shards them by rows with the codes (a row's groups stay with the row) and all-gathers all three:
about 1 + 8/g bytes per weight element instead of a float weight's 2 or 4 (see
:func:`fastgrad.nn.fully_shard_model`).

A value decodes as ``code·scale + zero`` (:func:`fastgrad.ops.dequantize_int8`, asymmetric min/max
quantizer whose range always contains the group's values). ``scales``/``zeros`` stay fp32 through
``model.to(dtype)`` (the ops require fp32 and a bf16 round trip would lose precision; QG-5).

How the weight gradient reaches the optimizer
---------------------------------------------
The uint8 ``weight`` cannot require grad, so autograd never produces its gradient by itself. The
custom autograd function of the forward computes, in backward, ``G = dyᵀ·x`` (m×n, flattened over
batch and sequence, accumulated in fp32) and adds it into ``weight.grad``: the codes' tensor is
given ``grad_dtype = torch.float32`` (torch ≥ 2.10), so its ``.grad`` is an ordinary fp32 m×n
tensor. Consequences:

* gradient accumulation over micro-batches works (``+=`` into ``weight.grad``);
* ``optimizer.zero_grad()`` / ``model.zero_grad()`` clear it like any other gradient, and
  ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` sees it;
* an optimizer that knows QLinear weights (:class:`fastgrad.optim.QGaLoreAdamW`) reads
  ``p.grad`` of a uint8 parameter and finds the codes' scales/zeros with :func:`qlinear_of`.
  Ordinary torch optimizers must not be given the uint8 weights (they would add a float update
  to uint8 codes); :func:`fastgrad.optim.qgalore_param_groups` builds the groups.

Between projector refreshes of :class:`~fastgrad.optim.QGaLoreAdamW` the backward computes only
the projected gradient R with the INT4 projector (:func:`fastgrad.ops.lowrank_grad`, see
:mod:`fastgrad.nn.lowrank`): then no m×n gradient exists at all and ``weight.grad`` stays None.

Forward ``y = x Ŵᵀ`` and the input gradient ``dx = dy·Ŵ`` decode the codes inside the matmul
(the quantized projection ops with Ŵ as an m×n "right" projector: C++ decodes blocks of Ŵ into a
small scratch, Triton decodes tiles in registers), so no dense Ŵ is formed or saved.
If the layer's input does not require grad (e.g. everything below it is frozen) the forward still
records the op so that ``G`` is produced; ``dx`` is then not computed. Set
``layer.weight_trainable = False`` to skip ``G`` (frozen quantized layer).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from fastgrad.nn.lowrank import (
    DEFAULT_TARGETS,
    _grad_key,
    deliver_grad,
    mark_accepts_projected_grad,
    project_weight_grad,
    register_sharded_weight,
)
from fastgrad.ops import QuantizedTensor, dequantize_int8, lowrank_project, lowrank_project_back, quantize_int8

__all__ = ["QLinear", "quantize_model", "dequantize_model", "qlinear_of", "DEFAULT_TARGETS"]

# weight Parameter -> weakref(QLinear). Filled at construction and at every forward (a deep copy of a
# model registers its own weights on its first forward), read by the optimizer to reach scales/zeros.
_OWNERS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def qlinear_of(weight: torch.Tensor) -> QLinear | None:
    """The :class:`QLinear` whose codes ``weight`` is (None if it is not a live QLinear weight)."""
    ref = _OWNERS.get(weight)
    module = ref() if ref is not None else None
    if module is None or module.weight is not weight:
        return None
    return module


def _resolve_group_size(group_size: int, in_features: int) -> int:
    g = min(group_size, in_features)
    if g < 1 or in_features % g != 0:
        raise ValueError(
            f"QLinear: group_size {group_size} must divide in_features {in_features} "
            "(groups are consecutive values of a row)"
        )
    return g


class _QLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, scales, zeros, bias, module, want_dx):  # noqa: D102
        ctx.save_for_backward(x, codes, scales, zeros)
        ctx.module = module
        ctx.want_dx = want_dx
        m, n = codes.shape
        # y = x Ŵᵀ with the INT8 Ŵ decoded inside the matmul (Ŵ as the "right" projector, m×n).
        y = lowrank_project(x.reshape(-1, n), QuantizedTensor(codes, scales, zeros, 8), "right")
        # Not a view of the T×m result (as F.linear does it): FSDP2 warns about a unit's output
        # that is a view, since an in-place op on it would drop its pre-backward hook.
        y = torch.ops.aten._unsafe_view(y, (*x.shape[:-1], m))
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, codes, scales, zeros = ctx.saved_tensors
        m, n = codes.shape
        dx = db = None
        dy2 = dy.reshape(-1, m)
        if ctx.want_dx and ctx.needs_input_grad[0]:
            # dx = dy Ŵ, Ŵ decoded again inside the matmul (never stored dense).
            w_hat = QuantizedTensor(codes, scales, zeros, 8)
            dx = lowrank_project_back(dy2.contiguous(), w_hat, "right").reshape(*dy.shape[:-1], n)
        if ctx.needs_input_grad[4]:
            db = dy2.sum(0)
        module = ctx.module
        if module.weight_trainable:
            module._accumulate_weight_grad(dy2, x.reshape(-1, n))
        return dx, None, None, None, db, None, None


class QLinear(nn.Module):
    """``y = x Ŵᵀ + b`` with Ŵ de-quantized on the fly from INT8 codes (see the module docstring).

    ``QLinear(in_features, out_features, bias=False, group_size=256)`` initialises a float weight as
    ``nn.Linear`` does and quantizes it (round to nearest); :meth:`from_linear` quantizes an existing
    layer's weight. ``group_size`` is capped at ``in_features`` and must divide it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 256,
        *,
        weight: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = _resolve_group_size(group_size, in_features)
        self.weight_trainable = True
        if weight is None:
            weight = torch.empty(out_features, in_features, device=device)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        elif tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"QLinear: weight of shape {tuple(weight.shape)}, expected {(out_features, in_features)}")
        with torch.no_grad():
            q = quantize_int8(weight.detach().float().contiguous(), self.group_size)
        self.weight = nn.Parameter(q.codes, requires_grad=False)
        self.scales = nn.Parameter(q.scales, requires_grad=False)
        self.zeros = nn.Parameter(q.zeros, requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=weight.device))
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)
        _OWNERS[self.weight] = weakref.ref(self)
        mark_accepts_projected_grad(self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 256) -> QLinear:
        """A QLinear with ``linear``'s weight quantized (RTN) and its bias copied (same dtype)."""
        q = cls(linear.in_features, linear.out_features, bias=False, group_size=group_size, weight=linear.weight)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return q

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ (m×n) of ``dtype``: a new tensor, for inspection and tests."""
        return dequantize_int8(self.weight, self.scales, self.zeros, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _OWNERS[self.weight] = weakref.ref(self)
        mark_accepts_projected_grad(self.weight)
        want_dx = True
        if torch.is_grad_enabled() and self.weight_trainable and not x.requires_grad:
            # Record the op anyway so that backward produces G; dx is then not needed.
            x, want_dx = x.detach().requires_grad_(), False
        return _QLinearFunction.apply(x, self.weight, self.scales, self.zeros, self.bias, self, want_dx)

    def _accumulate_weight_grad(self, dy2: torch.Tensor, x2: torch.Tensor) -> None:
        """The projected gradient (fp32) when the optimizer has published a projection for the
        weight (:mod:`fastgrad.nn.lowrank`), else weight.grad (fp32 m×n) += dy2ᵀ x2, created on
        first use; then the weight's grad-ready hooks run. The projected gradient's matmuls take dy2
        and x2 in their own dtype (bf16 training: bf16 tensor-core products, fp32 accumulation) and
        only R (m×r or r×n) is converted to fp32, not the T×m and T×n activations."""
        w = self.weight
        key = _grad_key(self)  # the sharded weight under FSDP2 (bind_sharded_weight), else w
        if project_weight_grad(key, dy2, x2, torch.promote_types(dy2.dtype, x2.dtype), torch.float32) is not None:
            return
        if w.grad_dtype != torch.float32:  # a deep copy / load resets it to the codes' dtype
            w.grad_dtype = torch.float32
        dy2, x2 = dy2.float(), x2.float()
        if w.grad is None:
            w.grad = dy2.t() @ x2
        else:
            w.grad.addmm_(dy2.t(), x2)
        deliver_grad(w)

    def bind_sharded_weight(self) -> None:
        """After ``fully_shard`` (see :func:`fastgrad.nn.lowrank.bind_sharded_weights`): the sharded
        codes are the optimizer's weight (:func:`qlinear_of` finds this layer from them), their
        ``.grad`` is fp32 (FSDP reduce-scatters the fp32 G of a refresh step into it), and the layer's
        backward delivers R under them. The layer must be a ``fully_shard`` unit of QLinear layers
        only (:func:`fastgrad.nn.fully_shard_model`): FSDP reduce-scatters a unit's gradients in one
        dtype and casts its parameters under mixed precision, and the scales must stay fp32."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self, FSDPModule):
            raise ValueError(
                "QLinear under FSDP2: shard the QLinear layers in fully_shard units of their own, without "
                "parameter casting, before their parent (fastgrad.nn.fully_shard_model does); this one was "
                "sharded as part of its parent"
            )
        _OWNERS[self.weight] = weakref.ref(self)
        self.weight.grad_dtype = torch.float32
        register_sharded_weight(self)

    def _apply(self, fn, recurse: bool = True):
        # Keep scales/zeros fp32 (model.to(bf16) would cast them and the ops need fp32); follow devices.
        kept = {name: getattr(self, name).data for name in ("scales", "zeros")}
        out = super()._apply(fn, recurse)
        for name, before in kept.items():
            param = getattr(self, name)
            if param.dtype != torch.float32:  # from the values before the cast, not a bf16 round trip
                param.data = before.to(device=param.device, dtype=torch.float32)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, int8"
        )


MIN_FITTED_GROUP = 32


def fit_group_size(group_size: int, in_features: int) -> int:
    """The group size :func:`quantize_model` uses for a layer: the largest divisor of
    ``in_features`` not above ``group_size``, or the whole row when that divisor would be below
    ``MIN_FITTED_GROUP`` (LLaMA widths like 352 → 176 or 5461 = 43·127 → 127 at group_size 256)."""
    best = max(d for d in range(1, min(group_size, in_features) + 1) if in_features % d == 0)
    return best if best >= min(MIN_FITTED_GROUP, in_features) else in_features


def quantize_model(model: nn.Module, group_size: int = 256, targets: Iterable[str] = DEFAULT_TARGETS) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` child whose attribute name is in ``targets`` by a
    :class:`QLinear` (RTN INT8, groups of :func:`fit_group_size` ``(group_size, in_features)``
    values: groups never straddle rows); returns ``model``.

    Embeddings, norms and the output head (``lm_head``) are not targets and stay floating point.
    """
    targets = set(targets)
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in targets and isinstance(child, nn.Linear)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, QLinear.from_linear(child, fit_group_size(group_size, child.in_features)))
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The inverse of :func:`quantize_model`, in place: every :class:`QLinear` becomes an
    ``nn.Linear`` of ``dtype`` holding its de-quantized weight Ŵ = code·scale + zero (and its bias),
    e.g. to save a float model at the end of Q-GaLore training; returns ``model``."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, QLinear)
    ]
    for parent, name, child in swaps:
        linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(child.dequantized_weight(dtype))
            if child.bias is not None:
                linear.bias.copy_(child.bias)
        setattr(parent, name, linear.to(child.weight.device))
    return model
