"""Run directories and checkpoints that resume exactly.

runs/<name>/
  config.json        the TrainConfig (resolved)
  tokenizer.json     the run's tokenizer (fastgrad sample / export read it)
  metrics.jsonl      one JSON object per logged step / evaluation
  checkpoint/        model.safetensors, optimizer.pt (loads with weights_only=True), trainer.json;
                     under --fsdp: sharded/ (torch.distributed.checkpoint), optimizer.json, trainer.json
  checkpoint-<step>/ with --keep-checkpoints k > 1: the k − 1 previous checkpoints, to roll back to
  loss.png           training and validation loss

A checkpoint is written to ``checkpoint.tmp`` and swapped in by renames, so an interrupt or a crash
while saving leaves the previous checkpoint intact (``checkpoint.old``, or ``checkpoint-<step>``
when older ones are kept, during the swap). To resume from an older checkpoint, move it to
``checkpoint/`` (``--resume`` reads ``checkpoint/``).

Under DDP only rank 0 saves and every rank loads; a ``DistributedDataParallel`` wrapper is
unwrapped, so the tensor names are those of the plain model whatever the process count.

Under FSDP2 (``--fsdp``) every rank saves its shards with ``torch.distributed.checkpoint`` (DCP:
tensors only, no pickle) and rank 0 writes the rest as JSON: the param groups and the optimizer's
non-tensor state. An optimizer tensor that holds the parameter's rows (the moments of a full-rank or
right-side weight) is saved as the parameter's DTensor layout, every other one (projectors, a
left-side weight's moments, counters) once, as every rank holds it whole; so a checkpoint saved by W
processes resumes on any number of processes, the states resharded by DCP. The run directory must be
visible to every rank (one node, or a shared file system).
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
SHARDED = "sharded"  # the DCP folder of an --fsdp checkpoint


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer, trainer: dict, keep: int = 1) -> None:
    """``optimizer``: anything with ``state_dict()`` (an optimizer or the layer-wise driver);
    ``keep``: how many checkpoints the run keeps (this one and the ``keep − 1`` newest before it)."""
    tmp = _fresh(run_dir)
    save_model(_unwrap(model), str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
    _swap_in(run_dir, tmp, keep)


def save_sharded_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer, trainer: dict, keep: int = 1) -> None:
    """:func:`save_checkpoint` of an FSDP2 run (module docstring); every rank calls it."""
    import torch.distributed.checkpoint as dcp

    dist = torch.distributed
    main = dist.get_rank() == 0
    tmp = _fresh(run_dir) if main else run_dir / f"{CHECKPOINT}.tmp"
    dist.barrier()  # the empty folder exists for every rank
    tensors, manifest = _sharded_optimizer_state(optimizer)
    dcp.save({"model": model.state_dict(), "optimizer": tensors}, checkpoint_id=tmp / SHARDED)
    if main:
        (tmp / "optimizer.json").write_text(json.dumps(manifest))
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        _swap_in(run_dir, tmp, keep)
    dist.barrier()  # no rank goes on (or exits) before the checkpoint is in place


def _fresh(run_dir: Path) -> Path:
    """An empty ``checkpoint.tmp`` to write the next checkpoint into."""
    tmp = run_dir / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _swap_in(run_dir: Path, tmp: Path, keep: int) -> None:
    """Make the complete ``tmp`` the run's checkpoint by renames; keep the ``keep − 1`` newest before it."""
    final, old = run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old"
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


def checkpoint_processes(run_dir: Path) -> int:
    """How many processes saved ``run_dir``'s checkpoint (1 for a checkpoint from before this was recorded)."""
    path = find_checkpoint(run_dir)
    if path is None:
        return 1
    trainer = path / "trainer.json"
    return int(_read(trainer, lambda: json.loads(trainer.read_text())).get("processes", 1))


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


def _sharded_optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state as DCP tensors (``"<param index>.<key>"``: the parameter's rows as a
    DTensor laid out as the parameter, others whole) and a JSON manifest of the rest."""
    from torch.distributed.tensor import DTensor

    from fastgrad.optim.sharding import row_shard

    saved = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tensors, values, layout = {}, {}, {}
    for i, p in enumerate(params):
        state = optimizer.state.get(p, {})
        rows = optimizer.sharded_state_keys(p) if hasattr(optimizer, "sharded_state_keys") else ()
        for key, value in state.items():
            name = f"{i}.{key}"
            if not isinstance(value, torch.Tensor):
                values[name] = value
                continue
            shard = row_shard(p)
            if not isinstance(value, DTensor) and key in rows and shard is not None:
                value = shard.as_dtensor(value)
            tensors[name] = value
            layout[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                            "rows": isinstance(value, DTensor)}  # fmt: skip
    extra = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}
    return tensors, {"param_groups": saved["param_groups"], "values": values, "tensors": layout, "extra": extra}


def load_sharded_checkpoint(path: Path, model: torch.nn.Module, optimizer) -> dict:
    """:func:`load_checkpoint` of an FSDP2 checkpoint, on any number of processes (every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    from fastgrad.optim.sharding import row_shard

    manifest_file = path / "optimizer.json"
    manifest = _read(manifest_file, lambda: json.loads(manifest_file.read_text()))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    targets = {}
    for name, meta in manifest["tensors"].items():
        p = params[int(name.split(".", 1)[0])]
        dtype = getattr(torch, meta["dtype"])
        if meta["rows"]:  # this rank's rows, laid out as the parameter
            shard = row_shard(p)
            local = torch.empty((shard.rows, *meta["shape"][1:]), dtype=dtype, device=p.device)
            targets[name] = shard.as_dtensor(local)
        else:
            targets[name] = torch.empty(meta["shape"], dtype=dtype, device=p.device)
    model_state = model.state_dict()
    dcp.load({"model": model_state, "optimizer": targets}, checkpoint_id=path / SHARDED)
    model.load_state_dict(model_state)
    state: dict[int, dict] = {}
    for name, value in [*manifest["values"].items(), *targets.items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": manifest["param_groups"], **manifest["extra"]})
    trainer = path / "trainer.json"
    return _read(trainer, lambda: json.loads(trainer.read_text()))


def is_sharded(path: Path) -> bool:
    """Whether checkpoint ``path`` was saved by an --fsdp run."""
    return (path / SHARDED).is_dir()
