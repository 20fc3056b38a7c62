"""THE op contract: every ``torch.ops.fastgrad`` schema, its argument checks, its fake kernel and
its ``default`` kernel (the pure-torch math of ``_reference.py``, inherited by every device).

Compiled kernels (``csrc/`` through ``fastgrad._C``, Triton in ``fastgrad.kernels``) only register
faster implementations of these schemas for a device; see ``fastgrad/_backends.py``.

The ``check_*`` functions are the single place where arguments are validated. They read only
shapes, dtypes and devices, so they run unchanged on fake/meta tensors (the fake kernels), before
the reference kernels and before every Triton launch. The C++ kernels repeat the checks that guard
memory safety with ``TORCH_CHECK`` because they can be reached without Python.
"""

from __future__ import annotations

import torch

from fastgrad import _reference as ref

LIB = "fastgrad"
_lib = torch.library.Library(LIB, "DEF")  # noqa: TOR901 (this module owns the namespace)

SCHEMAS: dict[str, str] = {
    "quantize_int8": "(Tensor x, int group_size, bool symmetric, bool stochastic, int seed, int offset)"
    " -> (Tensor codes, Tensor scales, Tensor zeros)",
    "dequantize_int8": "(Tensor codes, Tensor scales, Tensor zeros, ScalarType dtype) -> Tensor",
    "quantize_int4": "(Tensor x, int group_size, bool symmetric, bool stochastic, int seed, int offset)"
    " -> (Tensor codes, Tensor scales, Tensor zeros)",
    "dequantize_int4": "(Tensor codes, Tensor scales, Tensor zeros, ScalarType dtype) -> Tensor",
    "round_bf16_stochastic": "(Tensor x, int seed, int offset) -> Tensor",
    "lowrank_project": "(Tensor g, Tensor p, str side) -> Tensor",
    "lowrank_project_back": "(Tensor r, Tensor p, str side, float scale) -> Tensor",
    "lowrank_project_quantized": "(Tensor g, Tensor p_codes, Tensor p_scales, Tensor p_zeros, int bits, str side)"
    " -> Tensor",
    "lowrank_project_back_quantized": "(Tensor r, Tensor p_codes, Tensor p_scales, Tensor p_zeros, int bits,"
    " str side, float scale) -> Tensor",
    "lowrank_project_back_add_": "(Tensor(a!) w, Tensor r, Tensor p, str side, float scale) -> ()",
    "lowrank_project_back_quantized_add_": "(Tensor(a!) w, Tensor r, Tensor p_codes, Tensor p_scales, Tensor p_zeros,"
    " int bits, str side, float scale) -> ()",
    "lowrank_grad": "(Tensor dy, Tensor x, Tensor p, str side) -> Tensor",
    "lowrank_grad_quantized": "(Tensor dy, Tensor x, Tensor p_codes, Tensor p_scales, Tensor p_zeros, int bits,"
    " str side) -> Tensor",
    "galore_adam_step_": "(Tensor(a!) w, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor r, Tensor p, str side,"
    " float beta1, float beta2, float eps, float denom_scale, float step_scale, float decay) -> ()",
    "galore_adam_step_quantized_": "(Tensor(a!) w, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor r,"
    " Tensor p_codes, Tensor p_scales, Tensor p_zeros, int bits, str side, float beta1, float beta2, float eps,"
    " float denom_scale, float step_scale, float decay) -> ()",
    "galore_adam_step_int8_": "(Tensor(a!) w_codes, Tensor(b!) w_scales, Tensor(c!) w_zeros, Tensor(d!) exp_avg,"
    " Tensor(e!) exp_avg_sq, Tensor r, Tensor p_codes, Tensor p_scales, Tensor p_zeros, int bits, str side,"
    " float beta1, float beta2, float eps, float denom_scale, float step_scale, float decay, bool stochastic,"
    " int seed, int offset) -> ()",
    "newton_schulz": "(Tensor x, float[] coefficients, float eps) -> Tensor",
}

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIDES = ("left", "right")
SEED_RANGE = (0, 2**63 - 1)


def _fail(op: str, arg: str, expected: str, got) -> str:
    return f"fastgrad.{op}: argument '{arg}' must be {expected}, got {got}"


def _check(cond: bool, op: str, arg: str, expected: str, got) -> None:
    torch._check(cond, lambda: _fail(op, arg, expected, got))


def _check_same_device(op: str, ref_name: str, ref_t: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        _check(t.device == ref_t.device, op, name, f"on {ref_name}'s device {ref_t.device}", t.device)


def check_quantize(op: str, x: torch.Tensor, bits: int, group_size: int, seed: int, offset: int) -> int:
    """Validate a quantizer call; return the resolved group size."""
    _check(x.dtype in FLOAT_DTYPES, op, "x", "float32, bfloat16 or float16", x.dtype)
    _check(x.dim() >= 1, op, "x", "a tensor with at least 1 dimension", f"a {x.dim()}-d tensor")
    _check(x.is_contiguous(), op, "x", "contiguous", "a non-contiguous tensor")
    n = x.shape[-1]
    _check(group_size == -1 or group_size > 0, op, "group_size", "positive or -1 (one group per row)", group_size)
    g = n if group_size == -1 else group_size
    _check(g > 0 and n % g == 0, op, "group_size", f"a divisor of the last dimension {n}", group_size)
    if bits == 4:
        _check(g % 2 == 0, op, "group_size", "even for INT4 (two codes per byte)", g)
    _check(SEED_RANGE[0] <= seed <= SEED_RANGE[1], op, "seed", "in [0, 2**63)", seed)
    _check(offset >= 0, op, "offset", "non-negative", offset)
    _check(offset + x.numel() <= 2**63 - 1, op, "offset", "such that offset + numel < 2**63", offset)
    return g


def check_dequantize(
    op: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, dtype, prefix: str = ""
) -> int:
    """Validate quantized storage; return the number of values per row (unpacked). ``prefix``
    names the arguments in messages (``"w_"``: w_codes, w_scales, w_zeros)."""
    _check(codes.dtype == torch.uint8, op, f"{prefix}codes", "uint8", codes.dtype)
    _check(codes.dim() >= 1, op, f"{prefix}codes", "a tensor with at least 1 dimension", f"a {codes.dim()}-d tensor")
    _check(codes.is_contiguous(), op, f"{prefix}codes", "contiguous", "a non-contiguous tensor")
    for name, t in ((f"{prefix}scales", scales), (f"{prefix}zeros", zeros)):
        _check(t.dtype == torch.float32, op, name, "float32", t.dtype)
        _check(t.is_contiguous(), op, name, "contiguous", "a non-contiguous tensor")
    _check_same_device(op, f"{prefix}codes", codes, **{f"{prefix}scales": scales, f"{prefix}zeros": zeros})
    lead = tuple(codes.shape[:-1])
    _check(
        scales.dim() == codes.dim() and tuple(scales.shape[:-1]) == lead,
        op,
        f"{prefix}scales",
        f"of shape (*{lead}, groups)",
        tuple(scales.shape),
    )
    zeros_shape = tuple(zeros.shape)
    _check(zeros_shape == tuple(scales.shape), op, f"{prefix}zeros", f"of shape {tuple(scales.shape)}", zeros_shape)
    n = codes.shape[-1] * (8 // bits)
    groups = scales.shape[-1]
    _check(groups > 0 and n % groups == 0, op, f"{prefix}scales", f"with a last dimension that divides {n}", groups)
    if bits == 4:
        _check((n // groups) % 2 == 0, op, f"{prefix}scales", f"such that groups are even ({n} values per row)", groups)
    _check(dtype in FLOAT_DTYPES, op, "dtype", "float32, bfloat16 or float16", dtype)
    return n


def check_bits(op: str, bits: int) -> None:
    _check(bits in (4, 8), op, "bits", "4 or 8", bits)


def check_side(op: str, side: str) -> None:
    _check(side in SIDES, op, "side", "'left' or 'right'", repr(side))


def projected_shape(side: str, g_shape, p_shape) -> tuple[int, int]:
    """Shape of the projected gradient R for G of g_shape and P of p_shape."""
    return (p_shape[1], g_shape[1]) if side == "left" else (g_shape[0], p_shape[0])


def _check_operand(op: str, side: str, name: str, t: torch.Tensor, two_d: str) -> None:
    """``side``, and the float 2-d operand ``name`` that P multiplies (``two_d``: how the message names it)."""
    check_side(op, side)
    _check(t.dtype in FLOAT_DTYPES, op, name, "float32, bfloat16 or float16", t.dtype)
    _check(t.dim() == 2, op, name, two_d, f"a {t.dim()}-d tensor")


def _check_p_like(op: str, name: str, t: torch.Tensor, p_dtype, p_device) -> None:
    """P on the device of operand ``name``, and of its dtype unless P is quantized (``p_dtype`` None)."""
    _check(p_device == t.device, op, "p", f"on {name}'s device {t.device}", p_device)
    if p_dtype is not None:
        _check(p_dtype == t.dtype, op, "p", f"of {name}'s dtype {t.dtype}", p_dtype)


def check_project(op: str, g: torch.Tensor, p_shape: tuple[int, int], p_dtype, p_device, side: str) -> None:
    """G (m×n) and P (left: m×r, right: r×n)."""
    _check_operand(op, side, "g", g, "a 2-d tensor (m×n)")
    _check_p_like(op, "g", g, p_dtype, p_device)
    m, n = g.shape
    axis, size, expected = (0, m, f"({m}, r)") if side == "left" else (1, n, f"(r, {n})")
    _check(p_shape[axis] == size, op, "p", f"of shape {expected} for side='{side}' with g of shape {(m, n)}", p_shape)


def check_project_back(op: str, r: torch.Tensor, p_shape: tuple[int, int], p_dtype, p_device, side: str) -> None:
    """R (left: r×n, right: m×r) and P (left: m×r, right: r×n)."""
    _check_operand(op, side, "r", r, "a 2-d tensor")
    _check_p_like(op, "r", r, p_dtype, p_device)
    rank = r.shape[0] if side == "left" else r.shape[1]
    axis, expected = (1, f"(m, {rank})") if side == "left" else (0, f"({rank}, n)")
    fits = f"for side='{side}' with r of shape {tuple(r.shape)}"
    _check(p_shape[axis] == rank, op, "p", f"of shape {expected} {fits}", p_shape)


def backproject_shape(side: str, r_shape, p_shape) -> tuple[int, int]:
    return (p_shape[0], r_shape[1]) if side == "left" else (r_shape[0], p_shape[1])


def check_dense_p(op: str, p: torch.Tensor) -> None:
    _check(p.dim() == 2, op, "p", "a 2-d tensor", f"a {p.dim()}-d tensor")


def check_quantized_p(op: str, p_codes, p_scales, p_zeros, bits: int) -> tuple[int, int]:
    """Validate a quantized projector; return P's dense shape."""
    check_bits(op, bits)
    _check(p_codes.dim() == 2, op, "p_codes", "a 2-d tensor", f"a {p_codes.dim()}-d tensor")
    n = check_dequantize(op, p_codes, p_scales, p_zeros, bits, torch.float32)
    return (p_codes.shape[0], n)


# ---------------------------------------------------------------------------------------------
# Registration: schema, fake (checks + output metadata), default kernel (checks + reference math)
# ---------------------------------------------------------------------------------------------

for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def _register(name: str, check, out=None, nargs: int | None = None) -> None:
    """Register the fake and the default kernel of ``name``. Both first run ``check`` on the op's
    first ``nargs`` arguments (all of them by default). The fake then returns ``out(args, checked)``,
    ``checked`` being what the check returned (``out`` None: an in-place op, which returns nothing);
    the default returns the reference math, ``_reference.<name>(*args)``."""
    impl = getattr(ref, name)

    def fake(*args):
        checked = check(*args[:nargs])
        return None if out is None else out(args, checked)

    def default(*args):
        check(*args[:nargs])
        return impl(*args)

    torch.library.register_fake(f"{LIB}::{name}", fake, lib=_lib)
    _lib.impl(name, default, "CompositeExplicitAutograd")


def _like_first(args, shape):
    """The output of a projection op: a tensor of the checked shape, of its first operand's dtype and device."""
    return args[0].new_empty(shape)


def _register_quantizers(bits: int) -> None:
    quantize, dequantize = f"quantize_int{bits}", f"dequantize_int{bits}"

    def check_q(x, group_size, symmetric, stochastic, seed, offset):
        return check_quantize(quantize, x, bits, group_size, seed, offset)

    def quantize_out(args, g):
        x = args[0]
        n, lead = x.shape[-1], tuple(x.shape[:-1])
        scales = x.new_empty((*lead, n // g), dtype=torch.float32)
        return x.new_empty((*lead, n * bits // 8), dtype=torch.uint8), scales, torch.empty_like(scales)

    def check_dq(codes, scales, zeros, dtype):
        return check_dequantize(dequantize, codes, scales, zeros, bits, dtype)

    def dequantize_out(args, n):
        codes, dtype = args[0], args[3]
        return codes.new_empty((*codes.shape[:-1], n), dtype=dtype)

    _register(quantize, check_q, quantize_out)
    _register(dequantize, check_dq, dequantize_out)


for _bits in (8, 4):
    _register_quantizers(_bits)


def check_round_bf16(op: str, x: torch.Tensor, seed: int, offset: int) -> None:
    _check(x.dtype == torch.float32, op, "x", "float32", x.dtype)
    _check(x.is_contiguous(), op, "x", "contiguous", "a non-contiguous tensor")
    _check(SEED_RANGE[0] <= seed <= SEED_RANGE[1], op, "seed", "in [0, 2**63)", seed)
    _check(offset >= 0, op, "offset", "non-negative", offset)
    _check(offset + x.numel() <= 2**63 - 1, op, "offset", "such that offset + numel < 2**63", offset)


_register(
    "round_bf16_stochastic",
    lambda x, seed, offset: check_round_bf16("round_bf16_stochastic", x, seed, offset),
    lambda args, _: torch.empty_like(args[0], dtype=torch.bfloat16),
)


def check_lowrank_project(g, p, side) -> tuple[int, int]:
    op = "lowrank_project"
    check_dense_p(op, p)
    check_project(op, g, tuple(p.shape), p.dtype, p.device, side)
    return projected_shape(side, g.shape, p.shape)


_register("lowrank_project", check_lowrank_project, _like_first)


def check_lowrank_project_back(r, p, side) -> tuple[int, int]:
    op = "lowrank_project_back"
    check_dense_p(op, p)
    check_project_back(op, r, tuple(p.shape), p.dtype, p.device, side)
    return backproject_shape(side, r.shape, p.shape)


_register("lowrank_project_back", check_lowrank_project_back, _like_first, nargs=3)


def check_lowrank_project_quantized(g, p_codes, p_scales, p_zeros, bits, side) -> tuple[int, int]:
    op = "lowrank_project_quantized"
    p_shape = check_quantized_p(op, p_codes, p_scales, p_zeros, bits)
    check_project(op, g, p_shape, None, p_codes.device, side)
    return projected_shape(side, g.shape, p_shape)


_register("lowrank_project_quantized", check_lowrank_project_quantized, _like_first)


def check_lowrank_project_back_quantized(r, p_codes, p_scales, p_zeros, bits, side) -> tuple[int, int]:
    op = "lowrank_project_back_quantized"
    p_shape = check_quantized_p(op, p_codes, p_scales, p_zeros, bits)
    check_project_back(op, r, p_shape, None, p_codes.device, side)
    return backproject_shape(side, r.shape, p_shape)


_register("lowrank_project_back_quantized", check_lowrank_project_back_quantized, _like_first, nargs=6)


def check_accumulator(op: str, w: torch.Tensor, r: torch.Tensor, out_shape: tuple[int, int]) -> None:
    """W, the in-place target of an ``_add_`` op: a float tensor of the up-projection's shape."""
    _check(w.dtype in FLOAT_DTYPES, op, "w", "float32, bfloat16 or float16", w.dtype)
    _check(tuple(w.shape) == tuple(out_shape), op, "w", f"of shape {tuple(out_shape)}", tuple(w.shape))
    _check(w.device == r.device, op, "w", f"on r's device {r.device}", w.device)


def check_lowrank_project_back_add(w, r, p, side) -> None:
    op = "lowrank_project_back_add_"
    check_dense_p(op, p)
    check_project_back(op, r, tuple(p.shape), p.dtype, p.device, side)
    check_accumulator(op, w, r, backproject_shape(side, r.shape, p.shape))


_register("lowrank_project_back_add_", check_lowrank_project_back_add, nargs=4)


def check_lowrank_project_back_quantized_add(w, r, p_codes, p_scales, p_zeros, bits, side) -> None:
    op = "lowrank_project_back_quantized_add_"
    p_shape = check_quantized_p(op, p_codes, p_scales, p_zeros, bits)
    check_project_back(op, r, p_shape, None, p_codes.device, side)
    check_accumulator(op, w, r, backproject_shape(side, r.shape, p_shape))


_register("lowrank_project_back_quantized_add_", check_lowrank_project_back_quantized_add, nargs=7)


def check_grad_operands(op: str, dy: torch.Tensor, x: torch.Tensor, p_shape, p_dtype, p_device, side: str) -> None:
    """dy (T×m) and x (T×n), the output gradient and the input of y = x Wᵀ (W m×n), and P
    (left: m×r, right: r×n)."""
    _check_operand(op, side, "dy", dy, "a 2-d tensor (tokens×m)")
    _check(x.dim() == 2, op, "x", "a 2-d tensor (tokens×n)", f"a {x.dim()}-d tensor")
    _check(x.dtype == dy.dtype, op, "x", f"of dy's dtype {dy.dtype}", x.dtype)
    _check_same_device(op, "dy", dy, x=x)
    _check(x.shape[0] == dy.shape[0], op, "x", f"with dy's {dy.shape[0]} rows (tokens)", tuple(x.shape))
    _check_p_like(op, "dy", dy, p_dtype, p_device)
    m, n = dy.shape[1], x.shape[1]
    if side == "left":
        axis, size, expected, operand = 0, m, f"({m}, r)", f"dy of shape {tuple(dy.shape)}"
    else:
        axis, size, expected, operand = 1, n, f"(r, {n})", f"x of shape {tuple(x.shape)}"
    _check(p_shape[axis] == size, op, "p", f"of shape {expected} for side='{side}' with {operand}", p_shape)


def grad_shape(side: str, m: int, n: int, p_shape) -> tuple[int, int]:
    """Shape of R = down(G) for the m×n weight gradient G."""
    return (p_shape[1], n) if side == "left" else (m, p_shape[0])


def check_lowrank_grad(dy, x, p, side) -> tuple[int, int]:
    op = "lowrank_grad"
    check_dense_p(op, p)
    check_grad_operands(op, dy, x, tuple(p.shape), p.dtype, p.device, side)
    return grad_shape(side, dy.shape[1], x.shape[1], p.shape)


_register("lowrank_grad", check_lowrank_grad, _like_first)


def check_lowrank_grad_quantized(dy, x, p_codes, p_scales, p_zeros, bits, side) -> tuple[int, int]:
    op = "lowrank_grad_quantized"
    p_shape = check_quantized_p(op, p_codes, p_scales, p_zeros, bits)
    check_grad_operands(op, dy, x, p_shape, None, p_codes.device, side)
    return grad_shape(side, dy.shape[1], x.shape[1], p_shape)


_register("lowrank_grad_quantized", check_lowrank_grad_quantized, _like_first)


# ---------------------------------------------------------------------------------------------
# The fused projected-Adam step (GaLore / Q-GaLore), see _reference.galore_adam_step_


def check_adam_moments(op: str, r: torch.Tensor, exp_avg, exp_avg_sq, beta1, beta2, eps, denom_scale) -> None:
    """R (the projected gradient) and Adam's moments M, V of R's shape, updated in place."""
    _check(r.is_contiguous(), op, "r", "contiguous", "a non-contiguous tensor")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check(t.dtype in FLOAT_DTYPES, op, name, "float32, bfloat16 or float16", t.dtype)
        _check(tuple(t.shape) == tuple(r.shape), op, name, f"of r's shape {tuple(r.shape)}", tuple(t.shape))
        _check(t.is_contiguous(), op, name, "contiguous", "a non-contiguous tensor")
    _check(exp_avg_sq.dtype == exp_avg.dtype, op, "exp_avg_sq", f"of exp_avg's dtype {exp_avg.dtype}", exp_avg_sq.dtype)
    _check_same_device(op, "r", r, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    _check(0.0 <= beta1 < 1.0, op, "beta1", "in [0, 1)", beta1)
    _check(0.0 <= beta2 < 1.0, op, "beta2", "in [0, 1)", beta2)
    _check(0.0 <= eps < float("inf"), op, "eps", "finite and >= 0", eps)
    _check(0.0 < denom_scale < float("inf"), op, "denom_scale", "finite and > 0", denom_scale)


def check_galore_adam_step(w, exp_avg, exp_avg_sq, r, p, side, beta1, beta2, eps, denom_scale) -> None:
    op = "galore_adam_step_"
    check_dense_p(op, p)
    check_project_back(op, r, tuple(p.shape), p.dtype, p.device, side)
    check_accumulator(op, w, r, backproject_shape(side, r.shape, p.shape))
    check_adam_moments(op, r, exp_avg, exp_avg_sq, beta1, beta2, eps, denom_scale)


_register("galore_adam_step_", check_galore_adam_step, nargs=10)


def check_galore_adam_step_quantized(
    w, exp_avg, exp_avg_sq, r, p_codes, p_scales, p_zeros, bits, side, beta1, beta2, eps, denom_scale
) -> None:
    op = "galore_adam_step_quantized_"
    p_shape = check_quantized_p(op, p_codes, p_scales, p_zeros, bits)
    check_project_back(op, r, p_shape, None, p_codes.device, side)
    check_accumulator(op, w, r, backproject_shape(side, r.shape, p_shape))
    check_adam_moments(op, r, exp_avg, exp_avg_sq, beta1, beta2, eps, denom_scale)


_register("galore_adam_step_quantized_", check_galore_adam_step_quantized, nargs=13)


def check_galore_adam_step_int8(
    w_codes, w_scales, w_zeros, exp_avg, exp_avg_sq, r, p_codes, p_scales, p_zeros, bits, side,
    beta1, beta2, eps, denom_scale, seed, offset,
) -> int:  # fmt: skip
    """Also the INT8 weight (codes m×n uint8, fp32 scales/zeros m×groups) and the SR stream.
    Returns the weight's group size."""
    op = "galore_adam_step_int8_"
    p_shape = check_quantized_p(op, p_codes, p_scales, p_zeros, bits)
    check_project_back(op, r, p_shape, None, p_codes.device, side)
    _check(w_codes.dim() == 2, op, "w_codes", "a 2-d tensor (m×n)", f"a {w_codes.dim()}-d tensor")
    n = check_dequantize(op, w_codes, w_scales, w_zeros, 8, torch.float32, prefix="w_")
    out_shape = backproject_shape(side, r.shape, p_shape)
    _check(
        (w_codes.shape[0], n) == tuple(out_shape), op, "w_codes", f"of shape {tuple(out_shape)}", tuple(w_codes.shape)
    )
    _check(w_codes.device == r.device, op, "w_codes", f"on r's device {r.device}", w_codes.device)
    check_adam_moments(op, r, exp_avg, exp_avg_sq, beta1, beta2, eps, denom_scale)
    _check(SEED_RANGE[0] <= seed <= SEED_RANGE[1], op, "seed", "in [0, 2**63)", seed)
    _check(offset >= 0, op, "offset", "non-negative", offset)
    _check(offset + w_codes.numel() <= 2**63 - 1, op, "offset", "such that offset + numel < 2**63", offset)
    return n // w_scales.shape[1]


def _adam_step_int8_checks(*args) -> int:
    (w_codes, w_scales, w_zeros, exp_avg, exp_avg_sq, r, p_codes, p_scales, p_zeros, bits, side,
     beta1, beta2, eps, denom_scale, _step_scale, _decay, _stochastic, seed, offset) = args  # fmt: skip
    return check_galore_adam_step_int8(
        w_codes, w_scales, w_zeros, exp_avg, exp_avg_sq, r, p_codes, p_scales, p_zeros, bits, side,
        beta1, beta2, eps, denom_scale, seed, offset,
    )  # fmt: skip


_register("galore_adam_step_int8_", _adam_step_int8_checks)


# ---------------------------------------------------------------------------------------------
# Newton–Schulz orthogonalization (Muon), see _reference.newton_schulz

NEWTON_SCHULZ_DTYPES = (torch.float32, torch.bfloat16)


def check_newton_schulz(x: torch.Tensor, coefficients, eps: float) -> None:
    """x (..., m, n) float32/bfloat16 (any strides: a non-contiguous x is made contiguous); the
    coefficients a non-empty flat list of (a, b, c) triples, one per step, finite; eps finite > 0."""
    op = "newton_schulz"
    _check(x.dtype in NEWTON_SCHULZ_DTYPES, op, "x", "float32 or bfloat16", x.dtype)
    _check(x.dim() >= 2, op, "x", "a tensor with at least 2 dimensions (..., m, n)", f"a {x.dim()}-d tensor")
    k = len(coefficients)
    _check(
        k > 0 and k % 3 == 0,
        op,
        "coefficients",
        "a non-empty list of (a, b, c) triples (length a multiple of 3)",
        f"{k} values",
    )
    bad = [c for c in coefficients if not -float("inf") < c < float("inf")]
    _check(not bad, op, "coefficients", "finite", bad[:1])
    _check(0.0 < eps < float("inf"), op, "eps", "finite and > 0", eps)


_register("newton_schulz", check_newton_schulz, lambda args, _: args[0].new_empty(args[0].shape))  # contiguous
