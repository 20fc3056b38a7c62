"""The pretraining loop behind ``fastgrad pretrain``.

Exact resume: the batch of step k is a pure function of (seed, k) (``fastgrad.data``), the
learning rate is a pure function of k (set on every step, no scheduler state), and the model and
optimizer states are saved bit for bit, so a resumed run reproduces the uninterrupted run's
losses on CPU. A step whose gradient norm is NaN/Inf is skipped (weights and optimizer state
untouched) and counted; many in a row stop the run after saving the last good state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastgrad.data import prepare_data
from fastgrad.models import LlamaForCausalLM, get_config
from fastgrad.optim import layerwise
from fastgrad.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from fastgrad.train.config import TrainConfig
from fastgrad.train.optimizers import build_optimizer, state_bytes

MAX_CONSECUTIVE_NONFINITE = 20


class InterruptAtStepBoundary(contextlib.AbstractContextManager):
    """Turns the first Ctrl-C into a request to stop after the current optimizer step, so an
    interrupt never leaves some parameters updated and others not; a second Ctrl-C interrupts
    at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class RunResult:
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float
    tokens: int
    seconds: float
    peak_memory_bytes: int
    optimizer_state_bytes: int
    nonfinite_steps: int


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr_ratio · cfg.lr at the last step."""
    warmup = cfg.warmup_steps()
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, cfg: TrainConfig, device: torch.device) -> float:
    model.eval()
    losses = []
    for i, (inputs, labels) in enumerate(data.val_batches(cfg.batch_size)):
        if i >= cfg.eval_batches:
            break
        losses.append(model(inputs.to(device), labels.to(device), shift_labels=False).item())
    model.train()
    return sum(losses) / len(losses)


def _append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, show_progress: bool = True) -> RunResult:
    """Train per ``cfg`` (already resolved) into ``run_dir``; continue from its checkpoint if ``resume``.
    At the end, ``run_dir/summary.json`` holds the :class:`RunResult` (``seconds`` and the peak
    memory cover this process only, so a resumed run reports its last part).

    A new ``run_dir`` is created only once the data, model and optimizer are ready, so bad input
    leaves nothing behind, and never over an existing directory.
    """
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if cfg.max_memory_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.max_memory_gb * 2**30 / total), device)

    data = prepare_data(cfg.data, cfg.seq_len, cfg.vocab_size, cfg.tokenizer)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(get_config(cfg.model, data.vocab_size, cfg.seq_len)).to(device=device, dtype=dtype)
    model.gradient_checkpointing = cfg.activation_checkpointing
    optimizer = build_optimizer(cfg, model)
    # Layer-wise: the driver's hooks consume each gradient during backward (projected and
    # accumulated in low rank), then finish_step() clips, applies the NaN policy and updates.
    stepper = (
        layerwise(model, optimizer, grad_accum_steps=cfg.grad_accum, max_grad_norm=cfg.grad_clip or None)
        if cfg.layerwise
        else optimizer
    )
    forward = torch.compile(model) if cfg.compile else model

    metrics = run_dir / "metrics.jsonl"
    start_step, nonfinite, tokens_seen = 0, 0, 0
    if not resume:
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    else:
        checkpoint = find_checkpoint(run_dir)
        if checkpoint is None:
            raise ValueError(f"--resume {run_dir}: no checkpoint found in it")
        trainer = load_checkpoint(checkpoint, model, stepper)
        start_step, nonfinite, tokens_seen = trainer["step"], trainer["nonfinite_steps"], trainer["tokens"]
        _truncate_metrics(metrics, start_step)

    batches = data.train_batches(cfg.batch_size, seed=cfg.seed, grad_accum_steps=cfg.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    step, consecutive_bad, train_loss, val_loss = start_step, 0, float("nan"), float("nan")
    started = time.perf_counter()

    def checkpoint_now() -> None:
        save_checkpoint(run_dir, model, stepper, {"step": step, "nonfinite_steps": nonfinite, "tokens": tokens_seen})

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not show_progress, desc=f"{cfg.model} {cfg.optim}")
    with InterruptAtStepBoundary() as interrupt:
        while step < cfg.steps:
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:  # the layer-wise driver shares these groups
                group["lr"] = lr
            step_start = time.perf_counter()
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                inputs, labels = batches.get(step, micro)
                loss = forward(inputs.to(device), labels.to(device), shift_labels=False) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.item()
            if cfg.layerwise:
                stats = stepper.finish_step()  # the driver skips a non-finite step for every parameter
                grad_norm, ok = stats.grad_norm, not stats.skipped
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
                ok = math.isfinite(grad_norm) and math.isfinite(loss_sum)
                if ok:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if ok:
                consecutive_bad = 0
            else:
                nonfinite += 1
                consecutive_bad += 1
            step += 1
            tokens_seen += batches.tokens_per_step
            train_loss = loss_sum
            tok_per_s = batches.tokens_per_step / (time.perf_counter() - step_start)
            record = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen}
            record["tok_per_s"] = tok_per_s
            if consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
                bar.close()
                checkpoint_now()  # the last good state: the skipped steps changed nothing
                raise FloatingPointError(
                    f"{consecutive_bad} consecutive steps with a NaN/Inf loss or gradient at step {step}; "
                    f"the last good state is saved in {run_dir / 'checkpoint'}"
                )
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = evaluate(forward, data, cfg, device)
                record["val_loss"] = val_loss
            _append_metrics(metrics, record)
            bar.set_postfix(
                loss=f"{loss_sum:.3f}",
                val=f"{val_loss:.3f}",
                tok_s=f"{tok_per_s:,.0f}",
                mem=f"{_peak_memory(device) / 2**30:.2f}G",
            )
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.steps:
                checkpoint_now()
            if interrupt.requested:
                bar.close()
                checkpoint_now()
                raise KeyboardInterrupt
    bar.close()
    result = RunResult(
        run_dir=run_dir,
        step=step,
        train_loss=train_loss,
        val_loss=val_loss,
        tokens=tokens_seen,
        seconds=time.perf_counter() - started,
        peak_memory_bytes=_peak_memory(device),
        optimizer_state_bytes=state_bytes(optimizer),
        nonfinite_steps=nonfinite,
    )
    summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "run_dir"}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return result
