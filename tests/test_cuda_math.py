"""The host build of the CUDA kernels' per-element math, checked on a machine without a GPU.

csrc/cuda/quant.cu does all its per-element arithmetic through the FASTGRAD_HD functions of
csrc/common/quant_math.h and csrc/common/philox.h. tests/cuda_math_harness.cpp compiles those
functions with the host compiler (g++, -ffp-contract=off), so only their host (non-__CUDA_ARCH__)
branches are built and run, and calls them in the order the kernels apply them (team-strided
statistics, butterfly and slice merges, encode, nibble packing, decode, bf16 conversion: an order
the harness re-implements, quant.cu itself is not compiled here). This file compares its output
with fastgrad/_reference.py: identical codes, scales and zeros, decoded values bitwise (NaN-aware),
bf16 bit patterns, bf16 stochastic rounding and the Philox words.

What this cannot check: the __CUDA_ARCH__ branches (the __f*_rn intrinsics, __float_as_uint bit
casts, hardware fp16 conversion), the kernels' indexing, vector loads, reductions and launches, and
whether the harness's order is still quant.cu's; tests/test_cuda_kernels.py does that on a GPU.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from kernel_common import assert_bits_equal_nan, bits_of, special_values

from fastgrad import _backends
from fastgrad import _reference as ref

ROOT = Path(__file__).resolve().parents[1]
HARNESS_SRC = ROOT / "tests" / "cuda_math_harness.cpp"
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: cannot build the host harness of the CUDA device math")
    exe = tmp_path_factory.mktemp("cuda_math") / "harness"
    cmd = [gxx, "-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"]
    cmd += ["-I", str(ROOT / "csrc"), str(HARNESS_SRC), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"g++ failed:\n{proc.stderr}"
    return exe


def _run(exe: Path, *args) -> None:
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, f"harness {args[0]} exited with {proc.returncode}: {proc.stderr}"


def _spread(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = shape[0]
    return torch.randn(shape, generator=gen) * torch.logspace(-3, 3, rows).reshape(rows, *[1] * (len(shape) - 1)) + 0.25


def _ties() -> torch.Tensor:
    """(2, 256): values that fall exactly halfway between codes, x = (k + 0.5) * scale with a scale of
    few significant bits (3/64), so that u = x / scale is exactly k + 0.5 when the division is
    correctly rounded (RTN takes k + 1) and an ulp off, sometimes below, with a reciprocal multiply.
    Row 0: one INT8 group (min 0, max 255 * 3/64); row 1: 16 INT4 groups (min 0, max 15 * 3/64)."""
    s = 3.0 / 64.0
    row8 = torch.tensor([0.0, 255 * s] + [(k + 0.5) * s for k in range(254)])
    row4 = torch.tensor([0.0, 15 * s] + [(k % 14 + 0.5) * s for k in range(14)]).repeat(16)
    return torch.stack([row8, row4])


# (x, group size per bits, team size, pack width per bits, slices): team/pack/slice shapes the CUDA
# planner picks (sub-warp teams of the warp kernel; the 256-thread block kernel, whole or in slices).
def _cases():
    return [
        (special_values(), {8: 32, 4: 32}, 4, {8: 4, 4: 4}, 1),
        (_spread((7, 270), 1), {8: 27, 4: 30}, 8, {8: 1, 4: 2}, 1),
        (_spread((2, 1030), 2), {8: 1030, 4: 1030}, 256, {8: 2, 4: 2}, 3),
        (_spread((9, 40), 3), {8: 1, 4: 2}, 1, {8: 1, 4: 2}, 1),
        (_spread((3, 4096), 4), {8: 4096, 4: 4096}, 256, {8: 4, 4: 4}, 1),
        (_spread((4, 3, 128), 5), {8: 128, 4: 128}, 2, {8: 8, 4: 8}, 1),
        (_ties(), {8: 256, 4: 16}, 8, {8: 4, 4: 4}, 1),
    ]


def _quantize_harness(exe, tmp: Path, x, bits, g, tpg, vec, splits, symmetric, stochastic, seed, offset):
    numel = x.numel()
    groups = numel // g
    inp, out = tmp / "in.bin", tmp / "out.bin"
    if x.dtype == torch.bfloat16:
        x.contiguous().view(torch.int16).numpy().tofile(inp)
        kind = 1
    else:
        x.float().contiguous().numpy().tofile(inp)  # fp16 -> fp32 is exact (the device converts in hardware)
        kind = 0
    args = [bits, int(symmetric), int(stochastic), seed, offset, groups, g, tpg, vec, splits, kind, inp, out]
    _run(exe, "quant", *args)
    raw = torch.from_file(str(out), size=out.stat().st_size, dtype=torch.uint8)
    sizes = [numel * bits // 8, 4 * groups, 4 * groups, 4 * numel, 2 * numel]
    parts = torch.split(raw, sizes)
    lead = tuple(x.shape[:-1])
    n = x.shape[-1]
    codes = parts[0].clone().reshape(*lead, n * bits // 8)
    scales = parts[1].clone().view(torch.float32).reshape(*lead, n // g)
    zeros = parts[2].clone().view(torch.float32).reshape(*lead, n // g)
    deq = parts[3].clone().view(torch.float32).reshape(x.shape)
    deq_bf16 = parts[4].clone().view(torch.bfloat16).reshape(x.shape)
    return codes, scales, zeros, deq, deq_bf16


def _cpu_cpp_kernels() -> bool:
    return _backends.EXTENSION_ERROR is None and not _backends.triton_interpret()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_math_matches_reference(harness, tmp_path, bits, dtype):
    quant_ref = ref.quantize_int8 if bits == 8 else ref.quantize_int4
    seeds = [(1234, 99), (2**63 - 1, 2**40 + 2**34 - 7), (0xDEADBEEF12345, 2**34 - 100)]
    for case, (x, gs, tpg, vecs, splits) in enumerate(_cases()):
        xd = x.to(dtype)
        g = gs[bits]
        for symmetric in (False, True):
            for stochastic in (False, True):
                seed, offset = seeds[(case + 2 * symmetric + stochastic) % len(seeds)]
                what = f"case {case} {dtype} INT{bits} sym={symmetric} sr={stochastic}"
                got = _quantize_harness(harness, tmp_path, xd, bits, g, tpg, vecs[bits], splits, symmetric,
                                        stochastic, seed, offset)  # fmt: skip
                codes, scales, zeros = quant_ref(xd, g, symmetric, stochastic, seed, offset)
                assert torch.equal(got[0], codes), f"{what}: codes"
                torch.testing.assert_close(got[1], scales, rtol=0, atol=0, equal_nan=True, msg=f"{what}: scales")
                torch.testing.assert_close(got[2], zeros, rtol=0, atol=0, equal_nan=True, msg=f"{what}: zeros")
                unpacked = ref.unpack_int4(codes) if bits == 4 else codes
                assert_bits_equal_nan(got[3], ref.dequantize(unpacked, scales, zeros, torch.float32), f"{what}: deq")
                want_bf16 = ref.dequantize(unpacked, scales, zeros, torch.bfloat16)
                assert_bits_equal_nan(got[4], want_bf16, f"{what}: deq bf16")
                # bf16 NaN is written 0xFFFF, as the C++ CPU kernels write it: then all bits agree.
                assert bool((bits_of(got[4])[torch.isnan(got[4].float())] == -1).all()), f"{what}: bf16 NaN bits"
                if _cpu_cpp_kernels():
                    deq_op = torch.ops.fastgrad.dequantize_int8 if bits == 8 else torch.ops.fastgrad.dequantize_int4
                    cpu = deq_op(codes, scales, zeros, torch.bfloat16)
                    assert torch.equal(bits_of(got[4]), bits_of(cpu)), f"{what}: bf16 bits vs the CPU kernel"


def test_round_bf16_math_matches_reference(harness, tmp_path):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4099, generator=gen) * torch.logspace(-30, 30, 4099)
    x[:8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895314e38, -3.3895314e38, 1e-45, -1e-40])
    nan_bits = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF], dtype=torch.int64)
    x[8:13] = nan_bits.to(torch.int32).view(torch.float32)
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    x.numpy().tofile(inp)
    for seed, offset in ((5, 0), (2**63 - 1, 2**34 - 2000), (0xABCDEF, 2**62)):
        _run(harness, "round", seed, offset, inp, out)
        got = torch.from_file(str(out), size=x.numel(), dtype=torch.bfloat16)
        assert_bits_equal_nan(got, ref.round_bf16_stochastic(x, seed, offset), f"round_bf16 seed={seed}")
        # NaN keeps its sign and becomes quiet: top half of the fp32 pattern with bit 6 set.
        want_nan = ((nan_bits >> 16) | 0x40).to(torch.int32).to(torch.int16)
        assert torch.equal(bits_of(got[8:13]), want_nan)
        if _cpu_cpp_kernels():
            cpu = torch.ops.fastgrad.round_bf16_stochastic(x, seed, offset)
            assert torch.equal(bits_of(got), bits_of(cpu)), "round_bf16: bits vs the CPU kernel"


def test_philox_words_match_reference(harness, tmp_path):
    out = tmp_path / "philox.bin"
    # Offsets that are multiples of 4 take philox_run's block path, the others its per-word path.
    cases = ((0, 0), (1234, 99), (5, 2**34 - 4 * 40), (2**63 - 1, 2**32 - 3), (0x0123456789ABCDEF, 2**63 - 600))
    for seed, offset in cases:
        _run(harness, "philox", seed, offset, 512, out)
        got = torch.from_file(str(out), size=512, dtype=torch.int32).to(torch.int64) & 0xFFFFFFFF
        want = ref.philox_uint32(seed, torch.arange(512, dtype=torch.int64) + offset)
        assert torch.equal(got, want), f"philox seed={seed} offset={offset}"
