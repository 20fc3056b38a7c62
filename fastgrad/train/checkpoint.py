"""Run directories and checkpoints that resume exactly.

runs/<name>/
  config.json        the TrainConfig (resolved)
  tokenizer.json     the run's tokenizer (fastgrad sample / export read it)
  metrics.jsonl      one JSON object per logged step / evaluation
  checkpoint/        model.safetensors, optimizer.pt (loads with weights_only=True), trainer.json
  checkpoint-<step>/ with --keep-checkpoints k > 1: the k − 1 previous checkpoints, to roll back to
  loss.png           training and validation loss

A checkpoint is written to ``checkpoint.tmp`` and swapped in by renames, so an interrupt or a crash
while saving leaves the previous checkpoint intact (``checkpoint.old``, or ``checkpoint-<step>``
when older ones are kept, during the swap). To resume from an older checkpoint, move it to
``checkpoint/`` (``--resume`` reads ``checkpoint/``).

Under DDP only rank 0 saves and every rank loads; a ``DistributedDataParallel`` wrapper is
unwrapped, so the tensor names are those of the plain model whatever the process count.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

CHECKPOINT = "checkpoint"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer, trainer: dict, keep: int = 1) -> None:
    """``optimizer``: anything with ``state_dict()`` (an optimizer or the layer-wise driver);
    ``keep``: how many checkpoints the run keeps (this one and the ``keep − 1`` newest before it)."""
    tmp, final, old = run_dir / f"{CHECKPOINT}.tmp", run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(_unwrap(model), str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        previous = run_dir / f"{CHECKPOINT}-{_step_of(final)}" if keep > 1 else old
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    older = older_checkpoints(run_dir)
    for stale in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(stale)


def older_checkpoints(run_dir: Path) -> list[Path]:
    """The kept ``checkpoint-<step>`` folders of ``run_dir``, oldest first."""
    found = [p for p in run_dir.glob(f"{CHECKPOINT}-*") if p.name.removeprefix(f"{CHECKPOINT}-").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(f"{CHECKPOINT}-")))


def _step_of(path: Path) -> int:
    trainer = path / "trainer.json"
    return int(_read(trainer, lambda: json.loads(trainer.read_text()))["step"])


def find_checkpoint(run_dir: Path) -> Path | None:
    """``checkpoint/``; after a crash in the middle of a swap, the previous one it was replacing."""
    for path in (run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old", *reversed(older_checkpoints(run_dir))):
        if (path / "trainer.json").exists():
            return path
    return None


# What reading a truncated or overwritten checkpoint file raises (safetensors' header check, torch's
# zip reader, the unpickler, the JSON parser).
_DAMAGED = (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, json.JSONDecodeError, UnicodeDecodeError)


def _read(file: Path, load):
    """``load()``, or a ValueError naming ``file`` when it is damaged (a full disk, a copy cut short)."""
    try:
        return load()
    except _DAMAGED as e:
        kept = [p.name for p in older_checkpoints(file.parent.parent)]
        if kept:
            how = (
                f"earlier checkpoints are kept ({', '.join(kept)}): to resume from one, move it to "
                f"{file.parent.parent / CHECKPOINT} in place of the damaged one"
            )
        else:
            how = "this run keeps one checkpoint (--keep-checkpoints): start a new run, or restore the file"
        raise ValueError(
            f"checkpoint file {file} is damaged or incomplete ({type(e).__name__}: {e}); this run cannot be "
            f"resumed from it; {how}"
        ) from e


def checkpoint_step(run_dir: Path) -> int | None:
    """The optimizer step of ``run_dir``'s checkpoint (None without one), from trainer.json alone."""
    path = find_checkpoint(run_dir)
    return None if path is None else _step_of(path)


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Restore the model of checkpoint ``path`` in place (every tensor, names checked)."""
    weights = path / "model.safetensors"
    _read(weights, lambda: safe_open(str(weights), "pt").keys())  # the header and the file's length agree
    missing, unexpected = load_model(_unwrap(model), str(weights), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer) -> dict:
    """Restore model and optimizer in place; return the trainer state (step, counters)."""
    load_weights(path, model)
    states = path / "optimizer.pt"
    optimizer.load_state_dict(_read(states, lambda: torch.load(states, weights_only=True, map_location="cpu")))
    trainer = path / "trainer.json"
    return _read(trainer, lambda: json.loads(trainer.read_text()))
