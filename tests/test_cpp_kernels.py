"""The C++ CPU kernels of fastgrad._C: csrc/cpu/quant.cpp and csrc/cpu/project.cpp.

What is specific to them (the backend-agnostic numerics live in test_quant.py / test_project.py):
they are the kernels that serve the CPU; quantizer codes, scales and zeros and dequantized values
are bitwise identical to fastgrad/_reference.py for shapes that exercise their vector tails,
parallel chunks, Philox buffers and GEMM blocks; results do not depend on the thread count; the
projections stay within a rigorous fp32 error bound of the reference; and their own TORCH_CHECKs
name the op and the argument.
"""

import re

import pytest
import torch

from fastgrad import _backends
from fastgrad import _reference as ref

if _backends.EXTENSION_ERROR is not None:
    pytest.skip(f"fastgrad._C did not load: {_backends.EXTENSION_ERROR}", allow_module_level=True)
if _backends.triton_interpret():
    pytest.skip("TRITON_INTERPRET=1 replaces the C++ CPU kernels with the Triton bodies", allow_module_level=True)

F = torch.ops.fastgrad
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
QUANT_OPS = ["quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4"]
PROJECT_OPS = ["lowrank_project", "lowrank_project_back", "lowrank_project_quantized", "lowrank_project_back_quantized"]


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so that equality means bitwise identity (-0.0 != 0.0, NaN payloads compared)."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t


def _assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    diff = _bits_of(actual) != _bits_of(expected)
    if diff.any():
        idx = tuple(diff.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(diff.sum())} elements differ, first at {idx}: {actual[idx]} vs {expected[idx]}"
        )


def _quantize(bits, *args):
    return (F.quantize_int8 if bits == 8 else F.quantize_int4)(*args)


def _quantize_ref(bits, *args):
    return (ref.quantize_int8 if bits == 8 else ref.quantize_int4)(*args)


def _dequantize(bits, *args):
    return (F.dequantize_int8 if bits == 8 else F.dequantize_int4)(*args)


def _dequantize_ref(bits, *args):
    return (ref.dequantize_int8 if bits == 8 else ref.dequantize_int4)(*args)


@pytest.mark.parametrize("op", QUANT_OPS + PROJECT_OPS)
def test_cpp_kernel_serves_cpu(op):
    assert _backends.SERVED_BY[op]["cpu"] == "cpp"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgrad::{op}", "CPU")


# (shape, group_size per bits). Sizes are chosen against the kernels' structure: AVX2 vectors of 8,
# 256-element chunks and Philox buffers, groups not aligned to either, 1-D and 3-D, whole rows.
QUANT_CASES = [
    ((300,), {8: -1, 4: -1}),  # 1-D, one group, 300 = 256 + 44
    ((3, 5, 34), {8: 17, 4: 34}),  # 3-D; odd INT8 groups straddle vectors and buffers
    ((7, 270), {8: 27, 4: 30}),
    ((2, 1030), {8: -1, 4: -1}),  # rows of 1030: several chunks plus a tail of 6
    ((9, 40), {8: 1, 4: 2}),  # degenerate groups: every scale is the 0 -> 1 replacement
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize(("shape", "groups"), QUANT_CASES)
def test_quantize_bitwise_identical_to_reference(bits, dtype, symmetric, stochastic, shape, groups):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * torch.logspace(-2, 2, shape[-1])).to(dtype)
    group = groups[bits]
    # Offsets: zero; one that makes the 64-bit counter carry into its high word mid-tensor (and
    # mid-vector); one far past 2**32; seeds that use both key words.
    for seed, offset in ((0, 0), (1234, 2**32 - 7), (2**63 - 1, 2**40 + 12345)):
        got = _quantize(bits, x, group, symmetric, stochastic, seed, offset)
        want = _quantize_ref(bits, x, group, symmetric, stochastic, seed, offset)
        for a, b, name in zip(got, want, ("codes", "scales", "zeros"), strict=True):
            _assert_bitwise(a, b, f"{name} (seed={seed}, offset={offset})")
        for out_dtype in FLOATS:
            _assert_bitwise(
                _dequantize(bits, *got, out_dtype), _dequantize_ref(bits, *want, out_dtype), f"dequantize {out_dtype}"
            )


def test_largest_offset_is_accepted_and_exact():
    x = torch.randn(4, 64)
    offset = 2**63 - 1 - x.numel()
    for bits in (8, 4):
        got = _quantize(bits, x, 32, False, True, 99, offset)
        want = _quantize_ref(bits, x, 32, False, True, 99, offset)
        _assert_bitwise(got[0], want[0], f"INT{bits} codes at the largest offset")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_special_values_match_reference(bits, symmetric):
    nan, inf = float("nan"), float("inf")
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    x[0, 3] = nan
    x[1] = 0.0
    x[2] = 5.0
    x[3, 7] = inf
    x[4, 9] = -inf
    x[5, :2] = torch.tensor([inf, -inf])
    x[6] = 3e38 * torch.sign(x[6])  # max - min overflows to inf
    x[7] *= 1e-40  # subnormal
    x[8] = x[8].abs() + 1  # single-sign groups
    x[9] = -x[9].abs()
    x[10, 5], x[10, 6] = nan, inf
    for dtype in FLOATS:
        xd = x.to(dtype)
        for stochastic in (False, True):
            got = _quantize(bits, xd, 32, symmetric, stochastic, 5, 2**45)
            want = _quantize_ref(bits, xd, 32, symmetric, stochastic, 5, 2**45)
            _assert_bitwise(got[0], want[0], "codes")
            # NaN scales/zeros compare equal here; NaN-free ones bitwise.
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(got[2], want[2], rtol=0, atol=0, equal_nan=True)
            for out_dtype in FLOATS:
                _assert_bitwise(_dequantize(bits, *got, out_dtype), _dequantize_ref(bits, *want, out_dtype), "dequant")


@pytest.mark.parametrize("out_dtype", FLOATS)
def test_dequantize_arbitrary_storage(out_dtype):
    # Any storage the schema accepts decodes like the reference, not only what the quantizer makes:
    # random codes (INT8 codes above 15, both INT4 nibbles), scales and zeros, odd INT8 groups,
    # groups that are not multiples of the 8-wide vectors or 256-element chunks.
    gen = torch.Generator().manual_seed(11)
    for shape, groups in (((3, 2, 30), 3), ((5, 14), 1), ((1001,), 7), ((2, 602), 2)):  # (codes, groups/row)
        codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        scales = torch.randn(*shape[:-1], groups, generator=gen)
        zeros = torch.randn(*shape[:-1], groups, generator=gen)
        _assert_bitwise(
            F.dequantize_int8(codes, scales, zeros, out_dtype),
            ref.dequantize_int8(codes, scales, zeros, out_dtype),
            "int8",
        )
        if (2 * shape[-1] // groups) % 2 == 0:  # INT4 groups must be even
            _assert_bitwise(
                F.dequantize_int4(codes, scales, zeros, out_dtype),
                ref.dequantize_int4(codes, scales, zeros, out_dtype),
                "int4",
            )


def test_results_do_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(5)
    cases = [
        (torch.randn(64, 4096, generator=gen), 8, 128),  # 2048 groups: split across threads
        (torch.randn(3, 40000, generator=gen).bfloat16(), 8, 25),
        (torch.randn(32, 2048, generator=gen).half(), 4, -1),
    ]
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            run = []
            for x, bits, group in cases:
                q = _quantize(bits, x, group, False, True, 77, 2**33 + 1)
                run.append((q, _dequantize(bits, *q, torch.bfloat16)))
            results.append(run)
    finally:
        torch.set_num_threads(previous)
    for (q1, d1), (q2, d2) in zip(*results, strict=True):
        for a, b in zip((*q1, d1), (*q2, d2), strict=True):
            _assert_bitwise(a, b, "1 thread vs 2 threads")


# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------

OUT_UNIT = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _assert_within_matmul_bound(actual, expected, a, b, scale, what):
    """actual, expected: scale * a @ b computed by two fp32-accumulating GEMMs, rounded to their dtype.

    Justification. a (M x K) and b (K x N) are the exact fp32 operands both sides use (bf16/fp16
    inputs upcast exactly, the quantized P decoded bitwise like the reference). Each output element
    is a sum of K fp32 products; whatever the summation order (MKL's blocking, threads, FMA or not),
    |fl(s) - s| <= gamma_K * sum_k |a_ik b_kj| with gamma_K = K u / (1 - K u), u = 2**-24 (Higham,
    "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5); multiplying by `scale` adds
    one rounding, hence gamma_{K+1} * |scale| * (|a| @ |b|). Kernel and reference each obey that
    bound, so they differ by at most twice it. A bf16/fp16 result is then rounded once more on each
    side, relative error <= unit roundoff v (2**-8 / 2**-11), i.e. <= v / (1 - v) of the rounded
    values, plus half the smallest fp16 subnormal in absolute terms. (For random data the observed
    relative Frobenius error is ~sqrt(K) u, far inside this worst-case bound.)
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    k = a.shape[1]
    u = 2.0**-24
    gamma = (k + 1) * u / (1 - (k + 1) * u)
    fp32_bound = 2 * gamma * abs(scale) * (a.double().abs() @ b.double().abs())
    v = OUT_UNIT[actual.dtype]
    act, exp = actual.double(), expected.double()
    bound = fp32_bound + v / (1 - v) * (act.abs() + exp.abs()) + (2.0**-24 if actual.dtype == torch.float16 else 0.0)
    excess = (act - exp).abs() - bound
    if (excess > 0).any():
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(f"{what}: {act[idx]} vs {exp[idx]} at {idx}, bound {bound[idx]:.3e}")


# (m, n, r): one GEMM block; then a rank so large that blocks of P shrink to 64 rows (left) or
# columns (right) of P, so the blocked paths run 4 blocks with an 8-long tail, along m = 200 for
# side "left" and n = 200 for side "right", with tiles that cut through quantization groups.
PROJECT_SHAPES = [(96, 160, 16), (200, 36, 2100), (36, 200, 2100)]


def _dense_p(side, m, n, r, gen):
    return torch.randn((m, r) if side == "left" else (r, n), generator=gen) / r**0.5


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("m", "n", "r"), PROJECT_SHAPES)
def test_dense_projection_within_bound_of_reference(side, dtype, m, n, r):
    gen = torch.Generator().manual_seed(m * n + r)
    g = torch.randn(n, m, generator=gen).to(dtype).t()  # non-contiguous G: the kernels take any strides
    p = _dense_p(side, m, n, r, gen).to(dtype)
    low = F.lowrank_project(g, p, side)
    pa, ga = p.float(), g.float()
    a, b = (pa.t(), ga) if side == "left" else (ga, pa.t())
    _assert_within_matmul_bound(low, ref.lowrank_project(g, p, side), a, b, 1.0, "lowrank_project")
    rr = torch.randn(low.shape, generator=gen).to(dtype)
    back = F.lowrank_project_back(rr, p, side, -0.75)
    a, b = (pa, rr.float()) if side == "left" else (rr.float(), pa)
    _assert_within_matmul_bound(back, ref.lowrank_project_back(rr, p, side, -0.75), a, b, -0.75, "project_back")


def _random_quantized_p(side, m, n, r, bits, gen):
    """Random codes, scales and zeros of a P (groups along its rows), with group sizes that do not
    divide the 64-wide blocks (odd ones for INT8)."""
    rows, cols = (m, r) if side == "left" else (r, n)
    group_size = {
        (2100, 8): 7,
        (2100, 4): 42,
        (16, 8): 8,
        (16, 4): 8,
        (36, 8): 9,
        (36, 4): 18,
        (160, 8): 20,
        (160, 4): 10,
        (200, 8): 25,
        (200, 4): 50,
    }[(cols, bits)]
    ngroups = cols // group_size
    codes = torch.randint(0, 256, (rows, cols * bits // 8), dtype=torch.uint8, generator=gen)
    scales = torch.rand(rows, ngroups, generator=gen) / (16 * r**0.5)
    zeros = -scales * 2 ** (bits - 1) + torch.randn(rows, ngroups, generator=gen) * 1e-3
    return codes, scales, zeros


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("m", "n", "r"), PROJECT_SHAPES)
def test_quantized_projection_within_bound_of_reference(side, bits, dtype, m, n, r):
    gen = torch.Generator().manual_seed(bits * m + r)
    g = torch.randn(m, n, generator=gen).to(dtype)
    q = _random_quantized_p(side, m, n, r, bits, gen)
    p = ref.dequantize_projector(*q, bits, torch.float32)  # the exact fp32 P both sides multiply by
    low = F.lowrank_project_quantized(g, *q, bits, side)
    a, b = (p.t(), g.float()) if side == "left" else (g.float(), p.t())
    _assert_within_matmul_bound(low, ref.lowrank_project_quantized(g, *q, bits, side), a, b, 1.0, "project_q")
    rr = torch.randn(low.shape, generator=gen).to(dtype)
    back = F.lowrank_project_back_quantized(rr, *q, bits, side, 1.5)
    a, b = (p, rr.float()) if side == "left" else (rr.float(), p)
    expected = ref.lowrank_project_back_quantized(rr, *q, bits, side, 1.5)
    _assert_within_matmul_bound(back, expected, a, b, 1.5, "project_back_q")


def test_projections_of_empty_dimensions():
    q = F.quantize_int8(torch.randn(0, 8), 4, False, False, 0, 0)
    out = F.lowrank_project_quantized(torch.randn(0, 5), *q, 8, "left")  # sum over m = 0 terms
    assert out.shape == (8, 5) and torch.equal(out, torch.zeros(8, 5))
    back = F.lowrank_project_back_quantized(torch.randn(8, 5), *q, 8, "left", 2.0)
    assert back.shape == (0, 5)
    assert torch.equal(F.lowrank_project(torch.randn(0, 5), torch.randn(0, 3), "left"), torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------
# Bad arguments reach the C++ TORCH_CHECKs (CPU tensors dispatch straight to the C++ kernels)
# ---------------------------------------------------------------------------------------------

_x = torch.randn(4, 8)
_q8 = F.quantize_int8(torch.randn(6, 4), 2, False, False, 0, 0)  # P: 6 x 4, groups of 2
_q4 = F.quantize_int4(torch.randn(6, 4), 2, False, False, 0, 0)

BAD_CALLS = [
    ("quantize_int8", "x", lambda: F.quantize_int8(torch.ones(4, 8, dtype=torch.int32), 4, False, False, 0, 0)),
    ("quantize_int8", "x", lambda: F.quantize_int8(torch.tensor(1.0), -1, False, False, 0, 0)),
    ("quantize_int8", "x", lambda: F.quantize_int8(_x.t(), 4, False, False, 0, 0)),
    ("quantize_int8", "group_size", lambda: F.quantize_int8(_x, 0, False, False, 0, 0)),
    ("quantize_int8", "group_size", lambda: F.quantize_int8(_x, 3, False, False, 0, 0)),
    ("quantize_int4", "group_size", lambda: F.quantize_int4(torch.randn(2, 9), 9, False, False, 0, 0)),
    ("quantize_int8", "seed", lambda: F.quantize_int8(_x, 4, False, True, -1, 0)),
    ("quantize_int4", "offset", lambda: F.quantize_int4(_x, 4, False, True, 0, -5)),
    ("quantize_int8", "offset", lambda: F.quantize_int8(_x, 4, False, True, 0, 2**63 - 10)),
    ("dequantize_int8", "codes", lambda: F.dequantize_int8(_x, *_q8[1:], torch.float32)),
    ("dequantize_int8", "codes", lambda: F.dequantize_int8(_q8[0].t(), *_q8[1:], torch.float32)),
    ("dequantize_int8", "scales", lambda: F.dequantize_int8(_q8[0], _q8[1].double(), _q8[2], torch.float32)),
    ("dequantize_int4", "scales", lambda: F.dequantize_int4(_q4[0], _q4[1][:5], _q4[2][:5], torch.float32)),
    ("dequantize_int4", "scales", lambda: F.dequantize_int4(_q4[0], torch.ones(6, 3), torch.ones(6, 3), torch.float32)),
    ("dequantize_int4", "scales", lambda: F.dequantize_int4(_q4[0], torch.ones(6, 4), torch.ones(6, 4), torch.float32)),
    ("dequantize_int8", "zeros", lambda: F.dequantize_int8(_q8[0], _q8[1], _q8[2][:, :1], torch.float32)),
    ("dequantize_int8", "dtype", lambda: F.dequantize_int8(*_q8, torch.int32)),
    ("lowrank_project", "side", lambda: F.lowrank_project(_x, torch.randn(4, 2), "up")),
    ("lowrank_project", "g", lambda: F.lowrank_project(torch.randn(2, 4, 8), torch.randn(4, 2), "left")),
    ("lowrank_project", "g", lambda: F.lowrank_project(_x.int(), torch.randn(4, 2).int(), "left")),
    ("lowrank_project", "p", lambda: F.lowrank_project(_x, torch.randn(4), "left")),
    ("lowrank_project", "p", lambda: F.lowrank_project(_x, torch.randn(4, 2).double(), "left")),
    ("lowrank_project", "p", lambda: F.lowrank_project(_x, torch.randn(5, 2), "left")),
    ("lowrank_project", "p", lambda: F.lowrank_project(_x, torch.randn(2, 5), "right")),
    ("lowrank_project_back", "r", lambda: F.lowrank_project_back(torch.randn(2), torch.randn(4, 2), "left", 1.0)),
    ("lowrank_project_back", "p", lambda: F.lowrank_project_back(torch.randn(2, 8), torch.randn(4, 3), "left", 1.0)),
    ("lowrank_project_back", "p", lambda: F.lowrank_project_back(torch.randn(4, 2), torch.randn(3, 8), "right", 1.0)),
    ("lowrank_project_back", "side", lambda: F.lowrank_project_back(torch.randn(2, 8), torch.randn(4, 2), "", 1.0)),
    ("lowrank_project_quantized", "bits", lambda: F.lowrank_project_quantized(torch.randn(6, 3), *_q8, 3, "left")),
    (
        "lowrank_project_quantized",
        "p_codes",
        lambda: F.lowrank_project_quantized(torch.randn(6, 3), _q8[1], *_q8[1:], 8, "left"),
    ),
    (
        "lowrank_project_quantized",
        "p_codes",
        lambda: F.lowrank_project_quantized(torch.randn(6, 3), _q8[0][None], *_q8[1:], 8, "left"),
    ),
    (
        "lowrank_project_quantized",
        "p_scales",
        lambda: F.lowrank_project_quantized(torch.randn(6, 3), _q8[0], _q8[1][:3], _q8[2][:3], 8, "left"),
    ),
    (
        "lowrank_project_quantized",
        "p_zeros",
        lambda: F.lowrank_project_quantized(torch.randn(6, 3), *_q8[:2], _q8[2].t(), 8, "left"),
    ),
    (
        "lowrank_project_quantized",
        "p_scales",  # odd INT4 groups
        lambda: F.lowrank_project_quantized(torch.randn(6, 3), _q4[0], torch.ones(6, 4), torch.ones(6, 4), 4, "left"),
    ),
    ("lowrank_project_quantized", "p", lambda: F.lowrank_project_quantized(torch.randn(5, 3), *_q8, 8, "left")),
    ("lowrank_project_quantized", "side", lambda: F.lowrank_project_quantized(torch.randn(6, 3), *_q8, 8, "both")),
    ("lowrank_project_quantized", "g", lambda: F.lowrank_project_quantized(torch.randn(6, 3).int(), *_q8, 8, "left")),
    (
        "lowrank_project_back_quantized",
        "p",
        lambda: F.lowrank_project_back_quantized(torch.randn(3, 5), *_q4, 4, "left", 1.0),
    ),
    (
        "lowrank_project_back_quantized",
        "r",
        lambda: F.lowrank_project_back_quantized(torch.randn(4), *_q4, 4, "left", 1.0),
    ),
    (
        "lowrank_project_back_quantized",
        "bits",
        lambda: F.lowrank_project_back_quantized(torch.randn(4, 4), *_q4, 5, "left", 1.0),
    ),
]


@pytest.mark.parametrize(
    ("op", "arg", "call"), BAD_CALLS, ids=[f"{op}-{arg}-{i}" for i, (op, arg, _) in enumerate(BAD_CALLS)]
)
def test_bad_arguments_name_op_and_argument(op, arg, call):
    with pytest.raises(RuntimeError, match=re.escape(f"fastgrad.{op}: argument '{arg}' must be")):
        call()


# lowrank_grad: T large enough for tn_matmul_f32 to run several blocks of tokens with bf16/fp16
# inputs (blocks of 2**20 / (k1 + k2) rows), and the blocked quantized/low-precision projection of
# x (right) or dyᵀ (a transposed view, left).
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["dense", "int8", "int4"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_lowrank_grad_within_bound_of_reference(side, kind, dtype):
    tokens, m, n, r = 5000, 200, 36, 16
    gen = torch.Generator().manual_seed(tokens + r)
    dy = torch.randn(tokens, m, generator=gen).to(dtype)
    x = torch.randn(tokens, n, generator=gen).to(dtype)
    if kind == "dense":
        p_args = (_dense_p(side, m, n, r, gen).to(dtype),)
        p = p_args[0].float()
        got = F.lowrank_grad(dy, x, *p_args, side)
    else:
        bits = int(kind[-1])
        q = _random_quantized_p(side, m, n, r, bits, gen) if side == "right" else None
        if q is None:  # left P is m×r: groups of 8 (INT8) / 4 (INT4) along r
            gs = 8 if bits == 8 else 4
            q = ref.quantize(torch.randn(m, r, generator=gen) / r**0.5, bits, gs, False, False, 0, 0)
            q = (ref.pack_int4(q[0]), q[1], q[2]) if bits == 4 else q
        p_args = (*q, bits)
        p = ref.dequantize_projector(*q, bits, torch.float32)
        got = F.lowrank_grad_quantized(dy, x, *p_args, side)
    expected = ref.lowrank_grad(dy, x, p.to(dtype) if kind == "dense" else p, side)
    # Bound: both sides evaluate a product of three fp32 matrices (dyᵀ, x, P) in two GEMMs with
    # the intermediate kept in fp32; each GEMM's sums obey Higham's γ_K bound (K = T, then n or m),
    # so each result is within (γ_T + γ_K2 + γ_T·γ_K2)·(|dy|ᵀ|x||P|) of the exact product and they
    # differ by twice that; then one rounding to dtype each (see _assert_within_matmul_bound).
    dyd, xd, pd = dy.double().abs(), x.double().abs(), p.double().abs()
    chain = (pd.t() @ dyd.t()) @ xd if side == "left" else dyd.t() @ (xd @ pd.t())
    u = 2.0**-24
    g1, g2 = tokens * u / (1 - tokens * u), max(m, n) * u / (1 - max(m, n) * u)
    v = OUT_UNIT[dtype]
    act, exp = got.double(), expected.double()
    assert got.dtype == dtype and got.shape == expected.shape
    bound = 2 * (g1 + g2 + g1 * g2) * chain + v / (1 - v) * (act.abs() + exp.abs()) + 2.0**-24
    assert ((act - exp).abs() <= bound).all(), ((act - exp).abs() - bound).max()
