"""Layers for memory-efficient training: :class:`QLinear` (INT8 weight), :class:`LowRankGradLinear`
(projected weight gradients, :mod:`fastgrad.nn.lowrank`) and model conversion."""

from fastgrad.nn.fsdp import fully_shard_model
from fastgrad.nn.lowrank import (
    GradProjection,
    LowRankGradLinear,
    clip_grad_norm_,
    lowrank_grad_model,
    projected_grad,
    register_grad_ready_hook,
    zero_projected_grads,
)
from fastgrad.nn.qlinear import DEFAULT_TARGETS, QLinear, dequantize_model, qlinear_of, quantize_model

__all__ = [
    "QLinear",
    "quantize_model",
    "dequantize_model",
    "qlinear_of",
    "DEFAULT_TARGETS",
    "LowRankGradLinear",
    "lowrank_grad_model",
    "GradProjection",
    "projected_grad",
    "zero_projected_grads",
    "register_grad_ready_hook",
    "clip_grad_norm_",
    "fully_shard_model",
]
