"""The CUDA C++ kernels of fastgrad._C (csrc/cuda/quant.cu), on a GPU.

On CUDA the Triton kernels serve these ops unless ``FASTGRAD_CUDA_BACKEND=cuda`` was set before
fastgrad was imported (fastgrad/_backends.py), so every check runs in a fresh interpreter started
with that variable: this file re-runs itself (``python tests/test_cuda_kernels.py CHECK``).

Checked: the CUDA C++ kernel serves each op in that mode; quantizer codes, scales and zeros are
identical to fastgrad/_reference.py (and to the C++ CPU kernels, for shapes too large for the
pure-torch reference to be quick) for INT8/INT4 x asymmetric/symmetric x RTN/SR x fp32/bf16/fp16
inputs and group sizes covering every kernel path: the warp kernel (sub-warp teams, odd INT8
groups with one-value packs), the block kernel (whole rows staged in shared memory, beyond 48 KB,
too large to stage, split over blocks), misaligned inputs (element loads); dequantized values
bitwise (no FMA); bf16 stochastic rounding bitwise; special values; errors raised by the
kernels' own checks; the current stream and device.
The device math alone is also checked without a GPU, by tests/test_cuda_math.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_common import assert_bits_equal_nan, bits_of, special_values

import fastgrad  # noqa: F401  (FASTGRAD_CUDA_BACKEND is read here: set by the parent for the checks)
from fastgrad import _backends
from fastgrad import _reference as ref

F = torch.ops.fastgrad
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
OPS = ["quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4", "round_bf16_stochastic"]
REFERENCE_MAX_NUMEL = 1 << 18  # above: the C++ CPU kernels (bitwise the reference, tests/test_cpp_kernels.py)


# ---------------------------------------------------------------------------------------------
# Helpers (run in the child process)
# ---------------------------------------------------------------------------------------------


def _quantize(bits, *args):
    return (F.quantize_int8 if bits == 8 else F.quantize_int4)(*args)


def _dequantize(bits, *args):
    return (F.dequantize_int8 if bits == 8 else F.dequantize_int4)(*args)


def _oracle_quantize(bits, x_cpu, *args):
    if x_cpu.numel() <= REFERENCE_MAX_NUMEL or _backends.SERVED_BY[f"quantize_int{bits}"]["cpu"] != "cpp":
        return (ref.quantize_int8 if bits == 8 else ref.quantize_int4)(x_cpu, *args)
    return _quantize(bits, x_cpu, *args)


def _oracle_dequantize(bits, codes, scales, zeros, dtype):
    codes, scales, zeros = codes.cpu(), scales.cpu(), zeros.cpu()
    if codes.numel() <= REFERENCE_MAX_NUMEL or _backends.SERVED_BY[f"dequantize_int{bits}"]["cpu"] != "cpp":
        return (ref.dequantize_int8 if bits == 8 else ref.dequantize_int4)(codes, scales, zeros, dtype)
    return _dequantize(bits, codes, scales, zeros, dtype)


def _check_quantize(x, bits, group_size, symmetric, stochastic, seed, offset, what):
    """CUDA quantization of x (on the GPU) against the oracle on CPU; then dequantization."""
    got = _quantize(bits, x, group_size, symmetric, stochastic, seed, offset)
    want = _oracle_quantize(bits, x.cpu(), group_size, symmetric, stochastic, seed, offset)
    assert all(t.is_cuda for t in got), what
    assert torch.equal(got[0].cpu(), want[0]), f"{what}: codes ({int((got[0].cpu() != want[0]).sum())} differ)"
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=0, atol=0, equal_nan=True, msg=f"{what}: scales")
    torch.testing.assert_close(got[2].cpu(), want[2], rtol=0, atol=0, equal_nan=True, msg=f"{what}: zeros")
    for out_dtype in FLOATS:
        deq = _dequantize(bits, *got, out_dtype)
        assert_bits_equal_nan(deq, _oracle_dequantize(bits, *want, out_dtype), f"{what}: dequantize {out_dtype}")
    return got


def _data(shape, dtype, seed, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    rows = shape[0]
    spread = torch.logspace(-3, 3, rows).reshape(rows, *[1] * (len(shape) - 1))
    return (torch.randn(shape, generator=gen) * spread + 0.25).to(dtype).to(device)


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """The same values, contiguous, one element past an aligned address (no 16-byte packs)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# ---------------------------------------------------------------------------------------------
# Checks (each runs in a child process with FASTGRAD_CUDA_BACKEND=cuda)
# ---------------------------------------------------------------------------------------------


def check_served_by():
    assert fastgrad._C.with_cuda
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgrad::{op}", "CUDA"), op
        assert _backends.SERVED_BY[op]["cuda"] == "cuda", (op, _backends.SERVED_BY[op])


# (shape, INT8 group size, INT4 group size). Warp kernel: sub-warp teams (32, 128, 256), odd INT8
# groups (one-value packs), degenerate groups. Block kernel: whole rows of 11008 staged in shared
# memory, a few rows of 70000 split over blocks (two launches), groups of 8193 (INT8: one-value
# packs) and 16386 (INT4: two-value packs) split over blocks.
QUANT_CASES = [
    ((64, 256), 32, 32),
    ((33, 384), 128, 128),
    ((8, 204), 17, 34),
    ((5, 90), 1, 2),
    ((3, 2, 4096), 256, 256),
    ((4, 11008), -1, -1),
    ((2, 70000), -1, -1),
    ((3, 8193 * 2), 8193, 8193 * 2),
]


def check_quantize_matches_reference():
    for ci, (shape, g8, g4) in enumerate(QUANT_CASES):
        for dtype in FLOATS:
            x = _data(shape, dtype, seed=ci)
            for bits, g in ((8, g8), (4, g4)):
                for symmetric in (False, True):
                    for stochastic in (False, True):
                        what = f"{shape} g={g} {dtype} INT{bits} sym={symmetric} sr={stochastic}"
                        _check_quantize(x, bits, g, symmetric, stochastic, 1234 + ci, 99 + 1000 * ci, what)


def check_many_large_groups():
    # More large groups than SMs (no slices; grid-stride over groups): staged in more than 48 KB
    # of shared memory (opt-in), and too large to stage (the encode pass reads x again).
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = 4 * sms + 3
    for dtype, n in ((torch.float32, 16388), (torch.float32, 32772), (torch.bfloat16, 65544)):
        x = _data((rows, n), dtype, seed=7)
        for bits in (8, 4):
            for stochastic in (False, True):
                _check_quantize(x, bits, -1, False, stochastic, 5, 2**33, f"{rows}x{n} {dtype} INT{bits}")


def check_misaligned_and_offsets():
    for dtype in FLOATS:
        for shape, g in (((6, 256), 64), ((4, 11008), -1), ((1, 70000), -1)):
            x = _misaligned(_data(shape, dtype, seed=3))
            for bits in (8, 4):
                for seed, offset in ((0, 0), (2**63 - 1, 2**34 - 77), (0xDEADBEEF, 2**63 - 1 - x.numel())):
                    _check_quantize(x, bits, g, False, True, seed, offset, f"misaligned {shape} {dtype} INT{bits}")


def check_special_values():
    x = special_values()
    for dtype in FLOATS:
        for bits in (8, 4):
            for symmetric in (False, True):
                for stochastic in (False, True):
                    what = f"special {dtype} INT{bits} sym={symmetric} sr={stochastic}"
                    _check_quantize(x.to(dtype).cuda(), bits, 32, symmetric, stochastic, 5, 2**45, what)


def check_dequantize_arbitrary_storage():
    # Any storage the schema accepts decodes like the reference: random codes (INT8 above 15, both
    # nibbles), scales and zeros; 16-, 4- and 1-value packs; misaligned codes (byte loads).
    gen = torch.Generator().manual_seed(11)
    for shape, groups in (((3, 2, 30), 3), ((5, 14), 1), ((1001,), 7), ((2, 602), 2), ((16, 4096), 32)):
        codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        scales = torch.randn(*shape[:-1], groups, generator=gen)
        zeros = torch.randn(*shape[:-1], groups, generator=gen)
        for bits in (8, 4):
            if bits == 4 and (shape[-1] * 2 // groups) % 2:
                continue
            for misaligned in (False, True):
                c = _misaligned(codes.cuda()) if misaligned else codes.cuda()
                for out_dtype in FLOATS:
                    got = _dequantize(bits, c, scales.cuda(), zeros.cuda(), out_dtype)
                    want = (ref.dequantize_int8 if bits == 8 else ref.dequantize_int4)(codes, scales, zeros, out_dtype)
                    assert_bits_equal_nan(
                        got, want, f"dequantize INT{bits} {shape} {out_dtype} misaligned={misaligned}"
                    )


def check_round_bf16():
    gen = torch.Generator().manual_seed(8)
    for n in (1, 3, 4099, 1 << 20):
        x = torch.randn(n, generator=gen) * torch.logspace(-30, 30, n)
        if n > 16:
            x[:8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895314e38, -3.3895314e38, 1e-45, -1e-40])
            nan_bits = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF], dtype=torch.int64)
            x[8:13] = nan_bits.to(torch.int32).view(torch.float32)
        for misaligned in (False, True):
            xc = _misaligned(x.cuda()) if misaligned else x.cuda()
            for seed, offset in ((5, 0), (2**63 - 1, 2**34 - 2000), (0xABCDEF, 2**63 - 1 - n)):
                got = F.round_bf16_stochastic(xc, seed, offset)
                assert got.is_cuda and got.dtype == torch.bfloat16
                assert_bits_equal_nan(got, ref.round_bf16_stochastic(x, seed, offset), f"round_bf16 n={n}")
                if _backends.SERVED_BY["round_bf16_stochastic"]["cpu"] == "cpp":  # NaN bits too
                    assert torch.equal(bits_of(got.cpu()), bits_of(F.round_bf16_stochastic(x, seed, offset)))
    y = torch.randn(7, 33, device="cuda")  # any shape; counters follow the row-major flat index
    assert torch.equal(F.round_bf16_stochastic(y, 1, 2).cpu(), ref.round_bf16_stochastic(y.cpu(), 1, 2))


def check_errors():
    x = torch.randn(8, 64, device="cuda")
    cases = [
        (
            lambda: F.quantize_int8(x.t(), 8, False, False, 0, 0),
            r"fastgrad\.quantize_int8: argument 'x' must be contiguous",
        ),
        (
            lambda: F.quantize_int8(x.double(), 8, False, False, 0, 0),
            r"argument 'x' must be float32, bfloat16 or float16",
        ),
        (lambda: F.quantize_int4(x, 7, False, False, 0, 0), r"fastgrad\.quantize_int4: argument 'group_size' must be"),
        (lambda: F.quantize_int8(x, 5, False, False, 0, 0), r"argument 'group_size' must be a divisor"),
        (lambda: F.quantize_int8(x, 8, False, True, -1, 0), r"argument 'seed' must be"),
        (lambda: F.quantize_int8(x, 8, False, True, 0, 2**63 - 10), r"argument 'offset' must be"),
        (
            lambda: F.round_bf16_stochastic(x.half(), 0, 0),
            r"fastgrad\.round_bf16_stochastic: argument 'x' must be float32",
        ),
    ]
    codes, scales, zeros = F.quantize_int8(x, 16, False, False, 0, 0)
    cases += [
        (lambda: F.dequantize_int8(codes.float(), scales, zeros, torch.float32), r"argument 'codes' must be uint8"),
        (lambda: F.dequantize_int8(codes, scales.double(), zeros, torch.float32), r"argument 'scales' must be float32"),
        (
            lambda: F.dequantize_int8(codes, scales, zeros[:, :2].contiguous(), torch.float32),
            r"argument 'zeros' must be of shape",
        ),
        (lambda: F.dequantize_int8(codes, scales, zeros.cpu(), torch.float32), r"argument 'zeros' must be on codes's"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def check_streams():
    x = _data((64, 1024), torch.bfloat16, seed=9)
    want = F.quantize_int4(x, 128, False, True, 3, 4)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = F.quantize_int4(x, 128, False, True, 3, 4)
        deq = F.dequantize_int4(*got, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(deq, F.dequantize_int4(*want, torch.bfloat16))
    if torch.cuda.device_count() > 1:  # the device guard: inputs on a non-current device
        x1 = x.to("cuda:1")
        got1 = F.quantize_int4(x1, 128, False, True, 3, 4)
        assert got1[0].device == x1.device and torch.equal(got1[0].cpu(), want[0].cpu())


CHECKS = {name[len("check_") :]: fn for name, fn in dict(globals()).items() if name.startswith("check_")}


# ---------------------------------------------------------------------------------------------
# pytest side (parent process)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_cuda_kernel(check):
    if _backends.EXTENSION_ERROR is not None:
        pytest.skip(f"fastgrad._C did not load: {_backends.EXTENSION_ERROR}")
    if not getattr(fastgrad._C, "with_cuda", False):
        pytest.skip("fastgrad._C was built without CUDA kernels (needs a CUDA torch and toolkit at build time)")
    env = dict(os.environ, FASTGRAD_CUDA_BACKEND="cuda")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), check], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"check {check} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    assert proc.stdout.strip().endswith(f"ok {check}")


if __name__ == "__main__":
    assert os.environ.get("FASTGRAD_CUDA_BACKEND") == "cuda", "run through pytest (sets FASTGRAD_CUDA_BACKEND=cuda)"
    CHECKS[sys.argv[1]]()
    print(f"ok {sys.argv[1]}")
