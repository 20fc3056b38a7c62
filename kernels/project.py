"""Triton kernels: low-rank projection of a gradient and back-projection, with a dense projector P
or a group-wise INT4/INT8 quantized one (dequantized in registers, inside the matmul loop).

The four products (``_reference.py``: G is m×n, P is m×r for side "left", r×n for "right")

    lowrank_project       left:  R = Pᵀ G          (r×m)(m×n)   K = m
                          right: R = G Pᵀ          (m×n)(n×r)   K = n
    lowrank_project_back  left:  U = scale · P R   (m×r)(r×n)   K = r
                          right: U = scale · R P   (m×r)(r×n)   K = r

and the two products of the low-rank weight gradient (dy T×m, x T×n, G = dyᵀ x never formed)

    lowrank_grad          right: Z = x Pᵀ          (T×n)(n×r)   K = n   then R = dyᵀ Z  (m×T)(T×r)  K = T
                          left:  Zᵀ = Pᵀ dyᵀ       (r×m)(m×T)   K = m   then R = Zᵀ x   (r×T)(T×n)  K = T

are all ``C[M, N] = scale · Σ_k A[M, k] B[k, N]`` with A and B addressed by strides: a transpose is
a swap of strides, never a copy, and any strided G, R or dense P works. One kernel serves them
all: ``_lowrank_matmul``. A quantized P is one of A or B (``Q_IS_A``), read either as P or as Pᵀ
(``Q_TRANS``); its tile is decoded in registers from the codes with the group's scale and zero
(group ``i * groups_per_row + j // group_size`` for P's element (i, j)), so the dense P is never
materialized: an INT4 tile loads each byte once and splits its two nibbles, and when the tile lies
within one group along j (the usual case: groups of 256, tiles of ≤ 256) the scales and zeros are
loaded once per row of P in the tile rather than once per element (``load_tile``).

Tiling. Programs tile C in BLOCK_M × BLOCK_N tiles and loop over K in BLOCK_K steps, accumulating
in fp32 with ``tl.dot``. The down-projection has a huge K (m or n, 4096..11008+) and a skinny
output (r rows or columns): the tile grid alone can be smaller than the GPU, so when it does not
fill the device K is split across a second grid axis (split-K) into an fp32 workspace
``(splits, M, N)`` whose partial sums torch adds up (deterministic: no atomics, so two runs give the
same bits). The split count is capped so that the workspace's write + read stays under 25% of the
traffic of the streamed operand (``plans.SplitK``). Consecutive programs share the tiles
of the larger operand (``SHARE_B``), so G is read from DRAM about once and its re-reads by the
other row blocks of the rank come from L2. The back-projection has K = r: a plain tiled matmul.

Configs. No autotuning: ``matmul_configs`` orders candidate tiles by preference (large tiles when
they still give every SM a program) and ``_common.launch`` runs the first that fits the GPU's
shared memory without spilling registers. The choice depends only on the shapes, the GPU and the
compiler, so every rank of a distributed run (and every run) computes with the same tiles and sums
in the same order; nothing is benchmarked inside a training step. ``python -m
fastgrad.kernels.aot`` compiles every launch for sm_80/86/89/90/120 and checks the fit.

Precision. Accumulation is fp32 everywhere. Under the interpreter every operand is converted to
fp32 and ``tl.dot`` runs with ``input_precision="ieee"`` (exact fp32 products, as the reference).
On a GPU, bf16/fp16 operands go to the tensor cores in their own dtype (the products are exact in
fp32, so only the summation order differs from the reference); a quantized P is dequantized in
fp32 then rounded to G's (or R's) dtype for the tensor cores, which adds at most one rounding
(2**-9 relative for bf16) per element of P, the same size as the rounding of the bf16 output
itself. fp32 operands use ``input_precision="tf32x3"`` (three TF32 products, about fp32 accuracy at
a fraction of the cost of the non-tensor-core "ieee" path). The output is cast to G's (R's) dtype,
bf16 with round-to-nearest-even.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastgrad._ops import (
    check_lowrank_grad,
    check_lowrank_grad_quantized,
    check_lowrank_project,
    check_lowrank_project_back,
    check_lowrank_project_back_add,
    check_lowrank_project_back_quantized,
    check_lowrank_project_back_quantized_add,
    check_lowrank_project_quantized,
)

from ._common import INTERPRET, launch, load_float, out_view, parallel_slots, store_float
from .plans import SplitK

# When K is split (kernels/plans.py, shared with the memory model); shrunk under the interpreter so
# that tests reach the split path with small shapes.
SPLIT_K = SplitK(min_k=16, traffic_budget=float("inf"), nominal_tile=32, align=32) if INTERPRET else SplitK()

_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)


def _tiles(*rows: tuple[int, int, int, int, int]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in rows
    ]


# Candidate tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), largest first. 16-bit operands feed
# the tensor cores directly; fp32 operands run three TF32 products per step (tf32x3), which needs
# more registers per output: their tiles are smaller. ``launch`` skips any that does not fit the
# GPU (shared memory, spills); the compile stage (``fastgrad.kernels.aot``) shows which fit where.
_TILES_16BIT = _tiles(
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3),
    (64, 64, 32, 4, 2),
)  # fmt: skip
_TILES_FP32 = _tiles(
    (128, 128, 32, 8, 2), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3), (64, 64, 32, 4, 2),
    (32, 32, 32, 4, 2),
)  # fmt: skip


def matmul_configs(M: int, N: int, splits: int, fp32: bool, device: torch.device) -> list[triton.Config]:
    """The candidate tiles of one matmul in order of preference: the largest tiles that still give
    every SM a program (fewer re-reads of A and B), then the others from the largest down; if no
    tile fills the device (a small matmul), the smallest first."""
    if INTERPRET:
        return [_INTERPRET_CONFIG]
    tiles = _TILES_FP32 if fp32 else _TILES_16BIT
    slots = parallel_slots(device) // 4  # one program per SM

    def programs(c):
        return triton.cdiv(M, c.kwargs["BLOCK_M"]) * triton.cdiv(N, c.kwargs["BLOCK_N"]) * splits

    filling = [c for c in tiles if programs(c) >= slots]
    if not filling:
        return sorted(tiles, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    return filling + [c for c in tiles if c not in filling]


@triton.jit
def load_tile(
    ptr, row0, col0, n_rows, n_cols, stride_r, stride_c, q_scales, q_zeros, q_row_stride, q_gpr, q_gs,
    QUANT: tl.constexpr, Q_TRANS: tl.constexpr, Q_ALIGN: tl.constexpr, Q_EVEN: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Operand tile rows [row0, row0+BR) × cols [col0, col0+BC) (a dense tile in its dtype, a
    decoded one in fp32); zeros outside (n_rows, n_cols).

    QUANT 0: dense, element (a, b) at ptr + a*stride_r + b*stride_c.
    QUANT 4/8: the operand is P (Q_TRANS False: P's row i is the tile row, its column j the tile
    column) or Pᵀ (True: the other way round). P's element (i, j) has code ptr[i*q_row_stride + j]
    (INT8) or nibble j%2 of byte ptr[i*q_row_stride + j//2] (INT4, low nibble = even j) and decodes as
    code * scales[g] + zeros[g] with g = i*q_gpr + j // q_gs.

    Decoding costs: an INT4 tile whose extent along j starts at an even j (Q_EVEN: always in the
    matmuls, whose tiles start at multiples of their size) loads each byte once and splits it into
    its two nibbles; otherwise each element loads its byte. When the
    tile's extent along j divides Q_ALIGN, the largest power of two (≤ 256) dividing the group size
    q_gs (tiles start at multiples of their extent, so
    a tile then lies within one group along j), the scales and zeros are loaded once per i (a
    vector of BR or BC values) instead of once per element: the per-element gather would go
    through shared memory as 4-byte copies, and at 128×64 tiles needs more shared memory than a
    consumer GPU has per block. Otherwise (small or odd groups) each element gathers its own.
    """
    rows = row0 + tl.arange(0, BR).to(tl.int64)
    cols = col0 + tl.arange(0, BC).to(tl.int64)
    rmask = rows < n_rows
    cmask = cols < n_cols
    mask = rmask[:, None] & cmask[None, :]
    if QUANT == 0:
        t = tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    else:
        if Q_TRANS:
            i = cols[None, :]
            j = rows[:, None]
        else:
            i = rows[:, None]
            j = cols[None, :]
        if QUANT == 8:
            code = tl.load(ptr + i * q_row_stride + j, mask=mask, other=0).to(tl.int32)
        elif not Q_EVEN:
            byte = tl.load(ptr + i * q_row_stride + (j >> 1), mask=mask, other=0).to(tl.int32)
            code = (byte >> ((j & 1) * 4).to(tl.int32)) & 0xF
        elif Q_TRANS:  # j along the tile's rows: bytes [BR/2, BC], nibbles interleaved along rows
            jb = row0 // 2 + tl.arange(0, BR // 2).to(tl.int64)
            bmask = (jb * 2 < n_rows)[:, None] & cmask[None, :]
            byte = tl.load(ptr + cols[None, :] * q_row_stride + jb[:, None], mask=bmask, other=0).to(tl.int32)
            code = tl.reshape(tl.permute(tl.join(byte & 0xF, byte >> 4), (0, 2, 1)), (BR, BC))
        else:  # j along the tile's columns: bytes [BR, BC/2]
            jb = col0 // 2 + tl.arange(0, BC // 2).to(tl.int64)
            bmask = rmask[:, None] & (jb * 2 < n_cols)[None, :]
            byte = tl.load(ptr + rows[:, None] * q_row_stride + jb[None, :], mask=bmask, other=0).to(tl.int32)
            code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BR, BC))
        J_EXTENT: tl.constexpr = BR if Q_TRANS else BC
        if Q_ALIGN % J_EXTENT == 0:  # the tile lies in one group along j: one scale and zero per i
            if Q_TRANS:
                g = cols * q_gpr + row0 // q_gs
                s = tl.load(q_scales + g, mask=cmask, other=0.0)[None, :]
                z = tl.load(q_zeros + g, mask=cmask, other=0.0)[None, :]
            else:
                g = rows * q_gpr + col0 // q_gs
                s = tl.load(q_scales + g, mask=rmask, other=0.0)[:, None]
                z = tl.load(q_zeros + g, mask=rmask, other=0.0)[:, None]
        else:
            g = i * q_gpr + (j.to(tl.int32) // q_gs)  # j < 2**31: 32-bit division is cheaper
            s = tl.load(q_scales + g, mask=mask, other=0.0)
            z = tl.load(q_zeros + g, mask=mask, other=0.0)
        t = tl.where(mask, code.to(tl.float32) * s + z, 0.0)
    return t


@triton.jit
def _lowrank_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    q_scales, q_zeros, q_row_stride, q_gpr, q_gs, scale, k_per_split,
    QUANT: tl.constexpr, Q_IS_A: tl.constexpr, Q_TRANS: tl.constexpr, Q_ALIGN: tl.constexpr, SPLIT: tl.constexpr,
    SHARE_B: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, OUT_BF16: tl.constexpr,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[M, N] (split s: c_ptr + s*stride_cs) = scale · Σ_{k in split s} A[M, k] B[k, N].

    ACCUMULATE (never with splits): C ← C + scale · A B, the sum in fp32 and rounded once to C's
    dtype: the back-projection lands in the weight without an m×n temporary.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), splits). Split s covers K values
    [s*k_per_split, (s+1)*k_per_split), k_per_split a multiple of every config's BLOCK_K.
    Program order: consecutive programs share the tiles of the larger operand (SHARE_B: B's column
    block, else A's row block), so that operand is read from DRAM about once and re-read from L2
    (the left down-projection Pᵀ G reads G once, not once per BLOCK_M rows of the rank).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1).to(tl.int64)
    if SHARE_B:
        num_m = tl.cdiv(M, BLOCK_M)
        pid_n = pid // num_m
        pid_m = pid % num_m
    else:
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // num_n
        pid_n = pid % num_n
    m0 = pid_m.to(tl.int64) * BLOCK_M
    n0 = pid_n.to(tl.int64) * BLOCK_N
    offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    # Tensor-core dtype on a GPU: that of the dense operand (G or R; a dense P has the same one).
    if Q_IS_A:
        dot_dtype: tl.constexpr = b_ptr.dtype.element_ty
    else:
        dot_dtype: tl.constexpr = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    A_QUANT: tl.constexpr = QUANT if Q_IS_A else 0
    B_QUANT: tl.constexpr = 0 if Q_IS_A else QUANT
    for k0 in range(k_begin, k_end, BLOCK_K):
        a = load_tile(
            a_ptr, m0, k0, M, k_end, stride_am, stride_ak, q_scales, q_zeros, q_row_stride, q_gpr, q_gs,
            A_QUANT, Q_TRANS, Q_ALIGN, True, BLOCK_M, BLOCK_K,
        )  # fmt: skip
        b = load_tile(
            b_ptr, k0, n0, k_end, N, stride_bk, stride_bn, q_scales, q_zeros, q_row_stride, q_gpr, q_gs,
            B_QUANT, Q_TRANS, Q_ALIGN, True, BLOCK_K, BLOCK_N,
        )  # fmt: skip
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a.to(dot_dtype), b.to(dot_dtype), acc, input_precision=PRECISION)
    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    c_off = pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    result = acc * scale
    if ACCUMULATE:
        result += load_float(c_ptr + c_off, c_mask, OUT_BF16)
    store_float(c_ptr + c_off, result, c_mask, OUT_BF16)


def group_alignment(group_size: int) -> int:
    """Q_ALIGN of a quantized P: the largest power of two (≤ 256, the widest tile) that divides its
    group size. A constexpr: the hoisting decision of ``load_tile`` is made at compile time, while
    every group size with the same alignment shares one compiled kernel."""
    return math.gcd(group_size, 256)


def _matmul(a, sa, b, sb, M, N, K, out, scale, quant=None, accumulate=False):
    """out (M×N) = scale · A B (``accumulate``: out += scale · A B) with A given by (tensor,
    (stride_m, stride_k)), B by (tensor, (stride_k, stride_n)). ``quant``: (q_is_a, q_trans, bits,
    scales, zeros, group_size) when A or B is a quantized P (its tensor is then P's codes)."""
    if out.numel() == 0:
        return out
    if K == 0:
        return out if accumulate else out.zero_()
    dense = b if quant is not None and quant[0] else a
    dot_fp32 = INTERPRET or dense.dtype == torch.float32
    precision = "ieee" if INTERPRET else ("tf32x3" if dot_fp32 else "tf32")  # "tf32": only fp32 dots read it
    if quant is None:
        q_is_a, q_trans, bits, q_scales, q_zeros, q_gs = False, False, 0, a, a, 1
        q_row_stride = q_gpr = 1
    else:
        q_is_a, q_trans, bits, q_scales, q_zeros, q_gs = quant
        codes = a if q_is_a else b
        q_row_stride, q_gpr = codes.stride(0), q_scales.shape[1]
    splits, k_per_split = SPLIT_K.plan(M, N, K, dense.element_size(), parallel_slots(out.device))
    if splits > 1:
        target = torch.empty((splits, M, N), dtype=torch.float32, device=out.device)
        cs = target.stride()
    else:
        target = out_view(out)
        cs = (0, *out.stride())

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)

    args = (
        a, b, target, M, N, K, *sa, *sb, *cs, q_scales, q_zeros, q_row_stride, q_gpr, q_gs, float(scale), k_per_split,
    )  # fmt: skip
    constexprs = dict(
        QUANT=bits, Q_IS_A=q_is_a, Q_TRANS=q_trans, Q_ALIGN=group_alignment(q_gs), SPLIT=splits > 1,
        # Consecutive programs share the tiles of the operand with more elements (a stand-in for
        # the one read from DRAM: K·N for B against M·K for A).
        SHARE_B=N > M, DOT_FP32=dot_fp32, PRECISION=precision,
        OUT_BF16=splits == 1 and out.dtype == torch.bfloat16, ACCUMULATE=accumulate and splits == 1,
        enable_fp_fusion=True,  # FMA in the in-register dequantization of P: within the tolerance
    )  # fmt: skip
    configs = matmul_configs(M, N, splits, dot_fp32, out.device)
    launch(_lowrank_matmul_kernel, grid, args, constexprs, configs, out.device)
    if splits > 1:  # fp32 sum of the partials (and of out's old values), then one rounding
        total = target.sum(dim=0)
        out.copy_(total + out.float() if accumulate else total)
    return out


def lowrank_project_triton(g, p, side):
    """left: Pᵀ G, g (m×n), p (m×r) -> (r×n).  right: G Pᵀ, g (m×n), p (r×n) -> (m×r).  g's dtype."""
    M, N = check_lowrank_project(g, p, side)
    out = torch.empty((M, N), dtype=g.dtype, device=g.device)
    if side == "left":  # A = Pᵀ (r×m), B = G (m×n)
        return _matmul(p, (p.stride(1), p.stride(0)), g, g.stride(), M, N, g.shape[0], out, 1.0)
    # A = G (m×n), B = Pᵀ (n×r)
    return _matmul(g, g.stride(), p, (p.stride(1), p.stride(0)), M, N, g.shape[1], out, 1.0)


def _back_dense(r, p, side, scale, out, accumulate):
    """out (m×n) (+)= scale · (P R | R P) for a dense P."""
    M, N = out.shape
    if side == "left":  # A = P (m×r), B = R (r×n)
        return _matmul(p, p.stride(), r, r.stride(), M, N, r.shape[0], out, scale, accumulate=accumulate)
    return _matmul(r, r.stride(), p, p.stride(), M, N, r.shape[1], out, scale, accumulate=accumulate)  # A = R, B = P


def lowrank_project_back_triton(r, p, side, scale):
    """left: scale·P R, p (m×r), r (r×n).  right: scale·R P, r (m×r), p (r×n).  -> (m×n), r's dtype."""
    M, N = check_lowrank_project_back(r, p, side)
    return _back_dense(r, p, side, scale, torch.empty((M, N), dtype=r.dtype, device=r.device), False)


def lowrank_project_back_add_triton(w, r, p, side, scale):
    """In place: w (m×n, any float dtype) += scale · (P R | R P)."""
    check_lowrank_project_back_add(w, r, p, side)
    _back_dense(r, p, side, scale, w, True)


def _quant(q_is_a, q_trans, bits, p_codes, p_scales, p_zeros, p_shape):
    return (q_is_a, q_trans, bits, p_scales, p_zeros, p_shape[1] // p_scales.shape[1])


def lowrank_project_quantized_triton(g, p_codes, p_scales, p_zeros, bits, side):
    """As ``lowrank_project_triton`` with P given as INT4 (packed) / INT8 codes + fp32 scales/zeros."""
    M, N = check_lowrank_project_quantized(g, p_codes, p_scales, p_zeros, bits, side)
    out = torch.empty((M, N), dtype=g.dtype, device=g.device)
    p_shape = (p_codes.shape[0], p_codes.shape[1] * (8 // bits))
    if side == "left":  # A = Pᵀ (quantized, transposed), B = G
        q = _quant(True, True, bits, p_codes, p_scales, p_zeros, p_shape)
        return _matmul(p_codes, (0, 0), g, g.stride(), M, N, g.shape[0], out, 1.0, q)
    q = _quant(False, True, bits, p_codes, p_scales, p_zeros, p_shape)  # A = G, B = Pᵀ
    return _matmul(g, g.stride(), p_codes, (0, 0), M, N, g.shape[1], out, 1.0, q)


def _back_quantized(r, p_codes, p_scales, p_zeros, bits, side, scale, out, accumulate):
    """out (m×n) (+)= scale · (P R | R P) for a quantized P."""
    M, N = out.shape
    p_shape = (p_codes.shape[0], p_codes.shape[1] * (8 // bits))
    if side == "left":  # A = P (quantized), B = R
        q = _quant(True, False, bits, p_codes, p_scales, p_zeros, p_shape)
        return _matmul(p_codes, (0, 0), r, r.stride(), M, N, r.shape[0], out, scale, q, accumulate)
    q = _quant(False, False, bits, p_codes, p_scales, p_zeros, p_shape)  # A = R, B = P (quantized)
    return _matmul(r, r.stride(), p_codes, (0, 0), M, N, r.shape[1], out, scale, q, accumulate)


def lowrank_project_back_quantized_triton(r, p_codes, p_scales, p_zeros, bits, side, scale):
    """As ``lowrank_project_back_triton`` with P given as INT4 (packed) / INT8 codes + fp32 scales/zeros."""
    M, N = check_lowrank_project_back_quantized(r, p_codes, p_scales, p_zeros, bits, side)
    out = torch.empty((M, N), dtype=r.dtype, device=r.device)
    return _back_quantized(r, p_codes, p_scales, p_zeros, bits, side, scale, out, False)


def lowrank_project_back_quantized_add_triton(w, r, p_codes, p_scales, p_zeros, bits, side, scale):
    """In place: w (m×n, any float dtype) += scale · (P R | R P) with a quantized P."""
    check_lowrank_project_back_quantized_add(w, r, p_codes, p_scales, p_zeros, bits, side)
    _back_quantized(r, p_codes, p_scales, p_zeros, bits, side, scale, w, True)


def _grad(dy, x, side, M, N, p_operand):
    """R (M×N, dy's dtype) = down(dyᵀ x, P) in two products through Z (T×r, dy's dtype).

    ``p_operand(role)`` gives (tensor, strides, quant) of P for role "pT_right" (B = Pᵀ, n×r) or
    "pT_left" (A = Pᵀ, r×m). Z is stored in dy's dtype: on a GPU the second product feeds it to the
    tensor cores in that dtype anyway; in fp32 (and under the interpreter) it is exact fp32.
    """
    T = dy.shape[0]
    out = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
    if side == "right":  # Z = x Pᵀ (T×r), then R = dyᵀ Z (m×r)
        rank = N
        z = torch.empty((T, rank), dtype=dy.dtype, device=dy.device)
        p_t, p_strides, quant = p_operand("pT_right")
        _matmul(x, x.stride(), p_t, p_strides, T, rank, x.shape[1], z, 1.0, quant)
        return _matmul(dy, (dy.stride(1), dy.stride(0)), z, z.stride(), M, N, T, out, 1.0)
    rank = M  # Zᵀ = Pᵀ dyᵀ (r×T), then R = Zᵀ x (r×n)
    zt = torch.empty((rank, T), dtype=dy.dtype, device=dy.device)
    p_t, p_strides, quant = p_operand("pT_left")
    _matmul(p_t, p_strides, dy, (dy.stride(1), dy.stride(0)), rank, T, dy.shape[1], zt, 1.0, quant)
    return _matmul(zt, zt.stride(), x, x.stride(), M, N, T, out, 1.0)


def lowrank_grad_triton(dy, x, p, side):
    """right: dyᵀ (x Pᵀ), p (r×n) -> (m×r).  left: (dy P)ᵀ x, p (m×r) -> (r×n).  dy (T×m), x (T×n)."""
    M, N = check_lowrank_grad(dy, x, p, side)
    return _grad(dy, x, side, M, N, lambda role: (p, (p.stride(1), p.stride(0)), None))


def lowrank_grad_quantized_triton(dy, x, p_codes, p_scales, p_zeros, bits, side):
    """As ``lowrank_grad_triton`` with P given as INT4 (packed) / INT8 codes + fp32 scales/zeros."""
    M, N = check_lowrank_grad_quantized(dy, x, p_codes, p_scales, p_zeros, bits, side)
    p_shape = (p_codes.shape[0], p_codes.shape[1] * (8 // bits))

    def operand(role):  # Pᵀ as B (right) or as A (left): the quantized P read transposed
        return p_codes, (0, 0), _quant(role == "pT_left", True, bits, p_codes, p_scales, p_zeros, p_shape)

    return _grad(dy, x, side, M, N, operand)
