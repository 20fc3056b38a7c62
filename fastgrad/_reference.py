"""Pure-torch math of every fastgrad op: the specification, the fallback kernel and the test oracle.

Every compiled kernel (C++ CPU, Triton, CUDA C++) must reproduce these functions: quantizers give
*identical codes* for the same (seed, offset), matmuls agree to a per-dtype relative tolerance.

Conventions shared by all kernels
---------------------------------
Random stream
    Philox4x32-10 (Salmon et al., SC'11; the generator of ``tl.randint4x``), keyed by the 64-bit
    ``seed`` (low word k0, high word k1). Element ``i`` of a tensor (row-major flat index) has the
    stream position ``p = offset + i`` and draws word ``p mod 4`` of the Philox block at counter
    ``p div 4`` (low word c0, high word c1, c2 = c3 = 0): one Philox evaluation feeds four
    consecutive positions. Element ``i``'s word depends only on ``(seed, offset + i)``, so a caller
    that advances ``offset`` by a tensor's size never reuses a word, and a slice quantized at
    ``offset + k`` reproduces the whole tensor's codes from element ``k`` on.
    A uniform in [0, 1) is ``(word >> 8) * 2**-24``: 24 random bits, exactly representable in fp32.

Group-wise affine quantization (bits b in {4, 8}, qmax = 2**b - 1)
    Groups are ``group_size`` consecutive elements of the last dimension (``group_size == -1``:
    the whole row), so ``scales``/``zeros`` have shape ``(*x.shape[:-1], x.shape[-1] // group_size)``
    and are fp32. A value decodes as ``x̂ = code · scale + zero``; ``zero`` is the value of code 0.
      asymmetric: scale = (max − min) / qmax,   zero = min
      symmetric:  scale = absmax / (qmax // 2), zero = −2**(b−1) · scale   (codes 1..qmax, 0 ↦ 2**(b−1))
      scale == 0 (constant or all-zero group) is replaced by 1, so codes stay finite and x̂ exact.
    Because ``zero`` is a real number, not an integer clamped to [0, qmax], the range always
    contains every value of its group: single-sign groups are never clipped.
    Encoding: u = (x − zero) / scale  (fp32, correctly rounded division), then
      round-to-nearest: code = floor(u + 0.5)
      stochastic:       code = floor(u) + [ξ < u − floor(u)],  ξ the element's uniform above
    clamped to [0, qmax] (only fp32 rounding at the range ends can leave it).
    ``P(code = floor(u) + 1) = frac(u)`` to 2**-24, so E[x̂] = x: stochastic rounding is unbiased.
    INT4 codes are packed two per byte along the last dimension: element 2j in the low nibble,
    element 2j+1 in the high nibble.
    Non-finite inputs give unspecified codes: the optimizers' NaN/Inf policy stops such values
    before they reach a quantizer.

fp32 -> bf16 stochastic rounding
    Add a uniform 16-bit integer (the top 16 bits of the element's Philox word) to the fp32 bit
    pattern and truncate the low 16 bits: rounds the magnitude up with probability equal to the
    discarded fraction. NaN stays NaN (quiet, sign kept; its exact bits are unspecified).

Low-rank projection of a gradient G (m×n)
    side "left":  P is m×r, down R = Pᵀ G (r×n),  up  scale · P R (m×n)
    side "right": P is r×n, down R = G Pᵀ (m×r),  up  scale · R P (m×n)
    Accumulation in fp32; the result has G's (or R's) dtype. The ``_add_`` form accumulates the
    up-projection into a full-size W in place, W ← W + scale · up(R), summed in fp32 and rounded
    once to W's dtype, so no m×n temporary is needed (an optimizer's weight update, or Fira's
    residual G − α·up(R) formed inside a copy of G).

Projected Adam step (``galore_adam_step_*``: one GaLore / Q-GaLore weight update)
    From the projected gradient R and Adam's moments M, V (R's shape, updated in place):
      M ← β1·M + (1−β1)·R ;  V ← β2·V + (1−β2)·R⊙R          (fp32 math, stored in M's dtype)
      N = M / (denom_scale·√V + ε)                             (from the fp32 M, V, before storing)
      W ← decay·W + step_scale·up(N, P)                        (fp32, rounded once to W's dtype)
    The optimizer folds its policy into the four scalars: GaLore N = M/(√V + ε) is denom_scale 1,
    torch AdamW's M/(√V/√(1−β2^t) + ε) is denom_scale 1/√(1−β2^t); step_scale = −η_t·α; decay =
    1 − lr·wd (decoupled decay before the update), or decay 1 − lr·wd with step_scale ·(1 − lr·wd)
    (decay of the updated weight, galore-torch). The INT8-weight form decodes W = code·scale + zero,
    applies the same update and re-quantizes the result (asymmetric, W's group size, stochastic
    rounding with the stream position offset + i·n + j): bitwise the quantizer's codes of the
    updated fp32 weight.
"""

from __future__ import annotations

import torch

# Philox4x32-10 constants (Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def philox_block(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The four Philox4x32-10 output words of each 64-bit counter.

    counters: int64 tensor (*). Returns int64 (*, 4), values in [0, 2**32), words 0..3 in order.
    Products of two 32-bit words are formed in int64; they may wrap past 2**63, but the low
    64 bits stay exact, and only those are read back.
    """
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(PHILOX_ROUNDS):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def philox_uint32(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """The random word of each stream position p (int64 tensor, any shape): word p mod 4 of the
    Philox block at counter p div 4. Returns int64 values in [0, 2**32)."""
    words = philox_block(seed, positions >> 2)
    return torch.gather(words, -1, (positions & 3).unsqueeze(-1)).squeeze(-1)


def philox_uniform(seed: int, offset: int, shape: tuple[int, ...], device) -> torch.Tensor:
    """fp32 uniforms in [0, 1), one per element of ``shape`` (row-major positions offset + i)."""
    numel = 1
    for s in shape:
        numel *= s
    positions = torch.arange(numel, dtype=torch.int64, device=device) + offset
    words = philox_uint32(seed, positions)
    return ((words >> 8).to(torch.float32) * 2.0**-24).reshape(shape)


def resolve_group_size(x: torch.Tensor, group_size: int) -> int:
    """-1 means one group per row (the whole last dimension)."""
    return x.shape[-1] if group_size == -1 else group_size


def _group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., n) -> (..., n // g, g) in fp32."""
    g = resolve_group_size(x, group_size)
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // g, g)


def quantize(
    x: torch.Tensor, bits: int, group_size: int, symmetric: bool, stochastic: bool, seed: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise quantization to unpacked uint8 codes (..., n) plus fp32 scales and zeros (..., n/g)."""
    qmax = 2**bits - 1
    xg = _group_view(x, group_size)
    if symmetric:
        absmax = xg.abs().amax(dim=-1)
        # Divide by a tensor, not a Python number: CUDA turns tensor / scalar into a multiplication
        # by the reciprocal, which is not the correctly rounded division the kernels perform.
        scale = absmax / torch.full_like(absmax, qmax // 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = scale * float(-(2 ** (bits - 1)))
    else:
        lo = xg.amin(dim=-1)
        hi = xg.amax(dim=-1)
        scale = (hi - lo) / torch.full_like(hi, qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = lo
    u = (xg - zero.unsqueeze(-1)) / scale.unsqueeze(-1)
    if stochastic:
        xi = philox_uniform(seed, offset, tuple(x.shape), x.device).reshape(u.shape)
        fl = torch.floor(u)
        code = fl + (xi < (u - fl)).to(torch.float32)
    else:
        code = torch.floor(u + 0.5)
    code = code.clamp(0, qmax).to(torch.uint8).reshape(x.shape)
    return code, scale, zero


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unpacked uint8 codes (..., n), fp32 scales/zeros (..., n/g) -> values (..., n) of ``dtype``."""
    n = codes.shape[-1]
    g = n // scales.shape[-1]
    cg = codes.float().reshape(*codes.shape[:-1], n // g, g)
    x = cg * scales.unsqueeze(-1) + zeros.unsqueeze(-1)
    return x.reshape(codes.shape).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] of shape (..., n), n even -> packed (..., n/2): low nibble = even element."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed (..., n/2) uint8 -> codes (..., n)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_int8(x, group_size, symmetric, stochastic, seed, offset):
    return quantize(x, 8, group_size, symmetric, stochastic, seed, offset)


def dequantize_int8(codes, scales, zeros, dtype):
    return dequantize(codes, scales, zeros, dtype)


def quantize_int4(x, group_size, symmetric, stochastic, seed, offset):
    codes, scales, zeros = quantize(x, 4, group_size, symmetric, stochastic, seed, offset)
    return pack_int4(codes), scales, zeros


def dequantize_int4(packed, scales, zeros, dtype):
    return dequantize(unpack_int4(packed), scales, zeros, dtype)


def round_bf16_stochastic(x: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """fp32 (any shape) -> bf16 with stochastic rounding (see the module docstring)."""
    positions = torch.arange(x.numel(), dtype=torch.int64, device=x.device) + offset
    noise = (philox_uint32(seed, positions) >> 16).reshape(x.shape)
    bits = x.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((bits + noise) & 0xFFFF0000).to(torch.uint32).view(torch.int32).view(torch.float32)
    rounded = torch.where(torch.isnan(x), x, rounded)
    return rounded.to(torch.bfloat16)


def dequantize_projector(codes, scales, zeros, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """A quantized projector P (codes packed for bits=4) -> dense P of ``dtype``."""
    if bits == 4:
        return dequantize_int4(codes, scales, zeros, dtype)
    return dequantize_int8(codes, scales, zeros, dtype)


def lowrank_project(g: torch.Tensor, p: torch.Tensor, side: str) -> torch.Tensor:
    """left: Pᵀ G, (m×r)ᵀ(m×n) -> r×n.  right: G Pᵀ, (m×n)(r×n)ᵀ -> m×r.  fp32 accumulation, G's dtype."""
    out = p.float().t() @ g.float() if side == "left" else g.float() @ p.float().t()
    return out.to(g.dtype)


def lowrank_project_back(r: torch.Tensor, p: torch.Tensor, side: str, scale: float) -> torch.Tensor:
    """left: scale·P R, (m×r)(r×n) -> m×n.  right: scale·R P, (m×r)(r×n) -> m×n.  R's dtype."""
    out = p.float() @ r.float() if side == "left" else r.float() @ p.float()
    return (out * scale).to(r.dtype)


def lowrank_project_back_add_(w: torch.Tensor, r: torch.Tensor, p: torch.Tensor, side: str, scale: float) -> None:
    """W (m×n, any float dtype) ← W + scale · up(R, P), summed in fp32, rounded once to W's dtype."""
    up = p.float() @ r.float() if side == "left" else r.float() @ p.float()
    w.copy_(w.float() + up * scale)


def lowrank_project_quantized(g, p_codes, p_scales, p_zeros, bits, side):
    p = dequantize_projector(p_codes, p_scales, p_zeros, bits, torch.float32)
    return lowrank_project(g, p, side)


def lowrank_project_back_quantized(r, p_codes, p_scales, p_zeros, bits, side, scale):
    p = dequantize_projector(p_codes, p_scales, p_zeros, bits, torch.float32)
    return lowrank_project_back(r, p, side, scale)


def lowrank_project_back_quantized_add_(w, r, p_codes, p_scales, p_zeros, bits, side, scale) -> None:
    p = dequantize_projector(p_codes, p_scales, p_zeros, bits, torch.float32)
    lowrank_project_back_add_(w, r, p, side, scale)


def lowrank_grad(dy: torch.Tensor, x: torch.Tensor, p: torch.Tensor, side: str) -> torch.Tensor:
    """R = down(G, P) of the weight gradient G = dyᵀ x (m×n) of y = x Wᵀ, without forming G.

    dy (T×m), x (T×n).  right, P (r×n): R = G Pᵀ = dyᵀ (x Pᵀ) -> m×r.
                        left,  P (m×r): R = Pᵀ G = (dy P)ᵀ x  -> r×n.
    T·(m+n)·r multiply-adds instead of T·m·n (+ m·n·r). The T×r intermediate Z is kept in fp32;
    fp32 accumulation; the result has dy's dtype.
    """
    dy32, x32, p32 = dy.float(), x.float(), p.float()
    if side == "left":
        out = (dy32 @ p32).t() @ x32
    else:
        out = dy32.t() @ (x32 @ p32.t())
    return out.to(dy.dtype)


def lowrank_grad_quantized(dy, x, p_codes, p_scales, p_zeros, bits, side):
    p = dequantize_projector(p_codes, p_scales, p_zeros, bits, torch.float32)
    return lowrank_grad(dy, x, p, side)


def adam_direction_(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, r: torch.Tensor, beta1: float, beta2: float, eps: float,
    denom_scale: float,
) -> torch.Tensor:  # fmt: skip
    """Adam's moments updated in place from R; returns the fp32 direction N (R's shape)."""
    r32 = r.float()
    m = exp_avg.float() * beta1 + r32 * (1.0 - beta1)
    v = exp_avg_sq.float() * beta2 + r32 * r32 * (1.0 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    return m / (v.sqrt() * denom_scale + eps)


def galore_adam_step_(w, exp_avg, exp_avg_sq, r, p, side, beta1, beta2, eps, denom_scale, step_scale, decay) -> None:
    """W (m×n) ← decay·W + step_scale·up(N, P) with N from the updated moments (module docstring)."""
    n = adam_direction_(exp_avg, exp_avg_sq, r, beta1, beta2, eps, denom_scale)
    up = p.float() @ n if side == "left" else n @ p.float()
    w.copy_(w.float().mul_(decay).add_(up, alpha=step_scale))


def galore_adam_step_quantized_(w, exp_avg, exp_avg_sq, r, p_codes, p_scales, p_zeros, bits, side, *hyper) -> None:
    p = dequantize_projector(p_codes, p_scales, p_zeros, bits, torch.float32)
    galore_adam_step_(w, exp_avg, exp_avg_sq, r, p, side, *hyper)


# fp32 elements of the INT8 weight decoded at once: the reference walks the weight a block of rows
# at a time (bitwise the same as the whole matrix: groups lie within rows), so that it needs no
# m×n float copy either when it serves as the fallback kernel.
INT8_STEP_BLOCK_ELEMS = 1 << 18  # 1 MiB of fp32


def galore_adam_step_int8_(
    w_codes, w_scales, w_zeros, exp_avg, exp_avg_sq, r, p_codes, p_scales, p_zeros, bits, side,
    beta1, beta2, eps, denom_scale, step_scale, decay, stochastic, seed, offset,
) -> None:  # fmt: skip
    """The step of an INT8 weight (codes m×n, fp32 scales/zeros m×groups), in place:
    W = dequantize(codes) (fp32); W ← decay·W + step_scale·up(N, P); (codes, scales, zeros) ←
    quantize(W, 8, group, asymmetric, stochastic, seed, offset)."""
    n = adam_direction_(exp_avg, exp_avg_sq, r, beta1, beta2, eps, denom_scale)
    p = dequantize_projector(p_codes, p_scales, p_zeros, bits, torch.float32)
    rows, cols = w_codes.shape
    group = cols // w_scales.shape[1]
    block = max(1, INT8_STEP_BLOCK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, block):
        sl = slice(r0, min(rows, r0 + block))
        w = dequantize(w_codes[sl], w_scales[sl], w_zeros[sl], torch.float32)
        up = p[sl] @ n if side == "left" else n[sl] @ p
        w.mul_(decay).add_(up, alpha=step_scale)
        codes, scales, zeros = quantize(w, 8, group, False, stochastic, seed, offset + r0 * cols)
        w_codes[sl].copy_(codes)
        w_scales[sl].copy_(scales)
        w_zeros[sl].copy_(zeros)


def _newton_schulz_matrix(y: torch.Tensor, coefficients, eps: float) -> torch.Tensor:
    """One matrix (m×n, any strides): the op sequence of ``torch.optim.Muon`` (torch 2.13,
    ``_zeropower_via_newtonschulz``), op for op, so that results are bitwise torch's. The result may
    be a transposed view (m > n); the caller copies it out."""
    transposed = y.size(0) > y.size(1)
    if transposed:
        y = y.T  # work on the wide side: the Gram matrix A is min(m, n)²
    # torch.optim.Muon: y.div_(y.norm().clamp(min=eps)) on a fresh copy; y.norm() is
    # linalg.vector_norm(y, 2) (the Frobenius norm), rounded to y's dtype.
    y = y.div(y.norm().clamp(min=eps))
    for i in range(0, len(coefficients), 3):
        a, b, c = coefficients[i : i + 3]
        gram = y @ y.T  # A = Y Yᵀ
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # B = b·A + c·A·A
        y = torch.addmm(y, update, y, beta=a)  # Y = a·Y + B·Y
    return y.T if transposed else y


def newton_schulz(x: torch.Tensor, coefficients: list[float], eps: float) -> torch.Tensor:
    """Newton–Schulz orthogonalization of every matrix of ``x`` (..., m, n), float32 or bfloat16:

      Y = X (Xᵀ if m > n);  Y ← Y / max(‖Y‖_F, eps)
      for (a, b, c) in coefficients (consecutive triples):  A = Y Yᵀ;  B = b·A + c·A·A;  Y = a·Y + B·Y
      result: Y (transposed back if m > n), x's shape and dtype.

    Every op computes in x's dtype as torch's CPU/GPU kernels do (matmuls accumulate in fp32 and round
    the result to bf16), exactly the op sequence of ``torch.optim.Muon``: a 2-d contiguous x gives
    torch's bits. A non-contiguous x is made contiguous first; the matrices of a batch are
    processed one at a time, each bitwise its own 2-d result.
    """
    m, n = x.shape[-2], x.shape[-1]
    flat = x.contiguous().reshape(x.shape[:-2].numel(), m, n)
    out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
    for i in range(flat.shape[0]):
        out[i].copy_(_newton_schulz_matrix(flat[i], coefficients, eps))
    return out.reshape(x.shape)
