"""The Triton kernels (``fastgrad.kernels``) against ``fastgrad/_reference.py``.

Run on a CPU-only machine with ``TRITON_INTERPRET=1 python -m pytest tests/test_triton_kernels.py``
(the interpreter runs every ``@triton.jit`` body on CPU tensors), and on a GPU as is. Every test goes
through ``torch.ops.fastgrad`` and first checks that the Triton launcher is the implementation the
dispatcher serves, so a passing test proves the Triton kernel ran.

Quantizers must give codes, scales and zeros bitwise identical to the reference (same Philox stream,
correctly rounded division). Matmuls are checked against Higham's componentwise bound (below).
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

import fastgrad  # noqa: E402,F401  (registers the kernels)
from fastgrad import _backends  # noqa: E402
from fastgrad import _reference as ref  # noqa: E402

_INTERPRET = _backends.triton_interpret()
_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not (_INTERPRET or _CUDA),
        reason="Triton kernels need a CUDA device, or TRITON_INTERPRET=1 to run them on CPU",
    ),
]

DEVICES = (["cpu"] if _INTERPRET else []) + (["cuda"] if _CUDA else [])
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def run_op(op: str, *args):
    """Call ``torch.ops.fastgrad.<op>`` after checking that the Triton launcher serves it."""
    from fastgrad.kernels import TRITON_KERNELS

    assert _backends.TRITON_ERROR is None, _backends.TRITON_ERROR
    device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    served = _backends.SERVED_BY[op][device]
    if device == "cpu":
        assert served == "triton-interpret", f"{op} on cpu is served by {served}"
    elif served == "cuda" and _backends._cuda_backend_choice(op) == "cuda":
        # A CUDA C++ kernel was chosen for this op (CUDA_PREFERENCE / FASTGRAD_CUDA_BACKEND):
        # test the Triton launcher directly.
        return TRITON_KERNELS[op](*args)
    else:
        assert served == "triton", f"{op} on cuda is served by {served}"
    return getattr(torch.ops.fastgrad, op)(*args)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equality, with a report of where and by how much the tensors differ."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.shape, expected.shape)
    if actual.is_floating_point():
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[actual.element_size()]
        diff = actual.view(view) != expected.view(view)
    else:
        diff = actual != expected
    if diff.any():
        idx = diff.nonzero()[:5].tolist()
        pairs = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{what}: {int(diff.sum())}/{diff.numel()} differ; first (index, got, want): {pairs}")


# ---------------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------------

# (bits, shape, group_size, MAX_BLOCK, TARGET_TILE, expected path). The tiling knobs are shrunk
# in some cases so that small shapes reach every path: "fused" (a group is one chunk, loaded once),
# "chunked" (groups larger than BLOCK, looped in chunks, one program per group tile), "split"
# (few large groups: each group's chunks spread over programs; partial stats then encode).
QUANT_CASES = [
    (8, (6, 64), 16, None, None, "fused"),
    (8, (5, 300), -1, None, None, "fused"),  # per row, 300 is not a power of two
    (8, (3, 4, 33), 3, None, None, "fused"),  # odd group, 3-D
    (8, (999,), -1, None, None, "fused"),  # 1-D, odd
    (8, (8, 40), -1, 16, 16, "chunked"),  # group 40 > BLOCK 16, 40 not a multiple of 16
    (8, (3, 100), 50, 16, None, "split"),
    (8, (2, 1000), -1, 64, None, "split"),
    (4, (6, 64), 16, None, None, "fused"),
    (4, (5, 300), -1, None, None, "fused"),
    (4, (3, 4, 30), 10, None, None, "fused"),
    (4, (128,), 2, None, None, "fused"),  # smallest INT4 group, 1-D
    (4, (2, 4, 44), -1, 16, 16, "chunked"),
    (4, (3, 100), 50, 16, None, "split"),
]
SEED, OFFSET = 1234, 77


def _quant_ids(case):
    bits, shape, g, *_rest, path = case
    return f"int{bits}-{'x'.join(map(str, shape))}-g{g}-{path}"


@pytest.fixture
def tiling(monkeypatch):
    """Set the quantization tiling knobs for one test (restored afterwards)."""
    from fastgrad.kernels import quant

    def set_(max_block, target_tile):
        if max_block is not None:
            monkeypatch.setattr(quant, "MAX_BLOCK", max_block)
        if target_tile is not None:
            monkeypatch.setattr(quant, "TARGET_TILE", target_tile)
        return quant

    return set_


def _plan_path(quant, shape, group_size, device) -> str:
    g = shape[-1] if group_size == -1 else group_size
    numel = 1
    for s in shape:
        numel *= s
    plan = quant._Plan(numel // g, g, torch.device(device))
    if plan.splits > 1:
        return "split"
    return "fused" if plan.num_chunks == 1 else "chunked"


def _check_quantize(bits, x, group_size, symmetric, stochastic, seed, offset):
    op = f"quantize_int{bits}"
    codes, scales, zeros = run_op(op, x, group_size, symmetric, stochastic, seed, offset)
    want = getattr(ref, op)(x.cpu(), group_size, symmetric, stochastic, seed, offset)
    for name, got, exp in zip(("codes", "scales", "zeros"), (codes, scales, zeros), want, strict=True):
        assert_bits_equal(got.cpu(), exp, f"{op} {name}")
    return codes, scales, zeros


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("stochastic", [False, True], ids=["rtn", "sr"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("case", QUANT_CASES, ids=_quant_ids)
def test_quantize_codes_identical(case, symmetric, stochastic, dtype, device, tiling):
    bits, shape, group_size, max_block, target_tile, path = case
    quant = tiling(max_block, target_tile)
    if device == "cpu":  # the interpreter's plan; a GPU has more slots and may not split
        assert _plan_path(quant, shape, group_size, device) == path
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    x = torch.randn(shape, generator=gen) * 3
    x[..., :2] = x[..., :2].abs() + 1  # the largest values at the start of a row (a chunk's edge)
    x = x.to(dtype).to(device)
    codes, scales, zeros = _check_quantize(bits, x, group_size, symmetric, stochastic, SEED, OFFSET)
    # Dequantization of those codes: bitwise the reference's under the interpreter. On a GPU the
    # launchers disable FMA contraction, so it should be bitwise too; the contract allows one FMA
    # (one rounding fewer): within 1 ulp of fp32 before the cast, which is what is checked there.
    dq_op = f"dequantize_int{bits}"
    got = run_op(dq_op, codes, scales, zeros, dtype).cpu()
    want = getattr(ref, dq_op)(codes.cpu(), scales.cpu(), zeros.cpu(), dtype)
    if device == "cpu":
        assert_bits_equal(got, want, dq_op)
    else:
        qmax = 2**bits - 1
        bound = (qmax * scales.abs() + zeros.abs()).cpu().repeat_interleave(shape[-1] // scales.shape[-1], -1)
        ulp_out = torch.finfo(dtype).eps * want.float().abs()
        assert ((got.float() - want.float()).abs() <= ulp_out + 2**-23 * bound).all(), dq_op


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "seed, offset",
    [
        (2**63 - 1, 0),  # seed high word set
        (7, 2**32 + 12345),  # counter high word set
        (2**32 + 5, 2**32 - 100),  # counters cross a 2**32 boundary inside the tensor (carry)
        (99, 2**62 + 3),
    ],
)
def test_quantize_big_seed_and_offset(seed, offset, bits, device):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(device)
    _check_quantize(bits, x, 32, False, True, seed, offset)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_special_groups(device):
    """Constant, all-zero and single-sign groups (scale 0 -> 1, range includes every value)."""
    x = torch.tensor([[0.0] * 8, [2.5] * 8, [-3.0] * 8, [1, 2, 3, 4, 5, 6, 7, 8], [-1, -2, -3, -4, 0, 0, 0, -0.5]])
    for bits in (8, 4):
        for sym in (False, True):
            for sr in (False, True):
                _check_quantize(bits, x.to(device), -1, sym, sr, 3, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_before_launch(device):
    from fastgrad.kernels import TRITON_KERNELS

    x = torch.randn(4, 64, device=device)
    with pytest.raises(RuntimeError, match=r"fastgrad.quantize_int8: argument 'group_size'"):
        TRITON_KERNELS["quantize_int8"](x, 7, False, False, 0, 0)
    with pytest.raises(RuntimeError, match=r"fastgrad.quantize_int4: argument 'group_size'"):
        TRITON_KERNELS["quantize_int4"](x, 1, False, False, 0, 0)
    with pytest.raises(RuntimeError, match=r"fastgrad.quantize_int8: argument 'x'"):
        TRITON_KERNELS["quantize_int8"](x.t(), -1, False, False, 0, 0)
    with pytest.raises(RuntimeError, match=r"fastgrad.round_bf16_stochastic: argument 'offset'"):
        TRITON_KERNELS["round_bf16_stochastic"](x, 0, -1)
    with pytest.raises(RuntimeError, match=r"fastgrad.lowrank_project: argument 'p'"):
        TRITON_KERNELS["lowrank_project"](x, torch.randn(5, 3, device=device), "left")
    with pytest.raises(RuntimeError, match=r"fastgrad.dequantize_int4: argument 'scales'"):
        codes = torch.zeros(3, 5, dtype=torch.uint8, device=device)  # 10 values per row, groups of 5
        s = torch.ones(3, 2, device=device)
        TRITON_KERNELS["dequantize_int4"](codes, s, s, torch.float32)
    with pytest.raises(RuntimeError, match=r"fastgrad.lowrank_project_quantized: argument 'bits'"):
        codes = torch.zeros(4, 8, dtype=torch.uint8, device=device)
        s = torch.ones(4, 1, device=device)
        TRITON_KERNELS["lowrank_project_quantized"](x, codes, s, s, 3, "left")


# ---------------------------------------------------------------------------------------------
# fp32 -> bf16 stochastic rounding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape, seed, offset",
    [((1000,), 0, 0), ((3, 5, 70), 2**63 - 1, 2**32 - 500), ((64, 33), 42, 2**40 + 1)],
)
def test_round_bf16_stochastic_identical(shape, seed, offset, device):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 10
    flat = x.view(-1)
    specials = [0.0, -0.0, float("inf"), float("-inf"), 1e-40, -1e-40, 3.4e38, -3.4e38, 1.0, 2**-126]
    flat[: len(specials)] = torch.tensor(specials)
    flat[20] = float("nan")
    flat[21] = torch.tensor(0x7F800001, dtype=torch.int32).view(torch.float32)  # NaN, payload in the low bits
    got = run_op("round_bf16_stochastic", x.to(device), seed, offset).cpu()
    want = ref.round_bf16_stochastic(x, seed, offset)
    nan = torch.isnan(x)
    assert torch.isnan(got[nan]).all(), "NaN must stay NaN"
    assert_bits_equal(got[~nan], want[~nan], "round_bf16_stochastic")


@pytest.mark.parametrize("device", DEVICES)
def test_round_bf16_stochastic_unbiased(device):
    """Mean of many independent roundings of one value converges to it (torchao's test)."""
    x = torch.full((20000,), 1.0 + 2**-10, device=device)  # 1/8 of a bf16 ulp above 1.0
    y = run_op("round_bf16_stochastic", x, 5, 0).float()
    assert set(y.unique().tolist()) <= {1.0, 1.0 + 2**-7}
    # P(up) = 1/8; std of the mean of 20000 Bernoulli(1/8) is 0.0023: allow 4 sigma.
    assert abs((y == 1.0 + 2**-7).float().mean().item() - 0.125) < 0.0094


# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------

# Shapes deliberately not multiples of the tiles (32 under the interpreter, 64..256 on a GPU).
M_, N_, R_ = 70, 46, 10
# Group sizes of the quantized P (groups along P's rows): left P is m×r, right P is r×n.
P_GROUPS = {("left", 8): 5, ("left", 4): 2, ("right", 8): 23, ("right", 4): -1}


def _operands(kind: str, side: str, back: bool, dtype, device, noncontig: bool = False):
    """(args for the op, dense fp32 A, dense fp32 B, reference output, K) for one case."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, side, back)).encode()))
    p_shape = (M_, R_) if side == "left" else (R_, N_)
    p32 = torch.randn(p_shape, generator=gen) / R_**0.5
    if back:
        x_shape = (R_, N_) if side == "left" else (M_, R_)
    else:
        x_shape = (M_, N_)
    x = torch.randn(x_shape, generator=gen).to(dtype)
    if noncontig:
        x = x.t().contiguous().t()
    if kind == "dense":
        p = p32.to(dtype)
        p_args = (p.to(device),)
        p_dense = p.float()
    else:
        bits = int(kind[-1])
        group = P_GROUPS[(side, bits)]
        codes, scales, zeros = getattr(ref, f"quantize_int{bits}")(p32, group, False, True, 11, 0)
        p_args = (codes.to(device), scales.to(device), zeros.to(device), bits)
        p_dense = ref.dequantize_projector(codes, scales, zeros, bits, torch.float32)
    xf = x.float()
    if not back:
        a, b = (p_dense.t(), xf) if side == "left" else (xf, p_dense.t())
    else:
        a, b = (p_dense, xf) if side == "left" else (xf, p_dense)
    return x.to(device), p_args, a, b


def assert_matmul_close(got, want, a, b, scale, dtype, what):
    """Componentwise check: |got - want| <= γ·scale·(|A| |B|) + 2u·|want|.

    Justification. Kernel and reference accumulate the same products in fp32 in different orders;
    by Higham's bound each is within γ_K·(|A||B|) of the exact product, γ_K ≈ K·2**-24, so they are
    within 2γ_K of each other. On a GPU the dot inputs may be rounded once more: fp32 runs as
    "tf32x3" (≈ 2**-21 relative per product) and a dequantized P is rounded to the 16-bit dtype of
    G/R (u of that dtype per element of P). Each output is then rounded once to its dtype (unit
    roundoff u = 2**-24 fp32, 2**-8 bf16, 2**-11 fp16), hence the 2u·|want| term (one rounding
    each, times a small slack). An indexing or masking bug gives O(1) errors and fails at once.
    """
    K = a.shape[1]
    u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    gamma = 2 * K * 2.0**-24 + (2.0**-21 if dtype == torch.float32 else u)
    bound = gamma * abs(scale) * (a.abs() @ b.abs()) + 2.5 * u * want.float().abs() + 1e-30
    err = (got.float().cpu() - want.float()).abs()
    bad = err > bound
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; first at {i}: "
            f"got {got[i].item()}, want {want[i].item()}, |err| {err[i].item():.3g} > bound {bound[i].item():.3g}"
        )
    rel = (err.norm() / want.float().norm()).item()
    assert rel <= (1e-5 if dtype == torch.float32 else 3 * u), f"{what}: normwise relative error {rel:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["dense", "int8", "int4"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("back", [False, True], ids=["down", "up"])
def test_projection(back, side, kind, dtype, device):
    x, p_args, a, b = _operands(kind, side, back, dtype, device, noncontig=(kind == "dense" and side == "right"))
    scale = 0.37 if back else 1.0
    suffix = "" if kind == "dense" else "_quantized"
    op = ("lowrank_project_back" if back else "lowrank_project") + suffix
    args = (x, *p_args, side, scale) if back else (x, *p_args, side)
    got = run_op(op, *args)
    cpu_args = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in args)
    want = getattr(ref, op)(*cpu_args)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert_matmul_close(got, want, a, b, scale, dtype, f"{op} {side} {kind} {dtype}")


def test_split_k_is_exercised():
    """The down-projection shapes above take the split-K path under the interpreter, the
    back-projections (K = r) do not."""
    if not _INTERPRET:
        pytest.skip("the split decision checked here is the interpreter's")
    from fastgrad.kernels import project

    cpu = torch.device("cpu")
    assert project._split_k(R_, N_, M_, 4, cpu)[0] > 1  # left down: R = Pᵀ G, K = m
    assert project._split_k(M_, R_, N_, 4, cpu)[0] > 1  # right down: R = G Pᵀ, K = n
    assert project._split_k(M_, N_, R_, 4, cpu)[0] == 1  # back: K = r


@pytest.mark.parametrize("device", DEVICES)
def test_projection_empty_and_fp16(device):
    """K = 0 gives zeros; fp16 goes through the same kernel."""
    g = torch.zeros(0, 5, device=device)
    p = torch.zeros(0, 3, device=device)
    out = run_op("lowrank_project", g, p, "left")
    assert out.shape == (3, 5) and (out == 0).all()
    g = torch.randn(40, 33, dtype=torch.float16, device=device)
    p = torch.randn(40, 6, dtype=torch.float16, device=device)
    got = run_op("lowrank_project", g, p, "left")
    want = ref.lowrank_project(g.cpu(), p.cpu(), "left")
    assert_matmul_close(got, want, p.cpu().float().t(), g.cpu().float(), 1.0, torch.float16, "fp16")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["dense", "int8", "int4"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_lowrank_grad(side, kind, dtype, device):
    """R = down(dyᵀ x, P) through Z (T×r): both products (the first with the fused dequantization
    of P, split-K along n or m; the second along the T = 70 tokens) against the reference."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("grad", kind, side)).encode()))
    tokens = 70
    dy = torch.randn(tokens, N_, generator=gen).to(dtype)  # the weight is N_×M_: m = N_, n = M_
    x = torch.randn(tokens, M_, generator=gen).to(dtype)
    p32 = torch.randn((N_, R_) if side == "left" else (R_, M_), generator=gen) / R_**0.5
    if kind == "dense":
        p_args, op = (p32.to(dtype).to(device),), "lowrank_grad"
    else:
        bits = int(kind[-1])
        group = 2 if side == "left" else (7 if bits == 8 else 14)  # INT4 groups are even
        q = getattr(ref, f"quantize_int{bits}")(p32, group, False, True, 5, 0)
        p_args, op = (*(t.to(device) for t in q), bits), "lowrank_grad_quantized"
    got = run_op(op, dy.to(device), x.to(device), *p_args, side)
    want = getattr(ref, op)(dy, x, *(t.cpu() if isinstance(t, torch.Tensor) else t for t in p_args), side)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    # Normwise: fp32 sums in another order (and tf32x3 on a GPU) ~1e-6; bf16: Z may be rounded to
    # bf16 before the second product, and R once at the end: two roundings of 2**-9.
    rel = ((got.float().cpu() - want.float()).norm() / want.float().norm()).item()
    assert rel <= (1e-5 if dtype == torch.float32 else 2 * 2.0**-8), f"{op} {side} {kind}: {rel:.3g}"


# ---------------------------------------------------------------------------------------------
# GPU only: more than 2**31 elements (64-bit offsets and counters)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA device (a tensor of more than 2**31 elements)")
def test_quantize_more_than_2_31_elements():
    rows, cols = 2**21 + 3, 1024  # numel = 2**31 + 3072
    x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
    seed, offset = 2**40 + 9, 2**33 + 5
    for bits in (8, 4):
        codes, scales, zeros = run_op(f"quantize_int{bits}", x, 128, False, True, seed, offset)
        for start in (rows - 4, 2**21 - 2):  # rows whose flat indices are past 2**31
            sl = x[start : start + 4].cpu()
            want = getattr(ref, f"quantize_int{bits}")(sl, 128, False, True, seed, offset + start * cols)
            assert_bits_equal(codes[start : start + 4].cpu(), want[0], f"int{bits} codes rows {start}+")
            assert_bits_equal(scales[start : start + 4].cpu(), want[1], f"int{bits} scales rows {start}+")
        del codes, scales, zeros
    del x
    x = torch.randn(2**31 + 1000, device="cuda")
    y = run_op("round_bf16_stochastic", x, seed, offset)
    sl = x[-2000:].cpu()
    assert_bits_equal(y[-2000:].cpu(), ref.round_bf16_stochastic(sl, seed, offset + x.numel() - 2000), "bf16 SR")


def test_env_lists_triton():
    """``python -m fastgrad.env`` would report these ops as served by Triton."""
    for op in ("quantize_int8", "lowrank_project_back_quantized"):
        served = [_backends.SERVED_BY[op][d] for d in DEVICES]
        assert all(s.startswith("triton") or s == "cuda" for s in served), served
