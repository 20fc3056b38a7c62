"""Triton kernels: the fused projected-Adam step of GaLore / Q-GaLore (``galore_adam_step_*``),
in place, with a dense W (any float dtype) or an INT8 W (codes + group-wise scales/zeros), and a
dense or INT4/INT8 quantized projector P. The math is ``fastgrad/_reference.py`` ("Projected Adam
step"):

    M ← β1·M + (1−β1)·R ;  V ← β2·V + (1−β2)·R⊙R      (fp32 math, stored in the moments' dtype)
    N = M / (denom_scale·√V + ε)                         (from the fp32 M, V, before storing)
    W ← decay·W + step_scale·up(N, P)                    (fp32, rounded once to W's dtype)
        left:  up = P N   P (m×r), N and R (r×n)
        right: up = N P   N and R (m×r), P (r×n)

INT8 W: W = code·scale + zero with groups of g = n / groups consecutive values along each row (any
g: odd, not a power of two, the whole row); W' = decay·W + s·up in fp32 is re-quantized asymmetric
8-bit with the same g, scale = (max − min)/255 (correctly rounded, 0 → 1), zero = min, and RTN or
stochastic rounding with the stream position offset + i·n + j of element (i, j). The encoder and
the group statistics are those of ``quant.py`` (``encode_codes``, ``reduce_chunk``,
``scale_zero``): the same fp32 W' gives the reference quantizer's codes bit for bit.

Two launches per step.

1. ``_adam_moments_kernel`` (elementwise over R, 1-D blocks): reads R, M, V once, writes M, V in
   their dtype and N in fp32 into a scratch of R's shape (r/n or r/m of W's size: at rank 256 of a
   4096×11008 weight, 4.5 MB next to W's 90 MB in bf16). Every moment element is updated once, by
   the program that owns it, and nothing else reads M or V.
2. The update kernel reads N and P as the two operands of a K = r matmul and applies it to W in
   its epilogue: the full-size update is never written to memory.

Why N goes through memory rather than being recomputed in registers inside the update kernel (the
one-kernel alternative, with programs owning rows of N): (a) recomputing N per W chunk costs about
40 instructions per element of N (two correctly rounded operations, sqrt and division, plus three
loads and conversions) for every BM·r tile, i.e. 40·r/BN instructions per element of W, which on an
H100 at r = 256 is about twice the time of W's own memory traffic, while reading N back from L2
costs one load and one conversion; (b) with side "left" the rows of W are rows of P, not of N: a
row block of W needs all of N (r×n), so every program would recompute the whole N, and the INT8
update (whose programs must own whole rows, the quantization groups lying along rows) could not use
the transposed view; (c) the INT8 update reads N twice (see below). The scratch costs one write and
one read of m·r or r·n fp32 values, a few percent of W's traffic.

Dense W (``_adam_update_dense_kernel``). W tiled in BLOCK_M × BLOCK_N tiles, one program per tile,
K = r looped in BLOCK_K steps with ``tl.dot`` into an fp32 accumulator; A = P, B = N (left) or
A = N, B = P (right), any strides (W may be strided too: it is addressed by its strides). The
epilogue loads the W tile, W' = decay·W + s·acc, stores it (bf16 with round-to-nearest-even).
Tiles: ``project.matmul_configs``, the first that fits the GPU (``_common.launch``).

INT8 W (``_adam_update_int8_kernel``). One program per (block of BLOCK_M rows, group q): the
groups of a row are independent (each has its own scale and zero), so they are work items of their
own and no (rows × groups) statistics scratch is needed. The group's g columns are covered by
cdiv(g, BLOCK_N) chunks aligned to the group (``int8_chunk`` picks BLOCK_N so that the padding of
the last chunk is small: on a GPU g = 256 → one 256-wide chunk, g = 127 → one of 128, g = 176 →
three of 64, a whole row of 11008 → 86 of 128), so each chunk lies in exactly one group and its
min/max is a plain masked row reduction.
  One chunk (ONE_CHUNK, the default group of 256): W' = decay·W + s·(A B) (W decoded with the old
scale/zero, the matmul over K = r) is computed once and stays in registers for its min/max, the
new scale/zero and the encode.
  Several chunks: pass 1 folds each chunk's W' into the running per-row min/max, then scale/zero;
pass 2 recomputes W' chunk by chunk (the same instructions on the same data: bitwise the same
values; the matmul is recomputed rather than stored, so no m×n float ever exists) and encodes it.
  Codes are encoded with the new scale/zero and the element's stream position and stored over the old
ones (a chunk's old codes are read before its new codes are written, and no other program touches
them); finally the group's new scale and zero (after the codes, which decode with the old ones).
Compiled without FMA contraction so that the decoding is the reference's separate multiply and
add, and pass 1 and pass 2 compute identical W'. ``int8_configs`` lists the (BLOCK_M, BLOCK_K,
warps, stages) candidates, most rows first; ``_common.launch`` runs the first that fits the GPU
(no timing: the kernel works in place, and the choice is the same on every rank).

Precision. fp32 math throughout; under the interpreter ``tl.dot`` runs with exact fp32 products
(``input_precision="ieee"``). On a GPU: for an fp32 or INT8 W the dot inputs are fp32 (N from the
scratch, P dense or decoded in fp32) with ``"tf32x3"`` (about fp32 accuracy), which keeps the INT8
codes within a threshold flip of the reference's; for a bf16/fp16 W, N and P are rounded to W's
dtype for the 16-bit tensor cores: a relative error of W's unit roundoff per product, the size of
the rounding of the updated W itself. Offsets, element counters and strides are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgrad._ops import check_galore_adam_step, check_galore_adam_step_int8, check_galore_adam_step_quantized

from ._common import INTERPRET, launch, load_float, out_view, parallel_slots, store_float
from .project import group_alignment, load_tile, matmul_configs
from .quant import block_words_aligned, encode_codes, reduce_chunk, scale_zero

# Knobs (module attributes so that tests can reach every path with small shapes).
MOMENT_BLOCK = 2**14 if INTERPRET else 1024  # values per program of the moment kernel
INT8_BLOCK_M_MAX = 16 if INTERPRET else 64  # most rows per program of the INT8 update
INT8_BLOCK_N_MAX = 64 if INTERPRET else 256  # widest chunk of a group (a group this wide: one pass)
BLOCK_K_MAX = 32  # 64 needs more shared memory or registers than a 99 KB GPU has (fastgrad.kernels.aot)
_MIN_DOT = 16  # smallest tl.dot dimension on a GPU

_NO_FMA = {"enable_fp_fusion": False}

# The moment kernel is elementwise: one config (4 warps, 8 values per thread at 1024 per program).
_MOMENT_CONFIGS = [triton.Config({}, num_warps=4, num_stages=1)]

# Dot operand kinds (constexpr DOT).
_DOT_FP32, _DOT_BF16, _DOT_FP16 = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# jit helpers and kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _adam_moments_kernel(
    r_ptr, m_ptr, v_ptr, n_ptr, numel, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, denom_scale,
    R_BF16: tl.constexpr, MOM_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """M, V ← Adam's moments from R (in place, their dtype); n_ptr (fp32) ← M / (denom_scale·√V + ε).

    The operations of ``_reference.adam_direction_``, each rounded to fp32 (the launcher compiles
    without FMA contraction): M' = β1·M + R·(1−β1), V' = β2·V + (R·R)·(1−β2), then √V' (correctly
    rounded), · denom_scale, + ε and the correctly rounded division. (1−β) come from the host
    (computed in double and rounded once to fp32, as torch does with a Python scalar). The moments
    and N are therefore bitwise the reference's, on a GPU as under the interpreter.
    """
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    r = load_float(r_ptr + idx, mask, R_BF16)
    m = load_float(m_ptr + idx, mask, MOM_BF16)
    v = load_float(v_ptr + idx, mask, MOM_BF16)
    m = m * beta1 + r * one_minus_beta1
    v = v * beta2 + (r * r) * one_minus_beta2
    store_float(m_ptr + idx, m, mask, MOM_BF16)
    store_float(v_ptr + idx, v, mask, MOM_BF16)
    denom = tl.sqrt_rn(v) * denom_scale + eps
    denom = tl.where(mask, denom, 1.0)  # lanes past the end: no 0/0
    tl.store(n_ptr + idx, tl.math.div_rn(m, denom), mask=mask)


@triton.jit
def _up_tile(
    a_ptr, b_ptr, m0, n0, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
    q_scales, q_zeros, q_row_stride, q_gpr, q_gs,
    QUANT: tl.constexpr, Q_IS_A: tl.constexpr, Q_ALIGN: tl.constexpr, Q_EVEN: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 tile rows [m0, m0+BLOCK_M) × cols [n0, n0+BLOCK_N) of A B (A: M×K, B: K×N, addressed by
    strides; zeros outside). A quantized P (QUANT 4/8) is A (Q_IS_A) or B, read as P itself (never
    transposed here) and decoded in registers by ``project.load_tile``; Q_EVEN: the tiles of P
    start at even columns of P (only the INT8 update's chunks of odd groups do not)."""
    A_QUANT: tl.constexpr = QUANT if Q_IS_A else 0
    B_QUANT: tl.constexpr = 0 if Q_IS_A else QUANT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = load_tile(
            a_ptr, m0, k0, M, K, stride_am, stride_ak, q_scales, q_zeros, q_row_stride, q_gpr, q_gs,
            A_QUANT, False, Q_ALIGN, True, BLOCK_M, BLOCK_K,
        )  # fmt: skip
        b = load_tile(
            b_ptr, k0, n0, K, N, stride_bk, stride_bn, q_scales, q_zeros, q_row_stride, q_gpr, q_gs,
            B_QUANT, False, Q_ALIGN, Q_EVEN, BLOCK_K, BLOCK_N,
        )  # fmt: skip
        if DOT == 1:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        elif DOT == 2:
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _adam_update_dense_kernel(
    w_ptr, a_ptr, b_ptr, M, N, K, stride_wm, stride_wn, stride_am, stride_ak, stride_bk, stride_bn,
    q_scales, q_zeros, q_row_stride, q_gpr, q_gs, step_scale, decay,
    QUANT: tl.constexpr, Q_IS_A: tl.constexpr, Q_ALIGN: tl.constexpr, W_BF16: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """W[M, N] ← decay·W + step_scale·(A B), one BLOCK_M × BLOCK_N tile of W per program.
    Grid: cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N), consecutive programs share A's row block."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    m0 = (pid // num_n).to(tl.int64) * BLOCK_M
    n0 = (pid % num_n).to(tl.int64) * BLOCK_N
    offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    acc = _up_tile(
        a_ptr, b_ptr, m0, n0, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, q_scales, q_zeros, q_row_stride,
        q_gpr, q_gs, QUANT, Q_IS_A, Q_ALIGN, True, DOT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    w_off = offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    w = load_float(w_ptr + w_off, mask, W_BF16)
    store_float(w_ptr + w_off, w * decay + acc * step_scale, mask, W_BF16)


@triton.jit
def _int8_updated_chunk(
    codes_ptr, a_ptr, b_ptr, rows, rmask, m0, col0, c, w_scale, w_zero, M, N, K, group_size,
    stride_am, stride_ak, stride_bk, stride_bn, q_scales, q_zeros, q_row_stride, q_gpr, q_gs, step_scale, decay,
    QUANT: tl.constexpr, Q_IS_A: tl.constexpr, Q_ALIGN: tl.constexpr, Q_EVEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Chunk ``c`` of the group starting at column ``col0``: W' = decay·W + s·(A B) in fp32, with W
    decoded from its codes and the group's old (w_scale, w_zero) per row. Returns W', the
    elements' flat indices (row·N + column: address of the codes and stream position) and mask."""
    in_group = c * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = col0 + in_group
    acc = _up_tile(
        a_ptr, b_ptr, m0, col0 + c * BLOCK_N, M, col0 + group_size, K, stride_am, stride_ak, stride_bk, stride_bn,
        q_scales, q_zeros, q_row_stride, q_gpr, q_gs, QUANT, Q_IS_A, Q_ALIGN, Q_EVEN, 0, PRECISION,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    mask = rmask[:, None] & (in_group < group_size)[None, :]
    elem = rows[:, None] * N + cols[None, :]
    code = tl.load(codes_ptr + elem, mask=mask, other=0).to(tl.float32)
    w = code * w_scale[:, None] + w_zero[:, None]
    return w * decay + acc * step_scale, elem, mask


@triton.jit(do_not_specialize=["seed", "offset"])
def _adam_update_int8_kernel(
    codes_ptr, w_scales_ptr, w_zeros_ptr, a_ptr, b_ptr, M, N, K, group_size, num_groups,
    stride_am, stride_ak, stride_bk, stride_bn, q_scales, q_zeros, q_row_stride, q_gpr, q_gs,
    step_scale, decay, seed, offset,
    QUANT: tl.constexpr, Q_IS_A: tl.constexpr, Q_ALIGN: tl.constexpr, Q_EVEN: tl.constexpr, STOCHASTIC: tl.constexpr,
    BLOCK_WORDS: tl.constexpr, PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Group q of rows [pid_m·BLOCK_M, +BLOCK_M) of the INT8 W: W' min/max, scale/zero, encode and
    store the codes, then the new scales/zeros. ONE_CHUNK (the group fits one BLOCK_N chunk): W' is
    computed once and stays in registers. Otherwise two passes over the chunks: pass 1 folds W'
    into the min/max, pass 2 recomputes W' (the same instructions on the same data: bitwise the
    same values) and encodes it, so no m×n float is ever stored. Grid: cdiv(M, BLOCK_M) ·
    num_groups, consecutive programs walk the groups of one row block."""
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid // num_groups
    q = pid % num_groups
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < M
    stat = rows * num_groups + q  # (rows × groups) scales/zeros, contiguous
    old_scale = tl.load(w_scales_ptr + stat, mask=rmask, other=1.0)
    old_zero = tl.load(w_zeros_ptr + stat, mask=rmask, other=0.0)
    col0 = q * group_size
    lo = tl.full((BLOCK_M,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    if ONE_CHUNK:
        x, elem, mask = _int8_updated_chunk(
            codes_ptr, a_ptr, b_ptr, rows, rmask, m0, col0, 0, old_scale, old_zero, M, N, K, group_size,
            stride_am, stride_ak, stride_bk, stride_bn, q_scales, q_zeros, q_row_stride, q_gpr, q_gs,
            step_scale, decay, QUANT, Q_IS_A, Q_ALIGN, Q_EVEN, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        lo, hi = reduce_chunk(x, mask, lo, hi, False)
        scale, zero = scale_zero(lo, hi, rmask, 8, False)
        code = encode_codes(x, elem, scale, zero, seed, offset, 8, STOCHASTIC, BLOCK_WORDS)
        tl.store(codes_ptr + elem, code.to(tl.uint8), mask=mask)
    else:
        num_chunks = tl.cdiv(group_size, BLOCK_N)
        for c in range(0, num_chunks):
            x, elem, mask = _int8_updated_chunk(
                codes_ptr, a_ptr, b_ptr, rows, rmask, m0, col0, c, old_scale, old_zero, M, N, K, group_size,
                stride_am, stride_ak, stride_bk, stride_bn, q_scales, q_zeros, q_row_stride, q_gpr, q_gs,
                step_scale, decay, QUANT, Q_IS_A, Q_ALIGN, Q_EVEN, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            lo, hi = reduce_chunk(x, mask, lo, hi, False)
        scale, zero = scale_zero(lo, hi, rmask, 8, False)
        for c in range(0, num_chunks):
            x, elem, mask = _int8_updated_chunk(
                codes_ptr, a_ptr, b_ptr, rows, rmask, m0, col0, c, old_scale, old_zero, M, N, K, group_size,
                stride_am, stride_ak, stride_bk, stride_bn, q_scales, q_zeros, q_row_stride, q_gpr, q_gs,
                step_scale, decay, QUANT, Q_IS_A, Q_ALIGN, Q_EVEN, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            code = encode_codes(x, elem, scale, zero, seed, offset, 8, STOCHASTIC, BLOCK_WORDS)
            tl.store(codes_ptr + elem, code.to(tl.uint8), mask=mask)
    tl.store(w_scales_ptr + stat, scale, mask=rmask)
    tl.store(w_zeros_ptr + stat, zero, mask=rmask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _adam_direction(exp_avg, exp_avg_sq, r, beta1, beta2, eps, denom_scale) -> torch.Tensor:
    """Moments updated in place; returns N (fp32, R's shape, contiguous)."""
    n = torch.empty(r.shape, dtype=torch.float32, device=r.device)  # plans.adam_step_workspace_bytes
    numel = r.numel()
    if numel == 0:
        return n
    args = (
        out_view(r), out_view(exp_avg), out_view(exp_avg_sq), n, numel,
        float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps), float(denom_scale),
    )  # fmt: skip
    constexprs = dict(R_BF16=r.dtype == torch.bfloat16, MOM_BF16=exp_avg.dtype == torch.bfloat16, BLOCK=MOMENT_BLOCK)
    grid = (triton.cdiv(numel, MOMENT_BLOCK),)
    launch(_adam_moments_kernel, lambda meta: grid, args, constexprs | _NO_FMA, _MOMENT_CONFIGS, r.device)
    return n


class _P:
    """The projector as a matmul operand: dense (tensor, strides) or quantized codes + group data."""

    def __init__(self, p=None, codes=None, scales=None, zeros=None, bits=0):
        if codes is None:
            self.t, self.strides, self.bits = p, tuple(p.stride()), 0
            self.scales = self.zeros = p  # unused
            self.row_stride = self.gpr = self.gs = 1
        else:
            self.t, self.strides, self.bits = codes, (0, 0), bits
            self.scales, self.zeros = scales, zeros
            cols = codes.shape[1] * (8 // bits)
            self.row_stride, self.gpr, self.gs = codes.stride(0), scales.shape[1], cols // scales.shape[1]

    def qargs(self):
        return (self.scales, self.zeros, self.row_stride, self.gpr, self.gs)


def _operands(side: str, n: torch.Tensor, p: _P):
    """(A, A strides, B, B strides, Q_IS_A, K) of up(N, P): left P N, right N P."""
    if side == "left":
        return p.t, p.strides, n, tuple(n.stride()), True, n.shape[0]
    return n, tuple(n.stride()), p.t, p.strides, False, n.shape[1]


def _precision(fp32_dot: bool) -> str:
    if INTERPRET:
        return "ieee"
    return "tf32x3" if fp32_dot else "tf32"  # "tf32": only fp32 dots read it


def _update_dense(w, n, side, p: _P, step_scale, decay) -> None:
    """W (m×n, any float dtype, any strides) ← decay·W + step_scale·up(N, P)."""
    M, N = w.shape
    if M * N == 0:
        return
    a, sa, b, sb, q_is_a, K = _operands(side, n, p)
    if INTERPRET or w.dtype == torch.float32:
        dot = _DOT_FP32
    else:
        dot = _DOT_BF16 if w.dtype == torch.bfloat16 else _DOT_FP16

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (out_view(w), a, b, M, N, K, *w.stride(), *sa, *sb, *p.qargs(), float(step_scale), float(decay))
    constexprs = dict(
        QUANT=p.bits, Q_IS_A=q_is_a, Q_ALIGN=group_alignment(p.gs), W_BF16=w.dtype == torch.bfloat16, DOT=dot,
        PRECISION=_precision(dot == _DOT_FP32), enable_fp_fusion=True,  # FMA contraction: within the tolerance
    )  # fmt: skip
    configs = matmul_configs(M, N, 1, dot == _DOT_FP32, w.device)
    launch(_adam_update_dense_kernel, grid, args, constexprs, configs, w.device)


def galore_adam_step_triton(w, exp_avg, exp_avg_sq, r, p, side, beta1, beta2, eps, denom_scale, step_scale, decay):
    """In place: moments from R; W (m×n) ← decay·W + step_scale·up(N, P), dense P (R's dtype)."""
    check_galore_adam_step(w, exp_avg, exp_avg_sq, r, p, side, beta1, beta2, eps, denom_scale)
    n = _adam_direction(exp_avg, exp_avg_sq, r, beta1, beta2, eps, denom_scale)
    _update_dense(w, n, side, _P(p), step_scale, decay)


def galore_adam_step_quantized_triton(
    w, exp_avg, exp_avg_sq, r, p_codes, p_scales, p_zeros, bits, side,
    beta1, beta2, eps, denom_scale, step_scale, decay,
):  # fmt: skip
    """As ``galore_adam_step_triton`` with P given as INT4 (packed) / INT8 codes + fp32 scales/zeros."""
    check_galore_adam_step_quantized(
        w, exp_avg, exp_avg_sq, r, p_codes, p_scales, p_zeros, bits, side, beta1, beta2, eps, denom_scale
    )
    n = _adam_direction(exp_avg, exp_avg_sq, r, beta1, beta2, eps, denom_scale)
    _update_dense(w, n, side, _P(codes=p_codes, scales=p_scales, zeros=p_zeros, bits=bits), step_scale, decay)


def _pow2_at_least(x: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(max(x, 1)))


def int8_chunk(group_size: int) -> int:
    """BLOCK_N of the INT8 update: the widest power of two (16 ≤ BLOCK_N ≤ INT8_BLOCK_N_MAX, at
    most next_pow2(g)) whose chunks cover a group with at most g/8 padding (16-wide chunks pad a
    g ≥ 128 by less than 1/8). A group of at most INT8_BLOCK_N_MAX values is then one chunk."""
    width = min(INT8_BLOCK_N_MAX, _pow2_at_least(group_size, _MIN_DOT))
    while width > _MIN_DOT:
        if triton.cdiv(group_size, width) * width - group_size <= group_size / 8:
            return width
        width //= 2
    return _MIN_DOT


def int8_configs(rows: int, groups: int, block_n: int, rank: int, device: torch.device) -> list[triton.Config]:
    """Candidate (BLOCK_M, BLOCK_K, warps, stages) of the INT8 update, in order of preference.

    BLOCK_M: the most rows (≤ INT8_BLOCK_M_MAX, a tile of at most 8192 values) that still give the
    device enough programs (row blocks × groups ≥ parallel slots), then fewer rows. BLOCK_K: r
    rounded up to a power of two and capped at BLOCK_K_MAX, then half that. Two pipeline stages,
    then one. ``launch`` takes the first that fits the GPU (under the interpreter: the first)."""
    slots = parallel_slots(device)
    sizes = [bm for bm in (64, 32, 16) if bm <= INT8_BLOCK_M_MAX and bm * block_n <= 8192] or [_MIN_DOT]
    preferred = next((bm for bm in sizes if triton.cdiv(rows, bm) * groups >= slots), sizes[-1])
    block_ms = [bm for bm in sizes if bm <= preferred]
    block_k = min(BLOCK_K_MAX, _pow2_at_least(rank, _MIN_DOT))
    block_ks = [bk for bk in (block_k, block_k // 2) if bk >= _MIN_DOT]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=8 if bm * block_n >= 64 * 64 else 4, num_stages=st)
        for bm in block_ms
        for bk in block_ks
        for st in (2, 1)
    ]


def galore_adam_step_int8_triton(
    w_codes, w_scales, w_zeros, exp_avg, exp_avg_sq, r, p_codes, p_scales, p_zeros, bits, side,
    beta1, beta2, eps, denom_scale, step_scale, decay, stochastic, seed, offset,
):  # fmt: skip
    """In place: moments from R; the INT8 W (codes m×n, fp32 scales/zeros m×groups) decoded,
    updated with up(N, P) (P INT4/INT8) and re-quantized (asymmetric, W's group size, RTN or SR)."""
    g = check_galore_adam_step_int8(
        w_codes, w_scales, w_zeros, exp_avg, exp_avg_sq, r, p_codes, p_scales, p_zeros, bits, side,
        beta1, beta2, eps, denom_scale, seed, offset,
    )  # fmt: skip
    n = _adam_direction(exp_avg, exp_avg_sq, r, beta1, beta2, eps, denom_scale)
    M, N = w_codes.shape
    groups = w_scales.shape[1]
    if M * N == 0:
        return
    p = _P(codes=p_codes, scales=p_scales, zeros=p_zeros, bits=bits)
    a, sa, b, sb, q_is_a, K = _operands(side, n, p)
    block_n = int8_chunk(g)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * groups,)

    args = (
        w_codes, w_scales, w_zeros, a, b, M, N, K, g, groups, *sa, *sb, *p.qargs(),
        float(step_scale), float(decay), int(seed), int(offset),
    )  # fmt: skip
    # A right-side P's tiles start at W's group boundaries q·g + c·BLOCK_N, not at multiples of
    # BLOCK_N unless g is one: only then may a tile take one scale per row of P (Q_ALIGN), and only
    # an even g starts them at even columns (Q_EVEN).
    aligned = q_is_a or g % block_n == 0 or groups == 1
    constexprs = dict(
        QUANT=bits, Q_IS_A=q_is_a, Q_ALIGN=group_alignment(p.gs) if aligned else 1, Q_EVEN=q_is_a or g % 2 == 0,
        # Tile rows start at row·n + q·g + c·BLOCK_N (g divides n).
        STOCHASTIC=bool(stochastic), BLOCK_WORDS=bool(stochastic) and block_words_aligned(offset, g, block_n),
        PRECISION=_precision(True),
        ONE_CHUNK=g <= block_n, BLOCK_N=block_n, **_NO_FMA,
    )  # fmt: skip
    configs = int8_configs(M, groups, block_n, K, w_codes.device)
    launch(_adam_update_int8_kernel, grid, args, constexprs, configs, w_codes.device)
