"""Render bench/results/*.csv as Markdown: the latest row of each case, with speed-ups.

python bench/report.py            # print
python bench/report.py --readme   # replace the blocks between the bench and kernels markers in README.md

The kernels block is the compile table of ``python -m fastgrad.kernels.aot --csv
bench/results/kernels-compile.csv`` (one run per Triton version; each replaces its own rows). The
compare-table block is bench/results/compare-tiny.json, the compare.json of
``fastgrad compare --optims adamw,galore,q-galore`` (README, "Comparing optimizers"). The
memory-example and memory-modes blocks are computed by the memory model itself (``fastgrad memory``),
which needs no results file. The targets block computes each target's measured cell from the
latest rows of bench/results/{quant,project,optim,lowrank}.csv. The fsdp-comm block is the latest
run of ``python bench/comm_fsdp.py`` (bench/results/fsdp_comm.csv).
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
    "optim": ("galore-torch", "fira", "torch.optim.Muon"),
    "lowrank": ("full-G-then-project", "dequantize-then-matmul"),
}
REFRESH_BASELINE = "svd"  # refresh steps compare to the exact SVD
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
KERNELS_BEGIN, KERNELS_END = "<!-- kernels:begin -->", "<!-- kernels:end -->"
COMPILE_RESULTS = ROOT / "bench" / "results" / "kernels-compile.csv"
COMPARE_BEGIN, COMPARE_END = "<!-- compare-table:begin -->", "<!-- compare-table:end -->"
COMPARE_RESULTS = ROOT / "bench" / "results" / "compare-tiny.json"
TARGETS_BEGIN, TARGETS_END = "<!-- targets:begin -->", "<!-- targets:end -->"
MEMORY_EXAMPLE_BEGIN, MEMORY_EXAMPLE_END = "<!-- memory-example:begin -->", "<!-- memory-example:end -->"
MEMORY_MODES_BEGIN, MEMORY_MODES_END = "<!-- memory-modes:begin -->", "<!-- memory-modes:end -->"
FSDP_COMM_BEGIN, FSDP_COMM_END = "<!-- fsdp-comm:begin -->", "<!-- fsdp-comm:end -->"
FSDP_COMM_RESULTS = ROOT / "bench" / "results" / "fsdp_comm.csv"
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


def _ms(suite: str, op: str, shape: str, provider: str) -> float:
    """The latest median (ms) of one fp32 case of ``bench/results/<suite>.csv``."""
    for row in latest_rows(suite):
        if (row["op"], row["shape"], row["dtype"], row["provider"]) == (op, shape, "float32", provider):
            return float(row["median_ms"])
    raise KeyError(f"bench/results/{suite}.csv has no row {op} {shape} float32 {provider}")


def render_targets() -> str:
    """The README's targets table, each "measured" cell computed from the latest results rows."""
    q = "4096x4096"

    def quant(op: str, provider: str) -> float:
        return _ms("quant", op, q, provider)

    sr8, copy8 = quant("quantize_int8 SR", "cpp"), quant("quantize_int8 SR", "copy")
    sr4, copy4 = quant("quantize_int4 SR", "cpp"), quant("quantize_int4 SR", "copy")
    ref8, eager8 = quant("quantize_int8 SR", "reference"), quant("quantize_int8 SR", "torch-eager")
    bf16 = quant("round_bf16_stochastic", "cpp")

    def vs_matmul(op: str, shape: str) -> str:
        return f"{_ms('project', op, shape, 'torch-matmul') / _ms('project', op, shape, 'cpp-int4'):.2f}×"

    def optim(op: str, shape: str, provider: str) -> float:
        return _ms("optim", op, shape, provider)

    step = "GaLoreAdamW step"
    galore = {s: optim(step, s, "fastgrad") / optim(step, s, "galore-torch") for s in ("2048x2048x128",
              "5461x2048x512", "512x512x128")}  # fmt: skip
    refresh = "GaLoreAdamW refresh step"
    svd, randomized, dct = (optim(refresh, "2048x2048x128", p) for p in ("svd", "randomized", "dct"))
    grad = "2048x4096x4096x128"
    grad_r = ("lowrank_grad right (7b-attn)", grad)
    full_r, fused_r = (_ms("lowrank", *grad_r, p) for p in ("full-G-then-project", "cpp"))
    grad_l = ("lowrank_grad left (7b-attn)", grad)
    full_l, fused_l = (_ms("lowrank", *grad_l, p) for p in ("full-G-then-project", "cpp"))
    rows = [
        ("SR INT8 quantize of 4096×4096 fp32, C++ ≥ 3× the torch-eager reference",
         f"{ref8 / sr8:.0f}× ({sr8:.1f} ms vs {ref8 / 1000:.1f} s); {eager8 / sr8:.1f}× a hand-written "
         "`torch.rand_like` quantizer"),
        ("SR INT8 quantize of 4096×4096 fp32, C++ within 3× of a copy of the same tensor (interleaved in one run)",
         f"{sr8 / copy8:.2f}× ({sr8:.1f} ms vs {copy8:.2f} ms); INT4 {sr4 / copy4:.2f}×; fp32 → bf16 stochastic "
         f"rounding {bf16:.1f} ms ({bf16 / copy8:.2f}× the fp32 copy)"),
        ("INT4-P projection no slower than a dense fp32 `torch.matmul` of the same shape (speed ratio)",
         f"4096×4096, r = 128: {vs_matmul('project left', '4096x4096x128')} (left), "
         f"{vs_matmul('project right', '4096x4096x128')} (right); 7B MLP shapes "
         f"{vs_matmul('project left', '4096x11008x256')} (left) and {vs_matmul('project right', '11008x4096x256')} "
         f"(right); 1B MLP {vs_matmul('project right', '5461x2048x512')}"),
        ("non-refresh GaLoreAdamW step ≤ 0.7× galore-torch's time (2048×2048, r = 128)",
         f"{galore['2048x2048x128']:.2f}× ({optim(step, '2048x2048x128', 'fastgrad'):.1f} ms vs "
         f"{optim(step, '2048x2048x128', 'galore-torch'):.1f} ms, with the fused step); "
         f"{galore['5461x2048x512']:.2f}× at 5461×2048, r = 512; {galore['512x512x128']:.2f}× at the 60M shape "
         "512×512 (per-step Python overhead)"),
        ("`randomized` refresh ≥ 5× faster than `svd` (2048×2048, r = 128)",
         f"{svd / randomized:.1f}× ({randomized:.0f} ms vs {svd / 1000:.2f} s); `dct` {svd / dct:.1f}×"),
        ("`lowrank_grad` ≥ 3× faster than forming G then projecting (4096×4096, r = 128, 2048 tokens)",
         f"{full_r / fused_r:.1f}× (right, {fused_r:.0f} ms vs {full_r / 1000:.2f} s), {full_l / fused_l:.1f}× (left); "
         "`bench/bench_lowrank.py`"),
    ]  # fmt: skip
    lines = ["| target | measured |", "|---|---|"] + [f"| {t} | {m} |" for t, m in rows]
    return "\n".join(lines)


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


def render_fsdp_comm() -> str:
    """MiB per step under FSDP2 by collective: the latest measurement of each (model, optimizer,
    step) of bench/comm_fsdp.py, models in size order."""
    with FSDP_COMM_RESULTS.open(newline="") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["model"], r["optimizer"], r["step"]): r for r in rows}  # later rows replace earlier ones
    order = {name: i for i, name in enumerate(("tiny", "60m", "130m", "350m", "1b", "7b"))}
    latest = sorted(by_key.values(), key=lambda r: order.get(r["model"], len(order)))
    kinds = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")

    def mib(row: dict, *keys: str) -> float:
        return sum(int(row[k]) for k in keys) / 2**20

    lines = [
        "| model | optimizer | step | all-gather | reduce-scatter | all-reduce + broadcast | total | vs AdamW |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in latest:
        adamw = next(r for r in latest if (r["model"], r["optimizer"], r["step"]) == (row["model"], "adamw", "steady"))
        if row["optimizer"].startswith("adamw") and row["step"] == "refresh":
            continue  # AdamW has no refresh step
        total, base = mib(row, *kinds), mib(adamw, *kinds)
        lines.append(
            f"| {row['model']} | {row['optimizer']} | {row['step']} | {mib(row, 'all_gather'):.1f} | "
            f"{mib(row, 'reduce_scatter'):.1f} | {mib(row, 'all_reduce', 'broadcast'):.2f} | {total:.1f} | "
            f"{total / base:.2f}× |"
        )
    return "\n".join(lines)


def render_memory_fsdp() -> str:
    """Per-process memory under FSDP2 for the latest run of bench/memory_fsdp.py
    (bench/results/memory_fsdp.csv): the memory model's estimates by process count, then its persistent
    bytes against those measured with 2 processes."""
    with (ROOT / "bench" / "results" / "memory_fsdp.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    latest = [r for r in rows if r["time"] == rows[-1]["time"]]
    estimates = [r for r in latest if r["device"] == "cuda"]
    counts = sorted({int(r["processes"]) for r in estimates})

    def gib(nbytes: int) -> str:
        return f"{nbytes / 2**30:.2f}"

    lines = [
        "| model | optimizer | " + " | ".join(f"{n} process{'es' if n > 1 else ''}" for n in counts) + " |",
        "|---|---|" + "---:|" * len(counts),
    ]
    for key in dict.fromkeys((r["model"], r["optimizer"]) for r in estimates):
        cells = []
        for n in counts:
            r = next(r for r in estimates if (r["model"], r["optimizer"], int(r["processes"])) == (*key, n))
            peak = max(int(r["peak"]), int(r["peak_between_refreshes"]))
            persistent = sum(int(r[k]) for k in ("weights", "gradients", "optimizer_states"))
            cells.append(f"{gib(peak)} ({gib(persistent)})")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    measured = [r for r in latest if r["device"] == "cpu"]
    lines += [
        "",
        "| model | optimizer | weights (MiB) | gradients (MiB) | optimizer states (MiB) | model = measured |",
        "|---|---|---:|---:|---:|---|",
    ]
    kinds = ("weights", "gradients", "optimizer_states")
    modelled = {(m["model"], m["optimizer"]): m for m in measured if m["source"] == "model"}
    for r in (r for r in measured if r["source"] == "measured"):
        est = modelled[(r["model"], r["optimizer"])]
        same = all(int(est[k]) == int(r[k]) for k in kinds)
        cells = " | ".join(f"{int(r[k]) / 2**20:.2f}" for k in kinds)
        lines.append(f"| {r['model']} | {r['optimizer']} | {cells} | {'yes, byte for byte' if same else 'no'} |")
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
    content = replace_block(content, TARGETS_BEGIN, TARGETS_END, render_targets())
    content = replace_block(content, MEMORY_EXAMPLE_BEGIN, MEMORY_EXAMPLE_END, render_memory_example())
    content = replace_block(content, MEMORY_MODES_BEGIN, MEMORY_MODES_END, render_memory_modes())
    readme.write_text(replace_block(content, FSDP_COMM_BEGIN, FSDP_COMM_END, render_fsdp_comm()))


if __name__ == "__main__":
    main()
