"""`fastgrad pretrain` synchronises the host with the device at most once per optimizer step.

On a GPU every host synchronisation (``.item()``, ``.tolist()``, ``bool``/``float`` of a tensor,
``math.isfinite`` of one, data-dependent shapes such as ``nonzero``, a copy to the CPU) waits for
the queue to drain. These tests run short trainings through the loop's own entry point
(:func:`fastgrad.train.loop.train`) on CPU under :class:`SyncCounter`, a ``TorchDispatchMode``
that records the operators that synchronise on a device (``_local_scalar_dense``, what ``item()``,
``bool()`` and ``float()`` dispatch to; ``is_nonzero``; ``equal``; ``nonzero``; ``masked_select``)
and the tensor methods that do not dispatch on a CPU tensor (``tolist``, ``numpy``, ``cpu``).

Not counted, each for a stated reason: evaluation and checkpoints (their own steps, paused); the
data pipeline (``TokenBatches.get``: host tensors by design); the ``step`` counters of torch's
AdamW (host tensors on every device). Projector refreshes are kept out of the counted steps: the
refresh interval is longer than the run, so only step 0 refreshes (it also creates the states).
Every counted step must synchronise exactly once: the loop's read of loss and gradient norm (also
the proof that the counter sees the loop).
"""

from __future__ import annotations

import contextlib
import json
import math
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgrad.train.loop as loop
from fastgrad.data.dataset import TokenBatches
from fastgrad.models import LlamaForCausalLM, get_config
from fastgrad.optim import LowRankOptimizer, QGaLoreAdamW
from fastgrad.train.config import TrainConfig
from fastgrad.train.optimizers import LAYERWISE, OPTIMIZERS, build_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.nonzero, aten.masked_select}
SYNC_METHODS = ("tolist", "numpy", "cpu")  # no dispatch on a CPU tensor: patched instead
STEPS = 3  # step 0 refreshes; steps 1 and 2 are counted
MODES = {
    "plain": {"grad_clip": 1.0},
    "layerwise": {"layerwise": True, "grad_clip": 1.0},
    "streaming": {"layerwise": True, "layerwise_streaming": True},
}
CASES = [(o, "plain") for o in OPTIMIZERS] + [(o, m) for o in sorted(LAYERWISE) for m in ("layerwise", "streaming")]
GPU_CASES = [("adamw", "plain"), ("galore", "plain"), ("q-galore", "layerwise"), ("galore", "streaming")]


def _site() -> str:
    """file:line of the innermost fastgrad frame that called the synchronising operation."""
    frames = [f for f in traceback.extract_stack() if "/fastgrad/" in f.filename]
    frame = frames[-1] if frames else traceback.extract_stack()[-4]
    return f"{Path(frame.filename).name}:{frame.lineno}"


class SyncCounter(TorchDispatchMode):
    """Records synchronising calls per ``step`` (None: not counting), except while ``paused``."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.paused = 0
        self.host_tensors: list[torch.Tensor] = []  # read on the host without a device sync
        self.syncs: dict[int, list[str]] = defaultdict(list)
        self.built: dict[str, object] = {}  # the run's "optimizer" and "model"

    def record(self, what: str) -> None:
        if self.step is not None and not self.paused:
            self.syncs[self.step].append(f"{what} at {_site()}")

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNC_OPS and not any(args and args[0] is t for t in self.host_tensors):
            self.record(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counter(monkeypatch) -> SyncCounter:
    """A counter wired into the loop: step boundaries from ``lr_at`` (called first in every step),
    evaluation, checkpoints and batches paused, torch's host step counters exempt."""
    c = SyncCounter()
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def method(self, *args, _original=original, _name=name, **kwargs):
            c.record(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, method)

    def paused(fn):
        def wrapper(*args, **kwargs):
            with c.pause():
                return fn(*args, **kwargs)

        return wrapper

    for name in ("evaluate", "save_checkpoint"):
        monkeypatch.setattr(loop, name, paused(getattr(loop, name)))
    monkeypatch.setattr(TokenBatches, "get", paused(TokenBatches.get))

    def build(cfg, model):
        c.built["optimizer"], c.built["model"] = build_optimizer(cfg, model), model
        return c.built["optimizer"]

    original_lr_at = loop.lr_at

    def lr_at(cfg, step):
        c.step = step
        state = c.built["optimizer"].state.values()
        c.host_tensors = [st["step"] for st in state if isinstance(st.get("step"), torch.Tensor)]
        return original_lr_at(cfg, step)

    monkeypatch.setattr(loop, "build_optimizer", build)
    monkeypatch.setattr(loop, "lr_at", lr_at)
    return c


def _config(text_file: Path, optim: str, mode: str, **overrides) -> TrainConfig:
    settings = {
        "optim": optim,
        "rank": None if optim in ("frugal", "frugal-block") else 8,
        "update_proj_gap": 1000,  # no refresh after step 0
        "steps": STEPS,
        "grad_accum": 2,
        "seq_len": 32,
        "batch_size": 4,
        "vocab_size": 512,
        "eval_every": 1000,
        "eval_batches": 1,
        "save_every": 1000,
        "data": str(text_file),
        **MODES[mode],
        **overrides,
    }
    return TrainConfig(**settings).resolved()


def _train(counter: SyncCounter, cfg: TrainConfig, run_dir: Path) -> None:
    with counter:
        try:
            loop.train(cfg, run_dir, show_progress=False)
        finally:
            counter.step = None


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("optim", "mode"), CASES)
def test_one_host_sync_per_step(tmp_path, text_file, counter, optim, mode):
    """Every CLI optimizer, plain (with clipping), layer-wise (with clipping) and streaming, two
    micro-batches per step: exactly one synchronisation in each step after the first."""
    _train(counter, _config(text_file, optim, mode), tmp_path / "run")
    assert len(_metrics(tmp_path / "run")) == STEPS
    for step in range(1, STEPS):
        assert len(counter.syncs[step]) == 1, f"step {step}: {counter.syncs[step]}"


@pytest.mark.parametrize("mode", list(MODES))
def test_nonfinite_step_is_skipped_with_one_sync(tmp_path, text_file, counter, monkeypatch, mode):
    """A NaN loss (so NaN gradients) at step 1: the step changes no weight or optimizer state, is
    counted in nonfinite_steps and logged with a NaN loss and norm, still with one synchronisation;
    training goes on."""
    forward = LlamaForCausalLM.forward

    def poisoned(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        return loss * math.nan if counter.step == 1 else loss

    monkeypatch.setattr(LlamaForCausalLM, "forward", poisoned)
    snapshots = {}
    lr_at = loop.lr_at

    def snapshot_then_lr_at(cfg, step):
        model, opt = counter.built["model"], counter.built["optimizer"]
        states = [
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()} for st in opt.state.values()
        ]
        snapshots[step] = ({n: p.detach().clone() for n, p in model.state_dict().items()}, states)
        return lr_at(cfg, step)

    monkeypatch.setattr(loop, "lr_at", snapshot_then_lr_at)
    _train(counter, _config(text_file, "galore", mode), tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert math.isnan(rows[1]["loss"]) and math.isnan(rows[1]["grad_norm"])
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in (rows[0], rows[2]))
    assert json.loads((tmp_path / "run/summary.json").read_text())["nonfinite_steps"] == 1
    assert counter.built["optimizer"].nonfinite_steps == (0 if mode == "plain" else 1)  # plain: the loop skips
    (weights_before, state_before), (weights_after, state_after) = snapshots[1], snapshots[2]
    for name, w in weights_before.items():
        assert torch.equal(w, weights_after[name]), name
    assert len(state_before) == len(state_after)
    for st, after in zip(state_before, state_after, strict=True):
        assert st.keys() == after.keys()
        for k, v in st.items():
            assert torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k], k
    for step in range(1, STEPS):
        assert len(counter.syncs[step]) == 1, f"step {step}: {counter.syncs[step]}"


@pytest.mark.parametrize("mode", list(MODES))
def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, text_file, counter, monkeypatch, mode):
    """MAX_CONSECUTIVE_NONFINITE non-finite steps in a row stop the run after saving the last state."""
    forward = LlamaForCausalLM.forward

    def poisoned(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        return loss * math.nan if counter.step >= 1 else loss

    monkeypatch.setattr(LlamaForCausalLM, "forward", poisoned)
    monkeypatch.setattr(loop, "MAX_CONSECUTIVE_NONFINITE", 2)
    with pytest.raises(FloatingPointError, match="2 consecutive steps with a NaN/Inf loss or gradient at step 3"):
        _train(counter, _config(text_file, "galore", mode, steps=5), tmp_path / "run")
    trainer = json.loads((tmp_path / "run/checkpoint/trainer.json").read_text())
    assert trainer["step"] == 3 and trainer["nonfinite_steps"] == 2


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_optimizer_step_syncs_once_or_not_at_all(counter, optim):
    """``optimizer.step()`` called directly checks finiteness with one synchronisation per step;
    ``step(grads_finite=True)`` (what the loop calls after reading a finite norm) with none;
    torch's AdamW never checks."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(get_config("tiny", 512, 32))
    cfg = TrainConfig(optim=optim, rank=None if "frugal" in optim else 8, update_proj_gap=1000, steps=4)
    opt = build_optimizer(cfg.resolved(), model)
    ids = torch.randint(0, 512, (2, 32))
    for step, grads_finite in enumerate([False, False, True]):  # step 0 refreshes: not counted
        model(ids, ids).backward()
        counter.host_tensors = [st["step"] for st in opt.state.values() if isinstance(st.get("step"), torch.Tensor)]
        counter.step = step
        with counter:
            opt.step(**({"grads_finite": grads_finite} if isinstance(opt, LowRankOptimizer) else {}))
        counter.step = None
        opt.zero_grad(set_to_none=True)
    checks = isinstance(opt, LowRankOptimizer)
    assert len(counter.syncs[1]) == (1 if checks else 0), counter.syncs[1]
    assert counter.syncs[2] == []


def test_qgalore_growth_of_the_interval_is_read_at_a_refresh(counter):
    """Q-GaLore's adaptive T: the outcome of the cosine test is read on the host at the refresh
    that makes it (a step that synchronises anyway), not at the ordinary steps up to the next
    refresh candidate. T = 2 until the queue (2 cosines) is full at the refresh of k = 4, which
    grows T to 4: refreshes at 0, 2, 4 (then 8); k = 6 is a candidate under the old T only.
    With ``grads_finite`` a refresh does not check G either (on a GPU its SVD still synchronises)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(48, 32))
    group = {"params": [p], "rank": 8, "update_proj_gap": 2, "queue_size": 2, "cos_threshold": -1.0}
    opt = QGaLoreAdamW([group], lr=1e-3)
    refreshed = []
    for step in range(8):
        p.grad = torch.randn_like(p)
        before = opt.state[p].get("proj_svd_count", 0)
        counter.step = step
        with counter:
            opt.step(grads_finite=True)
        counter.step = None
        refreshed.append(opt.state[p]["proj_svd_count"] > before)
    assert [k for k, r in enumerate(refreshed) if r] == [0, 2, 4] and opt.state[p]["proj_gap"] == 4
    for step in (1, 3, 5, 6, 7):
        assert counter.syncs[step] == [], f"step {step}: {counter.syncs[step]}"
    assert counter.syncs[0] == counter.syncs[2] == []
    assert len(counter.syncs[4]) == 1 and "projectors.py" in counter.syncs[4][0], counter.syncs[4]


@pytest.mark.gpu
@pytest.mark.parametrize(("optim", "mode"), GPU_CASES)
def test_cuda_detector_sees_one_sync_per_step(tmp_path, text_file, monkeypatch, optim, mode):
    """On a GPU, torch's own detector (``torch.cuda.set_sync_debug_mode("warn")``) sees what the
    dispatch mode above cannot: copies between host and device that wait for the queue (a batch
    from pageable memory) and synchronisations inside native code. One per step after the first."""
    boundaries: dict[int, int] = {}
    lr_at = loop.lr_at

    def quiet(fn):  # evaluation and checkpoints synchronise on their own steps
        def wrapper(*args, **kwargs):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(1)

        return wrapper

    for name in ("evaluate", "save_checkpoint"):
        monkeypatch.setattr(loop, name, quiet(getattr(loop, name)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def mark(cfg, step):
            boundaries[step] = len(caught)
            return lr_at(cfg, step)

        monkeypatch.setattr(loop, "lr_at", mark)
        torch.cuda.set_sync_debug_mode(1)
        try:
            loop.train(_config(text_file, optim, mode, device="cuda"), tmp_path / "run", show_progress=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        boundaries[STEPS] = len(caught)
    for step in range(1, STEPS):
        syncs = [str(w.message) for w in caught[boundaries[step] : boundaries[step + 1]]]
        syncs = [m for m in syncs if "synchronizing CUDA operation" in m]
        assert len(syncs) == 1, f"step {step}: {syncs}"
