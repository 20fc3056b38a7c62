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
    import dataclasses

    from fastgrad.kernels import quant

    def set_(max_block, target_tile):
        knobs = {"max_block": max_block, "target_tile": target_tile}
        tiling = dataclasses.replace(quant.TILING, **{k: v for k, v in knobs.items() if v is not None})
        monkeypatch.setattr(quant, "TILING", tiling)
        return quant

    return set_


def _plan_path(quant, shape, group_size, device) -> str:
    g = shape[-1] if group_size == -1 else group_size
    numel = 1
    for s in shape:
        numel *= s
    plan = quant.TILING.plan(numel // g, g, quant.parallel_slots(torch.device(device)))
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
@pytest.mark.parametrize("case", QUANT_CASES, ids=_quant_ids)
def test_quantize_nan_and_inf_as_reference(case, device, tiling):
    """A NaN in a group gives the reference's NaN statistics (min/max propagate NaN, scale 1) and
    codes (0 for the NaN), on every tiling path: a group loaded once, in chunks (the NaN in a later
    chunk than the first) or split over programs (partial statistics reduced by torch). ±Inf too."""
    bits, shape, group_size, max_block, target_tile, _path = case
    tiling(max_block, target_tile)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).reshape(-1, shape[-1])
    x[0, -1] = float("nan")  # the last chunk of the first group
    x[-1, 0] = float("inf")
    x = x.reshape(shape).to(device)
    for symmetric in (False, True):
        for stochastic in (False, True):
            op = f"quantize_int{bits}"
            got = run_op(op, x, group_size, symmetric, stochastic, SEED, OFFSET)
            want = getattr(ref, op)(x.cpu(), group_size, symmetric, stochastic, SEED, OFFSET)
            assert_bits_equal(got[0].cpu(), want[0], f"{op} codes")
            # Affine: the NaN group's zero is NaN. Symmetric: its scale is 1 (NaN absmax).
            assert want[2].isnan().any() if not symmetric else (want[1] == 1).any(), "the case must hit a NaN group"
            for name, g, w in (("scales", got[1], want[1]), ("zeros", got[2], want[2])):
                torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0, equal_nan=True, msg=f"{op} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "seed, offset",
    [
        (2**63 - 1, 0),  # seed high word set
        (7, 2**34 + 12345),  # counter high word set
        (2**32 + 5, 2**34 - 100),  # counters cross a 2**32 boundary inside the tensor (carry)
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
    [((1000,), 0, 0), ((3, 5, 70), 2**63 - 1, 2**34 - 500), ((64, 33), 42, 2**40 + 1)],
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


def _assert_within(got, want, tol, what) -> torch.Tensor:
    """|got − want| ≤ tol elementwise, else an error naming the count and the first offender; returns |got − want|."""
    err = (got.float().cpu() - want.float()).abs()
    bad = err > tol
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; first at {i}: "
            f"got {got[i].item()}, want {want[i].item()}, |err| {err[i].item():.3g} > {tol[i].item():.3g}"
        )
    return err


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
    err = _assert_within(got, want, bound, what)
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

    slots = project.parallel_slots(torch.device("cpu"))
    assert project.SPLIT_K.plan(R_, N_, M_, 4, slots)[0] > 1  # left down: R = Pᵀ G, K = m
    assert project.SPLIT_K.plan(M_, R_, N_, 4, slots)[0] > 1  # right down: R = G Pᵀ, K = n
    assert project.SPLIT_K.plan(M_, N_, R_, 4, slots)[0] == 1  # back: K = r


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("side", ["left", "right"])
def test_quantized_projection_group_aligned_tiles(side, bits, device):
    """Groups that are a multiple of the tile extent along P's rows (the usual Q-GaLore case: groups
    of 256 along rows of r or n values): the kernels load one scale and zero per row of P in a tile
    instead of one per element. Down- and up-projection, the in-place update, the low-rank gradient
    and the fused Adam step, against the reference. P's rows hold two groups and the tiles (32 under
    the interpreter) cover a group in two steps; M and the tokens are not multiples of the tile."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("aligned", side, bits)).encode()))
    m, n, r, group, tokens = (70, 46, 128, 64, 37) if side == "left" else (70, 128, 10, 64, 37)
    p_shape = (m, r) if side == "left" else (r, n)
    r_shape = (r, n) if side == "left" else (m, r)
    q = getattr(ref, f"quantize_int{bits}")(torch.randn(p_shape, generator=gen) / r**0.5, group, False, True, 3, 0)
    p_args = (*(t.to(device) for t in q), bits)
    p_dense = ref.dequantize_projector(*q, bits, torch.float32)
    g = torch.randn(m, n, generator=gen)
    rr = torch.randn(r_shape, generator=gen)
    a, b = (p_dense.t(), g) if side == "left" else (g, p_dense.t())
    got = run_op("lowrank_project_quantized", g.to(device), *p_args, side)
    assert_matmul_close(got, ref.lowrank_project_quantized(g, *q, bits, side), a, b, 1.0, torch.float32, "down")
    a, b = (p_dense, rr) if side == "left" else (rr, p_dense)
    got = run_op("lowrank_project_back_quantized", rr.to(device), *p_args, side, 0.5)
    want = ref.lowrank_project_back_quantized(rr, *q, bits, side, 0.5)
    assert_matmul_close(got, want, a, b, 0.5, torch.float32, "up")
    w = g.to(device, copy=True)
    run_op("lowrank_project_back_quantized_add_", w, rr.to(device), *p_args, side, 0.5)
    assert_matmul_close(w.cpu() - g, want, a, b, 0.5, torch.float32, "up, in place")
    dy, x = torch.randn(tokens, m, generator=gen), torch.randn(tokens, n, generator=gen)
    got = run_op("lowrank_grad_quantized", dy.to(device), x.to(device), *p_args, side)
    want = ref.lowrank_grad_quantized(dy, x, *q, bits, side)
    rel = ((got.cpu() - want).norm() / want.norm()).item()
    assert rel <= 1e-5, f"lowrank_grad_quantized: normwise relative error {rel:.3g}"
    moments = (torch.randn(r_shape, generator=gen), torch.rand(r_shape, generator=gen))
    args = (g, *moments, rr, *q, bits, side, *ADAM_HYPER, STEP, DECAY)
    got_args, want_args = _to(args, device), _clone(args)
    run_op("galore_adam_step_quantized_", *got_args)
    ref.galore_adam_step_quantized_(*want_args)
    n_dir = want_args[1] / (ADAM_HYPER[3] * want_args[2].sqrt() + ADAM_HYPER[2])
    a, b = (p_dense, n_dir) if side == "left" else (n_dir, p_dense)
    assert_matmul_close(got_args[0].cpu(), want_args[0], a, b, STEP, torch.float32, "adam step")


# ---------------------------------------------------------------------------------------------
# Projected Adam step (galore_adam_step_*): moments, then W ← decay·W + s·up(N, P) in place
# ---------------------------------------------------------------------------------------------

# W is m×n, rank r: none a multiple of the 32-wide interpreter tiles, and r > BLOCK_K (two K steps).
ADAM_SHAPE = (70, 46, 36)
# Group sizes of a quantized P (along P's rows: left P is m×r, right P is r×n).
ADAM_P_GROUPS = {("left", 8): 9, ("left", 4): 6, ("right", 8): 23, ("right", 4): -1}
ADAM_HYPER = (0.9, 0.99, 1e-6, 1.3)  # beta1, beta2, eps, denom_scale
# An update of the size of W itself (N and up(N, P) are O(1), W ~ N(0, 1)), so that a wrong
# update cannot hide below the rounding of a bf16 W; a decay != 1 so that a lost decay shows.
STEP, DECAY = -0.4, 0.95
_U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff
# (W, moments, R and dense P) dtypes.
ADAM_DTYPES = [
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16, torch.bfloat16),  # fp32 master weight, bf16 states and gradient
    (torch.bfloat16, torch.float32, torch.float32),
]


def _dtypes_id(dtypes) -> str:
    short = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
    return "-".join(f"{name}:{short[d]}" for name, d in zip(("w", "mom", "r"), dtypes, strict=True))


def _adam_inputs(side, kind, m, n, rank, r_dtype, mom_dtype, gen, p_group=None):
    """R, M, V (R's shape), P's arguments (dense P in R's dtype, or INT4/INT8 codes, scales, zeros,
    bits) and P as a dense fp32 matrix."""
    p_shape = (m, rank) if side == "left" else (rank, n)
    r_shape = (rank, n) if side == "left" else (m, rank)
    p32 = torch.randn(p_shape, generator=gen) / max(rank, 1) ** 0.5
    if kind == "dense":
        p = p32.to(r_dtype)
        p_args, p_dense = (p,), p.float()
    else:
        bits = int(kind[-1])
        group = p_group if p_group is not None else ADAM_P_GROUPS[(side, bits)]
        q = getattr(ref, f"quantize_int{bits}")(p32, group, False, True, 11, 0)
        p_args, p_dense = (*q, bits), ref.dequantize_projector(*q, bits, torch.float32)
    r = torch.randn(r_shape, generator=gen).to(r_dtype)
    exp_avg = torch.randn(r_shape, generator=gen).to(mom_dtype)
    exp_avg_sq = torch.rand(r_shape, generator=gen).to(mom_dtype)
    return r, exp_avg, exp_avg_sq, p_args, p_dense


def _to(args, device):
    """Copies on ``device`` (always copies: the ops mutate their arguments)."""
    return tuple(a.to(device, copy=True) if isinstance(a, torch.Tensor) else a for a in args)


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _up_operands(side, r, exp_avg, exp_avg_sq, p_dense):
    """(A, B) in fp32 with up(N, P) = A B, N the reference's direction (from copies of the moments)."""
    n_dir = ref.adam_direction_(exp_avg.clone(), exp_avg_sq.clone(), r, *ADAM_HYPER)
    return (p_dense, n_dir) if side == "left" else (n_dir, p_dense)


def _step_bound(a, b, step, out_dtype, device):
    """Componentwise bound on |W'_kernel − W'_reference| before W's final rounding:
    γ·|s|·(|A| |B|) with γ = 2K·2**-24 (two fp32 sums of K products in different orders, Higham;
    N itself is bitwise the reference's, see the moment check) plus, on a GPU, the rounding of the
    dot inputs: "tf32x3" (≈ 2**-21) for fp32/INT8 W, or N and P rounded to a 16-bit W's dtype
    (2u). The decay·W products are the same fp32 operation on both sides."""
    gamma = 2 * a.shape[1] * 2.0**-24
    if device != "cpu":
        gamma += 2.0**-21 if out_dtype in (torch.float32, torch.uint8) else 2 * _U[out_dtype]
    return gamma * abs(step) * (a.abs() @ b.abs())


def _assert_step_close(got, want, bound, dtype, what):
    """|got − want| ≤ bound + 2.5u·|want|: the bound of ``_step_bound``, then each result rounded
    once to W's dtype (the two fp32 values may straddle a rounding boundary: one unit of the last
    place, ≤ 2u·|want|, with slack)."""
    _assert_within(got, want, bound + 2.5 * _U[dtype] * want.float().abs() + 1e-30, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", ADAM_DTYPES, ids=_dtypes_id)
@pytest.mark.parametrize("kind", ["dense", "int8", "int4"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_adam_step(side, kind, dtypes, device):
    """Moments bitwise (the same fp32 operations, correctly rounded √ and division, no FMA) and
    W within the matmul bound, for a dense W of either dtype and a dense or quantized P."""
    w_dtype, mom_dtype, r_dtype = dtypes
    m, n, rank = ADAM_SHAPE
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("adam", side, kind, dtypes)).encode()))
    r, exp_avg, exp_avg_sq, p_args, p_dense = _adam_inputs(side, kind, m, n, rank, r_dtype, mom_dtype, gen)
    w = torch.randn(m, n, generator=gen).to(w_dtype)
    op = "galore_adam_step_" if kind == "dense" else "galore_adam_step_quantized_"
    args = (w, exp_avg, exp_avg_sq, r, *p_args, side, *ADAM_HYPER, STEP, DECAY)
    got = _to(args, device)
    assert run_op(op, *got) is None
    want = _clone(args)
    getattr(ref, op)(*want)
    assert_bits_equal(got[1].cpu(), want[1], f"{op} exp_avg")
    assert_bits_equal(got[2].cpu(), want[2], f"{op} exp_avg_sq")
    a, b = _up_operands(side, r, exp_avg, exp_avg_sq, p_dense)
    assert got[0].dtype == w_dtype
    _assert_step_close(got[0], want[0], _step_bound(a, b, STEP, w_dtype, device), w_dtype, f"{op} {side} {kind} w")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_adam_step_fp16_strided_w(side, device):
    """fp16 W, moments and R; W a strided view (a column slice of a transposed buffer)."""
    m, n, rank = 37, 50, 20
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("adam-fp16", side)).encode()))
    r, exp_avg, exp_avg_sq, p_args, p_dense = _adam_inputs(side, "dense", m, n, rank, torch.float16, torch.float16, gen)
    base = torch.randn(n + 3, m, generator=gen).to(torch.float16).to(device)
    w = base.t()[:, 2 : n + 2]  # strides (1, m): not contiguous
    w_before = w.cpu().clone()
    base_before = base.cpu().clone()
    got = _to((exp_avg, exp_avg_sq, r, *p_args), device)
    run_op("galore_adam_step_", w, *got, side, *ADAM_HYPER, STEP, DECAY)
    want = (w_before, *_clone((exp_avg, exp_avg_sq, r, *p_args)))
    ref.galore_adam_step_(*want, side, *ADAM_HYPER, STEP, DECAY)
    assert_bits_equal(got[0].cpu(), want[1], "exp_avg fp16")
    assert_bits_equal(got[1].cpu(), want[2], "exp_avg_sq fp16")
    a, b = _up_operands(side, r, exp_avg, exp_avg_sq, p_dense)
    _assert_step_close(w, want[0], _step_bound(a, b, STEP, torch.float16, device), torch.float16, "fp16 w")
    outside = [0, 1, n + 2]  # rows of the buffer (columns of its transpose) outside the view
    assert_bits_equal(base.cpu()[outside], base_before[outside], "buffer outside the strided W")


@pytest.mark.parametrize("device", DEVICES)
def test_adam_step_zero_step_is_exact(device):
    """step_scale = 0 (or rank 0): W ← decay·W, one fp32 product rounded to W's dtype: bitwise."""
    m, n, rank = ADAM_SHAPE
    gen = torch.Generator().manual_seed(5)
    for side, kind, w_dtype, k in [("left", "dense", torch.bfloat16, rank), ("right", "int4", torch.float32, rank),
                                   ("right", "dense", torch.float32, 0)]:  # fmt: skip
        r, exp_avg, exp_avg_sq, p_args, _ = _adam_inputs(side, kind, m, n, k, torch.float32, torch.float32, gen)
        w = torch.randn(m, n, generator=gen).to(w_dtype)
        op = "galore_adam_step_" if kind == "dense" else "galore_adam_step_quantized_"
        step = 0.0 if k else STEP
        args = (w, exp_avg, exp_avg_sq, r, *p_args, side, *ADAM_HYPER, step, DECAY)
        got = _to(args, device)
        run_op(op, *got)
        want = _clone(args)
        getattr(ref, op)(*want)
        for i, name in enumerate(("w", "exp_avg", "exp_avg_sq")):
            assert_bits_equal(got[i].cpu(), want[i], f"{op} {side} {kind} rank {k}: {name}")


# INT8 W (m, n, rank). 40 rows: three row blocks of the interpreter's 16. Groups of 127 (not a
# power of two: two chunks of 64, the last one padded; the second group starts at column 127, inside
# a chunk of any power-of-two tiling of the row) and of the whole row (254: four chunks of 64).
# n is even so that a right-side P (r×n) can be INT4.
INT8_W_SHAPE = (40, 254, 12)
INT8_SEED_OFFSET = (2**40 + 7, 2**35 + 5)  # high words of the Philox key and counter set
INT8_P_GROUPS = {("left", 8): 3, ("left", 4): 6, ("right", 8): 127, ("right", 4): -1}


def _int8_step_case(side, bits, group, stochastic, step, device, seed=0):
    """Run the INT8-weight step on ``device`` and with the reference; returns (got, want, inputs)."""
    m, n, rank = INT8_W_SHAPE
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("adam-int8", side, bits, group, stochastic, seed)).encode()))
    mom_dtype = torch.bfloat16 if bits == 4 else torch.float32  # (and R: both dtypes seen)
    r, exp_avg, exp_avg_sq, p_args, p_dense = _adam_inputs(
        side, f"int{bits}", m, n, rank, mom_dtype, mom_dtype, gen, INT8_P_GROUPS[(side, bits)]
    )
    w = torch.randn(m, n, generator=gen) * 0.5
    w[:, :3] += 2.0  # the largest values at a group's (and chunk's) edge
    w_q = ref.quantize_int8(w, group, False, True, 21, 0)
    args = (*w_q, exp_avg, exp_avg_sq, r, *p_args, side, *ADAM_HYPER, step, DECAY, stochastic, *INT8_SEED_OFFSET)
    got = _to(args, device)
    run_op("galore_adam_step_int8_", *got)
    want = _clone(args)
    ref.galore_adam_step_int8_(*want)
    return got, want, (r, exp_avg, exp_avg_sq, p_dense, w_q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stochastic", [False, True], ids=["rtn", "sr"])
@pytest.mark.parametrize("group", [127, -1, "127-one-pass"], ids=["g127", "row", "g127-one-pass"])
@pytest.mark.parametrize("bits", [8, 4], ids=["p8", "p4"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_adam_step_int8_weight(side, bits, group, stochastic, device, monkeypatch):
    """Moments bitwise; the re-quantized W against the reference.

    Kernel and reference compute the same fp32 W' = decay·dequant(W) + s·up(N, P) up to the
    matmul's summation order (bound δ of ``_step_bound``, plus 2**-22·|W'| for the two roundings of
    the sum), then apply the same quantizer (same min/max reduction, correctly rounded division,
    Philox stream). So zero = min moves by at most the group's max δ, scale by 2·δ/255 and one
    ulp, and a code can differ only where u lies within about δ/scale of a rounding threshold: rare
    (≤ 0.1% of the codes is asserted; under the interpreter none is expected), and then by one
    (the dequantized values differ by one quantization step, not more).
    """
    from fastgrad.kernels import adam_step

    one_pass = group == "127-one-pass"  # a group within one chunk: W' computed once, kept in registers
    if one_pass:
        monkeypatch.setattr(adam_step, "INT8_BLOCK_N_MAX", 128)
        group = 127
    m, n, _rank = INT8_W_SHAPE
    g = n if group == -1 else group
    if device == "cpu":  # the interpreter's tiling: several row blocks; several chunks per group or one
        block_n = adam_step.int8_chunk(g)
        block_m = adam_step.int8_configs(m, n // g, block_n, _rank, torch.device("cpu"))[0].kwargs["BLOCK_M"]
        assert block_m < m and (block_n >= g if one_pass else block_n < g)
    got, want, (r, exp_avg, exp_avg_sq, p_dense, w_q) = _int8_step_case(side, bits, group, stochastic, STEP, device)
    assert_bits_equal(got[3].cpu(), want[3], "exp_avg")
    assert_bits_equal(got[4].cpu(), want[4], "exp_avg_sq")
    codes, scales, zeros = (t.cpu() for t in got[:3])
    w_codes, w_scales, w_zeros = want[:3]
    # Bound on |W'_kernel − W'_reference| per element, then its max per group.
    a, b = _up_operands(side, r, exp_avg, exp_avg_sq, p_dense)
    w_new = ref.dequantize_int8(*w_q, torch.float32) * DECAY + (a @ b) * STEP
    delta = _step_bound(a, b, STEP, torch.uint8, device) + 2.0**-22 * w_new.abs()
    delta_g = delta.reshape(m, n // g, g).amax(dim=-1)
    assert ((zeros - w_zeros).abs() <= delta_g).all(), "zeros"
    assert ((scales - w_scales).abs() <= 2 * delta_g / 255 + 2.0**-23 * w_scales).all(), "scales"
    same = codes == w_codes
    assert same.float().mean().item() >= 0.999, f"{int((~same).sum())}/{same.numel()} codes differ"
    got_w = ref.dequantize_int8(codes, scales, zeros, torch.float32)
    want_w = ref.dequantize_int8(w_codes, w_scales, w_zeros, torch.float32)
    step_g = torch.maximum(scales, w_scales).repeat_interleave(g, dim=1)
    assert ((got_w - want_w).abs() <= step_g * 1.001 + 256 * delta_g.repeat_interleave(g, dim=1)).all(), "values"
    # Every differing code is a decision at its threshold: the reference's u = (W' − zero)/scale
    # lies within the perturbation of W', zero and scale (in units of u) of the rounding threshold
    # (RTN: frac(u) = 1/2; SR: frac(u) = ξ, the element's uniform). Away from the thresholds the
    # decision is continuous in u (also across integers), so nothing else may differ.
    if not same.all():
        zero_e = w_zeros.repeat_interleave(g, dim=1)
        scale_e = w_scales.repeat_interleave(g, dim=1)
        u = (w_new - zero_e) / scale_e
        if stochastic:
            threshold = ref.philox_uniform(*INT8_SEED_OFFSET, (m, n), "cpu")
        else:
            threshold = torch.full_like(u, 0.5)
        slack = (4 * delta_g.repeat_interleave(g, dim=1) + delta) / scale_e + 2.0**-16
        near = (u - u.floor() - threshold).abs() <= slack
        assert near[~same].all(), f"codes differ away from a rounding threshold at {(~same & ~near).nonzero()[:5]}"


@pytest.mark.parametrize("device", DEVICES)
def test_adam_step_int8_weight_groups_unaligned_with_the_projector_groups(device):
    """W's groups of 120 are covered by chunks of 64 starting at q·120 (not multiples of 64), while a
    right-side INT8 P has groups of 320 along the same columns: a chunk such as [304, 368) spans two
    of P's groups, so it must not take one P scale per row (the decoding of a tile aligned to its
    own width). Against the reference: W' within a quantization step, nearly all codes equal."""
    m, n, rank, w_group, p_group = 20, 960, 12, 120, 320
    gen = torch.Generator().manual_seed(5)
    p_q = ref.quantize_int8(torch.randn(rank, n, generator=gen) / rank**0.5, p_group, False, True, 11, 0)
    r, exp_avg, exp_avg_sq = (
        torch.randn(m, rank, generator=gen),
        torch.randn(m, rank, generator=gen),
        torch.rand(m, rank, generator=gen),
    )
    w_q = ref.quantize_int8(torch.randn(m, n, generator=gen), w_group, False, True, 21, 0)
    args = (*w_q, exp_avg, exp_avg_sq, r, *p_q, 8, "right", *ADAM_HYPER, STEP, DECAY, True, 3, 0)
    got = _to(args, device)
    run_op("galore_adam_step_int8_", *got)
    want = _clone(args)
    ref.galore_adam_step_int8_(*want)
    got_w = ref.dequantize_int8(*(t.cpu() for t in got[:3]), torch.float32)
    want_w = ref.dequantize_int8(*want[:3], torch.float32)
    step = torch.maximum(got[1].cpu(), want[1]).repeat_interleave(w_group, dim=1)
    assert ((got_w - want_w).abs() <= 1.01 * step + 1e-5).all(), (got_w - want_w).abs().max()
    assert (got[0].cpu() == want[0]).float().mean() >= 0.999


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_adam_step_int8_weight_zero_step_is_exact(side, device):
    """step_scale = 0 and decay = 1: W' is the decoded W, the same fp32 values on both sides, so
    codes, scales and zeros are bitwise the reference quantizer's (SR with the element counters)."""
    m, n, rank = INT8_W_SHAPE
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("adam-int8-zero", side)).encode()))
    r, exp_avg, exp_avg_sq, p_args, _ = _adam_inputs(side, "int8", m, n, rank, torch.float32, torch.float32, gen,
                                                     INT8_P_GROUPS[(side, 8)])  # fmt: skip
    w_q = ref.quantize_int8(torch.randn(m, n, generator=gen), 127, False, True, 2, 0)
    args = (*w_q, exp_avg, exp_avg_sq, r, *p_args, side, *ADAM_HYPER, 0.0, 1.0, True, 77, 2**34 - 1000)
    got = _to(args, device)
    run_op("galore_adam_step_int8_", *got)
    want = _clone(args)
    ref.galore_adam_step_int8_(*want)
    for i, name in enumerate(("codes", "scales", "zeros", "exp_avg", "exp_avg_sq")):
        assert_bits_equal(got[i].cpu(), want[i], f"int8 step, zero step: {name}")


@pytest.fixture
def block_words_spy(monkeypatch):
    """Records the BLOCK_WORDS constexpr of every quantizer / round_bf16 / INT8-step launch."""
    from fastgrad.kernels import adam_step, quant

    seen: list[tuple[str, bool]] = []
    for module in (quant, adam_step):
        real = module.launch

        def spy(kernel, grid, args, constexprs, *rest, _real=real):
            if "BLOCK_WORDS" in constexprs:
                seen.append((kernel.fn.__name__, constexprs["BLOCK_WORDS"]))
            return _real(kernel, grid, args, constexprs, *rest)

        monkeypatch.setattr(module, "launch", spy)
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 2**34 - 400, 2**34 - 403])
def test_stochastic_rounding_draws_four_words_per_philox_when_aligned(device, offset, block_words_spy):
    """Stream positions that start tile rows at multiples of 4 (offset, group size, tile width and
    row length all multiples of 4) take BLOCK_WORDS, one Philox evaluation per four elements; any
    other offset takes one evaluation per element. Both give the reference's codes bitwise."""
    aligned = offset % 4 == 0
    gen = torch.Generator().manual_seed(offset % 1000)
    x = torch.randn(24, 256, generator=gen)
    for bits in (8, 4):
        got = run_op(f"quantize_int{bits}", x.to(device), 64, False, True, 5, offset)
        want = getattr(ref, f"quantize_int{bits}")(x, 64, False, True, 5, offset)
        for a, b, name in zip(got, want, ("codes", "scales", "zeros"), strict=True):
            assert_bits_equal(a.cpu(), b, f"INT{bits} SR {name}")
    got = run_op("round_bf16_stochastic", x.to(device), 5, offset)
    assert_bits_equal(got.cpu(), ref.round_bf16_stochastic(x, 5, offset), "round_bf16_stochastic")
    # The INT8-weight step with a zero step: the quantizer's codes of the decoded W, bitwise.
    m, n, rank = 24, 256, 8
    r, exp_avg, exp_avg_sq, p_args, _ = _adam_inputs("right", "int8", m, n, rank, torch.float32, torch.float32, gen, 64)
    w_q = ref.quantize_int8(torch.randn(m, n, generator=gen), 128, False, True, 2, 0)
    args = (*w_q, exp_avg, exp_avg_sq, r, *p_args, "right", *ADAM_HYPER, 0.0, 1.0, True, 77, offset)
    got = _to(args, device)
    run_op("galore_adam_step_int8_", *got)
    want = _clone(args)
    ref.galore_adam_step_int8_(*want)
    for i, name in enumerate(("codes", "scales", "zeros")):
        assert_bits_equal(got[i].cpu(), want[i], f"int8 step, zero step: {name}")
    kernels = {name for name, _ in block_words_spy}
    assert kernels == {
        "_quantize_int8_kernel", "_quantize_int4_kernel", "_round_bf16_stochastic_kernel", "_adam_update_int8_kernel"
    }  # fmt: skip
    assert all(flag == aligned for _, flag in block_words_spy), block_words_spy


@pytest.mark.parametrize("device", DEVICES)
def test_adam_step_bad_input_raises_before_launch(device):
    from fastgrad.kernels import TRITON_KERNELS

    m, n, rank = 8, 12, 4
    w = torch.randn(m, n, device=device)
    r = torch.randn(rank, n, device=device)
    p = torch.randn(m, rank, device=device)
    mom = torch.zeros(rank, n, device=device)
    with pytest.raises(RuntimeError, match=r"fastgrad.galore_adam_step_: argument 'beta2'"):
        TRITON_KERNELS["galore_adam_step_"](w, mom, mom.clone(), r, p, "left", 0.9, 1.0, 1e-8, 1.0, -1.0, 1.0)
    q = tuple(t.to(device) for t in ref.quantize_int8(p.cpu(), -1, False, False, 0, 0))
    with pytest.raises(RuntimeError, match=r"fastgrad.galore_adam_step_quantized_: argument 'w'"):
        TRITON_KERNELS["galore_adam_step_quantized_"](w[:, :5], mom, mom.clone(), r, *q, 8, "left", 0.9, 0.99,
                                                      1e-8, 1.0, -1.0, 1.0)  # fmt: skip
    wq = tuple(t.to(device) for t in ref.quantize_int8(w.cpu(), 6, False, False, 0, 0))
    with pytest.raises(RuntimeError, match=r"fastgrad.galore_adam_step_int8_: argument 'offset'"):
        TRITON_KERNELS["galore_adam_step_int8_"](*wq, mom, mom.clone(), r, *q, 8, "left", 0.9, 0.99, 1e-8, 1.0,
                                                 -1.0, 1.0, True, 0, -1)  # fmt: skip
    assert (mom == 0).all()  # nothing ran


# ---------------------------------------------------------------------------------------------
# GPU only: more than 2**31 elements (64-bit offsets and counters)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA device (a tensor of more than 2**31 elements)")
def test_quantize_more_than_2_31_elements():
    rows, cols = 2**21 + 3, 1024  # numel = 2**31 + 3072
    x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
    seed, offset = 2**40 + 9, 2**35 + 5
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
