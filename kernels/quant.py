"""Triton kernels: group-wise INT8/INT4 quantization (RTN and stochastic rounding), dequantization and
fp32 -> bf16 stochastic rounding. The math is ``fastgrad/_reference.py``; codes, scales and zeros
are bitwise identical to it (same Philox stream, correctly rounded fp32 division, same operation
order).

Layout. A contiguous ``x`` of shape ``(..., n)`` with groups of ``g`` consecutive values along the
last dimension is, in memory, ``numel / g`` groups of ``g`` contiguous values: group ``q`` starts at
flat index ``q * g`` and its scale/zero live at ``scales[q]``/``zeros[q]`` (scales is
``(..., n / g)``, contiguous). The kernels only see that flat view.

Tiling. A program owns a tile of ``GROUPS`` groups x ``BLOCK`` values, ``BLOCK = min(next_pow2(g),
TILING.max_block)``, and loops over the ``cdiv(g, BLOCK)`` chunks of its groups (any group size works: odd,
not a power of two, or the whole row, e.g. 11008). Small groups are packed ``GROUPS`` to a program
so that every program moves about ``TILING.target_tile`` values (coalesced row-major loads, enough bytes
in flight per SM). Quantization makes two passes over a group (min/max or absmax, then encode);
when a group fits in one chunk the values stay in registers between the passes, so ``x`` is read
from memory once. When there are too few groups to fill the device (a 1-D tensor with one group
per row, say), each group's chunks are split over a second grid axis: a first launch writes
partial min/max per split, torch reduces them (tiny, and exact: min/max do not round), and a
second launch encodes each split's chunks with the group's scale. All offsets are 64-bit.

Random stream. Element ``i`` (row-major flat index) has the stream position ``p = offset + i`` and
draws word ``p % 4`` of ``tl.randint4x(seed, p // 4)`` (Philox4x32-10 keyed by the 64-bit seed, the
64-bit counter split into low/high words); the uniform is ``(word >> 8) * 2**-24``, exactly as
``_reference.philox_uniform``. When every row of a tile is a run of positions starting at a multiple
of 4 (``BLOCK_WORDS``: the offset, the group size and the tile width are multiples of 4, the usual
case), one Philox evaluation feeds four elements; otherwise each element evaluates its block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgrad._ops import check_dequantize, check_quantize, check_round_bf16

from ._common import INTERPRET, launch, out_view, parallel_slots, store_float
from .plans import QuantTiling

# Tiling knobs (module attributes so that tests can shrink them to reach every code path; the
# quantizers' tiling is kernels/plans.py's, shared with the memory model). On a GPU a program's
# tile is 4096 values (16 per thread with 8 warps). The interpreter's cost is per operation and per
# program, nearly independent of the tile size, so it gets much larger tiles.
TILING = QuantTiling(max_block=2**14, target_tile=2**14) if INTERPRET else QuantTiling()
ROUND_BLOCK = 2**14 if INTERPRET else 4096  # values per program of round_bf16_stochastic

# Candidate launch configs, in order of preference (``launch`` takes the first that fits the GPU):
# the kernels are memory-bound; 4 warps give 32 values per thread of a 4096-value tile.
_WARPS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8, 2)]
_NO_FMA = {"enable_fp_fusion": False}  # compile option: no multiply-add contraction (see _dequantize_body)
_TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)  # 2**-24

# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_chunk(x_ptr, base, gmask, c, group_size, BLOCK: tl.constexpr):
    """Chunk ``c`` of each group: (GROUPS, BLOCK) fp32 values, their flat indices and mask."""
    col = c * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # c is int64 (from program_id)
    mask = gmask[:, None] & (col < group_size)[None, :]
    elem = base[:, None] + col[None, :]
    x = tl.load(x_ptr + elem, mask=mask, other=0.0).to(tl.float32)
    return x, elem, mask


@triton.jit
def reduce_chunk(x, mask, lo, hi, SYMMETRIC: tl.constexpr):
    """Fold a chunk into the running (min, max), or into the running absmax (``hi``) if symmetric.

    NaN propagates, as in the reference (torch's amin/amax): a group holding a NaN gets NaN
    statistics (scale 1 and zero NaN, or zero −2^(b−1) if symmetric; its codes are then those of
    ``encode_codes`` for NaN: 0). The GPU's min/max instructions drop NaN, so it is tracked apart.
    """
    nan = tl.max(tl.where(mask & (x != x), 1, 0), axis=1) > 0
    if SYMMETRIC:
        hi = tl.maximum(hi, tl.max(tl.abs(x), axis=1))  # masked lanes hold 0: no effect on absmax
    else:
        lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=1))
        lo = tl.where(nan | (lo != lo), float("nan"), lo)
        hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=1))
    hi = tl.where(nan | (hi != hi), float("nan"), hi)
    return lo, hi


@triton.jit
def scale_zero(lo, hi, gmask, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Group statistics -> (scale, zero), as ``_reference.quantize`` (division correctly rounded)."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    lo = tl.where(gmask, lo, 0.0)  # groups past the end keep finite stats (no inf - inf warnings)
    hi = tl.where(gmask, hi, 0.0)
    if SYMMETRIC:
        scale = tl.math.div_rn(hi, tl.full(hi.shape, QMAX // 2, tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)
        zero = scale * (-(1 << (BITS - 1)))  # times a power of two: exact
    else:
        scale = tl.math.div_rn(hi - lo, tl.full(hi.shape, QMAX, tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)
        zero = lo
    return scale, zero


@triton.jit
def stream_words(seed, pos, BLOCK_WORDS: tl.constexpr):
    """The uint32 random word of each stream position of ``pos`` (int64, (rows, cols)): word
    ``pos % 4`` of the Philox block at counter ``pos // 4``. BLOCK_WORDS: each row of ``pos`` is a
    run of consecutive positions starting at a multiple of 4 (cols % 4 == 0), so one evaluation
    serves four elements; otherwise every element evaluates its block and keeps its word. Why it
    matters: a Philox block is about 100 integer operations (10 rounds of two wide multiplies and
    xors), so one per element makes a quantizer compute-bound on a GPU, one per four does not; the
    price is a register shuffle of the joined words (8 KB of shared memory on sm_89)."""
    if BLOCK_WORDS:
        ROWS: tl.constexpr = pos.shape[0]
        COLS: tl.constexpr = pos.shape[1]
        counter = tl.max(tl.reshape(pos >> 2, (ROWS, COLS // 4, 4)), axis=2)  # the 4 share it
        w0, w1, w2, w3 = tl.randint4x(seed, counter)
        # join(join(w0, w2), join(w1, w3)) is (rows, cols/4, 2, 2) holding w0 w1 w2 w3 in row-major order.
        return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (ROWS, COLS))
    else:
        w0, w1, w2, w3 = tl.randint4x(seed, pos >> 2)
        k = pos & 3
        return tl.where(k < 2, tl.where(k == 0, w0, w1), tl.where(k == 2, w2, w3))


@triton.jit
def encode_codes(
    x, elem, scale, zero, seed, offset, BITS: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_WORDS: tl.constexpr
):
    """Codes (int32) of a tile ``x`` (rows, cols) whose row i has ``scale[i]``/``zero[i]``:
    u = (x - zero) / scale (correctly rounded), then RTN floor(u + 0.5) or SR floor(u) + [xi < frac],
    xi the uniform of stream position ``offset + elem`` (``elem``: the elements' flat indices;
    BLOCK_WORDS as in ``stream_words``), clamped to [0, 2**BITS - 1] (NaN -> 0). The one encoder
    of the Triton kernels (also ``adam_step.py``)."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    u = tl.math.div_rn(x - zero[:, None], tl.broadcast_to(scale[:, None], x.shape))
    if STOCHASTIC:
        r = stream_words(seed, offset + elem, BLOCK_WORDS)
        xi = (r >> 8).to(tl.float32) * _TWO_POW_M24
        fl = tl.floor(u)
        code = fl + (xi < (u - fl)).to(tl.float32)
    else:
        code = tl.floor(u + 0.5)
    code = tl.where(code == code, code, 0.0)  # NaN -> 0, explicitly (max/min NaN rules differ by backend)
    return tl.minimum(tl.maximum(code, 0.0), QMAX).to(tl.int32)


@triton.jit
def _encode_store(
    codes_ptr, x, elem, mask, base, gmask, c, scale, zero, group_size, seed, offset,
    BITS: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_WORDS: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Encode one chunk (u = (x - zero) / scale, then RTN or SR, clamp) and store its codes."""
    code = encode_codes(x, elem, scale, zero, seed, offset, BITS, STOCHASTIC, BLOCK_WORDS)
    if BITS == 8:
        tl.store(codes_ptr + elem, code.to(tl.uint8), mask=mask)
    else:
        # Pairs (2j, 2j+1) are adjacent in the tile: split them and pack low nibble = even element.
        lo, hi = tl.split(tl.reshape(code, (GROUPS, BLOCK // 2, 2)))
        packed = (lo | (hi << 4)).to(tl.uint8)
        pcol = c * (BLOCK // 2) + tl.arange(0, BLOCK // 2).to(tl.int64)
        pmask = gmask[:, None] & (pcol < group_size // 2)[None, :]
        tl.store(codes_ptr + (base // 2)[:, None] + pcol[None, :], packed, mask=pmask)


@triton.jit
def _quantize_body(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, lo_ptr, hi_ptr,
    num_groups, group_size, num_chunks, chunks_per_split, seed, offset,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_WORDS: tl.constexpr,
    MODE: tl.constexpr, ONE_CHUNK: tl.constexpr, GROUPS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Quantize the GROUPS groups of tile ``program_id(0)``, chunks of split ``program_id(1)``.

    MODE 0: stats then encode, all chunks (grid (tiles, 1)); ONE_CHUNK: a group is one chunk, so
            its values are loaded once and stay in registers between the two passes.
    MODE 1: partial stats over this split's chunks -> lo/hi[group * splits + split].
    MODE 2: encode this split's chunks with the reduced stats lo/hi[group]; split 0 stores the
            scales and zeros.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    grp = pid * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    gmask = grp < num_groups
    base = grp * group_size
    c_begin = pid_s * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, num_chunks)
    if MODE == 2:
        lo = tl.load(lo_ptr + grp, mask=gmask, other=0.0)
        hi = tl.load(hi_ptr + grp, mask=gmask, other=0.0)
    else:
        lo = tl.full((GROUPS,), float("inf"), tl.float32)
        hi = tl.full((GROUPS,), 0.0 if SYMMETRIC else float("-inf"), tl.float32)

    if ONE_CHUNK:
        x, elem, mask = _load_chunk(x_ptr, base, gmask, c_begin, group_size, BLOCK)
        lo, hi = reduce_chunk(x, mask, lo, hi, SYMMETRIC)
        scale, zero = scale_zero(lo, hi, gmask, BITS, SYMMETRIC)
        tl.store(scales_ptr + grp, scale, mask=gmask)
        tl.store(zeros_ptr + grp, zero, mask=gmask)
        _encode_store(
            codes_ptr, x, elem, mask, base, gmask, c_begin, scale, zero, group_size, seed, offset,
            BITS, STOCHASTIC, BLOCK_WORDS, GROUPS, BLOCK,
        )  # fmt: skip
    else:
        if MODE != 2:
            for c in range(c_begin, c_end):
                x, elem, mask = _load_chunk(x_ptr, base, gmask, c, group_size, BLOCK)
                lo, hi = reduce_chunk(x, mask, lo, hi, SYMMETRIC)
        if MODE == 1:
            nsplit = tl.num_programs(1)
            if not SYMMETRIC:
                tl.store(lo_ptr + grp * nsplit + pid_s, lo, mask=gmask)
            tl.store(hi_ptr + grp * nsplit + pid_s, hi, mask=gmask)
        else:
            scale, zero = scale_zero(lo, hi, gmask, BITS, SYMMETRIC)
            smask = gmask & ((grp * 0 + pid_s) == 0)  # (a scalar-bool & tensor-bool mask upsets the interpreter)
            tl.store(scales_ptr + grp, scale, mask=smask)
            tl.store(zeros_ptr + grp, zero, mask=smask)
            # Second pass: on a GPU the chunks just read are still in L2 (a program's groups are
            # at most a few MB apart), so DRAM traffic stays ~ one read of x + one write of codes.
            for c in range(c_begin, c_end):
                x, elem, mask = _load_chunk(x_ptr, base, gmask, c, group_size, BLOCK)
                _encode_store(
                    codes_ptr, x, elem, mask, base, gmask, c, scale, zero, group_size, seed, offset,
                    BITS, STOCHASTIC, BLOCK_WORDS, GROUPS, BLOCK,
                )  # fmt: skip


@triton.jit(do_not_specialize=["seed", "offset"])
def _quantize_int8_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, lo_ptr, hi_ptr,
    num_groups, group_size, num_chunks, chunks_per_split, seed, offset,
    SYMMETRIC: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_WORDS: tl.constexpr,
    MODE: tl.constexpr, ONE_CHUNK: tl.constexpr, GROUPS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    _quantize_body(
        x_ptr, codes_ptr, scales_ptr, zeros_ptr, lo_ptr, hi_ptr,
        num_groups, group_size, num_chunks, chunks_per_split, seed, offset,
        8, SYMMETRIC, STOCHASTIC, BLOCK_WORDS, MODE, ONE_CHUNK, GROUPS, BLOCK,
    )  # fmt: skip


@triton.jit(do_not_specialize=["seed", "offset"])
def _quantize_int4_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, lo_ptr, hi_ptr,
    num_groups, group_size, num_chunks, chunks_per_split, seed, offset,
    SYMMETRIC: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_WORDS: tl.constexpr,
    MODE: tl.constexpr, ONE_CHUNK: tl.constexpr, GROUPS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    _quantize_body(
        x_ptr, codes_ptr, scales_ptr, zeros_ptr, lo_ptr, hi_ptr,
        num_groups, group_size, num_chunks, chunks_per_split, seed, offset,
        4, SYMMETRIC, STOCHASTIC, BLOCK_WORDS, MODE, ONE_CHUNK, GROUPS, BLOCK,
    )  # fmt: skip


@triton.jit
def _dequantize_body(
    codes_ptr, scales_ptr, zeros_ptr, out_ptr, num_groups, group_size, num_chunks, chunks_per_split,
    BITS: tl.constexpr, OUT_BF16: tl.constexpr, GROUPS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """x = code * scale + zero in fp32, stored in the output dtype (bf16 rounded to nearest even).

    A GPU compiler may contract the multiply-add into one FMA (one rounding instead of two), which
    can move the fp32 result by 1 ulp from the reference's separate multiply and add; the contract
    accepts that for dequantization. The launchers of this file pass ``enable_fp_fusion=False``
    (Triton's switch for FMA contraction) so that it does not happen: dequantization is then bitwise
    the reference's on a GPU too, as it is under the interpreter. Quantization needs no FMA-free
    guarantee (its only product, scale · -2**(b-1), is exact), but gets the same flag.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    grp = pid * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    gmask = grp < num_groups
    base = grp * group_size
    scale = tl.load(scales_ptr + grp, mask=gmask, other=1.0)[:, None]
    zero = tl.load(zeros_ptr + grp, mask=gmask, other=0.0)[:, None]
    c_begin = pid_s * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, num_chunks)
    for c in range(c_begin, c_end):
        col = c * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = gmask[:, None] & (col < group_size)[None, :]
        elem = base[:, None] + col[None, :]
        if BITS == 8:
            code = tl.load(codes_ptr + elem, mask=mask, other=0).to(tl.float32)
        else:
            pcol = c * (BLOCK // 2) + tl.arange(0, BLOCK // 2).to(tl.int64)
            pmask = gmask[:, None] & (pcol < group_size // 2)[None, :]
            byte = tl.load(codes_ptr + (base // 2)[:, None] + pcol[None, :], mask=pmask, other=0).to(tl.int32)
            code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (GROUPS, BLOCK)).to(tl.float32)
        store_float(out_ptr + elem, code * scale + zero, mask, OUT_BF16)


@triton.jit
def _dequantize_int8_kernel(
    codes_ptr, scales_ptr, zeros_ptr, out_ptr, num_groups, group_size, num_chunks, chunks_per_split,
    OUT_BF16: tl.constexpr, GROUPS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    _dequantize_body(
        codes_ptr, scales_ptr, zeros_ptr, out_ptr, num_groups, group_size, num_chunks, chunks_per_split,
        8, OUT_BF16, GROUPS, BLOCK,
    )  # fmt: skip


@triton.jit
def _dequantize_int4_kernel(
    codes_ptr, scales_ptr, zeros_ptr, out_ptr, num_groups, group_size, num_chunks, chunks_per_split,
    OUT_BF16: tl.constexpr, GROUPS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    _dequantize_body(
        codes_ptr, scales_ptr, zeros_ptr, out_ptr, num_groups, group_size, num_chunks, chunks_per_split,
        4, OUT_BF16, GROUPS, BLOCK,
    )  # fmt: skip


@triton.jit(do_not_specialize=["seed", "offset"])
def _round_bf16_stochastic_kernel(x_ptr, out_ptr, numel, seed, offset, BLOCK_WORDS: tl.constexpr, BLOCK: tl.constexpr):
    """out = bf16 bits of (bits(x) + (word >> 16)) >> 16, word that of stream position offset + i:
    rounds the magnitude up with probability equal to the discarded fraction. NaN stays NaN (quiet,
    sign kept): adding noise to a NaN could carry into an Inf pattern, so NaN is truncated instead,
    with the quiet bit set."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    bits = x.to(tl.uint32, bitcast=True)
    words = tl.reshape(stream_words(seed, tl.reshape(offset + idx, (1, BLOCK)), BLOCK_WORDS), (BLOCK,))
    noise = words >> 16
    rounded = (bits + noise) >> 16  # non-NaN bits + noise < 2**32: no wrap
    out = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    tl.store(out_ptr + idx, out.to(tl.int16), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def block_words_aligned(offset: int, *run_starts: int) -> bool:
    """Whether tiles whose rows start at multiples of every ``run_starts`` value, plus ``offset``,
    start at stream positions that are multiples of 4, so ``stream_words`` may take BLOCK_WORDS."""
    return all(v % 4 == 0 for v in (offset, *run_starts))


def _quantize(op: str, bits: int, kernel, x, group_size, symmetric, stochastic, seed, offset):
    g = check_quantize(op, x, bits, group_size, seed, offset)
    n = x.shape[-1]
    lead = tuple(x.shape[:-1])
    codes = torch.empty((*lead, n * bits // 8), dtype=torch.uint8, device=x.device)
    scales = torch.empty((*lead, n // g), dtype=torch.float32, device=x.device)
    zeros = torch.empty_like(scales)
    num_groups = x.numel() // g
    if num_groups == 0:
        return codes, scales, zeros
    plan = TILING.plan(num_groups, g, parallel_slots(x.device))
    block_words = bool(stochastic) and block_words_aligned(offset, g, plan.block)
    common = dict(
        SYMMETRIC=bool(symmetric), STOCHASTIC=bool(stochastic), BLOCK_WORDS=block_words,
        GROUPS=plan.groups, BLOCK=plan.block,
    )  # fmt: skip
    args = (num_groups, g, plan.num_chunks, plan.chunks_per_split, seed, offset)

    def run(grid, lo, hi, mode, one_chunk):
        kernel_args = (x, codes, scales, zeros, lo, hi, *args)
        constexprs = dict(MODE=mode, ONE_CHUNK=one_chunk, **common, **_NO_FMA)
        launch(kernel, lambda meta: grid, kernel_args, constexprs, _WARPS, x.device)

    if plan.splits == 1:
        run((plan.tiles, 1), scales, zeros, 0, plan.num_chunks == 1)
        return codes, scales, zeros
    # Few large groups: partial stats per split, reduce (exact), then encode per split.
    part_lo = torch.empty((num_groups, plan.splits), dtype=torch.float32, device=x.device)
    part_hi = torch.empty_like(part_lo)
    run((plan.tiles, plan.splits), part_lo, part_hi, 1, False)
    lo = part_hi if symmetric else part_lo.amin(dim=1)
    hi = part_hi.amax(dim=1)
    run((plan.tiles, plan.splits), lo, hi, 2, False)
    return codes, scales, zeros


def quantize_int8_triton(x, group_size, symmetric, stochastic, seed, offset):
    """x (..., n) float -> codes (..., n) uint8, scales/zeros (..., n/g) fp32."""
    return _quantize("quantize_int8", 8, _quantize_int8_kernel, x, group_size, symmetric, stochastic, seed, offset)


def quantize_int4_triton(x, group_size, symmetric, stochastic, seed, offset):
    """x (..., n) float -> packed codes (..., n/2) uint8, scales/zeros (..., n/g) fp32."""
    return _quantize("quantize_int4", 4, _quantize_int4_kernel, x, group_size, symmetric, stochastic, seed, offset)


def _dequantize(op: str, bits: int, kernel, codes, scales, zeros, dtype):
    n = check_dequantize(op, codes, scales, zeros, bits, dtype)
    out = torch.empty((*codes.shape[:-1], n), dtype=dtype, device=codes.device)
    num_groups = scales.numel()
    if num_groups == 0:
        return out
    g = n // scales.shape[-1]
    plan = TILING.plan(num_groups, g, parallel_slots(codes.device))
    launch(
        kernel, lambda meta: (plan.tiles, plan.splits),
        (codes, scales, zeros, out_view(out), num_groups, g, plan.num_chunks, plan.chunks_per_split),
        dict(OUT_BF16=dtype == torch.bfloat16, GROUPS=plan.groups, BLOCK=plan.block, **_NO_FMA), _WARPS, codes.device,
    )  # fmt: skip
    return out


def dequantize_int8_triton(codes, scales, zeros, dtype):
    """codes (..., n) uint8, scales/zeros (..., n/g) fp32 -> (..., n) of ``dtype``."""
    return _dequantize("dequantize_int8", 8, _dequantize_int8_kernel, codes, scales, zeros, dtype)


def dequantize_int4_triton(codes, scales, zeros, dtype):
    """packed codes (..., n/2) uint8, scales/zeros (..., n/g) fp32 -> (..., n) of ``dtype``."""
    return _dequantize("dequantize_int4", 4, _dequantize_int4_kernel, codes, scales, zeros, dtype)


def round_bf16_stochastic_triton(x, seed, offset):
    """x fp32 (any shape, contiguous) -> bf16 of the same shape, stochastically rounded."""
    check_round_bf16("round_bf16_stochastic", x, seed, offset)
    out = torch.empty_like(x, dtype=torch.bfloat16)
    if x.numel() == 0:
        return out
    grid = (triton.cdiv(x.numel(), ROUND_BLOCK),)
    args = (x, out.view(torch.int16), x.numel(), seed, offset)
    constexprs = dict(BLOCK_WORDS=block_words_aligned(offset, ROUND_BLOCK), BLOCK=ROUND_BLOCK, **_NO_FMA)
    launch(_round_bf16_stochastic_kernel, lambda meta: grid, args, constexprs, _WARPS, x.device)
    return out
