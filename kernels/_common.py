"""Helpers shared by the Triton kernel families: interpreter detection, the target a launch must
fit, the one launch path (deterministic config choice, device guard), bf16 loads and stores."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Triton's own reading of TRITON_INTERPRET, taken once at import as ``@triton.jit`` does at decoration.
INTERPRET: bool = triton.knobs.runtime.interpret


@dataclass(frozen=True)
class Target:
    """What a launch must fit: a GPU's compute capability, SM count and the most shared memory one
    block may use (bytes, the opt-in limit, as Triton checks it at load time)."""

    name: str
    capability: int  # 80, 86, 89, 90, 120, ...
    sm_count: int
    max_shared: int


# Set by ``fastgrad.kernels.aot.compile_only``: launches then compile for this target and stop
# there (nothing runs), so that a machine without a GPU sees what a GPU launch would choose.
_COMPILE_ONLY: Target | None = None


@functools.cache
def _cuda_target(index: int) -> Target:
    from triton.runtime import driver

    props = torch.cuda.get_device_properties(index)
    max_shared = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return Target(props.name, props.major * 10 + props.minor, props.multi_processor_count, max_shared)


def device_target(device: torch.device) -> Target | None:
    """The GPU that a launch on ``device`` runs on (or compiles for); None under the interpreter."""
    if _COMPILE_ONLY is not None:
        return _COMPILE_ONLY
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return None


def parallel_slots(device: torch.device) -> int:
    """Programs that keep the device busy: 4 per SM on a GPU. Under the interpreter a small number,
    so that the split paths (quantization of few large groups, split-K) run with small test shapes."""
    target = device_target(device)
    return 8 if target is None else 4 * target.sm_count


@dataclass(frozen=True)
class Resources:
    """What a compiled kernel needs per block: shared memory and registers (per thread), and the
    local memory per thread that ptxas spilled registers to (0 for a kernel that does not spill)."""

    shared: int
    registers: int
    spilled: int

    def fits(self, target: Target) -> bool:
        return self.shared <= target.max_shared and self.spilled == 0


def _resources(compiled, target: Target) -> Resources:
    if _COMPILE_ONLY is not None:
        from fastgrad.kernels.aot import cubin_resources

        return cubin_resources(compiled)
    if compiled.metadata.shared > target.max_shared:  # loading it would raise: rejected as it is
        return Resources(compiled.metadata.shared, 0, 0)
    compiled._init_handles()  # loads the binary: the driver reports registers and local memory
    return Resources(compiled.metadata.shared, compiled.n_regs, compiled.n_spills)


# (kernel, target, specialization) -> chosen config. Filled once per process; the choice depends on
# the target and the compiler only, so every rank and every run chooses the same config.
_CHOSEN: dict[tuple, triton.Config] = {}
# Filled in compile-only mode: every launch's choice and the resources of each candidate tried
# (kernel, its tensor arguments' dtypes, constexprs, chosen config, [(config, Resources)]).
LAUNCH_LOG: list[dict] = []


def _spec_key(args: tuple, constexprs: dict) -> tuple:
    """What selects a compiled kernel besides the config: argument dtypes, 16-divisibility of the
    integer arguments (Triton specializes on it) and the constexpr values."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(a.dtype)
        elif isinstance(a, bool):
            parts.append(a)
        elif isinstance(a, int):
            parts.append(("i", a == 1, a % 16 == 0, -(2**31) <= a < 2**31))
        else:
            parts.append(type(a).__name__)
    return (*parts, *sorted(constexprs.items()))


def launch(kernel, grid, args: tuple, constexprs: dict, configs: list[triton.Config], device: torch.device):
    """Launch ``kernel[grid(config)](*args, **constexprs, **config)`` with the first of ``configs``
    that fits the device: its shared memory within the per-block limit and no register spills.

    ``configs`` is ordered by preference (the fastest expected first). No timing is involved, so
    the choice is deterministic: the same on every rank of a distributed run and in every run, with
    no benchmark runs of in-place kernels and no memory spike. Compiling a candidate to read its
    resources is what a first launch does anyway; the choice is cached per (kernel, device,
    specialization). If no candidate avoids spills, the first that fits shared memory is taken
    (slower, still correct) with a warning; if none fits, the error names the kernel.
    Under the interpreter the first config runs. Launches are guarded to ``device`` (a tensor on
    cuda:1 runs on GPU 1 whatever the current device is).
    """
    if INTERPRET:
        config = configs[0]
        kernel[grid(config.kwargs)](*args, **constexprs, **config.all_kwargs())
        return config
    if _COMPILE_ONLY is not None:
        return _chosen_config(kernel, grid, args, constexprs, configs, _COMPILE_ONLY)
    with torch.cuda.device(device):  # Triton launches (and compiles) for the current device
        config = _chosen_config(kernel, grid, args, constexprs, configs, device_target(device))
        kernel[grid(config.kwargs)](*args, **constexprs, **config.all_kwargs())
    return config


def _chosen_config(kernel, grid, args, constexprs, configs, target: Target) -> triton.Config:
    key = (kernel.fn.__name__, target, _spec_key(args, constexprs), tuple(map(str, configs)))
    config = _CHOSEN.get(key)
    if config is None:
        config = _CHOSEN[key] = _choose(kernel, grid, args, constexprs, configs, target)
    return config


def _gpu_name(target: Target) -> str:
    sm = f"sm_{target.capability}"
    return sm if target.name == sm else f"{target.name} ({sm})"


def _choose(kernel, grid, args, constexprs, configs, target: Target) -> triton.Config:
    tried = []
    chosen = None
    for config in configs:
        compiled = kernel.warmup(*args, grid=grid(config.kwargs), **constexprs, **config.all_kwargs())
        res = _resources(compiled, target)
        tried.append((config, res))
        if res.fits(target):
            chosen = config
            break
    if chosen is None:
        runnable = [c for c, r in tried if r.shared <= target.max_shared]
        if not runnable:
            raise RuntimeError(
                f"fastgrad: no config of {kernel.fn.__name__} fits {_gpu_name(target)}: "
                + "; ".join(f"{c}: {r.shared} B shared > {target.max_shared}" for c, r in tried)
            )
        chosen = runnable[0]
        warnings.warn(
            f"fastgrad: every config of {kernel.fn.__name__} spills registers on {_gpu_name(target)}; "
            f"running {chosen} (correct, slower)",
            stacklevel=3,
        )
    if _COMPILE_ONLY is not None:
        dtypes = [str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)]
        LAUNCH_LOG.append(
            {"kernel": kernel.fn.__name__, "dtypes": dtypes, "constexprs": dict(constexprs), "chosen": chosen,
             "tried": tried}
        )  # fmt: skip
    return chosen


def out_view(out: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel stores into: bf16 outputs are written as their int16 bit patterns."""
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


@triton.jit
def f32_to_bf16_bits(x):
    """fp32 -> bf16 bit pattern (int16), round-to-nearest-even; NaN -> 0xFFFF, the rule of every
    fastgrad kernel (csrc/common/quant_math.h::float_to_bf16_rne, and torch's CPU conversion that
    the reference uses).

    Done in integer arithmetic because the interpreter's fp32 -> bf16 cast truncates (and ignores
    ``fp_downcast_rounding``); on a GPU this costs a few integer ops per element in a memory-bound
    kernel and gives the bits of ``cvt.rn.bf16.f32`` for every non-NaN value.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rne = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0xFFFF, rne).to(tl.int16)


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
