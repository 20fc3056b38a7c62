"""`fastgrad pretrain`: bad input, never overwriting a run, exact resume, Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgrad.cli import main
from fastgrad.train.config import MUON_ADAMW_LR, MUON_LR

SMALL = ["--seq-len", "32", "--batch-size", "4", "--vocab-size", "512", "--eval-every", "3", "--eval-batches", "2"]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path, text_file, *extra) -> int:
    return main(["pretrain", "--out", str(tmp_path), "--data", str(text_file), "--no-progress", *SMALL, *extra])


def _val_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["val_loss"]


# How far below the untrained model's validation loss a run must end to count as learning: the
# validation batches are fixed, so a run that changes nothing lands exactly on the baseline
# (test_a_run_that_changes_nothing_does_not_count_as_learning), while 3-4 steps of any optimizer
# at its recipe lower it by 0.07 (AdamW at lr 1e-3) to 0.63 (ln 512 = 6.24 at the start).
LEARNING_MARGIN = 0.03


@pytest.fixture(scope="module")
def untrained_val_loss(tmp_path_factory, text_file) -> float:
    """The validation loss of the initial model: a 1-step AdamW run at lr 1e-12 (the weights move
    by ~1e-12, far below what the loss's 4 printed digits see). Every run here starts from the
    same seed, hence the same model and validation batches."""
    out = tmp_path_factory.mktemp("untrained")
    assert _run(out, text_file, "--optim", "adamw", "--lr", "1e-12", "--steps", "1", "--name", "base") == 0
    return _val_loss(out / "base")


def _assert_learned(run_dir: Path, untrained: float, steps: int) -> None:
    """The run has its steps, finite train losses, and a validation loss clearly below the start."""
    losses = _losses(run_dir)
    assert len(losses) == steps and all(0 < x < 20 for x in losses)
    val = _val_loss(run_dir)
    assert val < untrained - LEARNING_MARGIN, f"validation loss {val:.4f} vs {untrained:.4f} untrained: no learning"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "huge"], "unknown model"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--max-memory-gb", "0.0001"], "--max-memory-gb 0.0001: a training step of this configuration needs about"),
        (["--max-memory-gb", "-1"], "--max-memory-gb must be positive"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_message(tmp_path, text_file, capsys, args, message):
    assert _run(tmp_path, text_file, "--name", "bad", *args) == 2
    assert message in capsys.readouterr().err.lower()
    assert not (tmp_path / "bad").exists()


def test_unknown_optimizer_is_rejected(tmp_path, text_file):
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, text_file, "--optim", "sgd")
    assert info.value.code == 2


def test_missing_or_empty_data(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for data in (tmp_path / "nope.txt", empty):
        code = main(["pretrain", "--out", str(tmp_path), "--data", str(data), "--name", "x", "--no-progress", *SMALL])
        assert code == 2
        assert "--data" in capsys.readouterr().err


def test_existing_run_is_never_overwritten(tmp_path, text_file, capsys):
    run = tmp_path / "taken"
    run.mkdir()
    (run / "config.json").write_text("precious")
    assert _run(tmp_path, text_file, "--name", "taken") == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "config.json").read_text() == "precious"


def test_resume_with_a_different_config_is_refused(tmp_path, text_file, capsys):
    assert _run(tmp_path, text_file, "--optim", "adamw", "--steps", "2", "--name", "r") == 0
    before = (tmp_path / "r/metrics.jsonl").read_text()
    assert main(["pretrain", "--resume", str(tmp_path / "r"), "--lr", "0.5", "--no-progress"]) == 2
    assert "--lr=0.5" in capsys.readouterr().err
    assert (tmp_path / "r/metrics.jsonl").read_text() == before
    assert main(["pretrain", "--resume", str(tmp_path / "nothing-here")]) == 2


def test_resuming_a_finished_run_changes_no_file(tmp_path, text_file, capsys):
    """A run that completed its steps has nothing to resume: it says so and its summary, metrics,
    plot and checkpoint stay as they were (the loop would otherwise rewrite them with NaN)."""
    assert _run(tmp_path, text_file, "--optim", "adamw", "--steps", "2", "--name", "done") == 0
    run = tmp_path / "done"
    files = sorted(p for p in run.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--no-progress"]) == 0
    assert "already finished its 2 steps" in capsys.readouterr().out
    assert sorted(p for p in run.rglob("*") if p.is_file()) == files
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before


def test_progress_output_names_only_what_exists(tmp_path, text_file, capsys):
    """The "run directory" line comes once the directory exists (bad --data prints none), the
    progress bar has no validation column before the first evaluation (no val=nan), and the
    closing outputs line lists summary.json."""
    assert _run(tmp_path, text_file, "--data", str(tmp_path / "missing.txt"), "--name", "bad") == 2
    assert "run directory" not in capsys.readouterr().out
    args = ["pretrain", "--out", str(tmp_path), "--data", str(text_file), *SMALL, "--optim", "adamw"]
    assert main([*args, "--steps", "4", "--name", "ok"]) == 0  # with the progress bar (eval at step 3)
    captured = capsys.readouterr()
    assert f"run directory: {tmp_path / 'ok'}" in captured.out
    assert "val=nan" not in captured.err and "val=" in captured.err
    assert "summary.json" in captured.out.splitlines()[-1]


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "trainer.json"])
def test_resume_from_a_damaged_checkpoint_names_the_file(tmp_path, text_file, capsys, damaged):
    """A checkpoint file cut short (a full disk, an interrupted copy) ends --resume with one line
    naming the file and what is wrong, not a SafetensorError or unpickling traceback; no file of
    the run changes."""
    assert _run(tmp_path, text_file, "--optim", "adamw", "--steps", "4", "--save-every", "2", "--name", "r") == 0
    run = tmp_path / "r"
    # A 4-step run whose checkpoint says step 2, then one of its files cut in half.
    trainer = json.loads((run / "checkpoint/trainer.json").read_text())
    (run / "checkpoint/trainer.json").write_text(json.dumps({**trainer, "step": 2}))
    target = run / "checkpoint" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint file {target} is damaged or incomplete" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_extending_a_finished_run_keeps_its_past(tmp_path, text_file, capsys):
    """--resume RUN --steps N lengthens a finished run: its steps and records stay as they were, the
    learning-rate schedule keeps its horizon (the cosine ended at the run's last step) and the new
    steps run at its floor; shortening, or changing anything else, is refused."""
    base = ["--optim", "adamw", "--lr", "0.002", "--warmup", "1", "--min-lr-ratio", "0.25"]
    assert _run(tmp_path, text_file, *base, "--steps", "4", "--name", "x") == 0
    run = tmp_path / "x"
    past = _records(run)
    assert main(["pretrain", "--resume", str(run), "--steps", "3", "--no-progress"]) == 2
    assert "a run can be extended, not shortened" in capsys.readouterr().err
    assert main(["pretrain", "--resume", str(run), "--steps", "7", "--no-progress"]) == 0
    records = _records(run)
    assert records[: len(past)] == past  # the first 4 steps, byte for byte
    assert [r["step"] for r in records if "loss" in r][-3:] == [5, 6, 7]
    assert {r["lr"] for r in records if r["step"] > 4 and "lr" in r} == {0.002 * 0.25}  # the floor
    config = json.loads((run / "config.json").read_text())
    assert (config["steps"], config["schedule_steps"]) == (7, 4)
    assert json.loads((run / "summary.json").read_text())["step"] == 7
    # Extending again keeps the original horizon.
    assert main(["pretrain", "--resume", str(run), "--steps", "8", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["schedule_steps"] == 4
    assert _records(run)[-1]["lr"] == 0.002 * 0.25


def test_keep_checkpoints_rolls_back_exactly(tmp_path, text_file, capsys):
    """--keep-checkpoints 3 keeps checkpoint/ and the two before it as checkpoint-<step>/; moving an
    older one to checkpoint/ resumes from it, and the steps it redoes are the ones the run took."""
    args = ["--optim", "adamw", "--steps", "5", "--save-every", "1", "--eval-every", "100"]
    assert _run(tmp_path, text_file, *args, "--keep-checkpoints", "3", "--name", "k") == 0
    run = tmp_path / "k"
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint", "checkpoint-3", "checkpoint-4"]
    losses = _losses(run)
    shutil.rmtree(run / "checkpoint")
    (run / "checkpoint-3").rename(run / "checkpoint")
    assert main(["pretrain", "--resume", str(run), "--no-progress"]) == 0
    assert _losses(run) == losses  # steps 4 and 5 again, bit for bit
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint", "checkpoint-3", "checkpoint-4"]
    # A damaged checkpoint names the kept ones.
    target = run / "checkpoint/optimizer.pt"
    target.write_bytes(target.read_bytes()[:100])
    (run / "checkpoint/trainer.json").write_text(json.dumps({"step": 4, "nonfinite_steps": 0, "tokens": 0}))
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--no-progress"]) == 2
    assert "earlier checkpoints are kept (checkpoint-3, checkpoint-4)" in capsys.readouterr().err
    # The default keeps one.
    assert _run(tmp_path, text_file, *args, "--name", "one") == 0
    assert [p.name for p in (tmp_path / "one").glob("checkpoint*")] == ["checkpoint"]


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_log_to_tensorboard_writes_the_metrics_and_resume_purges_the_redone_steps(tmp_path, text_file):
    """--log-to tensorboard: every metrics.jsonl number as a scalar at its step; a run rolled back
    to its step-2 checkpoint redoes steps 3-4, and each step is still there once."""
    pytest.importorskip("tensorboard")
    args = ["--optim", "adamw", "--steps", "4", "--save-every", "2", "--keep-checkpoints", "2"]
    assert _run(tmp_path, text_file, *args, "--log-to", "tensorboard", "--name", "tb") == 0
    run = tmp_path / "tb"
    records = _records(run)
    scalars = _scalars(run)
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in records]
    assert [s for s, _ in scalars["val/loss"]] == [r["step"] for r in records if "val_loss" in r]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_memory_gib"} <= set(scalars)
    shutil.rmtree(run / "checkpoint")
    (run / "checkpoint-2").rename(run / "checkpoint")
    assert main(["pretrain", "--resume", str(run), "--no-progress"]) == 0
    assert [s for s, _ in _scalars(run)["train/loss"]] == [1, 2, 3, 4]
    exact = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss")  # not the timing and memory readings
    assert [{k: r.get(k) for k in exact} for r in _records(run)] == [{k: r.get(k) for k in exact} for r in records]


def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, text_file, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _run(tmp_path, text_file, "--device", "cuda", "--name", "gpu") == 2
    assert "--device cuda: this torch" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()


@pytest.mark.parametrize(
    "optim",
    [
        "adamw",
        "galore",
        "q-galore",
        "fira",
        "apollo",
        "apollo-mini",
        "frugal",
        "muon",
        "muon8bit",
        "galore-muon",
        "q-galore-muon",
    ],
)
def test_every_optimizer_trains(tmp_path, text_file, untrained_val_loss, optim):
    assert _run(tmp_path, text_file, "--optim", optim, "--rank", "8", "--steps", "4", "--name", optim) == 0
    _assert_learned(tmp_path / optim, untrained_val_loss, 4)


@pytest.mark.parametrize("frozen", [["--lr", "1e-12"], ["--optim", "galore", "--rank", "8", "--lr", "1e-12"]])
def test_a_run_that_changes_nothing_does_not_count_as_learning(tmp_path, text_file, untrained_val_loss, frozen):
    """The negative control of _assert_learned: a run whose optimizer moves nothing (lr 1e-12)
    completes its steps with finite losses, and still fails the learning check."""
    assert _run(tmp_path, text_file, *frozen, "--steps", "4", "--name", "frozen") == 0
    with pytest.raises(AssertionError, match="no learning"):
        _assert_learned(tmp_path / "frozen", untrained_val_loss, 4)


def test_layerwise_needs_a_supported_optimizer(tmp_path, text_file, capsys):
    assert _run(tmp_path, text_file, "--optim", "adamw", "--layerwise", "--name", "lw") == 2
    assert "--layerwise works with" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layerwise", "--layerwise-streaming", "--grad-clip", "1.0"], "--layerwise-streaming cannot clip gradients"),
        (["--layerwise-streaming"], "add --layerwise"),
    ],
)
def test_layerwise_streaming_needs_layerwise_and_no_clipping(tmp_path, text_file, capsys, args, message):
    assert _run(tmp_path, text_file, "--optim", "galore", *args, "--name", "bad") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("optim", ["galore", "q-galore", "muon", "muon8bit", "galore-muon", "q-galore-muon"])
def test_layerwise_streaming_trains_as_layerwise(tmp_path, text_file, untrained_val_loss, optim):
    """--layerwise-streaming (updates in the gradient hooks) is the same training as --layerwise
    without clipping: bitwise the same losses and optimizer state, across projector refreshes and
    with accumulation."""
    args = ["--optim", optim, "--layerwise", "--rank", "8", "--update-proj-gap", "2", "--grad-accum", "2"]
    args += ["--steps", "4", "--save-every", "4"]
    assert _run(tmp_path, text_file, *args, "--name", "deferred") == 0
    assert _run(tmp_path, text_file, *args, "--layerwise-streaming", "--name", "streaming") == 0
    assert json.loads((tmp_path / "streaming/config.json").read_text())["layerwise_streaming"] is True
    _assert_learned(tmp_path / "streaming", untrained_val_loss, 4)
    assert _losses(tmp_path / "streaming") == _losses(tmp_path / "deferred")
    a = torch.load(tmp_path / "deferred/checkpoint/optimizer.pt", weights_only=True)["optimizer"]
    b = torch.load(tmp_path / "streaming/checkpoint/optimizer.pt", weights_only=True)["optimizer"]
    for sa, sb in zip(a["state"].values(), b["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)


@pytest.mark.parametrize("layerwise", [[], ["--layerwise"]])
def test_the_schedule_scales_each_groups_own_learning_rate(tmp_path, text_file, layerwise):
    """Muon's AdamW group (embeddings, norms, head) keeps the AdamW recipe's lr beside Muon's 0.02:
    the warmup/cosine schedule scales every group's lr as built, it does not give them all Muon's.
    Checked at the last step's saved groups, and again after a resume (whose loaded groups hold the
    scheduled lr of the step saved, not the base)."""
    args = ["--optim", "muon", *layerwise, "--steps", "3", "--save-every", "3"]
    assert _run(tmp_path, text_file, *args, "--name", "run") == 0
    assert main(["pretrain", "--resume", str(tmp_path / "run"), "--steps", "5", "--no-progress"]) == 0
    saved = torch.load(tmp_path / "run/checkpoint/optimizer.pt", weights_only=True)
    groups = (saved["optimizer"] if layerwise else saved)["param_groups"]
    assert [g["use_muon"] for g in groups] == [True, False]
    logged = _records(tmp_path / "run")[-1]["lr"]  # step 5's, the schedule's value for cfg.lr = MUON_LR
    assert 0 < logged < MUON_LR
    assert groups[0]["lr"] == pytest.approx(logged, rel=1e-12)
    assert groups[1]["lr"] == pytest.approx(MUON_ADAMW_LR * logged / MUON_LR, rel=1e-12)


RESUME_CASES = {
    "galore": ["--optim", "galore"],
    "galore-layerwise": ["--optim", "galore", "--layerwise", "--grad-accum", "2", "--grad-clip", "1.0"],
    "q-galore": ["--optim", "q-galore"],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_ctrl_c_saves_at_a_step_boundary_and_resume_is_exact(tmp_path, text_file, case):
    steps = "40"
    cmd = [sys.executable, "-m", "fastgrad.cli", "pretrain", "--out", str(tmp_path), "--data", str(text_file)]
    galore = [*RESUME_CASES[case], "--rank", "8", "--update-proj-gap", "5"]  # several projector refreshes
    cmd += ["--name", "interrupted", *galore, "--steps", steps, "--no-progress", *SMALL]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    metrics = tmp_path / "interrupted/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    saved = json.loads((tmp_path / "interrupted/checkpoint/trainer.json").read_text())
    assert 2 <= saved["step"] == len(metrics.read_text().splitlines()) < int(steps)

    assert main(["pretrain", "--resume", str(tmp_path / "interrupted"), "--no-progress"]) == 0
    assert _run(tmp_path, text_file, *galore, "--steps", steps, "--name", "straight") == 0
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "interrupted")
    assert len(resumed) == int(steps)
    assert straight == resumed  # bitwise: same batches, same lr, same model and optimizer state
    a = torch.load(tmp_path / "straight/checkpoint/optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "interrupted/checkpoint/optimizer.pt", weights_only=True)
    a, b = (a["optimizer"], b["optimizer"]) if "optimizer" in a else (a, b)  # the layer-wise driver nests it
    for sa, sb in zip(a["state"].values(), b["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)
    assert (tmp_path / "interrupted/loss.png").stat().st_size > 1000


def test_sigkill_at_any_moment_then_resume_reproduces_the_run(tmp_path, text_file):
    """kill -9 at moments the run cannot prepare for (mid-step, mid-checkpoint-swap: it saves every
    step), three times, each followed by --resume: the losses and the optimizer state are bitwise
    those of the uninterrupted run (checkpoints are swapped in by renames; a half-written one is
    never read)."""
    args = ["--optim", "q-galore", "--rank", "8", "--update-proj-gap", "3", "--steps", "12", "--save-every", "1"]
    cmd = [sys.executable, "-m", "fastgrad.cli", "pretrain", "--out", str(tmp_path), "--data", str(text_file)]
    metrics = tmp_path / "killed/metrics.jsonl"
    # Seconds after the triggering step's metrics line appears: 0 lands in that step's checkpoint
    # save (metrics are written first), the others mid-step.
    for i, (at, delay) in enumerate(((2, 0.0), (5, 0.0), (8, 0.13))):
        run = [*cmd, *args, *SMALL, "--no-progress"]
        run += ["--resume", str(tmp_path / "killed")] if i else ["--name", "killed"]
        proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        deadline = time.time() + 120
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < at):
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    assert main(["pretrain", "--resume", str(tmp_path / "killed"), "--no-progress"]) == 0
    assert _run(tmp_path, text_file, *args, "--name", "straight") == 0
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")
    a = torch.load(tmp_path / "straight/checkpoint/optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "killed/checkpoint/optimizer.pt", weights_only=True)
    for sa, sb in zip(a["state"].values(), b["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)


def test_compare_runs_each_optimizer_and_writes_a_table_and_plot(tmp_path, text_file):
    args = ["compare", "--optims", "adamw,galore", "--out", str(tmp_path), "--name", "cmp", "--data", str(text_file)]
    assert main([*args, "--steps", "3", "--rank", "8", "--no-progress", *SMALL]) == 0
    rows = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert [r["optimizer"] for r in rows] == ["adamw", "galore"]
    for r in rows:  # same data and steps for each optimizer, each run in its own directory
        assert r["step"] == 3 and r["tokens"] == rows[0]["tokens"] and r["peak_memory_bytes"] > 0
        assert json.loads((tmp_path / "cmp" / r["optimizer"] / "config.json").read_text())["optim"] == r["optimizer"]
    table = (tmp_path / "cmp/compare.md").read_text()
    assert "| adamw |" in table and "| galore |" in table
    assert (tmp_path / "cmp/compare.png").stat().st_size > 1000
    assert rows[1]["optimizer_state_bytes"] < rows[0]["optimizer_state_bytes"]  # GaLore's low-rank moments


def test_compare_rejects_unknown_optimizers(tmp_path, capsys):
    assert main(["compare", "--optims", "adamw,sgd", "--out", str(tmp_path)]) == 2
    assert "--optims" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "extra", [["--optim", "adamw8bit"], ["--optim", "galore8bit"], ["--optim", "galore8bit", "--layerwise"]]
)
def test_8bit_optimizers_train(tmp_path, text_file, untrained_val_loss, extra):
    """The 8-bit-moment optimizers (and galore8bit layer-wise) train from the command line; at the
    tiny recipe's rank 32 every projected moment (≥ 128×32 elements) is 8-bit, as are the embedding
    and the head."""
    assert _run(tmp_path, text_file, *extra, "--steps", "4", "--name", "run") == 0
    _assert_learned(tmp_path / "run", untrained_val_loss, 4)


def test_frugal_block_trains(tmp_path, text_file, untrained_val_loss):
    """The FRUGAL paper's block recipe from the command line (state only for the window's tensors)."""
    assert _run(tmp_path, text_file, "--optim", "frugal-block", "--steps", "4", "--name", "run") == 0
    _assert_learned(tmp_path / "run", untrained_val_loss, 4)


def test_qgalore8bit_trains_layerwise(tmp_path, text_file, untrained_val_loss):
    """The Q-GaLore recipe's optimizer (8-bit moments) from the command line, layer-wise."""
    assert _run(tmp_path, text_file, "--optim", "q-galore8bit", "--layerwise", "--steps", "4", "--name", "run") == 0
    _assert_learned(tmp_path / "run", untrained_val_loss, 4)


def test_tokens_dtype_and_activation_checkpointing(tmp_path, text_file):
    """--tokens sets the steps (tokens per step = batch × seq × accumulation), bf16 training with
    recomputed activations runs, Q-GaLore (INT8 QLinear layers)."""
    args = ["--tokens", str(3 * 4 * 32 * 2), "--grad-accum", "2", "--dtype", "bfloat16", "--activation-checkpointing"]
    assert _run(tmp_path, text_file, *args, "--name", "run") == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["tokens"] == 3 * 4 * 32 * 2
    assert all(0 < r["loss"] < 20 for r in rows)


def test_readme_compare_table_is_the_results_file():
    """The README's optimizer comparison is `fastgrad compare`'s own table of the committed
    bench/results/compare-tiny.json (bench/report.py --readme writes it), not numbers copied by hand."""
    from fastgrad.cli import compare_table

    root = Path(__file__).parent.parent
    rows = json.loads((root / "bench" / "results" / "compare-tiny.json").read_text())
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- compare-table:begin -->\n", 1)[1].split("\n<!-- compare-table:end -->", 1)[0]
    assert block == compare_table(rows)
    assert [r["optimizer"] for r in rows] == [
        "adamw", "galore", "q-galore", "muon", "muon8bit", "galore-muon", "q-galore-muon"
    ]  # fmt: skip
