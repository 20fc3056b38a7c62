"""FSDP2 (``fully_shard``) for a model with fastgrad's layers, in one call.

:func:`fully_shard_model` shards each transformer block as one unit (its weights all-gathered
together before its forward and backward, its gradients reduce-scattered after), the remaining
parameters (embedding, final norm, head) with the root, and then binds the sharded weights of the
layers that compute their projected gradient (:func:`fastgrad.nn.lowrank.bind_sharded_weights`).

The :class:`~fastgrad.nn.QLinear` layers of a block form a unit of their own, inside the block's
and before it, with no parameter casting: their codes (uint8), scales and zeros (fp32) are sharded by
rows and all-gathered as they are stored, 1 + 8/g bytes per weight element against a float weight's
2 (bf16) or 4, and their fp32 gradients are reduce-scattered apart from the block's (FSDP2 reduces a
unit's gradients in one dtype; under ``--mixed-precision`` the block's are the compute dtype's).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fastgrad.nn.lowrank import bind_sharded_weights
from fastgrad.nn.qlinear import QLinear

__all__ = ["fully_shard_model"]


def fully_shard_model(
    model: nn.Module, blocks: Iterable[nn.Module] | None = None, *, mp_policy=None, **fsdp_kwargs
) -> nn.Module:
    """Shard ``model`` in place with ``torch.distributed.fsdp.fully_shard``; returns it.

    ``blocks``: the units (default ``model.model.layers``, the decoder layers of fastgrad's and
    Hugging Face's LLaMA). ``mp_policy``: FSDP2's ``MixedPrecisionPolicy`` for the blocks and the
    root (QLinear units never cast). ``fsdp_kwargs`` go to every ``fully_shard`` call (``mesh``,
    ``reshard_after_forward``, ...). Convert the layers first (:func:`~fastgrad.nn.quantize_model`,
    :func:`~fastgrad.nn.lowrank_grad_model`): FSDP keeps the modules it finds."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if blocks is None:
        inner = getattr(model, "model", None)
        blocks = getattr(inner, "layers", None)
        if blocks is None:
            raise ValueError(
                f"fully_shard_model: {type(model).__name__} has no model.layers; pass blocks= (the modules to "
                "shard as units)"
            )
    policy = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in blocks:
        quantized = [m for m in block.modules() if isinstance(m, QLinear)]
        if quantized:
            fully_shard(quantized, mp_policy=MixedPrecisionPolicy(), **fsdp_kwargs)
        fully_shard(block, **policy, **fsdp_kwargs)
    rest = [m for m in model.modules() if isinstance(m, QLinear) and not _is_sharded(m)]
    if rest:  # QLinear layers outside the blocks: one more unit
        fully_shard(rest, mp_policy=MixedPrecisionPolicy(), **fsdp_kwargs)
    fully_shard(model, **policy, **fsdp_kwargs)
    bind_sharded_weights(model)
    return model


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
