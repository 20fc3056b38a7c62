"""Helpers shared by the Triton kernel families: interpreter detection, autotune guard, bf16 stores."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastgrad._backends import triton_interpret

# Read once at import, like Triton itself (``@triton.jit`` picks the interpreter at decoration time).
INTERPRET: bool = triton_interpret()


def autotune(configs: list[triton.Config], key: list[str], restore_value: list[str] | None = None):
    """``triton.autotune`` over ``configs`` on a GPU; under the interpreter only the first config.

    With a single config the autotuner never benchmarks (benchmarking needs CUDA events), yet the
    launch still goes through the same autotuner and grid callback as on the GPU, so the
    interpreter exercises that code path too. Benchmarking runs a kernel many times: a kernel that
    updates a tensor in place names it in ``restore_value`` (the autotuner saves it before each
    timed run and copies it back after), otherwise the update would be applied once per run.
    """
    return triton.autotune(configs=configs[:1] if INTERPRET else configs, key=key, restore_value=restore_value)


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def parallel_slots(device: torch.device) -> int:
    """Programs that keep the device busy: 4 per SM on a GPU. Under the interpreter a small number,
    so that the split paths (quantization of few large groups, split-K) run with small test shapes."""
    if device.type == "cuda":
        return 4 * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def out_view(out: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel stores into: bf16 outputs are written as their int16 bit patterns."""
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


@triton.jit
def f32_to_bf16_bits(x):
    """fp32 -> bf16 bit pattern (int16), round-to-nearest-even, NaN kept (quiet, sign kept).

    Done in integer arithmetic because the interpreter's fp32 -> bf16 cast truncates (and ignores
    ``fp_downcast_rounding``); on a GPU this costs a few integer ops per element in a memory-bound
    kernel and gives the same bits as ``cvt.rn.bf16.f32`` and ``torch.Tensor.to(torch.bfloat16)``.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rne = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits >> 16) | 0x40
    return tl.where(x != x, nan, rne).to(tl.int16)


@triton.jit
def store_float(ptr, x, mask, OUT_BF16: tl.constexpr):
    """Store fp32 ``x`` into ``ptr`` (fp32/fp16, or the int16 view of a bf16 tensor)."""
    if OUT_BF16:
        tl.store(ptr, f32_to_bf16_bits(x), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_float(ptr, mask, IN_BF16: tl.constexpr):
    """Load fp32 values from ``ptr`` (fp32/fp16, or the int16 view of a bf16 tensor: a bf16 is the
    top half of the fp32 with the same value)."""
    if IN_BF16:
        bits = tl.load(ptr, mask=mask, other=0).to(tl.int32) << 16
        return bits.to(tl.float32, bitcast=True)
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
