"""Public, documented entry points to the ``torch.ops.fastgrad`` ops.

Every function here is a thin wrapper: the math is specified in ``fastgrad/_reference.py`` and
the argument checks live in ``fastgrad/_ops.py``. ``python -m fastgrad.env`` tells which
implementation (C++, Triton, CUDA C++ or the reference) serves each op on each device.

Quantization layout (INT8 and INT4): groups of ``group_size`` consecutive values along the last
dimension (``group_size=None``: one group per row); a value decodes as ``code * scale + zero``
with fp32 ``scales``/``zeros`` of shape ``(*x.shape[:-1], x.shape[-1] // group_size)``. INT4
codes are packed two per byte (low nibble first). Stochastic rounding draws from a counter-based
Philox stream: the same ``(seed, offset)`` gives the same codes on every backend; advance
``offset`` by ``x.numel()`` for fresh randomness.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "QuantizedTensor",
    "quantize",
    "quantize_int8",
    "dequantize_int8",
    "quantize_int4",
    "dequantize_int4",
    "round_bf16_stochastic",
    "lowrank_project",
    "lowrank_project_back",
    "lowrank_project_back_add_",
    "lowrank_grad",
    "galore_adam_step_",
    "NS_COEFFICIENTS",
    "newton_schulz",
]


class QuantizedTensor(NamedTuple):
    """Group-wise quantized storage of a float tensor.

    codes:  uint8, ``(..., n)`` for 8 bits, ``(..., n // 2)`` packed for 4 bits.
    scales: float32, ``(..., n // group_size)``.
    zeros:  float32, ``(..., n // group_size)``: the value that code 0 decodes to.
    bits:   4 or 8.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int

    def narrow_rows(self, start: int, length: int) -> QuantizedTensor:
        """Rows [start, start + length) of the quantized tensor (views; groups lie within rows)."""
        return QuantizedTensor(*(t.narrow(0, start, length) for t in self[:3]), self.bits)

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense tensor this stores."""
        return torch.Size((*self.codes.shape[:-1], self.codes.shape[-1] * (8 // self.bits)))

    @property
    def group_size(self) -> int:
        return self.shape[-1] // self.scales.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes + scales + zeros."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.bits == 4:
            return dequantize_int4(self.codes, self.scales, self.zeros, dtype)
        return dequantize_int8(self.codes, self.scales, self.zeros, dtype)


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    *,
    symmetric: bool = False,
    stochastic: bool = False,
    seed: int = 0,
    offset: int = 0,
) -> QuantizedTensor:
    """Quantize ``x`` (fp32/bf16/fp16, contiguous, ``(..., n)``) to ``bits``-bit codes (8 or 4), group-wise.

    Args:
        group_size: values per group along the last dimension (must divide ``n``, even for 4 bits);
            None: per row.
        symmetric: scale = absmax/127 and zero = -128·scale (codes 1..255) for 8 bits, absmax/7 and
            -8·scale (codes 1..15) for 4 bits; else min/max affine.
        stochastic: stochastic rounding (unbiased) instead of round-to-nearest.
        seed, offset: the Philox key and the stream position of element 0 (stochastic only).
    """
    if bits not in (4, 8):
        raise ValueError(f"fastgrad.quantize: argument 'bits' must be 4 or 8, got {bits}")
    op = torch.ops.fastgrad.quantize_int8 if bits == 8 else torch.ops.fastgrad.quantize_int4
    group_arg = -1 if group_size is None else group_size
    codes, scales, zeros = op(x, group_arg, symmetric, stochastic, seed, offset)
    return QuantizedTensor(codes, scales, zeros, bits)


def quantize_int8(x: torch.Tensor, group_size: int | None = 128, **kwargs) -> QuantizedTensor:
    """:func:`quantize` to INT8 codes ``(..., n)``; keywords as there."""
    return quantize(x, 8, group_size, **kwargs)


def quantize_int4(x: torch.Tensor, group_size: int | None = 128, **kwargs) -> QuantizedTensor:
    """:func:`quantize` to 4-bit codes packed two per byte (codes ``(..., n // 2)``); keywords as there."""
    return quantize(x, 4, group_size, **kwargs)


def dequantize_int8(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """INT8 codes ``(..., n)`` with scales/zeros ``(..., groups)`` -> ``(..., n)`` of ``dtype``."""
    return torch.ops.fastgrad.dequantize_int8(codes, scales, zeros, dtype)


def dequantize_int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Packed INT4 codes ``(..., n // 2)`` with scales/zeros ``(..., groups)`` -> ``(..., n)``."""
    return torch.ops.fastgrad.dequantize_int4(codes, scales, zeros, dtype)


def round_bf16_stochastic(x: torch.Tensor, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """fp32 -> bf16 with stochastic rounding: E[result] = x. Same shape; NaN stays NaN."""
    return torch.ops.fastgrad.round_bf16_stochastic(x, seed, offset)


def lowrank_project(g: torch.Tensor, p: torch.Tensor | QuantizedTensor, side: str) -> torch.Tensor:
    """Project a gradient ``g`` (m×n) onto the subspace of ``p``.

    side="left":  p is m×r, returns Pᵀ G (r×n).
    side="right": p is r×n, returns G Pᵀ (m×r).
    ``p`` may be a dense tensor of g's dtype or a :class:`QuantizedTensor` (INT4/INT8), whose
    dequantization is fused into the matmul. Accumulates in fp32; the result has g's dtype.
    """
    if isinstance(p, QuantizedTensor):
        return torch.ops.fastgrad.lowrank_project_quantized(g, p.codes, p.scales, p.zeros, p.bits, side)
    return torch.ops.fastgrad.lowrank_project(g, p, side)


def lowrank_project_back(
    r: torch.Tensor, p: torch.Tensor | QuantizedTensor, side: str, scale: float = 1.0
) -> torch.Tensor:
    """Map a low-rank tensor back to full size, times ``scale``.

    side="left":  r is r×n, p is m×r, returns scale·P R (m×n).
    side="right": r is m×r, p is r×n, returns scale·R P (m×n).
    """
    if isinstance(p, QuantizedTensor):
        return torch.ops.fastgrad.lowrank_project_back_quantized(r, p.codes, p.scales, p.zeros, p.bits, side, scale)
    return torch.ops.fastgrad.lowrank_project_back(r, p, side, scale)


def lowrank_project_back_add_(
    w: torch.Tensor, r: torch.Tensor, p: torch.Tensor | QuantizedTensor, side: str, scale: float = 1.0
) -> torch.Tensor:
    """In place: ``w += scale · up(r, p)`` (up as in :func:`lowrank_project_back`); returns ``w``.

    ``w`` is m×n of any float dtype (a weight, or a copy of a gradient); the sum is formed in fp32
    and rounded once to w's dtype. No m×n temporary is allocated: an optimizer applies its
    low-rank update straight into the weight with this.
    """
    if isinstance(p, QuantizedTensor):
        torch.ops.fastgrad.lowrank_project_back_quantized_add_(w, r, p.codes, p.scales, p.zeros, p.bits, side, scale)
    else:
        torch.ops.fastgrad.lowrank_project_back_add_(w, r, p, side, scale)
    return w


def lowrank_grad(dy: torch.Tensor, x: torch.Tensor, p: torch.Tensor | QuantizedTensor, side: str) -> torch.Tensor:
    """The projected weight gradient of ``y = x Wᵀ`` (W m×n), without forming the gradient.

    ``dy`` (..., m) is the gradient of y, ``x`` (..., n) the layer's input (leading dimensions,
    e.g. batch and sequence, are flattened into T tokens); G = dyᵀ x would be m×n. Returns
    ``lowrank_project(G, p, side)``:

    side="right": p is r×n, returns G Pᵀ = dyᵀ (x Pᵀ)   (m×r);
    side="left":  p is m×r, returns Pᵀ G = (dy P)ᵀ x    (r×n);

    in T·(m+n)·r multiply-adds instead of T·m·n, with a T×r intermediate instead of an m×n one.
    ``p`` may be a dense tensor of dy's dtype or a :class:`QuantizedTensor` (dequantization fused
    into the matmul, as in :func:`lowrank_project`). Accumulates in fp32; the result has dy's dtype.
    """
    if dy.dim() < 1 or x.dim() < 1 or dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"fastgrad.lowrank_grad: 'dy' (..., m) and 'x' (..., n) must share their leading dimensions, "
            f"got shapes {tuple(dy.shape)} and {tuple(x.shape)}"
        )
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(p, QuantizedTensor):
        return torch.ops.fastgrad.lowrank_grad_quantized(dy2, x2, p.codes, p.scales, p.zeros, p.bits, side)
    return torch.ops.fastgrad.lowrank_grad(dy2, x2, p, side)


def galore_adam_step_(
    w: torch.Tensor | QuantizedTensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    r: torch.Tensor,
    p: torch.Tensor | QuantizedTensor,
    side: str,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step_scale: float,
    denom_scale: float = 1.0,
    decay: float = 1.0,
    stochastic: bool = True,
    seed: int = 0,
    offset: int = 0,
) -> None:
    """One projected-Adam (GaLore) step of a weight, fused: in place,

        M ← β1·M + (1−β1)·R ;  V ← β2·V + (1−β2)·R⊙R     (``exp_avg``, ``exp_avg_sq``: R's shape)
        N = M / (denom_scale·√V + ε)
        W ← decay·W + step_scale·up(N, P)                  (up as in :func:`lowrank_project_back`)

    ``r`` is the projected gradient (side "left": r×n with P m×r; "right": m×r with P r×n), ``w``
    the m×n weight: a float tensor, or an INT8 :class:`QuantizedTensor` (asymmetric, groups along
    rows, as :class:`fastgrad.nn.QLinear` keeps it) whose codes, scales and zeros are decoded,
    updated in fp32 and re-quantized in place (``stochastic`` rounding from the Philox stream at
    ``(seed, offset)``, stream position offset + i·n + j for element (i, j)). ``p`` is dense (R's dtype) or
    an INT4/INT8 :class:`QuantizedTensor`, decoded inside the matmul. The moments keep their dtype;
    the math is fp32. No m×n temporary is formed by the compiled kernels: the update goes straight
    into W (in a block of rows at a time for an INT8 weight). Bias correction, learning rate, α and
    weight decay are folded into the scalars by the optimizer (see ``_reference.py``).
    """
    hyper = (beta1, beta2, eps, denom_scale, step_scale, decay)
    if isinstance(w, QuantizedTensor):
        if w.bits != 8 or not isinstance(p, QuantizedTensor):
            raise ValueError(
                "fastgrad.galore_adam_step_: a quantized 'w' must be INT8 (bits=8) with a quantized 'p', "
                f"got w.bits={w.bits} and p of type {type(p).__name__}"
            )
        torch.ops.fastgrad.galore_adam_step_int8_(
            w.codes, w.scales, w.zeros, exp_avg, exp_avg_sq, r, p.codes, p.scales, p.zeros, p.bits, side,
            *hyper, stochastic, seed, offset,
        )  # fmt: skip
    elif isinstance(p, QuantizedTensor):
        torch.ops.fastgrad.galore_adam_step_quantized_(
            w, exp_avg, exp_avg_sq, r, p.codes, p.scales, p.zeros, p.bits, side, *hyper
        )
    else:
        torch.ops.fastgrad.galore_adam_step_(w, exp_avg, exp_avg_sq, r, p, side, *hyper)


# The quintic Newton–Schulz coefficients (a, b, c) of Muon (Keller Jordan), torch.optim.Muon's default
# ``ns_coefficients``: chosen to maximize the slope at zero rather than to converge to exactly 1; 5
# steps take the singular values of a matrix of condition number 10 into [0.68, 1.14] (measured, fp32
# and bf16; tests/test_newton_schulz.py), not to 1. The classical cubic iteration is (1.5, -0.5, 0).
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.775, 2.0315)


def _is_triple(c) -> bool:
    return isinstance(c, Sequence) and len(c) == 3 and all(isinstance(v, numbers.Real) for v in c)


def newton_schulz(
    x: torch.Tensor,
    steps: int | None = None,
    coefficients: Sequence[float] | Sequence[Sequence[float]] = NS_COEFFICIENTS,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Newton–Schulz orthogonalization of every matrix of ``x`` (Muon's update direction).

    ``x`` is ``(..., m, n)``, float32 or bfloat16 (leading dimensions are a batch of matrices); the
    result has x's shape and dtype and is contiguous. Per matrix X (m×n)::

        Y = X, or Xᵀ if m > n             (so that A below is min(m, n)²)
        Y ← Y / max(‖Y‖_F, eps)           (Frobenius norm of the matrix)
        for each step i with coefficients (a_i, b_i, c_i):
            A = Y Yᵀ;  B = b_i·A + c_i·A·A;  Y = a_i·Y + B·Y
        result: Y, transposed back if m > n

    Each op computes in x's dtype (matmuls accumulate in fp32 and round their result to bf16 for a
    bf16 x), in the op sequence of ``torch.optim.Muon``: for a contiguous 2-d bf16 ``x`` the result
    is bitwise ``torch.optim.Muon``'s (which converts the update to bf16 first; do the same to match
    it for fp32 gradients). The matrices of a batch are processed one by one, each bitwise its own
    2-d result.

    Args:
        steps: the number of iterations when ``coefficients`` is one triple (None: 5, torch's);
            with a sequence of triples, None or its length.
        coefficients: one ``(a, b, c)`` triple used for every step (default :data:`NS_COEFFICIENTS`,
            torch's), or a sequence of triples, one per step.
        eps: floor of the norm (> 0): an all-zero matrix stays zero.
    """
    if _is_triple(coefficients):
        steps = 5 if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(
                "fastgrad.newton_schulz: argument 'steps' must be a positive int with one (a, b, c) triple, "
                f"got {steps!r}"
            )
        flat = [float(v) for v in coefficients] * steps
    else:
        triples = list(coefficients)
        if not triples or not all(_is_triple(t) for t in triples):
            raise ValueError(
                "fastgrad.newton_schulz: argument 'coefficients' must be one (a, b, c) triple or a non-empty "
                f"sequence of triples (one per step), got {coefficients!r}"
            )
        if steps is not None and steps != len(triples):
            raise ValueError(
                f"fastgrad.newton_schulz: argument 'steps' must be None or {len(triples)} (the number of "
                f"coefficient triples given, one per step), got {steps!r}"
            )
        flat = [float(v) for t in triples for v in t]
    return torch.ops.fastgrad.newton_schulz(x, flat, eps)
