"""Newton–Schulz orthogonalization (``fastgrad::newton_schulz``, Muon's update direction).

The contract is bitwise: every matrix's result is that of torch.optim.Muon's op sequence (torch 2.13,
``_zeropower_via_newtonschulz``), written out in ``_torch_sequence`` below, for the C++ CPU kernel
(csrc/cpu/newton_schulz.cpp) and the reference (fastgrad/_reference.py) alike, fp32 and bf16, square,
wide, tall and batched. Then: per-step coefficients, the singular values the iteration produces,
the public API's coefficient handling, bad-input errors, and that the C++ kernel (not the Python
reference) serves CPU tensors.

The Triton kernel (kernels/newton_schulz.py) is tested at the end of the file, against the
reference within a tolerance (its matmuls sum in another order): on a GPU, and on CPU under
``TRITON_INTERPRET=1`` (``TRITON_INTERPRET=1 python -m pytest -m triton tests/test_newton_schulz.py``,
as CI runs it). The interpreter registers the Triton kernel for CPU in place of the C++ one, so
the C++ kernel's bitwise tests are skipped there.
"""

import sys

import pytest
import torch
from kernel_common import bits_of

from fastgrad import _backends, ops
from fastgrad import _reference as ref

F = torch.ops.fastgrad
EPS = 1e-7
_INTERPRET = _backends.triton_interpret()
# The C++ kernel's (and the reference's) bitwise contract: under TRITON_INTERPRET=1 the Triton kernel
# serves CPU tensors instead, and the C++ kernel cannot be reached.
cpp_only = pytest.mark.skipif(_INTERPRET, reason="under TRITON_INTERPRET=1 the Triton kernel serves CPU tensors")
DTYPES = [torch.float32, torch.bfloat16]
# square, wide, tall (transposed inside), and odd sizes that make MKL/oneDNN block and thread
SHAPES = [(8, 8), (16, 40), (40, 16), (130, 270), (270, 130)]
# Five different (a, b, c): Muon's quintic, the cubic (1.5, -0.5, 0), the convergent quintic
# (15/8, -10/8, 3/8), and two more: a per-step schedule as Polar-Express-style variants use.
PER_STEP = [(3.4445, -4.775, 2.0315), (1.5, -0.5, 0.0), (3.0, -3.2, 1.2), (1.875, -1.25, 0.375), (2.0, -1.5, 0.5)]


def _torch_sequence(x: torch.Tensor, steps, eps: float = EPS) -> torch.Tensor:
    """torch.optim.Muon's op sequence on one matrix, in x's dtype (Muon first converts to bf16 with
    ``grad.bfloat16()``, a fresh tensor for an fp32 grad; here the clone is that fresh tensor)."""
    y = x.clone()
    t = x.size(0) > x.size(1)
    y = y.T if t else y
    y.div_(y.norm().clamp(min=eps))
    for a, b, c in steps:
        g = y @ y.T
        u = torch.addmm(g, g, g, beta=b, alpha=c)
        y = torch.addmm(y, u, y, beta=a)
    return y.T if t else y


def _flat(steps) -> list[float]:
    return [float(v) for t in steps for v in t]


def _assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = bits_of(actual) != bits_of(expected)
    if diff.any():
        idx = tuple(diff.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {diff.numel()} elements differ, first at {idx}: "
            f"{actual[idx].item()} vs {expected[idx].item()}"
        )


def _input(shape, dtype, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _conditioned(m: int, n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """An m×n fp32 matrix with singular values spread log-uniformly over [1/cond, 1]."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    return u @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k)) @ v.T


# ---------------------------------------------------------------------------------------------
# The fast path


@cpp_only
@pytest.mark.skipif(_backends.EXTENSION_ERROR is not None, reason="fastgrad._C is not built")
def test_cpp_kernel_serves_cpu():
    """The C++ kernel serves CPU tensors: registered for the CPU key, and no Python function of the
    reference (or of the default kernel that calls it) runs during a CPU call. Positive control: the
    same tracer sees them when the call is redispatched to the default (CompositeExplicitAutograd)."""
    assert _backends.SERVED_BY["newton_schulz"]["cpu"] == "cpp"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastgrad::newton_schulz", "CPU")
    x = _input((12, 20), torch.bfloat16)
    coefficients = list(ops.NS_COEFFICIENTS) * 2
    watched = {(ref.__file__, "newton_schulz"), (ref.__file__, "_newton_schulz_matrix")}

    def traced(fn):
        seen = set()

        def profile(frame, event, _arg):
            if event == "call":
                seen.add((frame.f_code.co_filename, frame.f_code.co_name))

        sys.setprofile(profile)
        try:
            out = fn()
        finally:
            sys.setprofile(None)
        return out, seen & watched

    fast, seen = traced(lambda: F.newton_schulz(x, coefficients, EPS))
    assert not seen, f"the reference ran for a CPU call: {seen}"
    default = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    slow, seen = traced(lambda: F.newton_schulz.default.redispatch(default, x, coefficients, EPS))
    assert seen == watched  # the tracer does see the reference when it runs
    _assert_bitwise(fast, slow, "C++ vs default kernel")


# ---------------------------------------------------------------------------------------------
# Contract


@pytest.mark.triton
@pytest.mark.parametrize(
    "x",
    [
        torch.randn(16, 40),
        torch.randn(40, 16).bfloat16(),
        torch.randn(3, 12, 20),
        torch.randn(2, 20, 12).bfloat16().transpose(-1, -2),  # non-contiguous: made contiguous
    ],
    ids=["wide-fp32", "tall-bf16", "batch-fp32", "noncontig-bf16"],
)
def test_opcheck(device, x):
    torch.library.opcheck(F.newton_schulz.default, (x.to(device), list(ops.NS_COEFFICIENTS) * 2, EPS))
    torch.library.opcheck(F.newton_schulz.default, (x.to(device), _flat(PER_STEP[:3]), 1e-3))


@pytest.mark.triton
def test_fake_kernel_gives_the_real_shape_dtype_and_layout():
    x = torch.randn(2, 20, 12).bfloat16().transpose(-1, -2)
    real = F.newton_schulz(x, list(ops.NS_COEFFICIENTS), EPS)
    fake = F.newton_schulz(x.to("meta"), list(ops.NS_COEFFICIENTS), EPS)
    assert fake.shape == real.shape == x.shape and fake.dtype == real.dtype == x.dtype
    assert fake.stride() == real.stride() and real.is_contiguous()


# ---------------------------------------------------------------------------------------------
# Bitwise: C++ = reference = torch's op sequence


@cpp_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bitwise_torch_sequence(dtype, shape):
    x = _input(shape, dtype, seed=sum(shape))
    want = _torch_sequence(x, [ops.NS_COEFFICIENTS] * 5)
    _assert_bitwise(ops.newton_schulz(x), want, "op vs torch sequence")
    _assert_bitwise(ref.newton_schulz(x, list(ops.NS_COEFFICIENTS) * 5, EPS), want, "reference vs torch sequence")


@cpp_only
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bitwise_torch_optim_muon(shape):
    """torch.optim.Muon's own function (private in torch 2.13): bf16 out of an fp32 or bf16 grad."""
    zeropower = getattr(getattr(torch.optim, "_muon", None), "_zeropower_via_newtonschulz", None)
    if zeropower is None:
        pytest.skip("torch.optim._muon._zeropower_via_newtonschulz is not in this torch")
    grad = _input(shape, torch.float32, seed=7)
    want = zeropower(grad, ops.NS_COEFFICIENTS, 5, EPS)
    _assert_bitwise(ops.newton_schulz(grad.bfloat16()), want, "op vs torch.optim.Muon (fp32 grad)")
    grad16 = grad.bfloat16()
    want16 = zeropower(grad16.clone(), ops.NS_COEFFICIENTS, 5, EPS)  # it divides a bf16 grad in place
    _assert_bitwise(ops.newton_schulz(grad16), want16, "op vs torch.optim.Muon (bf16 grad)")


@cpp_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 12, 20), (3, 20, 12), (2, 2, 9, 9)], ids=lambda s: "x".join(map(str, s)))
def test_batch_is_each_matrix_on_its_own(dtype, shape):
    x = _input(shape, dtype, seed=3)
    # different scales per matrix: the norm is per matrix, not over the batch
    x = (x.float() * torch.logspace(-2, 2, x[..., 0, 0].numel()).reshape(x.shape[:-2] + (1, 1))).to(dtype)
    out = ops.newton_schulz(x, 3)
    _assert_bitwise(ref.newton_schulz(x, list(ops.NS_COEFFICIENTS) * 3, EPS), out, "batched reference vs C++")
    flat_x, flat_out = x.reshape(-1, *shape[-2:]), out.reshape(-1, *shape[-2:])
    for i in range(flat_x.shape[0]):
        _assert_bitwise(flat_out[i], ops.newton_schulz(flat_x[i], 3), f"batch element {i} vs its 2-d call")
        _assert_bitwise(flat_out[i], _torch_sequence(flat_x[i], [ops.NS_COEFFICIENTS] * 3), f"element {i} vs torch")


@cpp_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 40), (40, 16)], ids=lambda s: "x".join(map(str, s)))
def test_per_step_coefficients(dtype, shape):
    x = _input(shape, dtype, seed=5)
    want = _torch_sequence(x, PER_STEP)
    _assert_bitwise(ops.newton_schulz(x, None, PER_STEP), want, "per-step op vs torch sequence")
    _assert_bitwise(ops.newton_schulz(x, 5, PER_STEP), want, "steps=len(coefficients)")
    _assert_bitwise(ref.newton_schulz(x, _flat(PER_STEP), EPS), want, "per-step reference vs torch sequence")
    # the order of the steps is honoured: reversed is another result
    assert not torch.equal(ops.newton_schulz(x, None, PER_STEP[::-1]), want)


@cpp_only
def test_one_triple_is_repeated_steps_times():
    x = _input((24, 10), torch.float32)
    triple = (2.0, -1.5, 0.5)
    _assert_bitwise(ops.newton_schulz(x, 3, triple), ops.newton_schulz(x, None, [triple] * 3), "3 x one triple")
    _assert_bitwise(ops.newton_schulz(x, 3, triple), F.newton_schulz(x, list(triple) * 3, EPS), "flat list")
    _assert_bitwise(ops.newton_schulz(x), _torch_sequence(x, [ops.NS_COEFFICIENTS] * 5), "defaults: torch's")
    assert ops.NS_COEFFICIENTS == (3.4445, -4.775, 2.0315)


@cpp_only
def test_non_contiguous_input_is_made_contiguous():
    x = _input((2, 30, 14), torch.bfloat16).transpose(-1, -2)  # (2, 14, 30) with swapped strides
    out = ops.newton_schulz(x)
    _assert_bitwise(out, ops.newton_schulz(x.contiguous()), "non-contiguous vs its contiguous copy")
    _assert_bitwise(out, ref.newton_schulz(x, list(ops.NS_COEFFICIENTS) * 5, EPS), "C++ vs reference")


@cpp_only
@pytest.mark.parametrize("shape", [(0, 4, 5), (4, 0), (0, 4), (1, 6), (6, 1)], ids=str)
def test_degenerate_shapes_and_zero_input(shape):
    for dtype in DTYPES:
        x = _input(shape, dtype)
        out = ops.newton_schulz(x)
        assert out.shape == x.shape and out.dtype == dtype
        _assert_bitwise(out, ref.newton_schulz(x, list(ops.NS_COEFFICIENTS) * 5, EPS), f"{shape} {dtype}")
    zero = torch.zeros(7, 5, dtype=torch.bfloat16)
    assert torch.equal(ops.newton_schulz(zero), zero)  # norm 0 -> eps: stays 0, no NaN


# ---------------------------------------------------------------------------------------------
# What the iteration does


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (96, 96)], ids=lambda s: "x".join(map(str, s)))
def test_singular_values_of_the_result(dtype, shape):
    """Muon's quintic, 5 steps, on a matrix of condition number 10: every singular value lands in
    [0.68, 1.14] (measured for these shapes, fp32 and bf16; the bound asserted is [0.6, 1.2], inside
    torch's documented "roughly Uniform(0.5, 1.5)"). The convergent cubic (1.5, -0.5, 0) takes them
    to 1 (measured within 6e-7 in fp32 after 30 steps)."""
    x = _conditioned(*shape, cond=10.0, seed=shape[0])
    sv = torch.linalg.svdvals(ops.newton_schulz(x.to(dtype)).float())
    assert sv.min() > 0.6 and sv.max() < 1.2, (sv.min().item(), sv.max().item())
    # the result keeps the input's singular vectors: U S' Vᵀ with X = U S Vᵀ and S' > 0, so
    # Xᵀ·result = V S S' Vᵀ is symmetric positive semi-definite (n×n)
    prod = x.T @ ops.newton_schulz(x.to(dtype)).float()
    assert torch.linalg.eigvalsh((prod + prod.T) / 2).min() > -1e-2 * prod.norm()
    if dtype == torch.float32:
        sv = torch.linalg.svdvals(ops.newton_schulz(x, 30, (1.5, -0.5, 0.0)))
        assert (sv - 1).abs().max() < 1e-5, (sv - 1).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Errors


def _bad_op_calls():
    x = torch.randn(6, 8)
    C = list(ops.NS_COEFFICIENTS)
    return [
        ("x", lambda d: F.newton_schulz(x.double().to(d), C, EPS)),
        ("x", lambda d: F.newton_schulz(x.half().to(d), C, EPS)),
        ("x", lambda d: F.newton_schulz(x.int().to(d), C, EPS)),
        ("x", lambda d: F.newton_schulz(torch.randn(8, device=d), C, EPS)),  # 1-d
        ("coefficients", lambda d: F.newton_schulz(x.to(d), [], EPS)),
        ("coefficients", lambda d: F.newton_schulz(x.to(d), C + [1.0], EPS)),
        ("coefficients", lambda d: F.newton_schulz(x.to(d), [3.0, float("nan"), 1.0], EPS)),
        ("coefficients", lambda d: F.newton_schulz(x.to(d), [3.0, -1.0, float("inf")], EPS)),
        ("eps", lambda d: F.newton_schulz(x.to(d), C, 0.0)),
        ("eps", lambda d: F.newton_schulz(x.to(d), C, -1e-7)),
        ("eps", lambda d: F.newton_schulz(x.to(d), C, float("nan"))),
    ]


@pytest.mark.triton
@pytest.mark.parametrize(("arg", "call"), _bad_op_calls(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input_names_op_and_argument(device, arg, call):
    """On CPU the C++ kernel's own checks answer (under TRITON_INTERPRET=1 the Triton launcher's, which
    are the Python checks); on meta the Python fake's. Same words, except the number formatting of
    eps (C++ prints 0 where Python prints 0.0)."""
    with pytest.raises(RuntimeError) as info:
        call(device)
    msg = str(info.value)
    assert f"fastgrad.newton_schulz: argument '{arg}' must be" in msg, msg
    if arg != "eps":
        with pytest.raises(RuntimeError) as other:
            call("meta" if device == "cpu" else "cpu")
        assert msg.splitlines()[0] == str(other.value).splitlines()[0]


def test_public_api_errors():
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"argument 'steps' must be None or 5 \(the number of coefficient triples"):
        ops.newton_schulz(x, 3, PER_STEP)
    with pytest.raises(ValueError, match="argument 'steps' must be None or 2"):
        ops.newton_schulz(x, 5, PER_STEP[:2])
    # steps None: 5 with one triple, one per triple with a sequence
    assert torch.equal(ops.newton_schulz(x), ops.newton_schulz(x, 5))
    assert torch.equal(ops.newton_schulz(x, coefficients=PER_STEP[:2]), ops.newton_schulz(x, 2, PER_STEP[:2]))
    with pytest.raises(ValueError, match="argument 'steps' must be a positive int"):
        ops.newton_schulz(x, 0)
    with pytest.raises(ValueError, match="argument 'coefficients' must be one .a, b, c. triple or a non-empty"):
        ops.newton_schulz(x, 5, (1.0, 2.0))
    with pytest.raises(ValueError, match="argument 'coefficients'"):
        ops.newton_schulz(x, None, [(1.0, 2.0, 3.0), (1.0, 2.0)])
    with pytest.raises(ValueError, match="argument 'coefficients'"):
        ops.newton_schulz(x, None, [])


# ---------------------------------------------------------------------------------------------
# The Triton kernel (kernels/newton_schulz.py): on a GPU, and on CPU under TRITON_INTERPRET=1

_TRITON_DEVICES = (["cpu"] if _INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])
triton_kernel = pytest.mark.skipif(
    not _TRITON_DEVICES, reason="the Triton kernel needs a CUDA device, or TRITON_INTERPRET=1 to run on CPU"
)
_DEVICE_PARAMS = _TRITON_DEVICES or ["cpu"]  # (skipped by triton_kernel when empty)
# Relative Frobenius error against the reference. fp32: the matmuls sum in another order (and on a
# GPU in tf32x3, about fp32 accuracy), ~sqrt(K)·2^-24 per product, grown by the iteration's slope
# (a ≈ 3.4 for the small singular values) over five steps; measured ≤ 2e-6 under the interpreter,
# asserted 1e-4. bf16: A, B and Y are rounded to bf16 after every product, as in the reference, and
# another summation order flips some of those roundings (2^-9 relative each): measured 2e-3 to 5e-3
# under the interpreter, asserted 2e-2. The bf16 result must also be as close to the exact iteration
# (in float64) as the reference is: measured equal to 2 digits, asserted within 10% + 1e-3.
TRITON_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# wide, tall, square; none a multiple of the interpreter's 32-wide tiles or 16-deep K steps except
# (20, 64): a wide output whose rows are aligned serves as one of the iterate's buffers.
TRITON_SHAPES = [(16, 40), (40, 16), (33, 33), (70, 100), (100, 70), (20, 64)]


def _triton_call(x: torch.Tensor, coefficients, eps: float = EPS) -> torch.Tensor:
    """torch.ops.fastgrad.newton_schulz after checking that the Triton launcher serves x's device."""
    from fastgrad.kernels import TRITON_KERNELS

    assert _backends.TRITON_ERROR is None, _backends.TRITON_ERROR
    served = _backends.SERVED_BY["newton_schulz"][x.device.type]
    assert served == ("triton-interpret" if x.device.type == "cpu" else "triton"), served
    assert "newton_schulz" in TRITON_KERNELS
    return F.newton_schulz(x, list(coefficients), eps)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double().cpu(), expected.double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def _assert_triton_close(out: torch.Tensor, x: torch.Tensor, coefficients, what: str, eps: float = EPS) -> None:
    """out (the Triton result) against the reference on the same input, and, in bf16, against the
    exact (float64) iteration as closely as the reference itself."""
    x = x.cpu()
    want = ref.newton_schulz(x, list(coefficients), eps)
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous(), what
    err = _rel(out, want)
    assert err <= TRITON_RTOL[x.dtype], f"{what}: relative error {err:.3e} > {TRITON_RTOL[x.dtype]:.0e}"
    if x.dtype == torch.bfloat16:
        exact = ref.newton_schulz(x.double(), list(coefficients), eps)
        mine, theirs = _rel(out, exact), _rel(want, exact)
        assert mine <= 1.1 * theirs + 1e-3, f"{what}: {mine:.3e} from the exact iteration, the reference {theirs:.3e}"


@pytest.mark.triton
@triton_kernel
@pytest.mark.parametrize("device", _DEVICE_PARAMS)
def test_triton_kernels_serve_the_op(device, monkeypatch):
    """Not a silent fallback: the dispatcher calls the Triton launcher, which launches the norm's
    two kernels and three kernels per step (two symmetric products, one update), and the
    reference's Python code never runs."""
    from fastgrad.kernels import newton_schulz as nsk

    launched = []
    real_launch = nsk.launch

    def counting(kernel, *args, **kwargs):
        launched.append(kernel.fn.__name__)
        return real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr(nsk, "launch", counting)
    watched = {(ref.__file__, "newton_schulz"), (ref.__file__, "_newton_schulz_matrix")}
    seen = set()

    def profile(frame, event, _arg):
        if event == "call":
            seen.add((frame.f_code.co_filename, frame.f_code.co_name))

    x = _input((24, 40), torch.float32).to(device)
    sys.setprofile(profile)
    try:
        out = _triton_call(x, _flat(PER_STEP[:3]))
    finally:
        sys.setprofile(None)
    assert not (seen & watched), f"the reference ran: {seen & watched}"
    step = ["_ns_sym_kernel", "_ns_sym_kernel", "_ns_update_kernel"]
    assert launched == ["_ns_sumsq_kernel", "_ns_normalize_kernel", *step * 3], launched
    _assert_triton_close(out, x, _flat(PER_STEP[:3]), "3 steps")


@pytest.mark.triton
@triton_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device", _DEVICE_PARAMS)
def test_triton_matches_reference(device, dtype, shape):
    x = _input(shape, dtype, seed=sum(shape)).to(device)
    coefficients = list(ops.NS_COEFFICIENTS) * 5
    _assert_triton_close(_triton_call(x, coefficients), x, coefficients, f"{shape} {dtype}")


@pytest.mark.triton
@triton_kernel
@pytest.mark.parametrize("steps", [2, 5])  # even and odd: the iterate's buffers swap roles
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(20, 64), (64, 20)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device", _DEVICE_PARAMS)
def test_triton_per_step_coefficients(device, shape, dtype, steps):
    x = _input(shape, dtype, seed=5).to(device)
    coefficients = _flat(PER_STEP[:steps])
    out = _triton_call(x, coefficients)
    _assert_triton_close(out, x, coefficients, f"per-step {steps}")
    # the order of the steps is honoured: the reversed schedule gives the reference's other result
    backwards = _flat(PER_STEP[:steps][::-1])
    assert _rel(ref.newton_schulz(x.cpu(), backwards, EPS), out) > 4 * TRITON_RTOL[dtype]  # (distinguishable)
    _assert_triton_close(_triton_call(x, backwards), x, backwards, f"per-step {steps}, reversed")


@pytest.mark.triton
@triton_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 20, 36), (3, 36, 20), (2, 2, 17, 17)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device", _DEVICE_PARAMS)
def test_triton_batch_is_each_matrix_on_its_own(device, dtype, shape):
    """The norm is per matrix (different scales per matrix), every matrix as the reference's."""
    x = _input(shape, dtype, seed=3)
    x = (x.float() * torch.logspace(-2, 2, x[..., 0, 0].numel()).reshape(x.shape[:-2] + (1, 1))).to(dtype)
    coefficients = _flat(PER_STEP)
    out = _triton_call(x.to(device), coefficients)
    flat_x, flat_out = x.reshape(-1, *shape[-2:]), out.reshape(-1, *shape[-2:])
    for i in range(flat_x.shape[0]):
        _assert_triton_close(flat_out[i].contiguous(), flat_x[i], coefficients, f"batch element {i}")


@pytest.mark.triton
@triton_kernel
@pytest.mark.skipif(not _INTERPRET, reason="the interpreter runs one config: the results are comparable bitwise")
def test_triton_batch_chunks_and_strides(monkeypatch):
    """A batch split over several launches (MAX_BATCH_PER_LAUNCH shrunk to 2: three runs of the
    iteration for 5 matrices) and a non-contiguous x (read through its strides, never copied) give
    the bits of the contiguous batch in one launch."""
    from fastgrad.kernels import newton_schulz as nsk

    x = _input((5, 30, 18), torch.bfloat16, seed=11)
    coefficients = list(ops.NS_COEFFICIENTS) * 2
    whole = _triton_call(x, coefficients)
    monkeypatch.setattr(nsk, "MAX_BATCH_PER_LAUNCH", 2)
    _assert_bitwise(_triton_call(x, coefficients), whole, "batch in chunks of 2")
    monkeypatch.undo()
    strided = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, column-major matrices
    assert not strided.is_contiguous()
    _assert_bitwise(_triton_call(strided, coefficients), whole, "column-major x")
    _assert_triton_close(whole, x, coefficients, "batch")


@pytest.mark.triton
@triton_kernel
@pytest.mark.parametrize("device", _DEVICE_PARAMS)
def test_triton_degenerate_shapes_zero_and_nan(device):
    for shape in [(0, 4, 5), (4, 0), (0, 4), (3, 0, 0)]:
        out = _triton_call(torch.empty(shape, device=device), list(ops.NS_COEFFICIENTS))
        assert out.shape == shape
    for dtype in DTYPES:
        five = list(ops.NS_COEFFICIENTS) * 5
        for shape in [(1, 6), (6, 1), (1, 1)]:
            x = _input(shape, dtype).to(device)
            _assert_triton_close(_triton_call(x, five), x, five, str(shape))
        zero = torch.zeros(7, 5, dtype=dtype, device=device)
        assert torch.equal(_triton_call(zero, list(ops.NS_COEFFICIENTS)), zero)  # norm 0 -> eps: stays 0, no NaN
        x = _input((6, 9), dtype).to(device)
        x[2, 3] = float("nan")  # as the reference: the norm is NaN, so is every element
        assert _triton_call(x, list(ops.NS_COEFFICIENTS)).isnan().all()
        assert ref.newton_schulz(x.cpu(), list(ops.NS_COEFFICIENTS), EPS).isnan().all()


@pytest.mark.triton
@triton_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", _DEVICE_PARAMS)
def test_triton_symmetric_product_computes_the_upper_tiles_only(device, dtype, monkeypatch):
    """C = β·D + α·X Xᵀ from the tiles on or above the diagonal: T(T+1)/2 programs for T tile rows
    (6 for S = 70 in 32-wide tiles, against 9), every element written (C starts as NaN), C exactly
    symmetric, and equal to the product within the tolerance of one rounding to C's dtype."""
    from fastgrad.kernels import newton_schulz as nsk

    grids = []
    real_launch = nsk.launch

    def recording(kernel, grid, args, constexprs, configs, dev):
        config = real_launch(kernel, grid, args, constexprs, configs, dev)
        grids.append((grid(config.kwargs), config.kwargs["BLOCK_T"]))
        return config

    monkeypatch.setattr(nsk, "launch", recording)
    S, K = 70, 45
    x = _input((2, S, K), dtype, seed=1).to(device)
    gram = torch.full((2, S, S), float("nan"), dtype=dtype, device=device)
    nsk._sym(x, gram, 1.0)
    d = gram.clone()
    c = torch.full((2, S, S), float("nan"), dtype=dtype, device=device)
    nsk._sym(d, c, -0.75, 1.5, d)
    for (programs, batch), block_t in grids:
        t = -(-S // block_t)
        assert programs == nsk.sym_programs(S, block_t) == t * (t + 1) // 2 and batch == 2
        if device == "cpu":
            assert (block_t, t, programs) == (32, 3, 6)
    for name, result in (("X Xᵀ", gram), ("β·D + α·D Dᵀ", c)):
        assert not result.isnan().any(), f"{name}: elements not written"
        _assert_bitwise(result, result.transpose(-1, -2), f"{name} symmetric")
    xd = x.double().cpu()
    want = xd @ xd.transpose(-1, -2)
    assert _rel(gram, want) < (1e-6 if dtype == torch.float32 else 4e-3)
    dd = d.double().cpu()
    want = 1.5 * dd - 0.75 * dd @ dd.transpose(-1, -2)
    assert _rel(c, want) < (1e-6 if dtype == torch.float32 else 4e-3)
