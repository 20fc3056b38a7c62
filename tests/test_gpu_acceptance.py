"""bench/gpu_acceptance.py, the one command to run on a lent GPU machine, through its CPU path.

The GPU is lent rarely and briefly, so the script must work the first time there: here it runs
end to end with ``--device cpu --quick`` (tiny shapes, the same code: steps, interleaved timing,
correctness checks, the CUDA-backend subprocess, training steps, the memory measurement, the CSV and
the Markdown), once with room and once with a budget too small for anything. The pieces only the
GPU run reaches (pytest output parsing after a stop, the CUDA_PREFERENCE choice, the deadline's
SIGALRM, the time cap of a subprocess group) are tested directly.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_acceptance.py"
STEPS = ("3a", "3b", "3c", "3d", "3e", "3f", "3g", "3h")
MD_SECTIONS = (
    "## Steps",
    "## Correctness checks",
    "## Measurements",
    *(f"### {s}." for s in STEPS),
    "## README targets",
    "## Recommended CUDA_PREFERENCE",
)


@functools.cache
def _load_script():
    """bench/gpu_acceptance.py as a module (registered first: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("fastgrad_bench_gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(out: Path, budget_s: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the C++ kernels serve the CPU
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), "--budget-s", str(budget_s)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _outputs(out: Path) -> tuple[list[dict], str]:
    csv_path, md_path = out / "gpu-acceptance-cpu-quick.csv", out / "gpu-acceptance-cpu-quick.md"
    assert csv_path.exists() and md_path.exists(), sorted(p.name for p in out.iterdir())
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, md_path.read_text()


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--device cpu --quick`` run with a generous budget (about 30 s on 2 cores)."""
    out = tmp_path_factory.mktemp("gpu-acceptance")
    start = time.monotonic()
    proc = _run(out, 240)
    return proc, out, time.monotonic() - start


def test_quick_run_passes_and_reports_every_step(quick_run):
    proc, out, seconds = quick_run
    assert proc.returncode == 0, _explain(proc)
    assert seconds < 90, f"--device cpu --quick took {seconds:.0f} s"
    rows, md = _outputs(out)
    assert set(rows[0]) == set(_load_script().FIELDS)
    steps = {r["step"]: r["status"] for r in rows if r["kind"] == "step"}
    assert steps["1"] == "skipped on cpu"
    assert steps["2"] == "ok"
    assert {s: steps[s] for s in STEPS} == dict.fromkeys(STEPS, "ok")
    for section in MD_SECTIONS:
        assert section in md, section
    assert "# GPU acceptance" in proc.stdout  # the summary is printed too
    assert "exit status 0" in md


def test_quick_run_measures_and_checks(quick_run):
    proc, out, _ = quick_run
    rows, _ = _outputs(out)
    measured = [r for r in rows if r["kind"] == "measurement"]

    def find(step, what_prefix, provider_part=""):
        return [
            r
            for r in measured
            if r["step"] == step and r["what"].startswith(what_prefix) and provider_part in r["provider"]
        ]

    def ok(found, unit):
        assert found, "no such row"
        for r in found:
            assert r["status"] == "ok" and float(r["value"]) > 0 and r["unit"] == unit, r

    ok(find("3a", "copy"), "GB/s")
    for what in ("quantize_int8 SR", "quantize_int8 RTN", "quantize_int4 SR", "quantize_int4 RTN",
                 "dequantize_int8", "dequantize_int4", "round_bf16_stochastic"):  # fmt: skip
        ok(find("3b", what, "cpp"), "GB/s")
        assert all(float(r["ratio"]) > 0 and float(r["median_ms"]) > 0 for r in find("3b", what, "cpp"))
    # the FASTGRAD_CUDA_BACKEND=cuda subprocess ran; on the CPU it serves every quantizer as the parent
    assert any("FASTGRAD_CUDA_BACKEND=cuda serves every quantizer" in r["status"] for r in find("3b", "quantizers"))
    for side in ("left", "right"):
        ok(find("3c", f"project {side}", "int4"), "TFLOP/s")
        ok(find("3c", f"project_back {side}", "int8"), "TFLOP/s")
        ok(find("3d", f"lowrank_grad {side}", "full-G"), "TFLOP/s")
    for weight in ("float", "int8"):
        ok(find("3e", f"galore_adam_step {weight} W", "fused"), "TFLOP/s")
        ok(find("3e", f"galore_adam_step {weight} W", "unfused"), "TFLOP/s")
    ok(find("3e", "optimizer step", "fastgrad QGaLoreAdamW"), "TFLOP/s")
    peers = find("3e", "optimizer step", "q-galore-torch")
    assert peers and all(r["status"] in ("ok", "not measured: package not installed") for r in peers)
    train = find("3f", "train step")
    ok(train, "tokens/s")
    assert {r["provider"] for r in train} == {"torch AdamW", "GaLore (fastgrad)", "Q-GaLore (fastgrad, INT8 W)"}
    memory = find("3g", "peak memory", "measured")
    ok(memory, "MiB")
    # the profiler measure of tests/test_memory.py against fastgrad memory's estimate (1e-4 there)
    assert abs(float(memory[0]["ratio"]) - 1) < 0.01, memory[0]
    for model in ("60m", "1b", "7b"):  # newton_schulz against torch.optim.Muon's sequence of matmuls
        ok(find("3h", f"newton_schulz 5 steps ({model})", "torch-sequence"), "TFLOP/s")
        ok(find("3h", f"newton_schulz 5 steps ({model})", "cpp"), "TFLOP/s")
    muon = find("3h", "Muon step")
    ok(muon, "TFLOP/s")
    assert {r["provider"] for r in muon} == {"torch.optim.Muon", "fastgrad Muon", "fastgrad Muon8bit"}
    assert all(float(r["ratio"]) > 0 and r["ratio_to"] == "torch.optim.Muon" for r in muon)
    checks = [r for r in rows if r["kind"] == "check"]
    assert len(checks) >= 30 and all(r["status"] == "ok" for r in checks), [r for r in checks if r["status"] != "ok"]
    assert {r["step"] for r in checks} == {"3b", "3c", "3d", "3e", "3h"}


def test_too_small_budget_still_writes_both_files(tmp_path):
    proc = _run(tmp_path, 1)
    assert proc.returncode == 0, _explain(proc)  # a skipped measurement is not a failure
    rows, md = _outputs(tmp_path)
    measured = [r for r in rows if r["kind"] == "measurement"]
    assert {r["step"] for r in measured} == set(STEPS)
    assert all(r["status"] == "not measured: time budget" for r in measured), {r["status"] for r in measured}
    assert all(r["status"] == "not run: time budget" for r in rows if r["kind"] == "check")
    steps = {r["step"]: r["status"] for r in rows if r["kind"] == "step"}
    assert steps["2"] == "not run: time budget"
    assert all(steps[s] == "not measured: time budget" for s in STEPS)
    for section in MD_SECTIONS:
        assert section in md, section


# ------------------------------------------------------------------------------------------------
# what only the GPU run reaches
# ------------------------------------------------------------------------------------------------


def test_pytest_counts_from_the_summary_or_from_the_progress_of_a_stopped_run():
    ga = _load_script()
    assert ga.parse_pytest("....F.s\n=== short test summary ===\n2 failed, 10 passed, 3 skipped in 4.20s\n") == (
        {"failed": 2, "passed": 10, "skipped": 3},
        True,
    )
    assert ga.parse_pytest("==== 1 error, 4 passed in 1.00s ====") == ({"errors": 1, "passed": 4}, True)
    stopped = "..........s.F.          [ 12%]\n.....E\n"  # killed at the time cap: no summary line
    assert ga.parse_pytest(stopped) == ({"passed": 17, "skipped": 1, "failed": 1, "errors": 1}, False)


def _report(ga, tmp_path):
    args = argparse.Namespace(out=str(tmp_path), argv=[])
    return ga.Report(args, "cpu", "unit", ga.Budget(time.monotonic(), 60, 1))


def test_cuda_preference_is_the_faster_kernel_that_passed_its_checks(tmp_path):
    ga = _load_script()
    report = _report(ga, tmp_path)
    times = {  # (what, provider): median ms
        ("quantize_int8 SR", "triton"): 0.030, ("quantize_int8 RTN", "triton"): 0.020,
        ("quantize_int8 SR", "cuda"): 0.025, ("quantize_int8 RTN", "cuda"): 0.020,  # cuda faster in sum
        ("dequantize_int4 (bf16 out)", "triton"): 0.010, ("dequantize_int4 (bf16 out)", "cuda"): 0.012,
        ("round_bf16_stochastic", "triton"): 0.020, ("round_bf16_stochastic", "cuda"): 0.010,
        ("quantize_int4 SR", "triton"): 0.020,  # only one backend serves it: no recommendation
    }  # fmt: skip
    for (what, provider), ms in times.items():
        report.add(ga.Row("measurement", "3b", what, "4096x4096", provider=provider, median_ms=ms))
    report.check("3b", "round_bf16_stochastic [FASTGRAD_CUDA_BACKEND=cuda]", "4096x4096", False, "3 differ", "cuda")
    ga.choose_preference(report)
    assert {op: backend for op, (backend, _) in report.preference.items()} == {
        "quantize_int8": "cuda",
        "dequantize_int4": "triton",
        "round_bf16_stochastic": "triton",  # faster, but failed its check
    }
    assert "failed a check" in report.preference["round_bf16_stochastic"][1]
    assert '"quantize_int8": "cuda"' in report.markdown()
    assert report.failures() and "round_bf16_stochastic" in report.failures()[0]


def test_no_preference_without_both_kernels(tmp_path):
    ga = _load_script()
    report = _report(ga, tmp_path)
    report.add(ga.Row("measurement", "3b", "quantize_int8 SR", "64x256", provider="cpp", median_ms=0.1))
    ga.choose_preference(report)
    assert report.preference == {} and report.preference_note.startswith("no recommendation")


def test_deadline_stops_a_measurement_and_the_run_goes_on(tmp_path):
    ga = _load_script()
    report = _report(ga, tmp_path)
    report.budget = ga.Budget(time.monotonic(), 0.5, 0.0)
    ctx = argparse.Namespace(report=report, budget=report.budget, mode=ga.QUICK_MODE, device="cpu")
    case = ga.Case("3c", "sleeps past the deadline", (1,), 0.0, lambda: time.sleep(5) or [], checks=("a check",))
    start = time.monotonic()
    assert ga.run_case(ctx, case)[0] == "budget"
    assert time.monotonic() - start < 2
    (row,) = [r for r in report.rows if r.kind == "measurement"]
    assert row.status.startswith("not measured: time budget (stopped after")
    (check,) = report.checks()
    assert check.status == "not run: time budget" and not report.failures()

    def broken():
        raise ValueError("boom")

    report.budget = ga.Budget(time.monotonic(), 60, 0.0)
    ctx.budget = report.budget
    assert ga.run_case(ctx, ga.Case("3c", "raises", (1,), 0.0, broken, checks=("b check",)))[0] == "failed"
    assert report.rows[-2].status == "failed: ValueError: boom"
    assert report.failures() == ["check b check (1): failed: not reached: failed: ValueError: boom"]


def test_subprocess_stopped_at_its_cap_with_its_children(tmp_path):
    ga = _load_script()
    log = tmp_path / "sleep.log"
    # a child that starts a grandchild (as pip starts ninja and nvcc): the whole group is stopped
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    code += "print('started', flush=True); time.sleep(60)"
    rc, seconds = ga.run_logged([sys.executable, "-c", code], dict(os.environ), 2.0, log)
    assert rc is None and seconds < 15
    assert "started" in log.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_default_device_without_cuda_says_so_in_its_outputs(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--budget-s", "30"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    md = (tmp_path / "gpu-acceptance-no-cuda.md").read_text()
    assert "no CUDA device (use --device cpu --quick" in md
    assert (tmp_path / "gpu-acceptance-no-cuda.csv").exists()
