"""Triton kernels: Newton–Schulz orthogonalization of every matrix of a batch (``newton_schulz``,
Muon's update direction). The math is ``fastgrad/_reference.py::newton_schulz`` (docs/algorithms.md
§10.2): for X (m×n), on the wide orientation Y (s×l, s = min(m, n), l = max(m, n): Y = X, or Xᵀ
when m > n),

    Y ← Y / max(‖Y‖_F, ε)
    per step (a, b, c):   A = Y Yᵀ  (s×s)      B = b·A + c·A·A  (s×s)      Y ← a·Y + B·Y  (s×l)

and the result is Y (transposed back when m > n), in x's shape and dtype.

Launches per call: two for the norm, then three per step.

1. ``_ns_sumsq_kernel``: partial sums of squares of each matrix over chunks of its rows (fp32),
   into a (batch, chunks) workspace: deterministic, no atomics.
2. ``_ns_normalize_kernel``: each program adds its matrix's partials up (the same order in every
   program), takes the norm and writes its tile of Y = X / max(‖X‖_F, ε) in the wide orientation,
   so the transposition of a tall X costs nothing extra.
3. ``_ns_sym_kernel`` twice per step: C = β·D + α·X Xᵀ for an (s×K) X, a product whose result is
   symmetric. Only the tiles on or above the diagonal are computed, each stored twice (in place and
   mirrored), which halves the FLOPs of the product. With X = Y (K = l, α = 1, no D) it is the Gram
   matrix A; with X = A (K = s, α = c, β = b, D = A) it is B = b·A + c·A·A, because A is symmetric
   (A·A = A·Aᵀ) and so is B. The fused epilogue β·D + α·acc reads A's tile once.
4. ``_ns_update_kernel`` once per step: Y' = a·Y + B·Y, a tiled matmul (s×s)(s×l) whose epilogue
   reads Y's tile and adds a·Y. A step never writes the Y it reads: Y ping-pongs between two
   buffers, and the last step writes the output (of a tall x: through transposed strides).

Dtypes and precision. A, B and every Y are stored in x's dtype, as the reference rounds each op's
result to it; the norm of a bf16 x is rounded to bf16 before the clamp and again after it, as
torch's ``y.norm().clamp(min=eps)`` on a bf16 tensor does, and the division is correctly rounded.
Accumulation is fp32 everywhere. On a GPU bf16 operands go to the tensor cores as bf16 (the
products are exact in fp32: only the summation order differs from the reference), fp32 operands
with ``input_precision="tf32x3"`` (about fp32 accuracy). Under the interpreter every operand is
converted to fp32 and ``tl.dot`` runs with ``"ieee"`` (the interpreter does no bf16 math), and
bf16 results are rounded to nearest even in integer arithmetic (``_common.store_float``).

Configs. No autotuning: the candidate tiles are ordered by preference (the largest that still give
every SM a program first) and ``_common.launch`` runs the first that fits the GPU's shared memory
without spilling; ``python -m fastgrad.kernels.aot --select newton_schulz`` compiles every launch
for sm_80/86/89/90/120. The symmetric kernel's tiles are square (BLOCK_T × BLOCK_T) so that a
diagonal tile mirrors onto itself. Offsets are 64-bit; the coefficients and ε are runtime
arguments (one compiled kernel serves every step and schedule).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgrad._ops import check_newton_schulz

from ._common import INTERPRET, f32_to_bf16_bits, launch, out_view, parallel_slots, store_float
from .plans import NewtonSchulzPlan, cdiv
from .project import matmul_configs

# Knobs (module attributes so that tests can reach every path with small shapes). The buffer layout
# and the norm's split are the plan's (plans.NewtonSchulzPlan), which the memory model reads too.
PLAN = NewtonSchulzPlan(norm_rows=32) if INTERPRET else NewtonSchulzPlan()
NORM_BLOCK = (PLAN.norm_rows, 64 if INTERPRET else 128)  # (rows, columns) of a norm / normalize tile
MAX_BATCH_PER_LAUNCH = 65535  # the grid's second axis holds the batch

_ELEMENTWISE_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8, 2)]
_INTERPRET_SYM = triton.Config({"BLOCK_T": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)


def _sym_tiles(*rows: tuple[int, int, int, int]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_T": t, "BLOCK_K": k}, num_warps=w, num_stages=s) for t, k, w, s in rows]


# Candidate tiles of the symmetric product (BLOCK_T, BLOCK_K, warps, stages), largest first. 16-bit
# operands: two 128×64 bf16 tiles per stage are 32 KB; at three stages the compiled kernel takes
# 64 KB of shared memory (96 KB on sm_90), within the 99 KB of a consumer GPU. fp32 operands run
# three TF32 products per step (tf32x3), which needs more registers: 128×128 tiles spill.
_SYM_16BIT = _sym_tiles((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2))
_SYM_FP32 = _sym_tiles((64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2))


def sym_programs(S: int, block_t: int) -> int:
    """Programs of one matrix's symmetric product: the T(T+1)/2 tiles on or above the diagonal of
    the T×T tiles of the S×S result (T = cdiv(S, block_t)), against T² for a full product."""
    t = cdiv(S, block_t)
    return t * (t + 1) // 2


def sym_configs(S: int, batch: int, fp32: bool, device: torch.device) -> list[triton.Config]:
    """The symmetric product's candidate tiles in order of preference: those that give every SM a
    program, largest first, then the others from the largest down; if none does, smallest first."""
    if INTERPRET:
        return [_INTERPRET_SYM]
    tiles = _SYM_FP32 if fp32 else _SYM_16BIT
    slots = parallel_slots(device) // 4  # one program per SM
    filling = [c for c in tiles if sym_programs(S, c.kwargs["BLOCK_T"]) * batch >= slots]
    if not filling:
        return sorted(tiles, key=lambda c: c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_K"])
    return filling + [c for c in tiles if c not in filling]


# ---------------------------------------------------------------------------------------------
# jit helpers and kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_bf16(x):
    """fp32 -> the fp32 value of its bf16 rounding (to nearest even)."""
    return (f32_to_bf16_bits(x).to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _ns_sumsq_kernel(
    x_ptr, part_ptr, M, N, rows_per_chunk, n_chunks, stride_xb, stride_xm, stride_xn,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """part[b, c] = Σ X_b[i, j]² over rows i of chunk c ([c·rows_per_chunk, (c+1)·rows_per_chunk)),
    fp32. x: (batch, M, N) any strides, x's dtype; part: (batch, n_chunks) fp32, contiguous.
    Grid: (n_chunks, batch)."""
    c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    base = x_ptr + b * stride_xb
    r_begin = c * rows_per_chunk
    r_end = tl.minimum(r_begin + rows_per_chunk, M)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < r_end
        for c0 in range(0, N, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = rmask[:, None] & (cols < N)[None, :]
            v = tl.load(base + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
            v = v.to(tl.float32)
            acc += v * v
    tl.store(part_ptr + b * n_chunks + c, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _ns_normalize_kernel(
    x_ptr, part_ptr, y_ptr, M, N, n_chunks, eps,
    stride_xb, stride_xm, stride_xn, stride_yb, stride_ym, stride_yn,
    ROUND_BF16: tl.constexpr, NC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Y_b[i, j] (addressed by X's indices: stride_ym, stride_yn are Y's strides for X's row i and
    column j, so a tall X lands transposed) = X_b[i, j] / d_b with

        d_b = max(‖X_b‖_F, eps),  ‖X_b‖_F = √(Σ_c part[b, c])        (bf16: ‖X_b‖_F and d_b rounded to bf16)

    x: (batch, M, N) any strides; part: (batch, n_chunks) fp32 (n_chunks ≤ NC); y: its dtype, the
    int16 view of a bf16 Y (ROUND_BF16 is x's and Y's dtype being bf16). A NaN norm stays NaN.
    Grid: (cdiv(M, BLOCK_R) · cdiv(N, BLOCK_C), batch)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    k = tl.arange(0, NC)
    parts = tl.load(part_ptr + b * n_chunks + k, mask=k < n_chunks, other=0.0)
    norm = tl.sqrt_rn(tl.sum(parts, axis=0))
    if ROUND_BF16:
        norm = _round_bf16(norm)
    d = tl.where(norm < eps, eps, norm)  # clamp(min=eps); NaN < eps is false: NaN is kept
    if ROUND_BF16:
        d = _round_bf16(d)
    num_c = tl.cdiv(N, BLOCK_C)
    rows = (pid // num_c).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = (pid % num_c).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    v = tl.load(x_ptr + b * stride_xb + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    y = tl.math.div_rn(v.to(tl.float32), tl.broadcast_to(d, (BLOCK_R, BLOCK_C)))
    store_float(y_ptr + b * stride_yb + rows[:, None] * stride_ym + cols[None, :] * stride_yn, y, mask, ROUND_BF16)


@triton.jit
def _ns_sym_kernel(
    x_ptr, d_ptr, c_ptr, S, K, alpha, beta,
    stride_xb, stride_xs, stride_xk, stride_db, stride_dr, stride_dc, stride_cb, stride_cr, stride_cc,
    HAS_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C_b = β·D_b + α·X_b X_bᵀ (HAS_D; else α·X_b X_bᵀ), computing only the tiles on or above the
    diagonal.

    Shapes: x (batch, S, K), d and c (batch, S, S), any strides; d must be symmetric (it is A, which
    this kernel wrote), c is x's dtype (the int16 view of a bf16 C: OUT_BF16).

    Why half the tiles suffice: (X Xᵀ)[r, q] = Σ_k X[r, k] X[q, k] = (X Xᵀ)[q, r], and D[r, q] =
    D[q, r], so C is symmetric: with T = cdiv(S, BLOCK_T) tile rows, the T(T+1)/2 tiles (i, j),
    i ≤ j, determine C. Program p computes tile (i, j) = rows [i·BT, (i+1)·BT) × columns
    [j·BT, (j+1)·BT) as Σ_k X[rows, k] · (X[columns, k])ᵀ (the second operand is a row block of X
    read transposed) and stores it at C[rows, columns] and, mirrored, at C[columns, rows]. On a
    diagonal tile (i = j) element (r, q) is stored where r ≤ q and mirrored where r < q, so C is
    exactly (bitwise) symmetric, which the product A·A = A·Aᵀ of the next launch relies on.
    FLOPs: T(T+1)/2 · BT² · K · 2 ≈ S² · K instead of 2 · S² · K.

    Tile order: p = j(j+1)/2 + i (0 ≤ i ≤ j), so consecutive programs share the column block j of
    X (re-read from L2). j is recovered as ⌊(√(8p+1) − 1)/2⌋ (fp32 square root, then corrected by
    one either way: exact for any p < 2³¹). Grid: (T(T+1)/2, batch).
    """
    p = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    j = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int64)
    j = tl.where((j + 1) * (j + 2) // 2 <= p, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > p, j - 1, j)
    i = p - j * (j + 1) // 2
    rows = i * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = j * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    rmask = rows < S
    cmask = cols < S
    x_base = x_ptr + b * stride_xb
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = ks < K
        lhs_mask = rmask[:, None] & kmask[None, :]
        rhs_mask = kmask[:, None] & cmask[None, :]
        lhs = tl.load(x_base + rows[:, None] * stride_xs + ks[None, :] * stride_xk, mask=lhs_mask, other=0.0)
        rhs = tl.load(x_base + ks[:, None] * stride_xk + cols[None, :] * stride_xs, mask=rhs_mask, other=0.0)
        # lhs = X[rows, k] (BLOCK_T, BLOCK_K), rhs = X[cols, k]ᵀ (BLOCK_K, BLOCK_T)
        if DOT_FP32:
            acc = tl.dot(lhs.to(tl.float32), rhs.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(lhs, rhs, acc)
    valid = rmask[:, None] & cmask[None, :]
    result = acc * alpha
    if HAS_D:
        dv = tl.load(
            d_ptr + b * stride_db + rows[:, None] * stride_dr + cols[None, :] * stride_dc, mask=valid, other=0.0
        )
        result += dv.to(tl.float32) * beta
    c_base = c_ptr + b * stride_cb
    upper = rows[:, None] <= cols[None, :]  # all of an off-diagonal tile (i < j)
    store_float(c_base + rows[:, None] * stride_cr + cols[None, :] * stride_cc, result, valid & upper, OUT_BF16)
    strict = rows[:, None] < cols[None, :]
    store_float(c_base + cols[None, :] * stride_cr + rows[:, None] * stride_cc, result, valid & strict, OUT_BF16)


@triton.jit
def _ns_update_kernel(
    b_ptr, y_ptr, out_ptr, S, L, a_coef,
    stride_bb, stride_bm, stride_bk, stride_yb, stride_ym, stride_yn, stride_ob, stride_om, stride_on,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Out_b = a·Y_b + B_b Y_b: b (batch, S, S), y and out (batch, S, L), any strides (out may be the
    transposed view of a tall result), out in y's dtype (the int16 view of a bf16 out: OUT_BF16).

    One BLOCK_M × BLOCK_N tile of Out per program, K = S looped in BLOCK_K steps into an fp32
    accumulator; the epilogue reads Y's tile (exact in fp32) and stores a·Y + acc rounded once.
    Consecutive programs share Y's column block (the larger operand, read from DRAM about once).
    Grid: (cdiv(S, BLOCK_M) · cdiv(L, BLOCK_N), batch)."""
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(S, BLOCK_M)
    rows = (pid % num_m).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = (pid // num_m).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < S
    cmask = cols < L
    b_base = b_ptr + bat * stride_bb
    y_base = y_ptr + bat * stride_yb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, S, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = ks < S
        lhs_mask = rmask[:, None] & kmask[None, :]
        rhs_mask = kmask[:, None] & cmask[None, :]
        lhs = tl.load(b_base + rows[:, None] * stride_bm + ks[None, :] * stride_bk, mask=lhs_mask, other=0.0)
        rhs = tl.load(y_base + ks[:, None] * stride_ym + cols[None, :] * stride_yn, mask=rhs_mask, other=0.0)
        # lhs = B[rows, k] (BLOCK_M, BLOCK_K), rhs = Y[k, cols] (BLOCK_K, BLOCK_N)
        if DOT_FP32:
            acc = tl.dot(lhs.to(tl.float32), rhs.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(lhs, rhs, acc)
    mask = rmask[:, None] & cmask[None, :]
    y = tl.load(y_base + rows[:, None] * stride_ym + cols[None, :] * stride_yn, mask=mask, other=0.0)
    out = y.to(tl.float32) * a_coef + acc
    store_float(out_ptr + bat * stride_ob + rows[:, None] * stride_om + cols[None, :] * stride_on, out, mask, OUT_BF16)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _precision(dot_fp32: bool) -> str:
    if INTERPRET:
        return "ieee"
    return "tf32x3" if dot_fp32 else "tf32"  # "tf32": only fp32 dots read it


def _normalize(x: torch.Tensor, y: torch.Tensor, y_strides: tuple[int, int], eps: float) -> None:
    """y (batch, s, l) ← x (batch, m, n) / max(‖x_b‖_F, eps) per matrix, x's element (i, j) stored
    at y's strides ``y_strides`` (wide: (l, 1); tall: (1, l), the transposition)."""
    batch, m, n = x.shape
    block_r, block_c = NORM_BLOCK
    slots = parallel_slots(x.device)
    rows_per_chunk, n_chunks = PLAN.norm_chunks(m, slots, batch)
    part = torch.empty((batch, n_chunks), dtype=torch.float32, device=x.device)
    sizes = dict(BLOCK_R=block_r, BLOCK_C=block_c)
    args = (x, part, m, n, rows_per_chunk, n_chunks, *x.stride())
    launch(_ns_sumsq_kernel, lambda meta: (n_chunks, batch), args, sizes, _ELEMENTWISE_CONFIGS, x.device)
    tiles = cdiv(m, block_r) * cdiv(n, block_c)
    args = (x, part, out_view(y), m, n, n_chunks, float(eps), *x.stride(), y.stride(0), *y_strides)
    constexprs = dict(ROUND_BF16=x.dtype == torch.bfloat16, NC=PLAN.max_chunks, **sizes)
    launch(_ns_normalize_kernel, lambda meta: (tiles, batch), args, constexprs, _ELEMENTWISE_CONFIGS, x.device)


def _sym(x: torch.Tensor, c: torch.Tensor, alpha: float, beta: float = 0.0, d: torch.Tensor | None = None) -> None:
    """c (batch, S, S) ← beta·d + alpha·x xᵀ (no d: alpha·x xᵀ), x (batch, S, K); upper tiles only."""
    batch, S, K = x.shape
    dot_fp32 = INTERPRET or x.dtype == torch.float32
    dd = c if d is None else d  # not read without d
    args = (x, dd, out_view(c), S, K, float(alpha), float(beta), *x.stride(), *dd.stride(), *c.stride())
    constexprs = dict(
        HAS_D=d is not None, DOT_FP32=dot_fp32, PRECISION=_precision(dot_fp32), OUT_BF16=c.dtype == torch.bfloat16,
        enable_fp_fusion=True,  # FMA in the epilogue: within the tolerance
    )  # fmt: skip

    def grid(meta):
        return (sym_programs(S, meta["BLOCK_T"]), batch)

    launch(_ns_sym_kernel, grid, args, constexprs, sym_configs(S, batch, dot_fp32, x.device), x.device)


def _update(b: torch.Tensor, y: torch.Tensor, out: torch.Tensor, out_strides: tuple[int, int, int], a: float) -> None:
    """out (batch, S, L), addressed by ``out_strides``, ← a·y + b y; b (batch, S, S), y (batch, S, L)."""
    batch, S, L = y.shape
    dot_fp32 = INTERPRET or y.dtype == torch.float32
    args = (b, y, out_view(out), S, L, float(a), *b.stride(), *y.stride(), *out_strides)
    constexprs = dict(
        DOT_FP32=dot_fp32, PRECISION=_precision(dot_fp32), OUT_BF16=out.dtype == torch.bfloat16, enable_fp_fusion=True
    )

    def grid(meta):
        return (cdiv(S, meta["BLOCK_M"]) * cdiv(L, meta["BLOCK_N"]), batch)

    launch(_ns_update_kernel, grid, args, constexprs, matmul_configs(S, L, 1, dot_fp32, y.device), y.device)


def _newton_schulz(x: torch.Tensor, out: torch.Tensor, coefficients, eps: float) -> None:
    """out (batch, m, n), contiguous ← the iteration on x (batch, m, n), any strides."""
    batch, m, n = x.shape
    tall = m > n
    S, L = (n, m) if tall else (m, n)
    steps = len(coefficients) // 3

    def new(rows: int, cols: int) -> torch.Tensor:  # (batch, rows, cols) with aligned rows
        padded = torch.empty((batch, rows, PLAN.padded_cols(cols)), dtype=x.dtype, device=x.device)
        return padded[..., :cols]

    gram, update = new(S, S), new(S, S)
    # The iterate before step i is ys[i % 2]; step i writes ys[(i + 1) % 2], the last step the output.
    # A wide output with aligned rows is itself an (S, L) buffer: it takes the parity of the last
    # step's result (one buffer fewer).
    if tall:
        ys = [new(S, L), new(S, L)]
        final_strides = (out.stride(0), out.stride(2), out.stride(1))  # Yᵀ written into out
    elif L % PLAN.row_align == 0:
        other = new(S, L)
        ys = [out, other] if steps % 2 == 0 else [other, out]
        final_strides = tuple(out.stride())
    else:
        ys = [new(S, L), new(S, L)]
        final_strides = tuple(out.stride())
    y0 = ys[0]
    _normalize(x, y0, (y0.stride(2), y0.stride(1)) if tall else (y0.stride(1), y0.stride(2)), eps)
    for i in range(steps):
        a, b, c = coefficients[3 * i : 3 * i + 3]
        y = ys[i % 2]
        _sym(y, gram, 1.0)  # A = Y Yᵀ
        _sym(gram, update, c, b, gram)  # B = b·A + c·A·A
        last = i + 1 == steps
        target = out if last else ys[(i + 1) % 2]
        _update(update, y, target, final_strides if last else tuple(target.stride()), a)  # Y ← a·Y + B·Y


def newton_schulz_triton(x: torch.Tensor, coefficients, eps: float) -> torch.Tensor:
    """x (..., m, n) float32/bfloat16, any strides -> (..., m, n), x's dtype, contiguous: Newton–Schulz
    with one (a, b, c) triple per step (``coefficients`` flat, 3·steps values)."""
    check_newton_schulz(x, coefficients, eps)
    m, n = x.shape[-2], x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    batch = x.shape[:-2].numel()
    flat = x.reshape(batch, m, n)  # a view when the leading dimensions merge
    flat_out = out.view(batch, m, n)
    coefficients = [float(v) for v in coefficients]
    for b0 in range(0, batch, MAX_BATCH_PER_LAUNCH):
        b1 = min(batch, b0 + MAX_BATCH_PER_LAUNCH)
        _newton_schulz(flat[b0:b1], flat_out[b0:b1], coefficients, eps)
    return out
