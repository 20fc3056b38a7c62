"""Shared benchmark plumbing: every measured case appends one row to bench/results/<suite>.csv.

Run: ``python -m pytest bench/bench_quant.py --benchmark-only`` (add ``-k`` to select). Rows
record the device, versions and git sha, so results from different machines can sit side by
side; ``python bench/report.py`` renders the latest row of each case as Markdown tables. The providers
of a case are timed interleaved (see ``compare``).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch

import fastgrad

RESULTS = Path(__file__).parent / "results"
FIELDS = [
    "date", "git_sha", "fastgrad", "torch", "device", "threads", "suite", "op", "shape", "dtype", "provider",
    "median_ms", "p20_ms", "p80_ms", "gbps", "tflops", "note",
]  # fmt: skip


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} {os.cpu_count()} cores"


def _git_sha() -> str:
    try:
        root = Path(__file__).parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def time_round(
    fns: dict, times: dict[str, list[float]], device: str = "cpu", iters: dict[str, int] | None = None
) -> None:
    """One interleaved round: each provider in turn, appending its seconds per call to ``times[name]``.

    ``iters[name]`` (default 1) back-to-back calls make one sample: a GPU kernel of a few microseconds
    is then timed over many launches instead of one launch plus a synchronization. On CUDA the
    sample is bracketed by ``torch.cuda.synchronize`` (what ran before is not counted; the work
    itself is, to completion).
    """
    for name, fn in fns.items():
        n = iters.get(name, 1) if iters else 1
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times[name].append((time.perf_counter() - start) / n)


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of timing samples, as the CSV rows record them."""
    data = sorted(samples)
    return statistics.median(data), data[int(0.2 * (len(data) - 1))], data[int(0.8 * (len(data) - 1))]


def synchronized(fn, device: str):
    """Time GPU work to completion, not just its launch."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture
def compare(benchmark):
    """compare(suite, op, shape, dtype, device, providers, bytes_moved=0, flops=0, note="", rounds=10).

    ``providers`` maps a provider name to a zero-argument function. Every pytest-benchmark round
    runs each provider once, in turn, so that all of them see the same machine state: on a shared
    machine whose speed drifts, timing providers one after another would compare the drift, not
    the code. One CSV row per provider: median, p20 and p80 over the rounds.
    """

    def run(suite, op, shape, dtype, device, providers, bytes_moved=0, flops=0, note="", rounds=10):
        fns = {name: synchronized(fn, device) for name, fn in providers.items()}
        for fn in fns.values():
            fn()  # warm-up: Triton compilation, allocator, thread pool
        times: dict[str, list[float]] = {name: [] for name in fns}

        def one_round():
            time_round(fns, times)  # fns synchronize themselves (synchronized)

        benchmark.group = f"{op} {shape} {dtype} {device}"
        benchmark.extra_info.update(providers=list(fns))
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
        medians = {}
        for name, samples in times.items():
            median, p20, p80 = quantiles(samples)
            medians[name] = median
            _append_row(
                suite,
                {
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "git_sha": _git_sha(),
                    "fastgrad": fastgrad.__version__,
                    "torch": torch.__version__,
                    "device": device_name(device),
                    "threads": torch.get_num_threads(),
                    "suite": suite,
                    "op": op,
                    "shape": "x".join(map(str, shape)),
                    "dtype": str(dtype).replace("torch.", ""),
                    "provider": name,
                    "median_ms": f"{median * 1e3:.4f}",
                    "p20_ms": f"{p20 * 1e3:.4f}",
                    "p80_ms": f"{p80 * 1e3:.4f}",
                    "gbps": f"{bytes_moved / median / 1e9:.2f}" if bytes_moved else "",
                    "tflops": f"{flops / median / 1e12:.4f}" if flops else "",
                    "note": note,
                },
            )
        return medians

    return run


def _append_row(suite: str, row: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{suite}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
