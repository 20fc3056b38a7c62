"""Compile every Triton launch of fastgrad for real GPU targets on a machine without a GPU.

``python -m fastgrad.kernels.aot`` drives the public launchers (``fastgrad.kernels.TRITON_KERNELS``)
over the LLaMA 60M-7B shapes and every variant they take (input dtypes fp32/bf16/fp16, INT4/INT8,
symmetric/affine, stochastic/round-to-nearest, both projection sides, dense/quantized projector,
float/INT8 weight, the split paths, wide/tall Newton–Schulz) with meta tensors, for each GPU target
below. The launchers run unchanged: ``launch`` (``_common.py``) compiles their kernels for the
target, picks the config it would run on that GPU (the first of the kernel's ordered candidates
that fits the target's shared memory without register spills) and stops before anything would
execute. So the list of specializations is the launchers' own: a new constexpr, config or code
path is compiled the day it is added, with no list here to keep in step.

For every launch it asserts that a config was chosen that compiles, fits the per-block shared
memory of the target, and does not spill; it writes one row per (target, kernel, specialization)
with the chosen config's registers, spilled bytes and shared memory, and a summary per kernel and
target (``--csv``, ``--markdown``). Exit status 1 on any failure.

Registers, local memory (spills) and shared memory are read from the compiled cubin by the
``cuobjdump`` that ships with Triton; no CUDA driver is involved.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from . import _common
from ._common import Resources, Target

# The GPUs fastgrad is built for, with the SM count of one representative card (it sizes the
# grids, and so decides split paths) and the opt-in shared memory per block.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("sm_80", 80, 108, 166912),  # A100: 163 KB
        Target("sm_86", 86, 82, 101376),  # RTX 3090: 99 KB
        Target("sm_89", 89, 128, 101376),  # RTX 4090: 99 KB
        Target("sm_90", 90, 132, 232448),  # H100 / H200: 227 KB
        Target("sm_120", 120, 170, 101376),  # RTX 5090: 99 KB
    )
}


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: it names the target and nothing else, which is all that
    compiling (``JITFunction.warmup``) asks of a driver. A launch would fail: none is made."""

    def __init__(self, target: Target):
        self.target = GPUTarget("cuda", target.capability, 32)
        self.device = target.capability  # Triton keeps one compile cache per device id

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device=None) -> int:
        return 0


@contextlib.contextmanager
def compile_only(target: Target) -> Iterator[list[dict]]:
    """Within the block every Triton launch of fastgrad compiles for ``target`` and chooses its
    config as on that GPU, then returns without running. Yields the launch log (a list of
    ``{"kernel", "dtypes", "constexprs", "chosen", "tried"}`` dicts, one per new specialization)."""
    driver.set_active(_CompileOnlyDriver(target))  # no GPU here: there is no default driver to keep
    _common._COMPILE_ONLY = target
    _common.LAUNCH_LOG.clear()
    try:
        yield _common.LAUNCH_LOG
    finally:
        _common._COMPILE_ONLY = None
        driver._active = None  # back to Triton's default (resolved lazily, as before)


@functools.cache
def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cubin_resources(compiled) -> Resources:
    """Shared memory (Triton's metadata: it includes the dynamic shared memory the kernel asks
    for), registers per thread and local memory per thread (spills) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = {}
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    if not fields:
        raise RuntimeError(f"cuobjdump reported no function resources:\n{out}")
    return Resources(compiled.metadata.shared, int(fields["REG"]), int(fields["LOCAL"]) + int(fields["STACK"]))


# ---------------------------------------------------------------------------------------------
# What the launchers are driven with
# ---------------------------------------------------------------------------------------------

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# (name, rows m, columns n, rank r) of LLaMA weights: the 60M attention (a small matmul: the
# split and small-tile paths), the 1B MLP down projection (a width that is not a multiple of 16)
# and the 7B MLP (large: the large tiles). Other shapes specialize the same ways.
SHAPES = (
    ("60m-attn", 512, 512, 128),
    ("1b-mlp-down", 2048, 5461, 512),
    ("7b-mlp", 11008, 4096, 1024),
)
TOKENS = 2048  # rows of dy and x in the low-rank weight gradient
# (name, m, n) of the weights Muon orthogonalizes (newton_schulz): LLaMA 60M attention and MLP down
# (wide) / gate-up (tall: transposed inside, the result stored through transposed strides), 1B and
# 7B attention and MLP, wide and tall (5461 is not a multiple of 16).
NS_SHAPES = (
    ("60m-attn", 512, 512),
    ("60m-mlp-down", 512, 1376),
    ("60m-mlp-up", 1376, 512),
    ("1b-attn", 2048, 2048),
    ("1b-mlp-down", 2048, 5461),
    ("1b-mlp-up", 5461, 2048),
    ("7b-attn", 4096, 4096),
    ("7b-mlp-down", 4096, 11008),
    ("7b-mlp-up", 11008, 4096),
)


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _quantized(rows: int, cols: int, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales, zeros of a (rows × cols) tensor quantized in groups of ``group`` along rows."""
    return _meta(rows, cols * bits // 8, dtype=torch.uint8), _meta(rows, cols // group), _meta(rows, cols // group)


def _proj_group(cols: int) -> int | None:
    """The INT4/INT8 projector group Q-GaLore uses along a P row of ``cols`` values (its default
    ``proj_group_size``), or None for an odd row, which Q-GaLore does not quantize."""
    from fastgrad.optim.projectors import proj_group_size
    from fastgrad.optim.qgalore import QGALORE_DEFAULTS

    return None if cols % 2 else proj_group_size(cols, QGALORE_DEFAULTS["proj_group_size"])


# (stochastic, offset): round to nearest; stochastic with four words per Philox evaluation (offset
# a multiple of 4: BLOCK_WORDS); stochastic with one evaluation per word (any other offset).
_ROUNDINGS = ((False, 0), (True, 0), (True, 1))


def workloads() -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, call) pairs: one call of a public launcher each."""
    from . import TRITON_KERNELS as K

    # Quantizers: many small groups (one chunk, the optimizer states and projectors), whole rows
    # (several chunks per group), one huge group (split over programs: stats, then encode).
    for bits in (8, 4):
        quantize = K[f"quantize_int{bits}"]
        dequantize = K[f"dequantize_int{bits}"]
        for shape, group in (((4096, 4096), 256), ((4096, 11008), -1), ((1 << 22,), -1), ((512, 96), 32)):
            for dtype in FLOATS:
                for symmetric in (False, True):
                    for stochastic, offset in _ROUNDINGS if not symmetric else _ROUNDINGS[:2]:
                        yield (
                            f"quantize_int{bits} {shape} g={group} {dtype} sym={symmetric} sr={stochastic}"
                            f" offset={offset}",
                            functools.partial(
                                quantize, _meta(*shape, dtype=dtype), group, symmetric, stochastic, 1, offset
                            ),
                        )
            g = shape[-1] if group == -1 else group
            codes, scales, zeros = _quantized(int(torch.Size(shape[:-1]).numel()), shape[-1], bits, g)
            for dtype in FLOATS:
                yield (
                    f"dequantize_int{bits} {shape} g={g} -> {dtype}",
                    functools.partial(dequantize, codes, scales, zeros, dtype),
                )
    for offset in (0, 1):
        yield (
            f"round_bf16_stochastic offset={offset}",
            functools.partial(K["round_bf16_stochastic"], _meta(4096, 4096), 1, offset),
        )

    # Newton-Schulz (Muon): fp32 and bf16, five steps of torch's coefficients (one compiled kernel per
    # specialization serves every step), and a batch (8 matrices of 64×512: the grid's batch axis).
    for name, m, n in NS_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            yield (
                f"newton_schulz {name} {m}x{n} {dtype}",
                functools.partial(K["newton_schulz"], _meta(m, n, dtype=dtype), [3.4445, -4.775, 2.0315] * 5, 1e-7),
            )
    for dtype in (torch.float32, torch.bfloat16):
        yield (
            f"newton_schulz batch 8x64x512 {dtype}",
            functools.partial(K["newton_schulz"], _meta(8, 64, 512, dtype=dtype), [3.4445, -4.775, 2.0315] * 5, 1e-7),
        )

    for name, m, n, r in SHAPES:
        for side in ("left", "right"):
            p_shape = (m, r) if side == "left" else (r, n)
            r_shape = (r, n) if side == "left" else (m, r)
            p_bits = (4, 8) if _proj_group(p_shape[1]) else ()  # an odd row is not quantized
            for dtype in FLOATS:
                g, p, rr = _meta(m, n, dtype=dtype), _meta(*p_shape, dtype=dtype), _meta(*r_shape, dtype=dtype)
                dy, x = _meta(TOKENS, m, dtype=dtype), _meta(TOKENS, n, dtype=dtype)
                tag = f"{name} {side} {dtype}"
                yield f"lowrank_project {tag}", functools.partial(K["lowrank_project"], g, p, side)
                yield f"lowrank_project_back {tag}", functools.partial(K["lowrank_project_back"], rr, p, side, 0.25)
                yield (
                    f"lowrank_project_back_add_ {tag}",
                    functools.partial(K["lowrank_project_back_add_"], g, rr, p, side, 0.25),
                )
                yield f"lowrank_grad {tag}", functools.partial(K["lowrank_grad"], dy, x, p, side)
                for bits in p_bits:
                    q = _quantized(*p_shape, bits, _proj_group(p_shape[1]))
                    qtag = f"{tag} int{bits} P"
                    yield (
                        f"lowrank_project_quantized {qtag}",
                        functools.partial(K["lowrank_project_quantized"], g, *q, bits, side),
                    )
                    yield (
                        f"lowrank_project_back_quantized {qtag}",
                        functools.partial(K["lowrank_project_back_quantized"], rr, *q, bits, side, 0.25),
                    )
                    yield (
                        f"lowrank_project_back_quantized_add_ {qtag}",
                        functools.partial(K["lowrank_project_back_quantized_add_"], g, rr, *q, bits, side, 0.25),
                    )
                    yield (
                        f"lowrank_grad_quantized {qtag}",
                        functools.partial(K["lowrank_grad_quantized"], dy, x, *q, bits, side),
                    )
            # The fused Adam step: moments in fp32 or bf16, W in any float dtype or INT8.
            adam = (0.9, 0.999, 1e-8, 1.0, -0.01, 1.0)
            for w_dtype, mom_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                       (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):  # fmt: skip
                w, rr = _meta(m, n, dtype=w_dtype), _meta(*r_shape, dtype=w_dtype)
                mm, vv = _meta(*r_shape, dtype=mom_dtype), _meta(*r_shape, dtype=mom_dtype)
                tag = f"{name} {side} W {w_dtype} moments {mom_dtype}"
                yield (
                    f"galore_adam_step_ {tag}",
                    functools.partial(
                        K["galore_adam_step_"], w, mm, vv, rr, _meta(*p_shape, dtype=w_dtype), side, *adam
                    ),
                )
                for bits in p_bits:
                    q = _quantized(*p_shape, bits, _proj_group(p_shape[1]))
                    yield (
                        f"galore_adam_step_quantized_ {tag} int{bits} P",
                        functools.partial(K["galore_adam_step_quantized_"], w, mm, vv, rr, *q, bits, side, *adam),
                    )
            for w_group in (256, n):  # QLinear's default group, and one group per row
                if n % w_group:
                    continue
                wq = _quantized(m, n, 8, w_group)
                rr, mm, vv = _meta(*r_shape), _meta(*r_shape), _meta(*r_shape)
                for bits in p_bits:
                    q = _quantized(*p_shape, bits, _proj_group(p_shape[1]))
                    for stochastic, offset in _ROUNDINGS if w_group == 256 else _ROUNDINGS[:2]:
                        yield (
                            f"galore_adam_step_int8_ {name} {side} W g={w_group} int{bits} P sr={stochastic}"
                            f" offset={offset}",
                            functools.partial(
                                K["galore_adam_step_int8_"],
                                *wq,
                                mm,
                                vv,
                                rr,
                                *q,
                                bits,
                                side,
                                *adam,
                                stochastic,
                                1,
                                offset,
                            ),  # fmt: skip
                        )


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

CSV_FIELDS = [
    "triton",
    "target",
    "kernel",
    "specialization",
    "config",
    "registers",
    "spilled",
    "shared",
    "max_shared",
    "ok",
]


def _config_str(config: triton.Config) -> str:
    meta = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta} warps={config.num_warps} stages={config.num_stages}".strip()


def compile_target(target: Target, select: str | None = None, calls=None) -> list[dict]:
    """Drive every workload of ``calls()`` (or those whose label contains ``select``) compiling for
    ``target``; return one row per new (kernel, specialization), or per failed workload."""
    rows = []
    with compile_only(target) as log:
        for label, call in (calls or workloads)():
            if select and select not in label:
                continue
            start = len(log)
            try:
                call()
            except Exception as e:  # a compile error, or no config fits: a failure of this target
                rows.append(_row(target, label.split()[0], label, None, None, _error_text(e)))
                continue
            for entry in log[start:]:
                constexprs = (f"{k}={v}" for k, v in entry["constexprs"].items() if not k.startswith("enable"))
                spec = " ".join(["(" + ",".join(entry["dtypes"]) + ")", *constexprs])
                res = dict((str(c), r) for c, r in entry["tried"])[str(entry["chosen"])]
                rows.append(_row(target, entry["kernel"], spec, entry["chosen"], res, None))
    return rows


def _error_text(e: BaseException) -> str:
    """The innermost cause of a compile error, on one line (Triton wraps it in the kernel's source)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"


def _row(target, kernel, spec, config, res, error) -> dict:
    return {
        "triton": triton.__version__,
        "target": target.name,
        "kernel": kernel,
        "specialization": spec,
        "config": _config_str(config) if config is not None else error,
        "registers": res.registers if res else "",
        "spilled": res.spilled if res else "",
        "shared": res.shared if res else "",
        "max_shared": target.max_shared,
        "ok": error is None and res is not None and res.fits(target),
    }


def summary(rows: list[dict]) -> str:
    """Markdown: per Triton version, kernel and target, the specializations compiled and the worst
    registers, spills and shared memory among the configs chosen (``rows`` as written to the CSV,
    numbers as ints or strings)."""

    def num(v) -> int:
        return int(v) if v not in ("", None) else 0

    targets = sorted({r["target"] for r in rows}, key=lambda t: TARGETS[t].capability)
    out = [
        "Per kernel and GPU target: the specializations compiled, then, over the configs chosen for them, "
        "the most registers per thread / bytes spilled / shared memory per block (KB).",
    ]
    for version in sorted({r["triton"] for r in rows}):
        sel_v = [r for r in rows if r["triton"] == version]
        out += [
            "",
            f"| Triton {version} | "
            + " | ".join(f"{t} (≤ {TARGETS[t].max_shared // 1024} KB)" for t in targets)
            + " |",
            "|---|" + "---:|" * len(targets),
        ]
        for k in sorted({r["kernel"] for r in sel_v}):
            cells = []
            for t in targets:
                sel = [r for r in sel_v if r["kernel"] == k and r["target"] == t]
                if not sel:
                    cells.append("")
                    continue
                good = [r for r in sel if r["registers"] not in ("", None)]
                bad = sum(str(r["ok"]) != "True" for r in sel)
                regs = max((num(r["registers"]) for r in good), default=0)
                spill = max((num(r["spilled"]) for r in good), default=0)
                shared = max((num(r["shared"]) for r in good), default=0) / 1024
                cells.append(f"{len(sel)}: {regs} / {spill} / {shared:.1f}" + (f" **{bad} failed**" if bad else ""))
            out.append(f"| `{k}` | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_csv(path: str, rows: list[dict]) -> None:
    """Write ``rows`` to ``path``, keeping the rows of other Triton versions already there (one
    results file holds the runs of every Triton version; a run replaces its own version's rows)."""
    versions = {r["triton"] for r in rows}
    kept = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r["triton"] not in versions]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(kept + rows)


def _compile_in_process(name: str, select: str | None) -> list[dict]:
    return compile_target(TARGETS[name], select)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgrad.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, of " + ", ".join(TARGETS))
    parser.add_argument("--select", default=None, help="only the workloads whose label contains this")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="targets compiled in parallel")
    parser.add_argument(
        "--csv", default=None, help="write one row per (target, kernel, specialization), replacing this Triton's rows"
    )
    parser.add_argument("--markdown", default=None, help="write the per-kernel summary table")
    args = parser.parse_args(argv)
    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        parser.error(f"argument --targets: unknown {unknown}, expected some of {list(TARGETS)}")
    start = time.perf_counter()
    if args.jobs > 1 and len(names) > 1:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh Triton per process: no shared driver state
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            results = list(pool.map(_compile_in_process, names, [args.select] * len(names)))
    else:
        results = [compile_target(TARGETS[n], args.select) for n in names]
    rows = [r for rs in results for r in rs]
    failed = [r for r in rows if not r["ok"]]
    table = summary(rows)
    print(table)
    for r in failed:
        print(f"FAILED {r['target']} {r['kernel']} [{r['specialization']}]: {r['config']} (registers "
              f"{r['registers']}, spilled {r['spilled']}, shared {r['shared']} of {r['max_shared']})")  # fmt: skip
    print(f"{len(rows)} kernel specializations compiled for {', '.join(names)} with Triton {triton.__version__} in "
          f"{time.perf_counter() - start:.0f} s: {len(rows) - len(failed)} passed, {len(failed)} failed")  # fmt: skip
    if args.csv:
        write_csv(args.csv, rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
