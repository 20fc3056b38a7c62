"""Layers for memory-efficient training: :class:`QLinear` (INT8 weight) and model conversion."""

from fastgrad.nn.qlinear import DEFAULT_TARGETS, QLinear, qlinear_of, quantize_model

__all__ = ["QLinear", "quantize_model", "qlinear_of", "DEFAULT_TARGETS"]
