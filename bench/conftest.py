"""Shared benchmark plumbing: every measured case appends one row to bench/results/<suite>.csv.

Run: ``python -m pytest bench/bench_quant.py --benchmark-only`` (add ``-k`` to select). Rows
record the device, versions and git sha, so results from different machines can sit side by
side; ``python bench/report.py`` renders the latest row of each case as Markdown tables.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
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
def measure(benchmark, request):
    """measure(suite, op, shape, dtype, provider, device, fn, bytes_moved=0, flops=0, note="")."""

    def run(suite, op, shape, dtype, provider, device, fn, bytes_moved=0, flops=0, note="", rounds=10):
        fn = synchronized(fn, device)
        fn()  # warm-up: Triton compilation, allocator, thread pool
        benchmark.group = f"{op} {shape} {dtype} {device}"
        benchmark.extra_info.update(provider=provider)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        data = sorted(benchmark.stats.stats.data)

        def pct(q):
            return data[min(len(data) - 1, int(q * len(data)))] * 1e3

        median = benchmark.stats.stats.median
        row = {
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
            "provider": provider,
            "median_ms": f"{median * 1e3:.4f}",
            "p20_ms": f"{pct(0.2):.4f}",
            "p80_ms": f"{pct(0.8):.4f}",
            "gbps": f"{bytes_moved / median / 1e9:.2f}" if bytes_moved else "",
            "tflops": f"{flops / median / 1e12:.4f}" if flops else "",
            "note": note,
        }
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{suite}.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        return median

    return run
