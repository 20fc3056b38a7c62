"""GPU acceptance: the one command to run when a machine with one CUDA GPU is lent.

    python bench/gpu_acceptance.py                          # on the GPU machine: build, tests, measurements
    python bench/gpu_acceptance.py --device cpu --quick     # the same code path with tiny shapes (CI, ~30 s)

Options: ``--out DIR`` (default bench/results), ``--budget-s`` (default 480: the whole run, imports
included), ``--skip-build``, ``--skip-tests``. GPU time is scarce, so the script keeps its own deadline:
a step gets at most its share of what is left, a measurement that would not fit is not started (its
row says ``not measured: time budget``), one that overruns the deadline is stopped (SIGALRM), and the
outputs are rewritten after every step, so they exist whatever happens.

In order, each step timed and its status recorded:

1. Build (GPU only, unless ``--skip-build``): ``pip install --no-build-isolation --no-deps -e .`` with
   ``TORCH_CUDA_ARCH_LIST`` of the present GPU and ``MAX_JOBS=16``, in a subprocess with a timeout
   (``--no-deps``: the GPU machines have no network, and the dependencies are there already).
2. Tests, in subprocesses with a timeout: every ``gpu``-marked test, then tests/test_triton_kernels.py
   and tests/test_random_stream.py compiled on the GPU (``TRITON_INTERPRET`` removed from the
   environment). ``--device cpu --quick`` runs tests/test_random_stream.py and tests/test_launch.py
   instead, to exercise the harness. Counts come from pytest's summary line (from its progress
   characters when the time cap stopped it).
3. Measurements, the providers of each case timed interleaved, round-robin
   (``bench/conftest.py``'s ``time_round``; on CUDA each sample is N back-to-back calls between two
   ``torch.cuda.synchronize``, so that a kernel of microseconds is not timed as one launch):

   a. device copy bandwidth: ``Tensor.copy_`` of a large buffer (read + write bytes / time);
   b. quantize_int8/int4 (SR and RTN), dequantize_int8/int4 (to bf16), round_bf16_stochastic at
      4096×4096: GB/s and the fraction of the copy bandwidth; then the same ops in a subprocess with
      ``FASTGRAD_CUDA_BACKEND=cuda`` (the backend is chosen at import), i.e. the CUDA C++ quantizers;
   c. ``lowrank_project`` with an INT8/INT4 P and the quantized back-projection against a bf16
      ``torch.matmul`` of the same shape, at the LLaMA 60M/1B/7B shapes (512×512 r128, 2048×5461 r512,
      4096×11008 r1024), both sides (G m×n with P on the left, and G n×m with P on the right: the
      side GaLore picks for each orientation);
   d. ``lowrank_grad`` (dense and INT4 P) against forming G = dyᵀx and projecting it, 2048 tokens;
   e. the fused ``galore_adam_step_`` (float and INT8 W) against the unfused sequence of
      bench/bench_lowrank.py; and optimizer steps of galore-torch / q-galore-torch beside fastgrad's,
      when those packages import;
   f. training throughput at the 1B shape (bf16, ``fastgrad.models.LlamaForCausalLM``): Q-GaLore
      (INT8 QLinear, as ``fastgrad pretrain --optim q-galore`` builds it) and GaLore against
      ``torch.optim.AdamW``, tokens/s of whole steps (forward, backward, norm, optimizer step);
   g. LLaMA-7B peak memory (``torch.cuda.max_memory_allocated``) of the README's q-galore8bit
      layer-wise streaming configuration beside ``fastgrad memory``'s estimate (``--quick``: the tiny
      model on the CPU, measured with the profiler as tests/test_memory.py does);
   h. ``newton_schulz`` (5 steps) against torch.optim.Muon's sequence of torch matmuls at the 60M/1B/7B
      shapes, and one Muon step over the seven weights of a LLaMA-1B decoder layer: torch.optim.Muon
      beside fastgrad's Muon and Muon8bit (bf16 Newton–Schulz, fp32 weights and gradients).

   Correctness checks run once per op at the benchmark shape against ``fastgrad._reference`` with the
   tests' tolerances: exact codes for the quantizers (on sampled rows with their Philox offsets: the
   reference is slow on the CPU at 4096×4096), relative Frobenius errors for the matmuls (the
   reference in fp32 on the same device).
4. Outputs: ``<out>/gpu-acceptance-<device-tag>.csv`` (one row per step, measurement and check) and
   ``<out>/gpu-acceptance-<device-tag>.md`` (the step table, the checks, the measurement tables and
   the ``CUDA_PREFERENCE`` this machine's numbers recommend: per quantizer op, the faster of the Triton
   and CUDA C++ kernels where both serve), printed at the end; the build and test logs beside them.

The refresh steps of (f) and (g) are warm-up, not measured: there ``torch.linalg.svd`` is replaced by
the factors of a coordinate subspace (same shapes), because the fp32 SVDs of 168 (1B) or 224 (7B)
matrices would take minutes of the budget. The measured steps between refreshes do not depend on P's
values; (g) is compared with the estimate's peak between refreshes (its refresh-step peak is shown).

Exit status: 0, or 1 when the build failed, a test failed, or a correctness check failed. A
measurement skipped or stopped for the time budget is not a failure, nor is a failing peer package.
"""

from __future__ import annotations

import time

_T0 = time.monotonic()  # the budget counts from here, the imports included

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if importlib.util.find_spec("fastgrad") is None:  # not installed: the working tree's package
    sys.path.append(str(REPO))  # appended: the repo's top-level kernels/ must not shadow PyPI's `kernels`

NOT_MEASURED_BUDGET = "not measured: time budget"
NOT_INSTALLED = "not measured: package not installed"
FIELDS = [
    "date", "git_sha", "device", "torch", "triton", "kind", "step", "what", "shape", "dtype", "provider",
    "median_ms", "p20_ms", "p80_ms", "value", "unit", "ratio", "ratio_to", "status", "note",
]  # fmt: skip
SECTIONS = {
    "3a": "Copy bandwidth",
    "3b": "Quantizers",
    "3c": "Quantized-P projection",
    "3d": "Low-rank weight gradient",
    "3e": "Fused GaLore step",
    "3f": "Training throughput",
    "3g": "Peak memory",
    "3h": "Newton–Schulz and Muon",
}
QUANT_OPS = ("quantize_int8", "quantize_int4", "dequantize_int8", "dequantize_int4", "round_bf16_stochastic")

# Correctness tolerances: those of the tests (tests/test_project.py RTOL and GRAD_RTOL,
# tests/test_adam_step.py MOMENT_RTOL and W_RTOL; see there for the bounds behind them). Relative
# Frobenius error against the fp32 reference on the same operands.
RTOL_PROJECT = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
RTOL_GRAD = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
RTOL_MOMENT = {torch.float32: 1e-6, torch.bfloat16: 4e-3}
RTOL_W = {torch.float32: 1e-6, torch.bfloat16: 4e-3}
RTOL_NS = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # tests/test_newton_schulz.py's
NS_STEPS = 5
INT8_STEP_SAME_CODES = 0.999  # tests/test_adam_step.py: SR thresholds crossed by the GEMM's summation order
CHECK_ROWS = 16  # rows at each end of a quantizer's output compared with the reference
CHILD_BUDGET_EXIT = 3  # exit status of the --child-quant subprocess stopped by its time budget


@dataclass(frozen=True)
class Mode:
    """Shapes, timing targets and time estimates of a run: the GPU's or ``--quick``'s."""

    copy_numel: int  # elements of the large copy buffer (fp32)
    quant_shape: tuple[int, int]
    models: tuple[tuple[str, int, int, int], ...]  # (name, m, n, r) with m ≤ n
    tokens: int  # of lowrank_grad
    optim_shapes: tuple[tuple[str, tuple[int, int, int]], ...]  # peers' optimizer steps
    muon_layer: tuple[str, tuple[tuple[int, int], ...]]  # the weights of one decoder layer, for Muon's step
    train_model: str
    train_seq: int
    train_vocab: int
    memory_model: str
    memory_seq: int
    memory_vocab: int
    target_s: float  # timing per case
    min_rounds: int
    max_rounds: int
    min_sample_s: float  # back-to-back calls per sample until a sample takes this long
    scale: float  # multiplies the time estimates of the cases


# The two runs, field by field: (the GPU's value, --quick's value).
_MODE_VALUES = {
    "copy_numel": (1 << 28, 1 << 18),
    "quant_shape": ((4096, 4096), (64, 256)),
    "models": (
        (("60m", 512, 512, 128), ("1b", 2048, 5461, 512), ("7b", 4096, 11008, 1024)),
        (("60m", 64, 64, 16), ("1b", 64, 170, 32), ("7b", 96, 256, 32)),
    ),
    "tokens": (2048, 64),
    "optim_shapes": ((("1b-attn", (2048, 2048, 128)), ("1b-mlp", (5461, 2048, 512))), (("tiny", (96, 64, 16)),)),
    "muon_layer": (
        ("llama1b-layer", ((2048, 2048),) * 4 + ((5461, 2048),) * 2 + ((2048, 5461),)),
        ("tiny-layer", ((64, 64),) * 4 + ((96, 64),) * 2 + ((64, 96),)),
    ),
    "train_model": ("1b", "tiny"),
    "train_seq": (256, 64),
    "train_vocab": (32000, 1024),
    "memory_model": ("7b", "tiny"),
    "memory_seq": (256, 64),
    "memory_vocab": (32000, 1024),
    "target_s": (1.0, 0.05),
    "min_rounds": (5, 3),
    "max_rounds": (50, 10),
    "min_sample_s": (2e-3, 1e-3),
    "scale": (1.0, 0.08),
}
GPU_MODE, QUICK_MODE = (Mode(**{name: values[i] for name, values in _MODE_VALUES.items()}) for i in (0, 1))


class BudgetExceeded(BaseException):
    """Raised by the SIGALRM of :meth:`Budget.hard_stop` (a BaseException: no ``except Exception`` in
    the measured code may swallow it)."""


@dataclass
class Budget:
    """The run's deadline: ``total`` seconds from ``start``, minus ``reserve`` kept for the outputs."""

    start: float
    total: float
    reserve: float

    def left(self) -> float:
        return self.start + self.total - self.reserve - time.monotonic()

    def used(self) -> float:
        return time.monotonic() - self.start

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds

    @contextlib.contextmanager
    def hard_stop(self):
        """Raise BudgetExceeded in the main thread at the deadline (checked between Python bytecodes,
        so a long kernel finishes first)."""
        left = self.left()
        if left <= 0:
            raise BudgetExceeded

        def handler(signum, frame):
            raise BudgetExceeded

        previous = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, left)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@dataclass
class Row:
    """One CSV row: a step, a timed provider of a measurement, or a correctness check."""

    kind: str  # "step" | "measurement" | "check"
    step: str  # "1", "2", "3a".."3g"
    what: str
    shape: str = ""
    dtype: str = ""
    provider: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    value: float | None = None
    unit: str = ""
    ratio: float | None = None
    ratio_to: str = ""
    status: str = "ok"
    note: str = ""
    seconds: float | None = None  # steps: wall time


@dataclass
class Timing:
    median: float  # seconds per call
    p20: float
    p80: float
    rounds: int
    iters: int


def _shape(shape) -> str:
    return shape if isinstance(shape, str) else "x".join(str(s) for s in shape)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else ""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(text) -> str:
    """Text for a Markdown table cell."""
    return str(text).replace("|", "\\|")


def _error(e: BaseException) -> str:
    return _one_line(f"{type(e).__name__}: {e}")


def _triton_version() -> str:
    try:
        import triton
    except Exception:
        return "not installed"
    return triton.__version__


def _device_name(device: str) -> str:
    if device == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"


def _tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# the report: rows, steps, checks; CSV and Markdown
# ----------------------------------------------------------------------------------------------


class Report:
    """Everything the run found, written to ``<out>/gpu-acceptance-<tag>.csv`` and ``.md``."""

    def __init__(self, args: argparse.Namespace, device: str, tag: str, budget: Budget) -> None:
        self.args = args
        self.device = device
        self.tag = tag
        self.budget = budget
        self.out = Path(args.out)
        self.rows: list[Row] = []
        self.date = datetime.datetime.now().isoformat(timespec="seconds")
        self.env = {
            "git_sha": "unknown",
            "device": _device_name(device),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "cuda": torch.version.cuda or "none",
            "fastgrad": "not imported",
        }
        self.served: dict[str, str] = {}  # op -> implementation serving it on the device (this process)
        self.preference: dict[str, tuple[str, str]] = {}  # op -> (backend, why)
        self.preference_note = "not determined (the quantizer measurements did not run)"
        self.notes: list[str] = []
        self.exit_reasons: list[str] = []

    @property
    def csv_path(self) -> Path:
        return self.out / f"gpu-acceptance-{self.tag}.csv"

    @property
    def md_path(self) -> Path:
        return self.out / f"gpu-acceptance-{self.tag}.md"

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def check(self, step: str, name: str, shape, passed: bool | None, detail: str, provider: str = "") -> None:
        """Record a correctness check: passed True/False, or None when it did not run (not a failure).
        ``provider``: the implementation that served the checked op."""
        status = "ok" if passed else (detail if passed is None else f"failed: {detail}")
        self.add(
            Row("check", step, name, _shape(shape), provider=provider, status=status, note=detail if passed else "")
        )

    def checks(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "check"]

    def failures(self) -> list[str]:
        """Why the exit status is nonzero (empty: zero)."""
        reasons = list(self.exit_reasons)
        reasons += [f"check {r.what} ({r.shape}): {r.status}" for r in self.checks() if r.status.startswith("failed")]
        return reasons

    # -------------------------------------------------------------- CSV
    def _csv_row(self, r: Row) -> dict:
        def num(x, fmt):
            return "" if x is None else format(x, fmt)

        value = r.seconds if r.kind == "step" else r.value
        return {
            "date": self.date,
            "git_sha": self.env["git_sha"],
            "device": self.env["device"],
            "torch": self.env["torch"],
            "triton": self.env["triton"],
            "kind": r.kind,
            "step": r.step,
            "what": r.what,
            "shape": r.shape,
            "dtype": r.dtype,
            "provider": r.provider,
            "median_ms": num(r.median_ms, ".4f"),
            "p20_ms": num(r.p20_ms, ".4f"),
            "p80_ms": num(r.p80_ms, ".4f"),
            "value": num(value, ".4g"),
            "unit": "s" if r.kind == "step" else r.unit,
            "ratio": num(r.ratio, ".3f"),
            "ratio_to": r.ratio_to,
            "status": r.status,
            "note": r.note,
        }

    # -------------------------------------------------------------- Markdown
    def markdown(self) -> str:
        e = self.env
        failures = self.failures()
        status = 1 if failures else 0
        cmd = "python bench/gpu_acceptance.py " + shlex.join(self.args.argv)
        lines = [
            f"# GPU acceptance: {e['device']}",
            "",
            f"{self.date} · git {e['git_sha']} · torch {e['torch']} · Triton {e['triton']} · CUDA {e['cuda']} · "
            f"fastgrad {e['fastgrad']}",
            "",
            f"`{cmd.strip()}` · {self.budget.used():.0f} s of a {self.budget.total:.0f} s budget · exit status "
            f"{status}" + (": " + "; ".join(failures) if failures else ""),
            "",
            "## Steps",
            "",
            "| step | what | status | seconds | detail |",
            "|---|---|---|---:|---|",
        ]
        for r in self.rows:
            if r.kind == "step":
                secs = "" if r.seconds is None else f"{r.seconds:.1f}"
                lines.append(f"| {r.step} | {_cell(r.what)} | {_cell(r.status)} | {secs} | {_cell(r.note)} |")
        lines += ["", "## Correctness checks", ""]
        checks = self.checks()
        if checks:
            lines += ["| step | check | shape | served by | status | detail |", "|---|---|---|---|---|---|"]
            lines += [
                f"| {r.step} | {_cell(r.what)} | {r.shape} | {r.provider} | {_cell(r.status)} | {_cell(r.note)} |"
                for r in checks
            ]
        else:
            lines.append("none ran")
        lines += ["", "## Measurements", ""]
        lines.append(
            "ratio: for copy-bound ops the fraction of the copy bandwidth (3a); for the others the speed-up over "
            "the baseline named in the row (baseline time / this time; above 1 is faster); for memory, measured / "
            "estimated. Times are medians per call over interleaved rounds."
        )
        for step, title in SECTIONS.items():
            rows = [r for r in self.rows if r.kind == "measurement" and r.step == step]
            lines += ["", f"### {step}. {title}", ""]
            if not rows:
                lines.append("not reached")
                continue
            lines += [
                "| what | shape | dtype | provider | median ms | value | ratio | status |",
                "|---|---|---|---|---:|---:|---|---|",
            ]
            for r in rows:
                ms = "" if r.median_ms is None else f"{r.median_ms:.4f}"
                value = "" if r.value is None else f"{r.value:,.4g} {r.unit}"
                ratio = "" if r.ratio is None else f"{r.ratio:.2f}× {r.ratio_to}"
                status = _cell(r.status + (f" ({r.note})" if r.note else ""))
                lines.append(
                    f"| {_cell(r.what)} | {r.shape} | {r.dtype} | {_cell(r.provider)} | {ms} | {value} | {ratio} | "
                    f"{status} |"
                )
        lines += ["", "## README targets", ""] + [f"- {t}" for t in self.targets()]
        lines += ["", "## Recommended CUDA_PREFERENCE", "", self.preference_note, ""]
        if self.preference:
            lines.append("```python")
            lines.append("CUDA_PREFERENCE: dict[str, str] = {")
            for op, (backend, why) in self.preference.items():
                lines.append(f'    "{op}": "{backend}",  # {why}')
            lines.append("}")
            lines.append("```")
        if self.served:
            lines += ["", f"## Implementation serving each op on {self.device} (this process)", ""]
            lines += ["| op | served by |", "|---|---|"]
            lines += [f"| {op} | {impl} |" for op, impl in self.served.items()]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def targets(self) -> list[str]:
        """The README's GPU targets (Benchmarks): quantize/dequantize at ≥ 80% of the copy bandwidth, and
        the INT4-P projection within 1.3× the time of a bf16 matmul of the same shape."""
        out = []
        ok = lambda r: r.kind == "measurement" and r.status == "ok" and r.ratio is not None  # noqa: E731
        quant = [r for r in self.rows if ok(r) and r.step == "3b" and r.what.split()[0] in QUANT_OPS[:4]]
        for provider in sorted({r.provider for r in quant}):
            worst = min((r for r in quant if r.provider == provider), key=lambda r: r.ratio)
            verdict = "met" if worst.ratio >= 0.8 else "not met"
            out.append(
                f"quantize/dequantize ≥ 80% of the copy bandwidth ({provider}): lowest {worst.ratio:.0%} "
                f"({worst.what}, {worst.shape}): {verdict}"
            )
        proj = [r for r in self.rows if ok(r) and r.step == "3c" and r.what.startswith("project ")]
        proj = [r for r in proj if r.provider.endswith("-int4")]
        if proj:
            worst = min(proj, key=lambda r: r.ratio)  # the largest time ratio
            verdict = "met" if 1 / worst.ratio <= 1.3 else "not met"
            out.append(
                f"INT4-P projection within 1.3× of a {worst.ratio_to}: worst {1 / worst.ratio:.2f}× its time "
                f"({worst.what}, {worst.shape}): {verdict}"
            )
        if self.device != "cuda":
            out.append(f"(measured on {self.device}: the targets are the GPU's; these lines check the harness)")
        return out or ["not measured"]

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            for r in self.rows:
                writer.writerow(self._csv_row(r))
        tmp.replace(self.csv_path)
        tmp = self.md_path.with_suffix(".md.tmp")
        tmp.write_text(self.markdown())
        tmp.replace(self.md_path)


# ----------------------------------------------------------------------------------------------
# steps 1 and 2: subprocesses with a time cap
# ----------------------------------------------------------------------------------------------


def run_logged(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` in the repo, in its own process group, its output to ``log``; (exit status, or None
    when ``timeout`` stopped it (the whole group: pip's ninja and nvcc too), seconds)."""
    start = time.monotonic()
    with log.open("w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = None
    return rc, time.monotonic() - start


def _tail(log: Path, n: int = 1) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return _one_line(" | ".join(lines[-n:]), 200) if lines else ""


def step_build(report: Report, args: argparse.Namespace) -> None:
    name = "build the extension (pip install --no-build-isolation --no-deps -e .)"
    if args.device != "cuda":
        report.add(Row("step", "1", name, status="skipped on cpu", seconds=0.0))
        return
    if args.skip_build:
        report.add(Row("step", "1", name, status="skipped (--skip-build)", seconds=0.0))
        return
    cap = min(0.35 * report.budget.total, report.budget.left() - 10)
    if cap < 30:
        report.add(Row("step", "1", name, status="not run: time budget", seconds=0.0))
        return
    major, minor = torch.cuda.get_device_capability()
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", MAX_JOBS="16")
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    log = report.out / f"gpu-acceptance-{report.tag}-build.log"
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    rc, seconds = run_logged(cmd, env, cap, log)
    detail = f"TORCH_CUDA_ARCH_LIST={major}.{minor} MAX_JOBS=16; log {log.name}"
    if rc == 0:
        status = "ok"
    elif rc is None:
        status = f"failed: stopped at its time cap of {cap:.0f} s"
    else:
        status = f"failed: pip exited {rc}: {_tail(log)}"
    if rc != 0:
        report.exit_reasons.append(f"build: {status}")
    report.add(Row("step", "1", name, status=status, seconds=seconds, note=detail))


_SUMMARY_WORD = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b")
_PROGRESS = re.compile(r"^([.sFExX]+)\s*(\[\s*\d+%\])?\s*$")


def parse_pytest(text: str) -> tuple[dict[str, int], bool]:
    """Counts from pytest's summary line ("3 failed, 10 passed, 2 skipped in 4.2s"); when there is
    none (stopped early), from the ``-q`` progress characters. Returns (counts, from_summary)."""
    for line in reversed(text.splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and (_SUMMARY_WORD.search(line) or "no tests ran" in line):
            counts: dict[str, int] = {}
            for n, word in _SUMMARY_WORD.findall(line):
                counts["errors" if word.startswith("error") else word] = int(n)
            return counts, True
    counts = {}
    names = {".": "passed", "s": "skipped", "F": "failed", "E": "errors", "x": "xfailed", "X": "xpassed"}
    for line in text.splitlines():
        m = _PROGRESS.match(line.strip())
        if m:
            for ch in m.group(1):
                counts[names[ch]] = counts.get(names[ch], 0) + 1
    return counts, False


def _counts_text(counts: dict[str, int]) -> str:
    order = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected")
    return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k)) or "no tests ran"


def step_tests(report: Report, args: argparse.Namespace) -> None:
    if args.device == "cuda" and not args.quick:
        runs = [
            ("gpu-marked tests (pytest -m gpu)", "gpu", ["-m", "gpu"], 1 / 3),
            (
                "Triton kernels compiled on the GPU (tests/test_triton_kernels.py tests/test_random_stream.py)",
                "triton",
                ["tests/test_triton_kernels.py", "tests/test_random_stream.py"],
                2 / 3,
            ),
        ]
    else:
        runs = [
            (
                "harness tests (tests/test_random_stream.py tests/test_launch.py)",
                "harness",
                ["tests/test_random_stream.py", "tests/test_launch.py"],
                1.0,
            )
        ]
    if args.skip_tests:
        for name, *_ in runs:
            report.add(Row("step", "2", name, status="skipped (--skip-tests)", seconds=0.0))
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["PYTHONUNBUFFERED"] = "1"  # progress reaches the log as it happens (counts survive a stop)
    pool = 0.45 * report.budget.left()  # the tests' time; the measurements keep the rest
    for i, (name, key, selection, share) in enumerate(runs):
        cap = min(pool * share / sum(r[3] for r in runs[i:]), report.budget.left())  # unused time passes on
        if cap < 5:
            report.add(Row("step", "2", name, status="not run: time budget", seconds=0.0))
            continue
        log = report.out / f"gpu-acceptance-{report.tag}-tests-{key}.log"
        cmd = [sys.executable, "-m", "pytest", "-q", *selection]
        rc, seconds = run_logged(cmd, env, cap, log)
        pool -= seconds
        counts, complete = parse_pytest(log.read_text(errors="replace"))
        bad = counts.get("failed", 0) + counts.get("errors", 0)
        text = _counts_text(counts)
        if rc is None:
            status = f"incomplete: time budget (stopped at {cap:.0f} s): {text} so far"
        elif rc in (0, 5) and not bad:  # 5: nothing collected (e.g. no gpu-marked test in a selection)
            status = "ok"
        else:
            status = f"failed: pytest exited {rc}: {text}"
        if bad or (rc not in (None, 0, 5)):
            report.exit_reasons.append(f"tests ({key}): {text}")
        note = f"{text}; log {log.name}" + ("" if complete else " (counts from the progress characters)")
        report.add(Row("step", "2", name, status=status, seconds=seconds, note=note))
        report.write()


# ----------------------------------------------------------------------------------------------
# step 3: measurement cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A group of providers timed interleaved (or one measured thing), with the checks it makes."""

    step: str
    what: str
    shape: object
    estimate_s: float  # wall time on the GPU (scaled by Mode.scale for --quick)
    run: Callable[[], list[Row]]
    checks: tuple[str, ...] = ()  # names of the correctness checks run() reports
    hard_stop: bool = True  # False for cases that wait on a subprocess (it has its own timeout)


@dataclass
class Context:
    """What the cases share: the device, the mode, the budget, the report and the bench helpers."""

    device: str
    mode: Mode
    budget: Budget
    report: Report
    quick: bool
    args: argparse.Namespace
    shared: dict = field(default_factory=dict)  # results one case leaves for another (copy bandwidth)

    def __post_init__(self) -> None:
        import fastgrad
        from fastgrad import _backends

        self.fastgrad = fastgrad
        self.backends = _backends
        spec = importlib.util.spec_from_file_location("fastgrad_bench_conftest", BENCH / "conftest.py")
        self.bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.bench)  # time_round, quantiles, device_name, _git_sha
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))

    @property
    def dtype(self) -> torch.dtype:
        """The benchmarks' operand dtype: bf16 on the GPU, fp32 on the CPU (as bench/)."""
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    def served(self, op: str) -> str:
        return self.backends.SERVED_BY[op][self.device]

    def check(self, step: str, name: str, shape, fn: Callable[[], tuple[bool, str]]) -> None:
        """Run one correctness check; an exception in it is a failed check (BudgetExceeded passes)."""
        try:
            passed, detail = fn()
        except Exception as e:
            passed, detail = False, _error(e)
        op = name.split()[0]
        self.report.check(step, name, shape, passed, detail, self.backends.SERVED_BY.get(op, {}).get(self.device, ""))

    def time(
        self,
        providers: dict[str, Callable[[], object]],
        target_s: float | None = None,
        min_rounds: int | None = None,
        max_rounds: int | None = None,
    ) -> dict[str, Timing]:
        """Time ``providers`` interleaved: a warm-up call each (compilation, allocator), a probe call
        each to size the samples (back-to-back calls until one takes ``min_sample_s``), then rounds
        until ``target_s`` (at least ``min_rounds``, fewer when the deadline is near)."""
        m = self.mode
        target_s = m.target_s if target_s is None else target_s
        min_rounds = m.min_rounds if min_rounds is None else min_rounds
        max_rounds = m.max_rounds if max_rounds is None else max_rounds
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        for fn in providers.values():
            fn()
        sync()
        probe: dict[str, list[float]] = {name: [] for name in providers}
        self.bench.time_round(providers, probe, self.device)
        iters = {name: max(1, min(1000, math.ceil(m.min_sample_s / max(t[0], 1e-9)))) for name, t in probe.items()}
        round_s = sum(iters[name] * probe[name][0] for name in providers)
        rounds = int(min(max_rounds, max(min_rounds, target_s / max(round_s, 1e-9))))
        rounds = max(1, min(rounds, int(self.budget.left() / max(round_s, 1e-9))))
        times: dict[str, list[float]] = {name: [] for name in providers}
        for _ in range(rounds):
            self.bench.time_round(providers, times, self.device, iters)
        out = {}
        for name, samples in times.items():
            median, p20, p80 = self.bench.quantiles(samples)
            out[name] = Timing(median, p20, p80, rounds, iters[name])
        return out


def _row(
    step: str, what: str, shape, dtype, provider: str, t: Timing | None, *, value: float | None = None,
    unit: str = "", ratio: float | None = None, ratio_to: str = "", status: str = "ok", note: str = "",
) -> Row:  # fmt: skip
    return Row(
        "measurement", step, what, _shape(shape), _dtype_name(dtype), provider,
        median_ms=None if t is None else t.median * 1e3,
        p20_ms=None if t is None else t.p20 * 1e3,
        p80_ms=None if t is None else t.p80 * 1e3,
        value=value, unit=unit, ratio=ratio, ratio_to=ratio_to, status=status, note=note,
    )  # fmt: skip


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.float(), expected.float()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def _within(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> tuple[bool, str]:
    err = _rel_err(actual, expected)
    return err <= rtol, f"relative error {err:.2e} (tolerance {rtol:.1e})"


@contextlib.contextmanager
def _fp32_reference():
    """fp32 matmuls of the reference in full fp32 on the GPU (no TF32), as on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def coordinate_svd():
    """``torch.linalg.svd`` replaced by the factors of a coordinate subspace (U = I[:, :k], S = 1,
    Vᴴ = I[:k]): a projector refresh then costs microseconds instead of an fp32 SVD. Only for warm-up
    steps whose cost and memory are not measured; P's values do not change the work of the steps
    between refreshes."""
    real = torch.linalg.svd

    def fake(a, full_matrices=True, *, driver=None, out=None):
        m, n = a.shape[-2:]
        k = min(m, n)
        u = torch.eye(m, m if full_matrices else k, dtype=a.dtype, device=a.device)
        vh = torch.eye(n if full_matrices else k, n, dtype=a.dtype, device=a.device)
        return torch.return_types.linalg_svd((u, torch.ones(k, dtype=a.dtype, device=a.device), vh))

    torch.linalg.svd = fake
    try:
        yield
    finally:
        torch.linalg.svd = real


@contextlib.contextmanager
def _build_on(device: str, dtype: torch.dtype):
    """Create modules directly on ``device`` in ``dtype`` (a 7B model never exists in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------- 3a, 3b


def case_copy(ctx: Context) -> Case:
    """3a: ``out.copy_(x)`` of a large fp32 vector (1 GiB on the GPU: far beyond L2): 8 bytes moved per
    element. Its GB/s is the ceiling the memory-bound quantizers of 3b are compared with."""
    numel = ctx.mode.copy_numel

    def run() -> list[Row]:
        x = torch.randn(numel, device=ctx.device)
        out = torch.empty_like(x)
        t = ctx.time({"copy": lambda: out.copy_(x)})["copy"]
        gbps = 8 * numel / t.median / 1e9
        ctx.shared["copy_gbps"] = gbps
        return [_row("3a", "copy (read + write)", (numel,), torch.float32, "Tensor.copy_", t, value=gbps, unit="GB/s")]

    return Case("3a", "copy (read + write)", (numel,), 5, run)


def quant_providers(ctx: Context, shape: tuple[int, int]):
    """The quantizer ops of 3b at ``shape`` (fp32 input, groups of 128): {what: (op, fn, bytes moved)},
    plus the tensors for the checks."""
    from bench_quant import GROUP, _quant_bytes

    from fastgrad import ops

    x = torch.randn(shape, device=ctx.device)
    numel = x.numel()
    q8 = ops.quantize_int8(x, GROUP)
    q4 = ops.quantize_int4(x, GROUP)
    out = torch.empty_like(x)
    deq_bytes = {bits: numel * bits // 8 + 2 * 4 * numel // GROUP + numel * 2 for bits in (8, 4)}  # bf16 out
    table = {
        "quantize_int8 SR": ("quantize_int8", lambda: ops.quantize_int8(x, GROUP, stochastic=True, seed=1),
                             _quant_bytes(numel, 8, 4)),
        "quantize_int8 RTN": ("quantize_int8", lambda: ops.quantize_int8(x, GROUP), _quant_bytes(numel, 8, 4)),
        "quantize_int4 SR": ("quantize_int4", lambda: ops.quantize_int4(x, GROUP, stochastic=True, seed=1),
                             _quant_bytes(numel, 4, 4)),
        "quantize_int4 RTN": ("quantize_int4", lambda: ops.quantize_int4(x, GROUP), _quant_bytes(numel, 4, 4)),
        "dequantize_int8 (bf16 out)": ("dequantize_int8", lambda: q8.dequantize(torch.bfloat16), deq_bytes[8]),
        "dequantize_int4 (bf16 out)": ("dequantize_int4", lambda: q4.dequantize(torch.bfloat16), deq_bytes[4]),
        "round_bf16_stochastic": ("round_bf16_stochastic", lambda: ops.round_bf16_stochastic(x, 1, 0), numel * 6),
        "copy (same shape)": (None, lambda: out.copy_(x), numel * 8),
    }  # fmt: skip
    return table, x, q8, q4, GROUP


def _sample_rows(m: int) -> list[slice]:
    """The first and last CHECK_ROWS rows of an m-row tensor (all of them when m is small)."""
    if m <= 2 * CHECK_ROWS:
        return [slice(0, m)]
    return [slice(0, CHECK_ROWS), slice(m - CHECK_ROWS, m)]


def quant_checks(ctx: Context, step: str, suffix: str, x, q8, q4, group: int) -> None:
    """Exact agreement with the reference on sampled rows (groups lie within rows, and element (i, j)
    draws the Philox counter offset + i·n + j, so rows r0.. of the whole tensor are the reference's
    output for those rows at offset r0·n)."""
    from fastgrad import _reference as ref
    from fastgrad import ops

    m, n = x.shape
    shape = tuple(x.shape)

    def quantize_check(bits: int, stochastic: bool):
        def fn():
            q = ops.quantize(x, bits, group, stochastic=stochastic, seed=5, offset=7)
            impl = ref.quantize_int8 if bits == 8 else ref.quantize_int4
            for rows in _sample_rows(m):
                want = impl(x[rows].cpu(), group, False, stochastic, 5, 7 + rows.start * n)
                for name, got, w in zip(("codes", "scales", "zeros"), q[:3], want, strict=True):
                    if not torch.equal(got[rows].cpu(), w):
                        diff = int((got[rows].cpu() != w).sum())
                        return False, f"{name} of rows {rows.start}:{rows.stop}: {diff} differ from the reference"
            return True, "codes, scales, zeros identical on the sampled rows"

        return fn

    def dequantize_check(bits: int):
        def fn():
            q = q8 if bits == 8 else q4
            got = q.dequantize(torch.bfloat16)
            impl = ref.dequantize_int8 if bits == 8 else ref.dequantize_int4
            for rows in _sample_rows(m):
                want = impl(q.codes[rows].cpu(), q.scales[rows].cpu(), q.zeros[rows].cpu(), torch.bfloat16)
                if not torch.equal(got[rows].cpu(), want):  # tests/test_quant.py: exact for 16-bit outputs
                    return False, f"rows {rows.start}:{rows.stop}: {int((got[rows].cpu() != want).sum())} differ"
            return True, "identical on the sampled rows"

        return fn

    def round_check():
        got = ops.round_bf16_stochastic(x, 3, 11)
        for rows in _sample_rows(m):
            want = ref.round_bf16_stochastic(x[rows].cpu(), 3, 11 + rows.start * n)
            if not torch.equal(got[rows].cpu().view(torch.int16), want.view(torch.int16)):
                return False, f"rows {rows.start}:{rows.stop} differ from the reference"
        return True, "bitwise identical on the sampled rows"

    for bits in (8, 4):
        for stochastic in (True, False):
            name = f"quantize_int{bits} {'SR' if stochastic else 'RTN'}{suffix}"
            ctx.check(step, name, shape, quantize_check(bits, stochastic))
        ctx.check(step, f"dequantize_int{bits}{suffix}", shape, dequantize_check(bits))
    ctx.check(step, f"round_bf16_stochastic{suffix}", shape, round_check)


def quant_check_names(suffix: str = "") -> tuple[str, ...]:
    """The names quant_checks reports, to declare them on the case before it runs."""
    names = []
    for bits in (8, 4):
        names += [f"quantize_int{bits} SR{suffix}", f"quantize_int{bits} RTN{suffix}", f"dequantize_int{bits}{suffix}"]
    return (*names, f"round_bf16_stochastic{suffix}")


def measure_quantizers(ctx: Context, suffix: str = "") -> list[Row]:
    """3b: every quantizer op and a copy of the same shape, interleaved; then the checks."""
    shape = ctx.mode.quant_shape
    table, x, q8, q4, group = quant_providers(ctx, shape)
    timings = ctx.time({what: fn for what, (_, fn, _) in table.items()})
    copy_gbps = ctx.shared.get("copy_gbps")
    same_shape_gbps = table["copy (same shape)"][2] / timings["copy (same shape)"].median / 1e9
    base, base_name = (copy_gbps, "copy (3a)") if copy_gbps else (same_shape_gbps, "copy (same shape)")
    rows = []
    for what, (op, _, moved) in table.items():
        t = timings[what]
        gbps = moved / t.median / 1e9
        provider = ctx.served(op) if op else "Tensor.copy_"
        rows.append(
            _row("3b", what, shape, torch.float32, provider, t, value=gbps, unit="GB/s", ratio=gbps / base,
                 ratio_to=base_name, note=f"{t.iters} calls per sample, {t.rounds} rounds")
        )  # fmt: skip
    quant_checks(ctx, "3b", suffix, x, q8, q4, group)
    return rows


def case_quantizers(ctx: Context) -> Case:
    """3b: the quantizers as this process serves them (Triton on the GPU by default)."""
    return Case(
        "3b", "quantizers", ctx.mode.quant_shape, 15, lambda: measure_quantizers(ctx), checks=quant_check_names()
    )


def _other_backends(ctx: Context) -> list[str]:
    """The FASTGRAD_CUDA_BACKEND values whose subprocess would serve some quantizer otherwise than here."""
    here = {ctx.served(op) for op in QUANT_OPS}
    if ctx.device == "cpu":
        return ["cuda"]  # serves nothing else on the CPU, but runs the subprocess path (CI)
    return [b for b in ("cuda", "triton") if here != {b}]


def case_cuda_cpp_quantizers(ctx: Context) -> Case:
    """3b, second part: the same ops with FASTGRAD_CUDA_BACKEND=cuda (read at import: a subprocess)."""

    def run() -> list[Row]:
        rows = []
        for backend in _other_backends(ctx):
            rows += _run_quant_child(ctx, backend)
        return rows

    checks = tuple(name for b in _other_backends(ctx) for name in quant_check_names(f" [FASTGRAD_CUDA_BACKEND={b}]"))
    return Case("3b", "quantizers, other CUDA backend (subprocess)", ctx.mode.quant_shape, 25, run, checks, False)


def _run_quant_child(ctx: Context, backend: str) -> list[Row]:
    """Run 3b in ``--child-quant`` with FASTGRAD_CUDA_BACKEND=``backend``; its rows (only for ops it
    serves otherwise than this process) and its checks. A stop at the deadline is BudgetExceeded."""
    out = ctx.report.out / f"gpu-acceptance-{ctx.report.tag}-quant-{backend}.json"
    out.unlink(missing_ok=True)
    left = ctx.budget.left()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", ctx.device, "--child-quant", str(out)]
    cmd += ["--budget-s", f"{max(left - 2, 1):.0f}", "--out", str(ctx.report.out)]
    cmd += ["--quick"] if ctx.quick else []
    if "copy_gbps" in ctx.shared:
        cmd += ["--copy-gbps", repr(ctx.shared["copy_gbps"])]
    env = dict(os.environ, FASTGRAD_CUDA_BACKEND=backend)
    env.pop("TRITON_INTERPRET", None)
    log = ctx.report.out / f"gpu-acceptance-{ctx.report.tag}-quant-{backend}.log"
    rc, _ = run_logged(cmd, env, left, log)
    if rc is None or rc == CHILD_BUDGET_EXIT:
        raise BudgetExceeded
    if rc != 0 or not out.exists():
        raise RuntimeError(f"subprocess with FASTGRAD_CUDA_BACKEND={backend} exited {rc}: {_tail(log)}")
    result = json.loads(out.read_text())
    ctx.shared.setdefault("quant_children", {})[backend] = result
    for r in result["checks"]:
        ctx.report.add(Row(**r))
    served = result["served"]
    same = [op for op in QUANT_OPS if served[op] == ctx.served(op)]
    if len(same) == len(QUANT_OPS):  # nothing new to time (e.g. no CUDA C++ kernels built, or the CPU)
        status = f"not measured: FASTGRAD_CUDA_BACKEND={backend} serves every quantizer as here ({served[same[0]]})"
        return [_row("3b", "quantizers", ctx.mode.quant_shape, torch.float32, f"FASTGRAD_CUDA_BACKEND={backend}",
                     None, status=status, note="the subprocess ran (its checks are listed)")]  # fmt: skip
    rows = []
    for r in result["rows"]:
        row = Row(**r)
        op = next((op for op in QUANT_OPS if row.what.startswith(op)), None)
        if op is None:
            continue  # its copy row: the parent's stands
        if op in same:
            row.status = f"not measured: FASTGRAD_CUDA_BACKEND={backend} serves this op by {row.provider} too"
            row.median_ms = row.p20_ms = row.p80_ms = row.value = row.ratio = None
            row.note = ""
        row.note = f"subprocess FASTGRAD_CUDA_BACKEND={backend}" + (f"; {row.note}" if row.note else "")
        rows.append(row)
    return rows


def child_quant(args: argparse.Namespace) -> int:
    """``--child-quant PATH``: 3b only, in this process's backend; rows and checks as JSON to PATH."""
    mode = QUICK_MODE if args.quick else GPU_MODE
    budget = Budget(_T0, args.budget_s, 0.5)
    report = Report(args, args.device, "child", budget)
    ctx = Context(args.device, mode, budget, report, args.quick, args)
    if args.copy_gbps:
        ctx.shared["copy_gbps"] = args.copy_gbps
    backend = os.environ.get("FASTGRAD_CUDA_BACKEND", "")
    if args.device == "cpu" and args.quick:
        torch.set_num_threads(1)
    try:
        with budget.hard_stop():
            rows = measure_quantizers(ctx, f" [FASTGRAD_CUDA_BACKEND={backend}]")
    except BudgetExceeded:
        return CHILD_BUDGET_EXIT
    result = {
        "served": {op: ctx.served(op) for op in QUANT_OPS},
        "rows": [dataclasses.asdict(r) for r in rows],
        "checks": [dataclasses.asdict(r) for r in report.checks()],
    }
    Path(args.child_quant).write_text(json.dumps(result, indent=1))
    return 0


def choose_preference(report: Report) -> None:
    """Per quantizer op: the faster of Triton and CUDA C++ (summed over the op's variants), where both
    serve it and the CUDA C++ kernel passed its checks; into report.preference."""
    times: dict[str, dict[str, float]] = {op: {} for op in QUANT_OPS}
    for r in report.rows:
        if r.kind != "measurement" or r.step != "3b" or r.median_ms is None or r.status != "ok":
            continue
        op = next((op for op in QUANT_OPS if r.what.startswith(op)), None)
        if op is not None and r.provider in ("triton", "cuda"):
            times[op][r.provider] = times[op].get(r.provider, 0.0) + r.median_ms
    failed = {(r.what.split()[0], r.provider) for r in report.checks() if r.status.startswith("failed")}
    both = {op: t for op, t in times.items() if set(t) == {"triton", "cuda"}}
    if not both:
        report.preference_note = (
            f"no recommendation: no quantizer op was measured with both a Triton and a CUDA C++ kernel on "
            f"{report.device} (both must serve it: see the served-by table and the 3b rows)."
        )
        return
    for op, t in both.items():
        faster = min(t, key=t.get)
        other = "triton" if faster == "cuda" else "cuda"
        why = f"cuda {t['cuda']:.4f} ms vs triton {t['triton']:.4f} ms (all variants)"
        if (op, faster) in failed:
            faster, why = other, why + f"; the {faster} kernel failed a check"
            if (op, other) in failed:
                why += f", and so did the {other} kernel"
        report.preference[op] = (faster, why)
    report.preference_note = (
        "Per op, the faster of the two kernels measured here (medians summed over the op's variants in 3b); "
        "the Triton kernels stay the default for the others. For fastgrad/_backends.py:"
    )


# ---------------------------------------------------------------- 3c, 3d, 3e


def _orientations(ctx: Context):
    """(model, m, n, r, side) with G m×n: P on the left for the wide orientation, on the right for the
    tall one (GaLore's std rule)."""
    for model, m, n, r in ctx.mode.models:
        yield model, m, n, r, "left"
        yield model, n, m, r, "right"


def _group(row: int, want: int = 128) -> int:
    """A group size along a P row of length ``row`` (even for INT4: ``row`` is even here)."""
    return want if row % want == 0 else row


def _is_last_model(ctx: Context, model: str) -> bool:
    return model == ctx.mode.models[-1][0]


def case_project(ctx: Context, model: str, m: int, n: int, r: int, side: str) -> Case:
    """3c: R = down(G, P) and up(R, P) with P in INT8/INT4 against bf16 matmuls of the same shape."""
    what = f"project {side} ({model})"
    check_names = ()
    if _is_last_model(ctx, model):
        check_names = tuple(f"{op} int{b} {side}" for op in ("lowrank_project", "lowrank_project_back") for b in (8, 4))

    def run() -> list[Row]:
        from fastgrad import _reference as ref
        from fastgrad import ops

        dtype, dev = ctx.dtype, ctx.device
        g = torch.randn(m, n, device=dev, dtype=dtype)
        p = torch.randn((m, r) if side == "left" else (r, n), device=dev) / r**0.5
        q = {b: ops.quantize(p.contiguous(), b, _group(p.shape[1])) for b in (8, 4)}
        p_hat = {b: q[b].dequantize(dtype) for b in (8, 4)}  # the baseline matmuls' operand
        low = ops.lowrank_project(g, q[4], side)
        served = ctx.served("lowrank_project_quantized")
        served_back = ctx.served("lowrank_project_back_quantized")
        down = (lambda pp: pp.t() @ g) if side == "left" else (lambda pp: g @ pp.t())
        up = (lambda pp: pp @ low) if side == "left" else (lambda pp: low @ pp)
        providers = {
            "project torch-matmul": lambda: down(p_hat[4]),
            f"project {served}-int8": lambda: ops.lowrank_project(g, q[8], side),
            f"project {served}-int4": lambda: ops.lowrank_project(g, q[4], side),
            "back torch-matmul": lambda: up(p_hat[4]),
            f"back {served_back}-int8": lambda: ops.lowrank_project_back(low, q[8], side),
            f"back {served_back}-int4": lambda: ops.lowrank_project_back(low, q[4], side),
        }
        t = ctx.time(providers)
        flops = 2 * m * n * r
        rows = []
        mm = f"{_dtype_name(dtype)} torch.matmul"
        for name, timing in t.items():
            kind, provider = name.split(" ", 1)
            base = t[f"{kind} torch-matmul"].median
            label = mm if provider == "torch-matmul" else provider
            rows.append(
                _row("3c", f"{'project' if kind == 'project' else 'project_back'} {side} ({model})", (m, n, r),
                     dtype, label, timing, value=_tflops(flops, timing.median), unit="TFLOP/s",
                     ratio=base / timing.median, ratio_to=mm)
            )  # fmt: skip
        if check_names:
            with _fp32_reference():
                for b in (8, 4):
                    p32 = q[b].dequantize(torch.float32)
                    want_low = ref.lowrank_project(g.float(), p32, side)
                    ctx.check("3c", f"lowrank_project int{b} {side}", (m, n, r),
                              lambda b=b, w=want_low: _within(ops.lowrank_project(g, q[b], side), w,
                                                              RTOL_PROJECT[dtype]))  # fmt: skip
                    want_back = ref.lowrank_project_back(low.float(), p32, side, 0.25)
                    ctx.check("3c", f"lowrank_project_back int{b} {side}", (m, n, r),
                              lambda b=b, w=want_back: _within(ops.lowrank_project_back(low, q[b], side, 0.25), w,
                                                               RTOL_PROJECT[dtype]))  # fmt: skip
        return rows

    return Case("3c", what, (m, n, r), 5, run, check_names)


def case_lowrank_grad(ctx: Context, model: str, m: int, n: int, r: int, side: str) -> Case:
    """3d: R = down(dyᵀx, P) straight from dy and x against forming G and projecting it."""
    tokens = ctx.mode.tokens
    check_names = (f"lowrank_grad dense {side}", f"lowrank_grad int4 {side}") if _is_last_model(ctx, model) else ()

    def run() -> list[Row]:
        from fastgrad import _reference as ref
        from fastgrad import ops

        dtype, dev = ctx.dtype, ctx.device
        dy = torch.randn(tokens, m, device=dev, dtype=dtype)
        x = torch.randn(tokens, n, device=dev, dtype=dtype)
        p = torch.randn((m, r) if side == "left" else (r, n), device=dev, dtype=dtype) / r**0.5
        q4 = ops.quantize_int4(p.float().contiguous(), _group(p.shape[1]))
        served, served_q = ctx.served("lowrank_grad"), ctx.served("lowrank_grad_quantized")
        providers = {
            "full-G-then-project": lambda: ops.lowrank_project(dy.t() @ x, p, side),
            served: lambda: ops.lowrank_grad(dy, x, p, side),
            f"{served_q}-int4": lambda: ops.lowrank_grad(dy, x, q4, side),
        }
        t = ctx.time(providers)
        base = t["full-G-then-project"].median
        rows = []
        for name, timing in t.items():
            flops = 2 * tokens * m * n + 2 * m * n * r if name == "full-G-then-project" else 2 * tokens * (m + n) * r
            rows.append(
                _row("3d", f"lowrank_grad {side} ({model})", (tokens, m, n, r), dtype, name, timing,
                     value=_tflops(flops, timing.median), unit="TFLOP/s", ratio=base / timing.median,
                     ratio_to="full-G-then-project")
            )  # fmt: skip
        if check_names:
            with _fp32_reference():
                full_g = dy.float().t() @ x.float()
                want = ref.lowrank_project(full_g, p.float(), side)
                ctx.check("3d", check_names[0], (tokens, m, n, r),
                          lambda: _within(ops.lowrank_grad(dy, x, p, side), want, RTOL_GRAD[dtype]))  # fmt: skip
                want4 = ref.lowrank_project(full_g, q4.dequantize(torch.float32), side)
                ctx.check("3d", check_names[1], (tokens, m, n, r),
                          lambda: _within(ops.lowrank_grad(dy, x, q4, side), want4, RTOL_GRAD[dtype]))  # fmt: skip
        return rows

    return Case("3d", f"lowrank_grad {side} ({model})", (tokens, m, n, r), 4, run, check_names)


def _bench_lowrank():
    """bench/bench_lowrank.py's unfused providers and step hyper-parameters, or the import error."""
    try:
        import bench_lowrank
    except Exception as e:
        return None, _error(e)
    return bench_lowrank, ""


def case_fused_step(ctx: Context, model: str, m: int, n: int, r: int, side: str, weight: str) -> Case:
    """3e: one fused GaLore step (float or INT8 W) against bench_lowrank's unfused sequence."""
    op = "galore_adam_step_" if weight == "float" else "galore_adam_step_int8_"
    check_names = (f"{op} {side}",) if _is_last_model(ctx, model) else ()

    def run() -> list[Row]:
        from fastgrad import _reference as ref
        from fastgrad import ops

        bl, why = _bench_lowrank()
        hyper = bl.STEP_HYPER if bl else dict(beta1=0.9, beta2=0.999, eps=1e-6, step_scale=-1e-3, decay=0.9999)
        dtype, dev = ctx.dtype, ctx.device
        low = torch.randn((r, n) if side == "left" else (m, r), device=dev)
        first, second = torch.zeros_like(low), torch.zeros_like(low)
        p = torch.randn((m, r) if side == "left" else (r, n), device=dev) / r**0.5
        if weight == "float":
            w = torch.randn(m, n, device=dev, dtype=dtype)
            p, low, first, second = p.to(dtype), low.to(dtype), first.to(dtype), second.to(dtype)
            fused = lambda: ops.galore_adam_step_(w, first, second, low, p, side, **hyper)  # noqa: E731
            unfused = (lambda: bl._unfused_step(w, first, second, low, p, side, hyper)) if bl else None
        else:
            w = ops.quantize_int8(torch.randn(m, n, device=dev), 256 if n % 256 == 0 else n)
            p = ops.quantize_int4(p.contiguous(), _group(p.shape[1]))
            fused = lambda: ops.galore_adam_step_(w, first, second, low, p, side, **hyper, seed=1)  # noqa: E731
            unfused = (lambda: bl._unfused_int8_step(w, first, second, low, p, side, hyper)) if bl else None
        served = f"{ctx.served(op)}-fused"
        providers = {served: fused} | ({"unfused": unfused} if unfused else {})
        t = ctx.time(providers)
        flops = 2 * m * n * r
        what = f"galore_adam_step {weight} W {side} ({model})"
        rows = []
        for name in ("unfused", served):
            if name not in t:
                rows.append(_row("3e", what, (m, n, r), dtype, name, None, status=f"not measured: {why}"))
                continue
            ratio = t["unfused"].median / t[name].median if "unfused" in t else None
            rows.append(
                _row("3e", what, (m, n, r), dtype, name, t[name], value=_tflops(flops, t[name].median),
                     unit="TFLOP/s", ratio=ratio, ratio_to="unfused" if ratio else "")
            )  # fmt: skip
        if check_names:
            full = dict(hyper, denom_scale=1.0)
            args = [full[k] for k in ("beta1", "beta2", "eps", "denom_scale", "step_scale", "decay")]
            with _fp32_reference():
                if weight == "float":

                    def check():
                        want = [t_.clone() for t_ in (w, first, second)]
                        ref.galore_adam_step_(*want, low, p, side, *args)
                        ops.galore_adam_step_(w, first, second, low, p, side, **hyper)
                        for name_, got, w_, tol in (("exp_avg", first, want[1], RTOL_MOMENT[dtype]),
                                                    ("exp_avg_sq", second, want[2], RTOL_MOMENT[dtype]),
                                                    ("w", w, want[0], RTOL_W[dtype])):  # fmt: skip
                            ok, detail = _within(got, w_, tol)
                            if not ok:
                                return False, f"{name_}: {detail}"
                        return True, "moments and W within the tests' tolerances"

                else:

                    def check():
                        want_w = [t_.clone() for t_ in w[:3]]
                        want_m = [first.clone(), second.clone()]
                        ref.galore_adam_step_int8_(*want_w, *want_m, low, *p[:3], p.bits, side, *args, True, 11, 5)
                        ops.galore_adam_step_(w, first, second, low, p, side, **hyper, seed=11, offset=5)
                        for name_, got, want, tol in (("exp_avg", first, want_m[0], RTOL_MOMENT[torch.float32]),
                                                      ("exp_avg_sq", second, want_m[1], RTOL_MOMENT[torch.float32]),
                                                      ("scales", w.scales, want_w[1], 1e-5),
                                                      ("zeros", w.zeros, want_w[2], 1e-5)):  # fmt: skip
                            ok, detail = _within(got, want, tol)
                            if not ok:
                                return False, f"{name_}: {detail}"
                        same = (w.codes == want_w[0]).float().mean().item()
                        ok = same >= INT8_STEP_SAME_CODES
                        return (
                            ok,
                            f"{same:.4%} of the codes equal the reference's (at least {INT8_STEP_SAME_CODES:.1%})",
                        )

                ctx.check("3e", check_names[0], (m, n, r), check)
        return rows

    return Case("3e", f"galore_adam_step {weight} W {side} ({model})", (m, n, r), 4, run, check_names)


def case_peer_optimizers(ctx: Context, name: str, shape: tuple[int, int, int]) -> Case:
    """3e, peers: one optimizer step between refreshes, galore-torch / q-galore-torch (when they import)
    beside fastgrad's GaLoreAdamW and QGaLoreAdamW (INT8 QLinear weight), fp32 weights as
    bench/bench_optim.py (whose builders run here under ``torch.device``)."""
    m, n, r = shape

    def run() -> list[Row]:
        import bench_optim

        from fastgrad.optim import GaLoreAdamW

        providers, missing = {}, {}
        with torch.device(ctx.device):
            try:
                from galore_torch import GaLoreAdamW as TorchGaLore
            except Exception as e:
                missing["galore-torch GaLoreAdamW"] = e
            else:
                providers["galore-torch GaLoreAdamW"] = bench_optim._optimizer(TorchGaLore, shape).step
            providers["fastgrad GaLoreAdamW"] = bench_optim._optimizer(GaLoreAdamW, shape).step
            providers["fastgrad QGaLoreAdamW (INT8 W)"] = bench_optim._qgalore_step(shape)
            try:
                from q_galore_torch import QGaLoreAdamW8bit
            except Exception as e:
                missing["q-galore-torch QGaLoreAdamW8bit"] = e
            else:
                extra = {"quant": True, "quant_n_bit": 4, "quant_group_size": 256, "cos_threshold": 0.4,
                         "gamma_proj": 2, "queue_size": 5}  # fmt: skip
                try:
                    providers["q-galore-torch QGaLoreAdamW8bit"] = bench_optim._optimizer(
                        QGaLoreAdamW8bit, shape, group_extra=extra
                    ).step
                except Exception as e:  # a peer's failure is recorded, not ours
                    missing["q-galore-torch QGaLoreAdamW8bit"] = RuntimeError(f"failed: {_error(e)}")
        t = ctx.time(providers)
        base = t.get("galore-torch GaLoreAdamW")
        rows = []
        for provider, timing in t.items():
            rows.append(
                _row("3e", f"optimizer step ({name})", shape, torch.float32, provider, timing,
                     value=_tflops(4 * m * n * r, timing.median), unit="TFLOP/s",
                     ratio=base.median / timing.median if base else None, ratio_to="galore-torch" if base else "")
            )  # fmt: skip
        for provider, e in missing.items():
            status = str(e) if str(e).startswith("failed:") else NOT_INSTALLED
            note = "" if status.startswith("failed:") else _error(e)
            rows.append(_row("3e", f"optimizer step ({name})", shape, torch.float32, provider, None, status=status,
                             note=note))  # fmt: skip
        return rows

    return Case("3e", f"optimizer step ({name})", shape, 15, run)


# ---------------------------------------------------------------- 3f, 3g


def _train_config(ctx: Context, optim: str, batch: int, **kw):
    """``fastgrad pretrain``'s config of the throughput model (no projector refresh after the first step)."""
    from fastgrad.train.config import TrainConfig

    m = ctx.mode
    dtype = "bfloat16" if ctx.device == "cuda" else "float32"
    return TrainConfig(
        model=m.train_model, optim=optim, batch_size=batch, seq_len=m.train_seq, vocab_size=m.train_vocab,
        dtype=dtype, update_proj_gap=10**9, device=ctx.device, **kw,
    ).resolved()  # fmt: skip


TRAIN_OPTIMS = {"torch AdamW": "adamw", "GaLore (fastgrad)": "galore", "Q-GaLore (fastgrad, INT8 W)": "q-galore"}


def _train_batch(ctx: Context) -> int:
    """The largest batch (≤ 16 sequences) whose three models fit at once in 60% of the free GPU memory
    by fastgrad's memory model; 2 on the CPU."""
    if ctx.device != "cuda":
        return 2
    from fastgrad.train.memory import estimate

    free, _ = torch.cuda.mem_get_info()
    for batch in (16, 8, 4, 2, 1):
        need = sum(estimate(_train_config(ctx, o, batch), device="cuda").peak for o in TRAIN_OPTIMS.values())
        if need <= 0.6 * free:
            return batch
    return 1


def case_training(ctx: Context) -> Case:
    """3f: whole training steps of the 1B model as ``fastgrad pretrain`` takes them (forward with the
    fp32 loss, backward, the gradient norm, the optimizer step), interleaved across the optimizers."""
    m = ctx.mode

    def run() -> list[Row]:
        from fastgrad.models import LlamaForCausalLM, get_config
        from fastgrad.nn.lowrank import accepts_projected_grad, clip_grad_norm_
        from fastgrad.train.optimizers import build_optimizer

        batch = _train_batch(ctx)
        steps = {}
        for label, optim in TRAIN_OPTIMS.items():
            cfg = _train_config(ctx, optim, batch)
            torch.manual_seed(0)
            with _build_on(ctx.device, getattr(torch, cfg.dtype)):
                model = LlamaForCausalLM(get_config(cfg.model, cfg.vocab_size, cfg.seq_len))
            optimizer = build_optimizer(cfg, model)
            params = [p for p in model.parameters() if p.requires_grad or accepts_projected_grad(p)]
            gen = torch.Generator(device=ctx.device).manual_seed(1)
            ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=ctx.device, generator=gen)
            labels = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=ctx.device, generator=gen)

            def step(model=model, optimizer=optimizer, params=params, ids=ids, labels=labels):
                loss = model(ids, labels, shift_labels=False)
                loss.backward()
                clip_grad_norm_(params, None).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            with coordinate_svd():
                step()  # k = 0: the projector refresh (not timed)
            step()  # k = 1: the first step between refreshes compiles its kernels
            steps[label] = step
        t = ctx.time(steps, target_s=10 * m.target_s, min_rounds=max(2, m.min_rounds - 2), max_rounds=20)
        tokens = batch * m.train_seq
        base = t["torch AdamW"].median
        dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
        return [
            _row("3f", f"train step ({m.train_model}, vocab {m.train_vocab})", (batch, m.train_seq), dtype, label,
                 timing, value=tokens / timing.median, unit="tokens/s", ratio=base / timing.median,
                 ratio_to="torch AdamW", note=f"{timing.rounds} steps each, interleaved")
            for label, timing in t.items()
        ]  # fmt: skip

    return Case("3f", f"train step ({m.train_model})", (m.train_model,), 60, run)


def _memory_config(ctx: Context):
    """The README's LLaMA-7B Q-GaLore configuration (section Memory): q-galore8bit, rank 1024 (the
    model's recipe rank in --quick), layer-wise streaming, activation checkpointing, batch 1."""
    from fastgrad.train.config import TrainConfig

    m = ctx.mode
    return TrainConfig(
        model=m.memory_model, optim="q-galore8bit", rank=1024 if m.memory_model == "7b" else None, layerwise=True,
        layerwise_streaming=True, batch_size=1, seq_len=m.memory_seq, activation_checkpointing=True,
        dtype="bfloat16", vocab_size=m.memory_vocab, device=ctx.device,
    ).resolved()  # fmt: skip


MEMORY_MARK = 7777  # bytes of the marker allocation before the measured step (tests/test_memory.py's MARK)


def _profiled_peak(model: torch.nn.Module, batch: list[torch.Tensor], step: Callable[[], None]) -> int:
    """CPU: the live-memory peak of the second of two steps, as tests/test_memory.py measures it. Both
    steps are profiled, so the optimizer state the first creates (and every tensor the second
    replaces) is counted on allocation and on release; the live total starts from what is resident
    before them (weights, buffers, the token batch) and a marker allocation starts the measured step."""
    from fastgrad.train.profiling import measured_memory_events, storage_bytes

    live = storage_bytes([*model.parameters(), *model.buffers(), *batch])

    def run() -> None:
        with coordinate_svd():
            step()  # k = 0: refresh (not measured)
        torch.empty(MEMORY_MARK, dtype=torch.uint8)  # allocated and freed at once: the marker
        step()  # k = 1: between refreshes

    peak, measuring = 0, False
    for nbytes in measured_memory_events(run):
        if abs(nbytes) == MEMORY_MARK:
            measuring = True
            continue
        live += nbytes
        if measuring:
            peak = max(peak, live)
    if not measuring:
        raise RuntimeError("the profiler recorded no marker allocation")
    return peak


def _memory_command(cfg) -> str:
    rank = f" --rank {cfg.rank}" if cfg.model == "7b" else ""
    return (
        f"fastgrad memory --model {cfg.model} --optim {cfg.optim}{rank} --layerwise --layerwise-streaming "
        f"--batch-size {cfg.batch_size} --seq-len {cfg.seq_len} --activation-checkpointing --dtype {cfg.dtype} "
        f"--vocab-size {cfg.vocab_size} --device {cfg.device}"
    )


def case_memory(ctx: Context) -> Case:
    """3g: the peak of a training step between projector refreshes, measured, beside the estimate."""

    def run() -> list[Row]:
        from fastgrad.models import LlamaForCausalLM, get_config
        from fastgrad.optim import layerwise
        from fastgrad.train.memory import estimate
        from fastgrad.train.optimizers import build_optimizer

        cfg = _memory_config(ctx)
        est = estimate(cfg, device=ctx.device)
        _free_memory(ctx.device)
        base = torch.cuda.memory_allocated() if ctx.device == "cuda" else 0
        torch.manual_seed(0)
        with _build_on(ctx.device, torch.bfloat16):
            model = LlamaForCausalLM(get_config(cfg.model, cfg.vocab_size, cfg.seq_len))
        model.gradient_checkpointing = True
        optimizer = build_optimizer(cfg, model)  # converts the projections to INT8 QLinear first
        lw = layerwise(model, optimizer, grad_accum_steps=1, streaming=True)
        gen = torch.Generator(device=ctx.device).manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len), device=ctx.device, generator=gen)
        labels = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len), device=ctx.device, generator=gen)

        def step():
            loss = model(ids, labels, shift_labels=False)
            loss.backward()
            loss.item()
            lw.finish_step()

        if ctx.device == "cuda":
            with coordinate_svd():
                step()  # k = 0: refresh (not measured)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()  # k = 1: between refreshes
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated() - base
            how = "torch.cuda.max_memory_allocated"
        else:
            measured = _profiled_peak(model, [ids, labels], step)
            how = "profiler memory events"
        what = f"peak memory ({cfg.model} {cfg.optim} rank {cfg.rank} layer-wise streaming)"
        shape = (cfg.batch_size, cfg.seq_len)
        mib = 2**20
        return [
            _row("3g", what, shape, torch.bfloat16, f"measured ({how})", None, value=measured / mib, unit="MiB",
                 ratio=measured / est.peak_between_refreshes, ratio_to="estimate between refreshes",
                 note=f"a step between refreshes; {measured / est.peak_between_refreshes - 1:+.3%} vs the estimate"),
            _row("3g", what, shape, torch.bfloat16, "estimate between refreshes (fastgrad memory)", None,
                 value=est.peak_between_refreshes / mib, unit="MiB", note=_memory_command(cfg)),
            _row("3g", what, shape, torch.bfloat16, "estimate, refresh step (fastgrad memory's peak)", None,
                 value=est.peak / mib, unit="MiB", note=f"peak phase: {est.peak_phase}"),
        ]  # fmt: skip

    cfg_name = ctx.mode.memory_model
    return Case("3g", f"peak memory ({cfg_name})", (cfg_name,), 60, run)


# ---------------------------------------------------------------- 3h


def case_newton_schulz(ctx: Context, model: str, m: int, n: int) -> Case:
    """3h: ``newton_schulz`` of an m×n matrix against torch.optim.Muon's sequence of torch matmuls
    (bench/bench_newton_schulz.py's, the bar to meet and bitwise the op's reference)."""
    check_names = ("newton_schulz",) if _is_last_model(ctx, model) else ()

    def run() -> list[Row]:
        from bench_newton_schulz import EPS, _torch_sequence

        from fastgrad import _reference as ref
        from fastgrad import ops

        dtype, dev = ctx.dtype, ctx.device
        x = torch.randn(m, n, device=dev).to(dtype)
        triples = [ops.NS_COEFFICIENTS] * NS_STEPS
        served = ctx.served("newton_schulz")
        t = ctx.time({"torch-sequence": lambda: _torch_sequence(x, triples), served: lambda: ops.newton_schulz(x)})
        s, length = min(m, n), max(m, n)
        flops = NS_STEPS * (4 * s * s * length + 2 * s**3)  # Y Yᵀ and B Y: 2·s²·l each; A·A: 2·s³
        base = t["torch-sequence"].median
        rows = [
            _row("3h", f"newton_schulz {NS_STEPS} steps ({model})", (m, n), dtype, provider, timing,
                 value=_tflops(flops, timing.median), unit="TFLOP/s", ratio=base / timing.median,
                 ratio_to="torch-sequence")
            for provider, timing in t.items()
        ]  # fmt: skip
        if check_names:
            with _fp32_reference():
                want = ref.newton_schulz(x.float(), list(ops.NS_COEFFICIENTS) * NS_STEPS, EPS)
            ctx.check("3h", check_names[0], (m, n), lambda: _within(ops.newton_schulz(x), want, RTOL_NS[dtype]))
        return rows

    return Case("3h", f"newton_schulz ({model})", (m, n), 4, run, check_names)


def case_muon_step(ctx: Context) -> Case:
    """3h: one Muon step (momentum, Newton–Schulz in bf16, update) over the weights of one decoder
    layer with fixed fp32 gradients, after an untimed step: torch.optim.Muon beside fastgrad's Muon
    (bitwise torch's weights) and Muon8bit (8-bit momentum)."""
    name, shapes = ctx.mode.muon_layer

    def run() -> list[Row]:
        from fastgrad.optim import Muon, Muon8bit

        options = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True}

        def stepper(make):
            weights = [torch.nn.Parameter(torch.randn(m, n, device=ctx.device) * 0.02) for m, n in shapes]
            for w in weights:
                w.grad = torch.randn_like(w) * 1e-3
            opt = make(weights)
            opt.step()  # creates the momentum buffers
            return opt.step

        providers, missing = {}, {}
        if hasattr(torch.optim, "Muon"):
            providers["torch.optim.Muon"] = stepper(lambda ws: torch.optim.Muon(ws, **options))
        else:
            missing["torch.optim.Muon"] = f"torch {torch.__version__} has no torch.optim.Muon"
        providers["fastgrad Muon"] = stepper(lambda ws: Muon(ws, **options))
        providers["fastgrad Muon8bit"] = stepper(lambda ws: Muon8bit(ws, **options))
        t = ctx.time(providers)
        flops = sum(NS_STEPS * (4 * min(s) ** 2 * max(s) + 2 * min(s) ** 3) for s in shapes)
        base = t.get("torch.optim.Muon")
        rows = [
            _row("3h", f"Muon step ({name})", (name,), torch.float32, provider, timing,
                 value=_tflops(flops, timing.median), unit="TFLOP/s",
                 ratio=base.median / timing.median if base else None, ratio_to="torch.optim.Muon" if base else "")
            for provider, timing in t.items()
        ]  # fmt: skip
        rows += [_row("3h", f"Muon step ({name})", (name,), torch.float32, provider, None, status=NOT_INSTALLED,
                      note=why) for provider, why in missing.items()]  # fmt: skip
        return rows

    return Case("3h", f"Muon step ({name})", (name,), 8, run)


def build_cases(ctx: Context) -> list[Case]:
    cases = [case_copy(ctx), case_quantizers(ctx), case_cuda_cpp_quantizers(ctx)]
    orientations = list(_orientations(ctx))
    cases += [case_project(ctx, *o) for o in orientations]
    cases += [case_lowrank_grad(ctx, *o) for o in orientations]
    cases += [case_fused_step(ctx, *o, weight) for weight in ("float", "int8") for o in orientations]
    cases += [case_peer_optimizers(ctx, name, shape) for name, shape in ctx.mode.optim_shapes]
    # 3h before 3f and 3g: seconds, where a training or memory case takes a minute of the budget
    cases += [case_newton_schulz(ctx, model, m, n) for model, m, n, _ in ctx.mode.models]
    cases += [case_muon_step(ctx)]
    cases += [case_training(ctx), case_memory(ctx)]
    return cases


def run_case(ctx: Context, case: Case) -> tuple[str, float]:
    """Run one case under the budget; its rows (or one row saying why there are none) go to the report.
    Returns (outcome: "ok" | "failed" | "budget", seconds)."""
    report, shape = ctx.report, _shape(case.shape)
    estimate = case.estimate_s * ctx.mode.scale
    if not ctx.budget.fits(estimate):
        note = f"needs about {estimate:.0f} s, {max(ctx.budget.left(), 0):.0f} s left"
        report.add(Row("measurement", case.step, case.what, shape, status=NOT_MEASURED_BUDGET, note=note))
        for name in case.checks:
            report.check(case.step, name, shape, None, "not run: time budget")
        return "budget", 0.0
    start = time.monotonic()
    reported = {r.what for r in report.checks()}
    outcome, status = "ok", "ok"
    try:
        with ctx.budget.hard_stop() if case.hard_stop else contextlib.nullcontext():
            rows = case.run()
        for row in rows:
            report.add(row)
    except BudgetExceeded:
        outcome, status = "budget", f"{NOT_MEASURED_BUDGET} (stopped after {time.monotonic() - start:.0f} s)"
    except Exception as e:
        outcome, status = "failed", f"failed: {_error(e)}"
        traceback.print_exc()
    if outcome != "ok":
        report.add(Row("measurement", case.step, case.what, shape, status=status))
    done = {r.what for r in report.checks()} - reported
    for name in case.checks:
        if name not in done:
            passed = None if outcome == "budget" else False
            detail = "not run: time budget" if outcome == "budget" else f"not reached: {status}"
            report.check(case.step, name, shape, passed, detail)
    with contextlib.suppress(Exception):
        _free_memory(ctx.device)
    return outcome, time.monotonic() - start


def step_measurements(report: Report, args: argparse.Namespace, budget: Budget) -> None:
    mode = QUICK_MODE if args.quick else GPU_MODE
    try:
        ctx = Context(args.device, mode, budget, report, args.quick, args)
        report.env["fastgrad"] = ctx.fastgrad.__version__
        report.env["git_sha"] = ctx.bench._git_sha() or "unknown (no git repository)"
        report.env["device"] = ctx.bench.device_name(args.device)
        report.served = {op: ctx.served(op) for op in ctx.backends.SERVED_BY}
        for what, err in (("fastgrad._C", ctx.backends.EXTENSION_ERROR), ("Triton", ctx.backends.TRITON_ERROR)):
            if err:
                report.notes.append(f"{what} not loaded: {err}")
        cases = build_cases(ctx)
    except Exception as e:
        for step, title in SECTIONS.items():
            report.add(Row("step", step, title, status=f"failed: {_error(e)}", seconds=0.0))
        report.exit_reasons.append(f"measurements could not start: {_error(e)}")
        traceback.print_exc()
        return
    torch.manual_seed(0)
    by_step: dict[str, list[tuple[str, float]]] = {step: [] for step in SECTIONS}
    for case in cases:
        by_step[case.step].append(run_case(ctx, case))
        report.write()
    for step, results in by_step.items():
        outcomes = [o for o, _ in results]
        counts = {o: outcomes.count(o) for o in ("ok", "failed", "budget")}
        if counts["ok"] == len(outcomes):
            status = "ok"
        elif counts["budget"] == len(outcomes):
            status = NOT_MEASURED_BUDGET
        else:
            status = f"{counts['ok']} ok, {counts['failed']} failed, {counts['budget']} not measured (time budget)"
        seconds = sum(s for _, s in results)
        report.add(Row("step", step, SECTIONS[step], status=status, seconds=seconds, note=f"{len(outcomes)} cases"))
    choose_preference(report)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CI)")
    p.add_argument("--out", default=str(BENCH / "results"), help="output folder (default bench/results)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-time budget of the whole run (default 480)")
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--child-quant", help=argparse.SUPPRESS)  # internal: 3b in a subprocess, JSON to this path
    p.add_argument("--copy-gbps", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.out = str(Path(args.out).resolve())  # the subprocesses run in the repo root
    return args


def device_tag(device: str, quick: bool) -> str:
    """The output files' tag: "cpu" or the GPU's name ("nvidia-h200"), "-quick" for --quick."""
    name = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return name + ("-quick" if quick else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_quant:
        return child_quant(args)
    budget = Budget(_T0, args.budget_s, reserve=min(10.0, 0.03 * args.budget_s))
    if args.device == "cuda" and not torch.cuda.is_available():
        report = Report(args, "cuda", "no-cuda" + ("-quick" if args.quick else ""), budget)
        report.exit_reasons.append("no CUDA device (use --device cpu --quick off the GPU machine)")
        report.write()
        print(report.markdown())
        return 1
    if args.device == "cpu" and args.quick:
        # Tiny shapes on a shared CPU: a second thread only adds OpenMP spin-waits (tests/conftest.py's
        # single_thread); the measurements are of the harness, not of the CPU.
        torch.set_num_threads(1)
    report = Report(args, args.device, device_tag(args.device, args.quick), budget)
    report.write()  # something exists from the start
    step_build(report, args)
    report.write()
    step_tests(report, args)
    report.write()
    step_measurements(report, args, budget)
    report.write()
    print(report.markdown())
    print(f"written: {report.csv_path} and {report.md_path}")
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
