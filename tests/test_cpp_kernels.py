"""The C++ CPU kernels of fastgrad._C: csrc/cpu/quant.cpp, csrc/cpu/project.cpp, csrc/cpu/adam_step.cpp,
csrc/cpu/round_bf16.cpp.

What is specific to them (the backend-agnostic numerics live in test_quant.py / test_project.py):
they are the kernels that serve the CPU; quantizer codes, scales and zeros and dequantized values
are bitwise identical to fastgrad/_reference.py for shapes that exercise their vector tails,
parallel chunks, Philox buffers and GEMM blocks; results do not depend on the thread count; the
projections stay within a rigorous fp32 error bound of the reference; and their own TORCH_CHECKs
name the op and the argument (round_bf16_stochastic's: word for word the Python contract's).
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from kernel_common import bits_of, special_values

from fastgrad import _backends
from fastgrad import _reference as ref
from fastgrad.train.profiling import live_peak, measured_memory_events

if _backends.EXTENSION_ERROR is not None:
    pytest.skip(f"fastgrad._C did not load: {_backends.EXTENSION_ERROR}", allow_module_level=True)
if _backends.triton_interpret():
    pytest.skip("TRITON_INTERPRET=1 replaces the C++ CPU kernels with the Triton bodies", allow_module_level=True)

F = torch.ops.fastgrad
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
QUANT_OPS = ["quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4"]
PROJECT_OPS = ["lowrank_project", "lowrank_project_back", "lowrank_project_quantized", "lowrank_project_back_quantized"]


def _assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    diff = bits_of(actual) != bits_of(expected)
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


@pytest.mark.parametrize("op", QUANT_OPS + PROJECT_OPS + ["round_bf16_stochastic"])
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
    # Offsets: zero; one whose 64-bit counter (position // 4) carries into its high word mid-tensor
    # and mid-vector (position 2**34); one far past it; seeds that use both key words.
    for seed, offset in ((0, 0), (1234, 2**34 - 7), (2**63 - 1, 2**40 + 12345)):
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
    x = special_values()
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
                q = _quantize(bits, x, group, False, True, 77, 2**35 + 1)
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


# round_bf16_stochastic: the C++ kernel's message is byte for byte the Python contract's
# (fastgrad/_ops.py::check_round_bf16, which the fake and reference kernels run): both come from
# check_round_bf16 (csrc/common/checks.h and fastgrad/_ops.py). Offsets at the edge: the counters
# offset + i of the 32 elements must stay below 2**63.
_xr = torch.randn(4, 8)
ROUND_BF16_BAD_ARGS = [
    ("x", (_xr.half(), 0, 0)),
    ("x", (_xr.double(), 0, 0)),
    ("x", (_xr.t(), 0, 0)),
    ("seed", (_xr, -1, 0)),
    ("seed", (_xr, -(2**63), 0)),
    ("offset", (_xr, 0, -5)),
    ("offset", (_xr, 0, 2**63 - 32)),  # offset + numel == 2**63
    ("offset", (_xr, 0, 2**63 - 1)),
]


@pytest.mark.parametrize(
    ("arg", "args"), ROUND_BF16_BAD_ARGS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(ROUND_BF16_BAD_ARGS)]
)
def test_round_bf16_bad_arguments_match_python_contract(arg, args):
    from fastgrad._ops import check_round_bf16

    with pytest.raises(RuntimeError) as python:
        check_round_bf16("round_bf16_stochastic", *args)
    assert str(python.value).startswith(f"fastgrad.round_bf16_stochastic: argument '{arg}' must be ")
    with pytest.raises(RuntimeError) as cpp:
        F.round_bf16_stochastic(*args)  # a CPU tensor: the C++ kernel (test_cpp_kernel_serves_cpu)
    assert str(cpp.value) == str(python.value)


def test_round_bf16_takes_the_last_offset():
    x = torch.randn(4, 8)
    _assert_bitwise(F.round_bf16_stochastic(x, 3, 2**63 - 33), ref.round_bf16_stochastic(x, 3, 2**63 - 33), "bf16")


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


# ---------------------------------------------------------------------------------------------
# The fused projected-Adam step (csrc/cpu/adam_step.cpp)
# ---------------------------------------------------------------------------------------------

ADAM_OPS = ["galore_adam_step_", "galore_adam_step_quantized_", "galore_adam_step_int8_"]
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
N_RTOL = 2.0**-21  # the direction N against the reference's (see the moments test)


@pytest.mark.parametrize("op", ADAM_OPS)
def test_cpp_adam_step_serves_cpu(op):
    assert _backends.SERVED_BY[op]["cpu"] == "cpp"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgrad::{op}", "CPU")


def _moments_of(shape, dtype, gen):
    """Adam moments as after some steps: M of either sign, V ≥ 0 spread over decades."""
    m = torch.randn(shape, generator=gen) * 0.1
    v = torch.rand(shape, generator=gen) * torch.logspace(-6, -1, shape[-1])
    return m.to(dtype), v.to(dtype)


@pytest.mark.parametrize("mom_dtype", FLOATS)
@pytest.mark.parametrize("r_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(8, 13), (37, 1000)])
def test_adam_moments_bitwise_identical_and_direction_within_bound(mom_dtype, r_dtype, side, shape):
    """M and V equal the reference bitwise; N is within 2**-21 relative of it.

    Justification. The kernel evaluates exactly the reference's sequence of fp32 operations,
    m*b1 + r*(1-b1) and v*b2 + (r*r)*(1-b2), each one correctly rounded IEEE fp32 op (no FMA
    contraction: -ffp-contract=off), with the scalars converted to fp32 as torch converts a Python
    float for an fp32 tensor, and stores M, V with torch's round-to-nearest-even conversion: M, V
    are bitwise. N = m / (sqrt(v)*denom_scale + eps) uses the correctly rounded sqrt, whereas
    torch's CPU sqrt (MKL VML, high-accuracy mode, on MKL builds) is only within 1 ulp (2**-23
    relative); the three remaining roundings (·denom_scale, +eps with eps ≥ 0, the division) add at
    most 2**-24 relative each on each side: |ΔN| ≤ (2**-23 + 6·2**-24)·|N| = 2**-21·|N| (to first
    order; eps only damps the effect of sqrt). Shapes: 13 columns (vector tails), 37 000 elements
    (several 256-element chunks and parallel_for ranges).

    N is observed through W ← 0·W + 1·(P N | N P) with P the identity: each output element is one
    product 1·N plus exact zeros, so W holds N exactly (beta = 0 does not read W)."""
    gen = torch.Generator().manual_seed(shape[1] + (side == "left"))
    r = (torch.randn(shape, generator=gen) * torch.logspace(-3, 1, shape[1])).to(r_dtype)
    m0, v0 = _moments_of(shape, mom_dtype, gen)
    denom_scale = 1.0 / (1.0 - BETA2**7) ** 0.5  # a bias correction as the optimizers fold it in
    eye = torch.eye(shape[0] if side == "left" else shape[1], dtype=r_dtype)
    w = torch.randn(shape)
    m, v = m0.clone(), v0.clone()
    F.galore_adam_step_(w, m, v, r, eye, side, BETA1, BETA2, EPS, denom_scale, 1.0, 0.0)
    m_ref, v_ref = m0.clone(), v0.clone()
    n_ref = ref.adam_direction_(m_ref, v_ref, r, BETA1, BETA2, EPS, denom_scale)
    _assert_bitwise(m, m_ref, "exp_avg")
    _assert_bitwise(v, v_ref, "exp_avg_sq")
    torch.testing.assert_close(w, n_ref, rtol=N_RTOL, atol=0)


def _assert_within_step_bound(actual, expected, w0, decay, step, p, n, left, what):
    """actual, expected: decay·W0 + step·(P N | N P) evaluated in fp32 by the kernel and by the
    reference, each rounded once to W's dtype.

    Justification. Each output element is an inner product of length K + 1 in fp32: the term
    decay·w0 and the K terms step·P_ik·N_kj of fp32 operands (W0 and P upcast or decoded bitwise
    like the reference; N the reference's, the kernel's within N_RTOL of it, see the test above,
    which adds N_RTOL·|step|·(|P| |N|)). The reference rounds decay·w0, the GEMM sum and the final
    w + step·up (an FMA or not); the kernel lets MKL apply beta and alpha to C and to its sum.
    Either way every path has at most K + 2 roundings in sequence, so each result is within
    γ_{K+2}·(|decay·w0| + |step|·(|P| |N|)) of the exact value for its N (Higham, eq. 3.5, as in
    _assert_within_matmul_bound) and the two differ by at most twice that. A bf16/fp16 W is then
    rounded once more on each side: v/(1-v)·(|actual| + |expected|).
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    k = p.shape[1] if left else p.shape[0]
    u = 2.0**-24
    gamma = (k + 2) * u / (1 - (k + 2) * u)
    pd, nd = p.double().abs(), n.double().abs()
    up_mag = abs(step) * (pd @ nd if left else nd @ pd)
    mag = abs(decay) * w0.double().abs() + up_mag
    v = OUT_UNIT[actual.dtype]
    act, exp = actual.double(), expected.double()
    bound = 2 * gamma * mag + N_RTOL * up_mag + v / (1 - v) * (act.abs() + exp.abs())
    excess = (act - exp).abs() - bound
    if (excess > 0).any():
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(f"{what}: {act[idx]} vs {exp[idx]} at {idx}, bound {bound[idx]:.3e}")


# (m, n, rank): one block; and ranks so large that P's blocks shrink to 64 rows (left) or columns
# (right) with an 8-long tail, as in PROJECT_SHAPES; plus odd sizes.
ADAM_SHAPES = [*PROJECT_SHAPES, (131, 78, 10)]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mom_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p_kind", ["f32", "bf16", "int4", "int8"])
@pytest.mark.parametrize(("m", "n", "r"), ADAM_SHAPES)
def test_dense_weight_step_within_bound_of_reference(side, w_dtype, mom_dtype, p_kind, m, n, r):
    gen = torch.Generator().manual_seed(m + n + r + len(p_kind))
    left = side == "left"
    low_shape = (r, n) if left else (m, r)
    if p_kind in ("f32", "bf16"):
        r_dtype = torch.float32 if p_kind == "f32" else torch.bfloat16
        p_args = (_dense_p(side, m, n, r, gen).to(r_dtype),)
        p = p_args[0].float()
    else:
        bits = int(p_kind[-1])
        if (m, n, r) == (131, 78, 10):  # quantize a real P: odd INT8 groups (5 of rank 10, 13 of 78)
            pd = _dense_p(side, m, n, r, gen)
            group = {(8, True): 5, (4, True): 10, (8, False): 13, (4, False): 26}[(bits, left)]
            q = ref.quantize(pd, bits, group, False, False, 0, 0)
            q = (ref.pack_int4(q[0]), q[1], q[2]) if bits == 4 else q
        else:
            q = _random_quantized_p(side, m, n, r, bits, gen)
        p_args = (*q, bits)
        p = ref.dequantize_projector(*q, bits, torch.float32)  # the exact fp32 P both sides use
        r_dtype = w_dtype
    rr = torch.randn(low_shape, generator=gen).to(r_dtype)
    w0 = (torch.randn(m, n, generator=gen) * 0.05).to(w_dtype)
    m0, v0 = _moments_of(low_shape, mom_dtype, gen)
    hyper = (BETA1, BETA2, EPS, 1.3, -0.02, 0.995)
    w, mm, vv = w0.clone(), m0.clone(), v0.clone()
    w_ref, mm_ref, vv_ref = w0.clone(), m0.clone(), v0.clone()
    if len(p_args) == 1:
        F.galore_adam_step_(w, mm, vv, rr, *p_args, side, *hyper)
        ref.galore_adam_step_(w_ref, mm_ref, vv_ref, rr, *p_args, side, *hyper)
    else:
        F.galore_adam_step_quantized_(w, mm, vv, rr, *p_args, side, *hyper)
        ref.galore_adam_step_quantized_(w_ref, mm_ref, vv_ref, rr, *p_args, side, *hyper)
    _assert_bitwise(mm, mm_ref, "exp_avg")
    _assert_bitwise(vv, vv_ref, "exp_avg_sq")
    n_dir = ref.adam_direction_(m0.clone(), v0.clone(), rr, *hyper[:4])
    _assert_within_step_bound(w, w_ref, w0.float(), hyper[5], hyper[4], p, n_dir, left, "W")


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_dense_weight_step_any_strides(w_dtype):
    """W may be a strided view (the schema does not ask for a contiguous W): a transposed W is
    updated in place, within the bound of the reference, and nothing outside it is touched."""
    gen = torch.Generator().manual_seed(4)
    m, n, r = 70, 90, 6
    base = torch.randn(n, m + 3, generator=gen).to(w_dtype)
    w = base[:, :m].t()  # (m, n), strides (1, m + 3)
    w0, before = w.clone(), base.clone()
    p = _dense_p("right", m, n, r, gen)
    rr = torch.randn(m, r, generator=gen)
    m0, v0 = _moments_of((m, r), torch.float32, gen)
    hyper = (BETA1, BETA2, EPS, 1.0, -0.1, 0.9)
    F.galore_adam_step_(w, m0.clone(), v0.clone(), rr, p, "right", *hyper)
    w_ref = w0.clone()
    ref.galore_adam_step_(w_ref, m0.clone(), v0.clone(), rr, p, "right", *hyper)
    n_dir = ref.adam_direction_(m0.clone(), v0.clone(), rr, *hyper[:4])
    _assert_within_step_bound(w, w_ref, w0.float(), 0.9, -0.1, p, n_dir, False, "strided W")
    _assert_bitwise(base[:, m:], before[:, m:], "columns outside W")


def _int8_weight(m, n, group, gen):
    w = torch.randn(m, n, generator=gen) * 0.02
    return F.quantize_int8(w, group, False, True, 5, 0)


def _quantized_p(side, m, n, r, bits, group, gen):
    pd = _dense_p(side, m, n, r, gen)
    codes, scales, zeros = ref.quantize(pd, bits, group, False, False, 0, 0)
    return (ref.pack_int4(codes) if bits == 4 else codes), scales, zeros


def _int8_step_pair(m, n, r, group, bits, side, p_group, step, decay, stochastic, seed=17, offset=2**34 - 99):
    """The INT8-weight step by the C++ kernel and by the reference from the same state."""
    gen = torch.Generator().manual_seed(m * n + r + bits)
    left = side == "left"
    low_shape = (r, n) if left else (m, r)
    wq = _int8_weight(m, n, group, gen)
    pq = _quantized_p(side, m, n, r, bits, p_group, gen)
    rr = torch.randn(low_shape, generator=gen)
    m0, v0 = _moments_of(low_shape, torch.float32, gen)
    tail = (bits, side, BETA1, BETA2, EPS, 1.0, step, decay, stochastic, seed, offset)
    got = [t.clone() for t in (*wq, m0, v0)]
    want = [t.clone() for t in (*wq, m0, v0)]
    F.galore_adam_step_int8_(*got, rr, *pq, *tail)
    ref.galore_adam_step_int8_(*want, rr, *pq, *tail)
    return wq, got, want


# (m, n, rank, W group, P bits, side, P group). 1100 x 1024: larger than 2**20 elements, so several
# row blocks of the kernel's walk (2**18 elements: 256 rows, four times, then 76); 300 x 254 with
# groups of 127 (odd, not a power of two); P's groups cut through its 64-wide decode blocks.
INT8_STEP_CASES = [
    (1100, 1024, 16, 128, 8, "left", 8),
    (1100, 1024, 16, 128, 4, "right", 64),
    (300, 254, 10, 127, 8, "right", 127),
    (300, 254, 10, 127, 4, "right", -1),
    (300, 254, 10, 127, 8, "left", 5),
    (300, 254, 10, 127, 4, "left", 10),
]


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize(("m", "n", "r", "group", "bits", "side", "p_group"), INT8_STEP_CASES)
def test_int8_weight_step_matches_reference(stochastic, m, n, r, group, bits, side, p_group):
    """Codes equal the reference's for ≥ 99.9 % of the elements and every dequantized value is
    within one quantization step of it; the moments are bitwise the reference's.

    Justification. Decode, quantizer and counters are bitwise the reference's (the pure-decay test
    below shows it); only the fp32 updated weight may differ, by a few ulps (N's correctly rounded
    sqrt, the GEMM's summation order, and MKL applying beta = decay and alpha = step_scale where the
    reference rounds decay·W and W + step·up separately; see _assert_within_step_bound). A code then differs only where
    u = (x − zero)/scale lies within those ulps of its rounding threshold (RTN: a half-integer; SR:
    the element's uniform ξ), or where a group's min/max moved by an ulp, shifting that group's
    scale/zero by an ulp: rare (observed: at most 4 of 1.1 million) and never more than one code, so the
    dequantized values differ by at most one step plus ulp-level changes of scale and zero (the
    slack of 1e-3 of a step covers |code·Δscale + Δzero| ≤ ~300 ulps of scale)."""
    wq, got, want = _int8_step_pair(m, n, r, group, bits, side, p_group, -1e-3, 0.999, stochastic)
    _assert_bitwise(got[3], want[3], "exp_avg")
    _assert_bitwise(got[4], want[4], "exp_avg_sq")
    assert got[1].shape == want[1].shape and got[2].shape == want[2].shape
    equal = (got[0] == want[0]).double().mean().item()
    assert equal >= 0.999, f"only {equal:.5f} of the codes equal the reference's"
    assert (got[0] != wq[0]).double().mean() > 0.1, "the update should move many codes"
    deq_got = ref.dequantize(got[0], got[1], got[2], torch.float32)
    deq_want = ref.dequantize(want[0], want[1], want[2], torch.float32)
    step = want[1].repeat_interleave(n // want[1].shape[1], dim=1)
    assert ((deq_got - deq_want).abs() <= step * (1 + 1e-3)).all()


@pytest.mark.parametrize(("step", "decay"), [(0.0, 0.97), (0.0, 1.0)])
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize(("m", "n", "r", "group", "bits", "side", "p_group"), INT8_STEP_CASES[:4])
def test_int8_weight_pure_decay_bitwise_identical_to_reference(
    step, decay, stochastic, m, n, r, group, bits, side, p_group
):
    """step_scale = 0: the update is decay·W in one fp32 multiplication on both sides (MKL's
    C = beta·C with alpha = 0; the reference's W·decay + 0·up), so codes, scales and zeros are
    bitwise the reference's: the W decode, the row blocks, the quantizer and its stream positions
    offset + i·n + j (counters whose low word carries mid-tensor) are exactly the reference's."""
    _, got, want = _int8_step_pair(m, n, r, group, bits, side, p_group, step, decay, stochastic)
    for a, b, name in zip(got, want, ("codes", "scales", "zeros", "exp_avg", "exp_avg_sq"), strict=True):
        _assert_bitwise(a, b, name)


def test_adam_steps_with_empty_dimensions():
    """Rank 0 (up = 0): W ← decay·W exactly; m = 0: nothing to update but the moments."""
    gen = torch.Generator().manual_seed(8)
    hyper = (BETA1, BETA2, EPS, 1.0, -0.5, 0.75)
    for w_dtype in (torch.float32, torch.bfloat16):
        w0 = torch.randn(6, 5, generator=gen).to(w_dtype)
        w, w_ref = w0.clone(), w0.clone()
        low = torch.empty(0, 5)
        F.galore_adam_step_(w, low.clone(), low.clone(), low, torch.empty(6, 0), "left", *hyper)
        ref.galore_adam_step_(w_ref, low.clone(), low.clone(), low, torch.empty(6, 0), "left", *hyper)
        _assert_bitwise(w, w_ref, f"rank 0, {w_dtype}")
    q = F.quantize_int8(torch.randn(6, 8, generator=gen), 4, False, False, 0, 0)
    pq = F.quantize_int8(torch.empty(0, 8), 4, False, False, 0, 0)  # right P (0, 8)
    got = [t.clone() for t in q]
    want = [t.clone() for t in q]
    low = torch.empty(6, 0)
    F.galore_adam_step_int8_(*got, low.clone(), low.clone(), low, *pq, 8, "right", *hyper, True, 3, 0)
    ref.galore_adam_step_int8_(*want, low.clone(), low.clone(), low, *pq, 8, "right", *hyper, True, 3, 0)
    for a, b in zip(got, want, strict=True):
        _assert_bitwise(a, b, "INT8 W, rank 0")
    # m = 0: an empty weight; R (0, r) updates nothing
    q0 = F.quantize_int8(torch.empty(0, 8), 4, False, False, 0, 0)
    r0 = torch.empty(0, 3)
    pq = F.quantize_int8(torch.randn(3, 8, generator=gen), 4, False, False, 0, 0)
    F.galore_adam_step_int8_(*q0, r0.clone(), r0.clone(), r0, *pq, 8, "right", *hyper, False, 0, 0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_int8_weight_step_allocates_no_weight_sized_float_tensor(side):
    """A 2048 × 2048 INT8 weight (16 MiB as fp32): the step decodes, updates and re-quantizes
    blocks of whole rows no larger than the reference's (INT8_STEP_BLOCK_ELEMS, 1 MiB of fp32
    scratch); P (INT4) is decoded a block at a time; N is R-sized (0.5 MiB). No allocation exceeds
    one block and the live peak of the op's CPU allocations stays under a fifth of the weight's
    fp32 size (observed: 1.5 MiB left, 2 MiB right)."""
    m = n = 2048
    r = 64
    gen = torch.Generator().manual_seed(2)
    wq = _int8_weight(m, n, 128, gen)
    pq = _quantized_p(side, m, n, r, 4, 8 if side == "left" else 64, gen)
    low = torch.randn((r, n) if side == "left" else (m, r), generator=gen)
    m0, v0 = _moments_of(low.shape, torch.float32, gen)
    args = (*wq, m0, v0, low, *pq, 4, side, BETA1, BETA2, EPS, 1.0, -1e-3, 0.999, True, 1, 0)
    events = measured_memory_events(lambda: F.galore_adam_step_int8_(*args))
    weight_f32 = m * n * 4
    assert max(events) <= ref.INT8_STEP_BLOCK_ELEMS * 4, max(events)
    assert live_peak(events) < 0.2 * weight_f32, live_peak(events)


_m8, _v8 = torch.randn(8, 40), torch.rand(8, 40)
_low = torch.randn(8, 40)
_p_left = torch.randn(48, 8)
_q8_left = F.quantize_int8(torch.randn(48, 8), 8, False, False, 0, 0)
_q8_w = F.quantize_int8(torch.randn(48, 40), 20, False, False, 0, 0)
_q4_odd = F.quantize_int4(torch.randn(48, 8), 8, False, False, 0, 0)
_H = (BETA1, BETA2, EPS, 1.0, -0.01, 1.0)


def _step(w=None, m=_m8, v=_v8, r=_low, p=_p_left, side="left", hyper=_H):
    """A galore_adam_step_ call on fresh copies, with one argument replaced."""
    w = torch.zeros(48, 40) if w is None else w
    return lambda: F.galore_adam_step_(w, m.clone(), v.clone(), r, p, side, *hyper)


def _step8(wq=_q8_w, m=_m8, v=_v8, pq=_q8_left, bits=8, side="left", stochastic=True, seed=0, offset=0):
    """A galore_adam_step_int8_ call on fresh copies, with one argument replaced."""
    tail = (bits, side, *_H, stochastic, seed, offset)
    return lambda: F.galore_adam_step_int8_(*[t.clone() for t in wq], m.clone(), v.clone(), _low, *pq, *tail)


ADAM_BAD_CALLS = [
    ("galore_adam_step_", "side", _step(side="up")),
    ("galore_adam_step_", "p", _step(p=torch.randn(48, 8).double())),
    ("galore_adam_step_", "r", _step(r=torch.randn(8, 40).int(), p=torch.randn(48, 8).int())),
    ("galore_adam_step_", "w", _step(w=torch.zeros(48, 40, dtype=torch.float64))),
    ("galore_adam_step_", "exp_avg", _step(m=_m8.int())),
    ("galore_adam_step_", "exp_avg_sq", _step(v=_v8.t().contiguous().t())),
    ("galore_adam_step_", "exp_avg_sq", _step(v=_v8[:7])),
    ("galore_adam_step_", "beta1", _step(hyper=(-0.1, *_H[1:]))),
    ("galore_adam_step_", "beta2", _step(hyper=(0.9, 1.0, *_H[2:]))),
    ("galore_adam_step_", "eps", _step(hyper=(0.9, 0.999, -1e-8, *_H[3:]))),
    ("galore_adam_step_", "eps", _step(hyper=(0.9, 0.999, float("inf"), *_H[3:]))),
    ("galore_adam_step_", "denom_scale", _step(hyper=(*_H[:3], float("inf"), *_H[4:]))),
    ("galore_adam_step_", "denom_scale", _step(hyper=(*_H[:3], float("nan"), *_H[4:]))),
    (
        "galore_adam_step_quantized_",
        "p_scales",  # odd INT4 groups
        lambda: F.galore_adam_step_quantized_(
            torch.zeros(48, 40),
            _m8.clone(),
            _v8.clone(),
            _low,
            _q4_odd[0],
            torch.ones(48, 8),
            torch.ones(48, 8),
            4,
            "left",
            *_H,
        ),
    ),
    (
        "galore_adam_step_quantized_",
        "p",
        lambda: F.galore_adam_step_quantized_(
            torch.zeros(48, 40), _m8.clone(), _v8.clone(), _low, *_q8_left[:3], 8, "right", *_H
        ),
    ),
    (
        "galore_adam_step_quantized_",
        "exp_avg",
        lambda: F.galore_adam_step_quantized_(
            torch.zeros(48, 40), _m8[:, :20], _v8.clone(), _low, *_q8_left[:3], 8, "left", *_H
        ),
    ),
    ("galore_adam_step_int8_", "w_codes", _step8(wq=(_q8_w[0][None], *_q8_w[1:]))),
    ("galore_adam_step_int8_", "w_codes", _step8(wq=(_q8_w[0].float(), *_q8_w[1:]))),
    ("galore_adam_step_int8_", "w_codes", _step8(wq=(torch.zeros(40, 48, dtype=torch.uint8).t(), *_q8_w[1:]))),
    ("galore_adam_step_int8_", "w_scales", _step8(wq=(_q8_w[0], _q8_w[1].double(), _q8_w[2]))),
    ("galore_adam_step_int8_", "w_scales", _step8(wq=(_q8_w[0], _q8_w[1][:47], _q8_w[2][:47]))),
    ("galore_adam_step_int8_", "w_zeros", _step8(wq=(_q8_w[0], _q8_w[1], _q8_w[2][:, :1]))),
    ("galore_adam_step_int8_", "w_zeros", _step8(wq=(_q8_w[0], _q8_w[1], torch.zeros(2, 48).t()))),
    ("galore_adam_step_int8_", "p_codes", _step8(pq=(_q8_left[0].t(), *_q8_left[1:3]))),
    ("galore_adam_step_int8_", "bits", _step8(bits=3)),
    ("galore_adam_step_int8_", "side", _step8(side="top")),
    ("galore_adam_step_int8_", "exp_avg_sq", _step8(m=_m8.bfloat16())),  # exp_avg_sq fp32: not exp_avg's dtype
    ("galore_adam_step_int8_", "seed", _step8(seed=-1)),
    ("galore_adam_step_int8_", "offset", _step8(offset=2**63 - 100)),
]


@pytest.mark.parametrize(
    ("op", "arg", "call"), ADAM_BAD_CALLS, ids=[f"{op}-{arg}-{i}" for i, (op, arg, _) in enumerate(ADAM_BAD_CALLS)]
)
def test_adam_step_bad_arguments_name_op_and_argument(op, arg, call):
    with pytest.raises(RuntimeError, match=re.escape(f"fastgrad.{op}: argument '{arg}' must be")):
        call()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setup.py adds -fopenmp on Linux only")
def test_kernels_are_built_with_openmp():
    """at::parallel_for is a header template over OpenMP: an extension compiled without -fopenmp
    gets a serial loop (every C++ kernel on one core) while every thread-count test still passes.
    Built with it, the extension imports libgomp's parallel-region entry point."""
    import fastgrad._C

    with open(fastgrad._C.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read(), "fastgrad._C was compiled without -fopenmp: at::parallel_for is serial"


_STREAM_SCRIPT = """
import torch, fastgrad
from fastgrad import _reference as ref
x = torch.randn(7, 300, generator=torch.Generator().manual_seed(3))
for offset in (0, 1, 2, 3, 2**34 - 130, 2**34 - 129):
    for bits in (8, 4):
        got = getattr(torch.ops.fastgrad, f"quantize_int{bits}")(x, 60, False, True, 2**40 + 1, offset)
        want = getattr(ref, f"quantize_int{bits}")(x, 60, False, True, 2**40 + 1, offset)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (bits, offset)
    got = torch.ops.fastgrad.round_bf16_stochastic(x, 9, offset).view(torch.int16)
    assert torch.equal(got, ref.round_bf16_stochastic(x, 9, offset).view(torch.int16)), offset
print("ok")
"""


@pytest.mark.parametrize("no_avx512", ["", "1"])
def test_philox_paths_give_the_reference_stream(no_avx512):
    """The bulk Philox generator (csrc/cpu/philox_cpu.h) picks AVX-512 at run time where the CPU
    has it; FASTGRAD_NO_AVX512=1 forces the AVX2 path. Both give the reference's words (stochastic
    codes and bf16 rounding, offsets aligned to a Philox block or not, counters carrying into their
    high word), in a fresh process since the choice is made once."""
    env = {k: v for k, v in os.environ.items() if k != "FASTGRAD_NO_AVX512"}
    if no_avx512:
        env["FASTGRAD_NO_AVX512"] = no_avx512
    done = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
