"""Render bench/results/*.csv as Markdown: the latest row of each case, with speed-ups.

python bench/report.py            # print
python bench/report.py --readme   # replace the blocks between the bench and kernels markers in README.md

The kernels block is the compile table of ``python -m fastgrad.kernels.aot --csv
bench/results/kernels-compile.csv`` (one run per Triton version; each replaces its own rows). The
compare-table block is bench/results/compare-tiny.json, the compare.json of
``fastgrad compare --optims adamw,galore,q-galore`` (README, "Comparing optimizers"). The
memory-example and memory-modes blocks are computed by the memory model itself (``fastgrad memory``),
which needs no results file.
"""

from __future__ import annotations

import argparse
import csv
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).parent.parent
BASELINE = {
    "quant": "reference",
    "project": "torch-matmul",
    "optim": ("galore-torch", "fira"),
    "lowrank": ("full-G-then-project", "dequantize-then-matmul"),
}
REFRESH_BASELINE = "svd"  # refresh steps compare to the exact SVD
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
KERNELS_BEGIN, KERNELS_END = "<!-- kernels:begin -->", "<!-- kernels:end -->"
COMPILE_RESULTS = ROOT / "bench" / "results" / "kernels-compile.csv"
COMPARE_BEGIN, COMPARE_END = "<!-- compare-table:begin -->", "<!-- compare-table:end -->"
COMPARE_RESULTS = ROOT / "bench" / "results" / "compare-tiny.json"
MEMORY_EXAMPLE_BEGIN, MEMORY_EXAMPLE_END = "<!-- memory-example:begin -->", "<!-- memory-example:end -->"
MEMORY_MODES_BEGIN, MEMORY_MODES_END = "<!-- memory-modes:begin -->", "<!-- memory-modes:end -->"
# The README's memory example: Q-GaLore's 7B recipe (8-bit moments, rank 1024) in its published setting.
MEMORY_7B = [
    "--model", "7b", "--optim", "q-galore8bit", "--rank", "1024", "--layerwise", "--layerwise-streaming",
    "--batch-size", "1", "--seq-len", "256", "--activation-checkpointing", "--dtype", "bfloat16",
    "--vocab-size", "32000",
]  # fmt: skip
# The layer-wise modes compared at 7B: (label, the flags that differ from MEMORY_7B's).
MEMORY_MODES = [
    ("deferred (`--layerwise`: every R kept until the step, for clipping and the all-or-nothing NaN policy)",
     {"--layerwise-streaming": None}),
    ("streaming (`--layerwise --layerwise-streaming`)", {}),
    ("streaming, rank 512", {"--rank": "512"}),
]  # fmt: skip


def latest_rows(suite: str) -> list[dict]:
    path = ROOT / "bench" / "results" / f"{suite}.csv"
    if not path.exists():
        return []
    latest: OrderedDict = OrderedDict()
    with path.open() as f:
        for row in csv.DictReader(f):
            latest[(row["device"], row["op"], row["shape"], row["dtype"], row["provider"])] = row
    return list(latest.values())


def _baseline_name(suite: str) -> str:
    base = BASELINE[suite]
    return " / ".join(base) if isinstance(base, tuple) else base


def render(suite: str) -> str:
    rows = latest_rows(suite)
    if not rows:
        return ""
    cases: OrderedDict = OrderedDict()
    for row in rows:
        cases.setdefault((row["device"], row["threads"], row["op"], row["shape"], row["dtype"]), []).append(row)
    out = [
        f"| device | op | shape | dtype | provider | median ms | GB/s | TFLOP/s | vs {_baseline_name(suite)} |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for (device, threads, op, shape, dtype), group in cases.items():
        baselines = BASELINE[suite] if isinstance(BASELINE[suite], tuple) else (BASELINE[suite],)
        base = next((r for r in group if r["provider"] in (*baselines, REFRESH_BASELINE)), None)
        if base is None and suite == "quant":  # the reference is timed on fp32 only
            base = next(
                (r for r in rows if r["provider"] == "reference" and r["op"] == op and r["device"] == device), None
            )
        for r in group:
            speedup = f"{float(base['median_ms']) / float(r['median_ms']):.2f}×" if base else ""
            dev = device if device.startswith(("NVIDIA", "H100")) else f"{device}, {threads} threads"
            out.append(
                f"| {dev} | {op} | {shape} | {dtype} | {r['provider']} | {float(r['median_ms']):.3f} "
                f"| {r['gbps']} | {r['tflops']} | {speedup} |"
            )
    return "\n".join(out)


def render_compile() -> str:
    """The per-kernel compile table (registers, spills, shared memory per target and Triton version)."""
    from fastgrad.kernels.aot import summary

    with COMPILE_RESULTS.open(newline="") as f:
        return summary(list(csv.DictReader(f)))


def render_compare() -> str:
    """The README's optimizer comparison: ``fastgrad compare``'s own table of its committed results."""
    import json

    from fastgrad.cli import compare_table

    return compare_table(json.loads(COMPARE_RESULTS.read_text()))


def _memory(args: list[str]) -> tuple[str, dict]:
    """``fastgrad memory ARGS``: the printed report and the --json breakdown."""
    import contextlib
    import io
    import json

    from fastgrad.cli import main

    outputs = []
    for extra in ([], ["--json"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["memory", *args, *extra]) == 0
        outputs.append(buf.getvalue())
    return outputs[0].rstrip(), json.loads(outputs[1])


def _with(args: list[str], changes: dict) -> list[str]:
    """``args`` with each flag of ``changes`` set to its value (None: removed)."""
    out, i = [], 0
    while i < len(args):
        flag = args[i]
        takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        if flag in changes:
            if changes[flag] is not None:
                out += [flag, changes[flag]] if takes_value else [flag]
        else:
            out += args[i : i + 2] if takes_value else [flag]
        i += 2 if takes_value else 1
    return out


def render_memory_example() -> str:
    """The command and the report of the README's ``fastgrad memory`` example."""
    half = MEMORY_7B.index("--batch-size")
    command = " ".join(["fastgrad memory", *MEMORY_7B[:half]]) + " \\\n    " + " ".join(MEMORY_7B[half:])
    return f"```bash\n{command}\n```\n\n```text\n{_memory(MEMORY_7B)[0]}\n```"


def render_memory_modes() -> str:
    """Weights + states and the estimated peak of Q-GaLore's 7B recipe per layer-wise mode."""

    def size(nbytes: int) -> str:
        return f"{nbytes / 2**30:.2f} GiB ({nbytes / 1e9:.2f} GB)"

    lines = ["| layer-wise mode | weights + states | estimated peak |", "|---|---|---|"]
    for label, changes in MEMORY_MODES:
        b = _memory(_with(MEMORY_7B, changes))[1]
        lines.append(f"| {label} | {size(b['weights'] + b['optimizer_states'])} | {size(b['peak'])} |")
    return "\n".join(lines)


def replace_block(content: str, begin: str, end: str, text: str) -> str:
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text}\n{end}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", action="store_true", help="write the tables into README.md")
    args = parser.parse_args()
    text = "\n\n".join(t for t in (render(s) for s in ("quant", "project", "lowrank", "optim")) if t)
    if not args.readme:
        print(text)
        return
    readme = ROOT / "README.md"
    content = replace_block(readme.read_text(), BEGIN, END, text)
    content = replace_block(content, KERNELS_BEGIN, KERNELS_END, render_compile())
    content = replace_block(content, COMPARE_BEGIN, COMPARE_END, render_compare())
    content = replace_block(content, MEMORY_EXAMPLE_BEGIN, MEMORY_EXAMPLE_END, render_memory_example())
    readme.write_text(replace_block(content, MEMORY_MODES_BEGIN, MEMORY_MODES_END, render_memory_modes()))


if __name__ == "__main__":
    main()
