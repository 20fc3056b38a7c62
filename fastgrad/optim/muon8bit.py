"""Muon (docs/algorithms.md §10) with its momentum buffer in 8 bits, and 8-bit Adam moments for its
AdamW groups.

The momentum B of an m×n weight, read as a flat vector of n_el = m·n elements cut into blocks of
``block_size`` consecutive elements (the last block zero-padded to n_pad), is stored as

    B ≈ (code − 128)·scale,   scale = max|B_block| / 127,   code ∈ [1, 255] uint8

(signed symmetric per block: 0 is exact, the zero point −128·scale is not stored) with the codes
rounded stochastically by :func:`fastgrad.ops.quantize_int8` (counter-based Philox: a seed per
parameter, stream positions [t·n_pad, (t+1)·n_pad) at step t + 1, never reused, so a resumed run draws
the numbers an uninterrupted one draws). Each step decodes B to fp32, applies
B ← μ·B + (1−μ)·G and U = (1−μ)·G + μ·B (nesterov) in fp32, re-encodes B and orthogonalizes U.

Row-sharded (FSDP2) weights keep the layout of :mod:`fastgrad.optim.galore8bit` (one implementation
of it: :class:`~fastgrad.optim.galore8bit.EightBitMoments`): the blocks and the rounding positions are
those of the whole flattened momentum (rank k's rows start at global element k·c·n, which must be a
multiple of ``block_size``), stored by rows (codes (rows, n), scales (rows, t) tables), so the codes
do not depend on the number of processes and a sharded checkpoint reshards.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fastgrad.ops import dequantize_int8, quantize_int8
from fastgrad.optim.base import ParamStep
from fastgrad.optim.galore8bit import EightBitMoments, Layout
from fastgrad.optim.muon import Muon

__all__ = ["Muon8bit"]

# State keys of an 8-bit momentum (a weight below min_8bit_size keeps Muon's "momentum_buffer").
B_CODES, B_SCALES, B_QSEED = "momentum_codes", "momentum_scales", "momentum_qseed"
MOMENTUM_LAYOUT = Layout("momentum_buffer", (B_CODES,), (B_SCALES,))


class Muon8bit(EightBitMoments, Muon):
    """:class:`~fastgrad.optim.Muon` whose momentum buffers are kept in 8 bits per element, and whose
    AdamW groups keep AdamW8bit's 8-bit moments.

    Arguments, param groups, defaults and update rule: Muon's, plus ``block_size`` (256) and
    ``min_8bit_size`` (4096): a weight with fewer elements keeps Muon's ``momentum_buffer`` (an
    AdamW parameter its fp32 moments), and is then stepped exactly as by Muon. The layout is chosen
    at a weight's first step and kept.

    Representation (module docstring): B as signed symmetric blocks of ``block_size`` consecutive
    values, uint8 codes and one fp32 scale per block, stochastic rounding; decoded to fp32 for the
    update and re-encoded every step. The AdamW groups' moments are
    :class:`~fastgrad.optim.AdamW8bit`'s (V^(1/4) asymmetric and M/√V̂ symmetric per block).

    State of a Muon weight of n_el elements in 8 bits (n_pad = n_el rounded up to ``block_size``,
    blocks = n_pad/block_size): ``step`` int, ``momentum_qseed`` int, ``momentum_codes`` uint8
    (n_pad,), ``momentum_scales`` fp32 (blocks,). Bytes: n_pad + 4·blocks, 1 + 4/256 = 1.016 per
    element for block 256 (vs 4 for Muon's fp32 buffer, 2 for bf16). An 8-bit AdamW parameter:
    2·n_pad + 12·blocks (2.05 per element). A row-sharded weight keeps, on each rank, its rows:
    codes (rows, n) and scales (rows, t), rows·n + 4·rows·t bytes (t: the blocks a row can touch,
    :class:`~fastgrad.optim.GaLoreAdamW8bit`). :meth:`state_bytes` sums the tensors.

    Accuracy (tests/test_optim_muon8bit.py): one encoding is unbiased, with an error of std at most
    half a code step (max|B_block|/254) per element; the EMA keeps a fraction μ of each step's error,
    so the errors settle at about 1/√(1−μ²) (3.2 for μ = 0.95) times one encoding's, ≈ 3% of B for
    blocks of 256 (whose max/rms is ≈ 3). Measured on the tiny LLaMA's real gradients (μ = 0.95,
    block 256), the decoded momentum against fp32 buffers fed the same gradients: relative 2-norm
    error 1.1% after 1 step, 3.5% after 30 (blocks of 32 only bring it to 2.4%: the error is that of
    8 bits, not of the block's spread). Newton–Schulz raises the small singular values of B, noise
    included: NS(B̂) is 11% from NS(B) after 30 steps (bf16 rounding of the same B: 1.5%). Training
    (50 steps memorising 4 batches, loss 5.55 → 1.17): the mean of the last 5 losses within 0.1–1%
    of fp32 Muon's, every step within 3.1% (rounding seeds 0, 1, 2).

    NaN/Inf policy (``nonfinite``), checkpoints (tensors and ints, ``weights_only``), exact resume
    (the rounding stream is a function of the seed and the step) and FSDP2: as Muon and
    GaLoreAdamW8bit. On 2 processes with the same gradients each rank's codes and scales are its
    rows' share of one process's and its weights the same, bitwise (tests/test_fsdp_8bit.py); the
    layout needs ``block_size`` to divide every rank's first element, c·n (c = ⌈m/W⌉ rows per rank),
    and raises ValueError at the first step otherwise (a smaller ``block_size`` fixes it). Per 8-bit
    Muon weight and step: one ``dequantize_int8`` and one ``quantize_int8`` around the momentum
    update (transient: the fp32 momentum and U of one weight).
    """

    keep_dtype_keys = (*EightBitMoments.keep_dtype_keys, B_SCALES)

    def _layout(self, group: dict[str, Any]) -> Layout:
        return MOMENTUM_LAYOUT if group["use_muon"] else super()._layout(group)

    def _momentum_update(self, group: dict[str, Any], it: ParamStep) -> torch.Tensor:
        """Muon's momentum update on the decoded 8-bit buffer (fp32), re-encoded after it; U in fp32."""
        if not self._is_8bit(it):
            return super()._momentum_update(group, it)
        momentum = group["momentum"]
        st = it.state
        grad = it.low.float()
        it.low = None
        n = grad.numel()
        if B_CODES in st:
            buf_pad = self._decode_momentum(it)
        else:
            st[B_QSEED] = self._rounding_seed(group, it)
            buf_pad = torch.zeros(self._padded(n), dtype=torch.float32, device=grad.device)
        buf = buf_pad[:n].view(grad.shape)
        buf.lerp_(grad, 1.0 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf  # (grad may be p.grad itself)
        self._encode_momentum(it, buf_pad)
        return update

    def _decode_momentum(self, it: ParamStep) -> torch.Tensor:
        """fp32 B of ``it``'s n_pad (local) elements from its codes, the padding 0."""
        st = it.state
        rows = self._local_rows(it)
        if rows is None:
            return dequantize_int8(st[B_CODES], st[B_SCALES], st[B_SCALES] * -128.0)
        row0, shape, _ = rows
        n = math.prod(shape)
        if n == 0:  # a rank that holds no rows (m < world size)
            return torch.zeros(0, device=st[B_CODES].device)
        flat = self._flat_from_rows(st, MOMENTUM_LAYOUT, row0, shape)
        buf = dequantize_int8(flat[B_CODES], flat[B_SCALES], flat[B_SCALES] * -128.0)
        buf[n:] = 0.0  # the global tail's padding, stored as code 0 here (one process stores 128)
        return buf

    def _encode_momentum(self, it: ParamStep, buf_pad: torch.Tensor) -> None:
        """Store the fp32 B of n_pad (local) elements as codes, at step t + 1 (``step`` is t, not yet
        counted): element i of the whole flattened momentum rounds at stream position t·n_pad + i."""
        st = it.state
        rows = self._local_rows(it)
        if rows is None:
            q = quantize_int8(
                buf_pad, self.block_size, symmetric=True, stochastic=True, seed=st[B_QSEED],
                offset=st["step"] * buf_pad.numel(),
            )  # fmt: skip
            st[B_CODES], st[B_SCALES] = q.codes, q.scales
            return
        row0, shape, numel = rows
        n = math.prod(shape)
        flat: dict[str, torch.Tensor] = {}
        if n:  # (a rank that holds no rows stores empty codes and scales)
            total = self._padded(numel)
            q = quantize_int8(
                buf_pad, self.block_size, symmetric=True, stochastic=True, seed=st[B_QSEED],
                offset=st["step"] * total + row0 * (n // shape[0]),
            )  # fmt: skip
            flat = {B_CODES: q.codes, B_SCALES: q.scales}
        self._store_rows(st, MOMENTUM_LAYOUT, row0, shape, flat, buf_pad.device)

    def dequantized_momentum(self, p: torch.Tensor) -> torch.Tensor | None:
        """``p``'s momentum buffer B as an fp32 tensor of ``p``'s (local) shape: decoded, or a copy of
        an unquantized buffer; None before ``p``'s first step or for an AdamW parameter."""
        st = self.state.get(p, {})
        if B_CODES in st:
            shape = tuple(st[B_CODES].shape) if st[B_CODES].dim() > 1 else tuple(p.shape)  # by rows: local
            group = self._group_of(p)
            it = ParamStep(group, p, st, self.index_of(p), source=p, shard=self._rows_of_moments(group, p))
            n = math.prod(shape)
            return self._decode_momentum(it)[:n].view(shape)
        if "momentum_buffer" in st:
            return st["momentum_buffer"].float().clone()
        return None
