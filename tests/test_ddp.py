"""`fastgrad pretrain` under torchrun: 2 CPU processes (gloo) × batch B train like 1 process × 2B.

``--batch-size`` is per process, so both runs take the same global batch at every step (rank r
keeps rows [r·B, (r+1)·B) of it) with the same weights, learning rate and optimizer; only the
fp32 summation order differs: the batch of 2B is split over two forward passes and the two
halves' gradients are averaged by an all-reduce instead of summed inside one matmul.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastgrad.cli import main

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; gloo on Linux"),
    pytest.mark.usefixtures("single_thread"),  # the in-process 1-process runs, like the 1-thread workers
]

SMALL = ["--seq-len", "32", "--vocab-size", "512", "--eval-every", "2", "--eval-batches", "2", "--no-progress"]
GALORE = ["--rank", "8", "--update-proj-gap", "2"]  # a projector refresh every other step
CASES = {
    "adamw": ["--optim", "adamw"],
    "galore": ["--optim", "galore", *GALORE],
    # the driver's own all-reduces, in low rank between refreshes; accumulation and clipping too
    "galore-layerwise": ["--optim", "galore", *GALORE, "--layerwise", "--grad-accum", "2", "--grad-clip", "1.0"],
    # DDP under no_sync() for the first micro-batch; the gradients of QLinear's INT8 codes (full on
    # refresh steps, projected by the layer in between) averaged by the loop, not DDP
    "q-galore": ["--optim", "q-galore", *GALORE, "--grad-accum", "2"],
    # Muon under DDP: G averaged by DDP, then every rank orthogonalizes the same momentum
    "muon": ["--optim", "muon"],
    # GaLoreMuon layer-wise: the driver all-reduces the R of the LowRankGradLinear layers
    "galore-muon-layerwise": ["--optim", "galore-muon", *GALORE, "--layerwise", "--grad-accum", "2"],
}
# Relative tolerance on the losses. Measured (relative): adamw 1.2e-7, galore 4.5e-7, q-galore
# 1.9e-7 to 5e-6 (4 steps), galore-layerwise 9e-8 (30 steps). One fp32 ulp of a loss of ~6 is
# 5e-7 / 6 = 8e-8; the matmuls of 2 rows against 4 and the all-reduce reorder sums of fp32 terms,
# and the updates (Adam's g/√v, an SVD refresh every other step) carry these roundings into the
# next steps' losses: 1e-5 leaves a 20× margin over the worst fp32 case. Q-GaLore re-quantizes its
# INT8 weights by stochastic rounding: a weight whose fp32 value moved by δ (in quanta) rounds the
# other way with probability δ, a whole quantum (1/255 of its group's range), so a few weights
# differ by one quantum after each step; 2e-4 bounds the effect on the loss with a 40× margin.
# (Replicas that drift apart, e.g. a gradient left out of the average, differ by ~1e-3 at once.)
# Muon's Newton–Schulz runs in bf16: a gradient entry whose fp32 rounding differs can round U to
# the neighbouring bf16 value (2^-8 relative); measured 1.8e-5 (muon) and 4.2e-5 (galore-muon
# layer-wise) over 4 steps, so 5e-4 keeps a 12× margin; a layer-wise driver that does not average
# the gradients moves them by 1.5e-2.
RTOL = {
    "adamw": 1e-5, "galore": 1e-5, "galore-layerwise": 1e-5, "q-galore": 2e-4,
    "muon": 5e-4, "galore-muon-layerwise": 5e-4,
}  # fmt: skip
STEPS = 4


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _torchrun_cmd(*args) -> list[str]:
    # --standalone: a local rendezvous on a free port chosen by torchrun (no port to pick and race for)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [*run, "-m", "fastgrad.cli", "pretrain", *args]


def _env() -> dict:
    # FASTGRAD_CACHE (conftest) is inherited, so the workers reuse the tokenizer the 1-process run trained.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _assert_same_losses(single: list[dict], ddp: list[dict], rtol: float, what: str) -> None:
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in single]  # global tokens
    worst = max(abs(b["loss"] / a["loss"] - 1) for a, b in zip(single, ddp, strict=True))
    print(f"{what}: largest relative difference of a training loss {worst:.1e}")
    for key in ("loss", "val_loss"):
        a = [r[key] for r in single if key in r]
        b = [r[key] for r in ddp if key in r]
        assert len(a) == len(b) > 0
        assert b == pytest.approx(a, rel=rtol), key


# galore-layerwise is compared, over 30 steps, by the Ctrl-C test below (a torchrun launch costs ~10 s here).
@pytest.mark.parametrize("case", ["adamw", "galore", "q-galore", "muon", "galore-muon-layerwise"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, text_file, case):
    common = ["--data", str(text_file), "--out", str(tmp_path), *SMALL, *CASES[case], "--steps", str(STEPS)]
    assert main(["pretrain", *common, "--batch-size", "4", "--name", "one"]) == 0
    done = subprocess.run(
        _torchrun_cmd(*common, "--batch-size", "2", "--name", "two"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one run directory for 2 ranks
    single, ddp = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert len(ddp) == STEPS  # rank 0 alone logged
    _assert_same_losses(single, ddp, RTOL[case], case)
    assert json.loads((tmp_path / "two/checkpoint/trainer.json").read_text())["step"] == STEPS
    assert json.loads((tmp_path / "two/summary.json").read_text())["tokens"] == ddp[-1]["tokens"]


def _worker_pid(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker of global rank ``rank`` (a child of the agent), if started."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


# Ctrl-C: data parallel with the layer-wise driver against one process, and sharded (FSDP2: every
# rank saves its shards) against the uninterrupted sharded run, which the resumed one must reproduce
# exactly. (Against one process, an SVD refresh every other step can turn the fp32 rounding of the
# reduce-scatter into 1e-4 after a few steps: DDP without accumulation shows the same;
# tests/test_fsdp.py compares with one process.)
CTRL_C = {
    "ddp": (CASES["galore-layerwise"], []),
    "fsdp": (
        ["--optim", "galore", *GALORE, "--grad-accum", "2", "--grad-clip", "1.0"],
        ["--fsdp"],
    ),
}


@pytest.mark.parametrize("engine", list(CTRL_C))
def test_ctrl_c_on_one_rank_stops_all_at_the_same_step_and_resume_continues(tmp_path, text_file, engine):
    """SIGINT to rank 1 only: rank 0 stops after the same step (the stop request is all-reduced),
    saves, and ``--resume`` under torchrun (every rank loads the checkpoint) finishes the run with
    the losses of the uninterrupted run (one process with the global batch; FSDP: the same run)."""
    steps = 30
    case, sharded = CTRL_C[engine]
    common = ["--data", str(text_file), "--out", str(tmp_path), *SMALL, *case, "--steps", str(steps)]
    if sharded:
        done = subprocess.run(
            _torchrun_cmd(*common, *sharded, "--batch-size", "2", "--name", "one"),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-4000:]
    else:
        assert main(["pretrain", *common, "--batch-size", "4", "--name", "one"]) == 0

    proc = subprocess.Popen(
        _torchrun_cmd(*common, *sharded, "--batch-size", "2", "--name", "two"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "two/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    pid = _worker_pid(proc.pid, rank=1)
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-4000:]  # the workers exit with 130; torchrun reports them failed
    assert "--resume" in err
    saved = json.loads((tmp_path / "two/checkpoint/trainer.json").read_text())
    assert 2 <= saved["step"] == len(metrics.read_text().splitlines()) < steps

    resumed = subprocess.run(
        _torchrun_cmd("--resume", str(tmp_path / "two"), "--no-progress"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    single, ddp = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert len(ddp) == steps
    if sharded:  # the same processes and batches: exactly the uninterrupted run
        assert [r["loss"] for r in ddp] == [r["loss"] for r in single]
        assert (tmp_path / "two/checkpoint/sharded").is_dir()
    else:
        _assert_same_losses(single, ddp, RTOL["galore-layerwise"], "galore-layerwise, 30 steps")
