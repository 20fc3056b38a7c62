"""The pretraining loop behind ``fastgrad pretrain``.

Exact resume: the batch of step k is a pure function of (seed, k) (``fastgrad.data``), the
learning rate is a pure function of k (set on every step, no scheduler state), and the model and
optimizer states are saved bit for bit, so a resumed run reproduces the uninterrupted run's
losses on CPU. A step whose gradient norm is NaN/Inf is skipped (weights and optimizer state
untouched) and counted; many in a row stop the run after saving the last good state.

One host synchronisation per optimizer step: the step's loss, gradient norm and stop request stay
on the device until one read, after backward (non-layer-wise: after clipping on the device, and the
optimizer is told the gradients are finite instead of checking them again; layer-wise: inside
``finish_step``, which reads the loop's values with its norm). Batches reach a CUDA device through
pinned memory, without waiting for the queue. Evaluation, checkpoints and projector refreshes
(the finiteness of G, an SVD) synchronise on their own steps.

Data parallelism: the same command under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment)
trains with DDP, ``gloo`` on CPU and ``nccl`` on CUDA (rank r on ``cuda:LOCAL_RANK``).

* ``--batch-size`` is per process: the global batch of a step is
  ``batch_size × world_size × grad_accum`` sequences, and it is the very batch that one process
  with ``batch_size × world_size`` would take (rank r keeps rows ``[r·B, (r+1)·B)`` of every
  micro-batch, ``TokenBatches``). So 2 processes × B reproduce 1 process × 2B up to the fp32
  summation order of the gradient average; the learning-rate schedule is unchanged.
* Non-layer-wise: the model is wrapped in ``DistributedDataParallel`` after the optimizer is
  built (Q-GaLore swaps Linear layers for ``QLinear`` there); the micro-batches but the last run
  under ``no_sync()``. Gradients DDP cannot see are averaged explicitly after the last
  micro-batch, before clipping and the step: those of ``QLinear``'s INT8 codes (no autograd
  gradient: the layer writes an fp32 ``.grad``) and the projected gradients R = down(G, P) that
  low-rank-gradient layers (:mod:`fastgrad.nn.lowrank`) hand the optimizer between refreshes;
  DDP is told to ignore those weights.
* Layer-wise: the plain model is given to :func:`fastgrad.optim.layerwise`, which averages the
  gradients itself (low-rank ones in low rank) and broadcasts rank 0's weights. With
  ``layerwise_streaming`` each weight is updated in its hook during the step's last backward pass
  (after a synchronous all-reduce under DDP): the learning rate is set at the start of the step,
  before any backward; there is no clipping; a NaN/Inf gradient skips that weight only, and such a
  step counts as non-finite (its grad_norm is NaN/Inf) though the other weights were updated.
* All ranks agree: the logged loss is the all-reduced mean, the gradient norm (hence the NaN/Inf
  skip) is computed from averaged gradients, and the stop request (Ctrl-C on any rank) is
  all-reduced with the loss once per step, so every rank stops after the same step; rank 0
  saves and the others wait for it before exiting. (Ctrl-C in torchrun's terminal reaches the
  agent, which forwards it to every worker and kills them after its shutdown timeout, 30 s by
  default: enough for a step and a checkpoint of the models here.) Validation
  runs on every rank over its share of the validation sequences (every world_size-th one) and
  the sequence-weighted mean is all-reduced: the same sequences and value as one process with the
  global batch size.
* Rank 0 alone creates and writes the run directory (config, metrics, checkpoints, summary) and
  shows the progress bar; every rank loads the checkpoint on ``--resume`` (the run directory must
  be visible to all ranks: one node or a shared file system). The process group is destroyed at
  the end (when ``train`` created it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
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
from fastgrad.nn import fully_shard_model
from fastgrad.nn.lowrank import (
    accepts_projected_grad,
    clip_grad_norm_,
    projected_grad,
    reduce_projected_grads,
)
from fastgrad.optim import LowRankOptimizer, layerwise
from fastgrad.train.checkpoint import (
    find_checkpoint,
    is_sharded,
    load_checkpoint,
    load_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from fastgrad.train.config import TrainConfig
from fastgrad.train.optimizers import build_optimizer, convert_layers, state_bytes

MAX_CONSECUTIVE_NONFINITE = 20


@dataclass(frozen=True)
class Distributed:
    """This process's place in data-parallel training (world_size 1: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False  # train() initialised the process group and destroys it at the end

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """True on rank 0 of a ``torchrun`` launch (or of an initialised process group) and in a single
    process: where the command prints and writes files."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def setup_distributed(cfg: TrainConfig) -> tuple[Distributed, torch.device]:
    """The device, and the process group: an initialised one is used as is; under ``torchrun``
    (``WORLD_SIZE`` > 1) one is initialised from the environment, ``nccl`` when the device is CUDA
    (then ``cuda:LOCAL_RANK``, whatever index ``--device`` names) and ``gloo`` otherwise."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if not cfg.fsdp:
            return Distributed(), device
        # FSDP2 shards over a process group, of one process here: an in-memory store, no rendezvous.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
        return Distributed(owned=True), device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = dist.get_rank() if initialised else int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not initialised:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, dist.get_world_size(), local_rank, owned=not initialised), device


def _rank0_first(env: Distributed, fn, *, others: bool = True):
    """``fn()`` on rank 0, then (``others``) on the other ranks, which find its caches filled; an
    error on rank 0 is raised on every rank instead of leaving the others waiting for it."""
    if not env.enabled:
        return fn()
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
            error = e
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    torch.distributed.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise ValueError(f"rank 0 failed: {status[0]}")
    return result if env.is_main or not others else fn()


def _average_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """All-reduce (average), in place, the gradients of ``params`` that DDP does not handle: the
    ``.grad`` and the projected gradient (:func:`fastgrad.nn.lowrank.projected_grad`) of each,
    where there is one (the same on every rank: the same model, step and published projections)."""
    grads = [g for p in params for g in (p.grad, projected_grad(p)) if g is not None]
    works = [torch.distributed.all_reduce(g, async_op=True) for g in grads]
    for work, g in zip(works, grads, strict=True):
        work.wait()
        g.div_(world_size)


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on ``device``; to CUDA through pinned memory, asynchronously (a copy from pageable
    memory waits for the device's queue to drain)."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


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
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr_ratio · cfg.lr at the schedule's
    last step (``cfg.horizon()``: the run's steps, or what they were before it was extended), and
    that floor for the steps of an extension."""
    warmup = cfg.warmup_steps()
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.horizon() - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data, cfg: TrainConfig, device: torch.device, env: Distributed | None = None
) -> float:
    """Mean validation loss over ``cfg.eval_batches`` batches of ``cfg.batch_size`` sequences per
    rank, weighted by sequences; with DDP each rank takes every world_size-th sequence and the
    result is all-reduced (the value of one process with batches of batch_size × world_size).

    Without autograd: no graph is kept (and under FSDP2 no backward is expected after these forwards)."""
    env = env or Distributed()
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # Σ loss · sequences, Σ sequences
    with torch.no_grad():
        for i, (inputs, labels) in enumerate(
            data.val_batches(cfg.batch_size, rank=env.rank, world_size=env.world_size)
        ):
            if i >= cfg.eval_batches:
                break
            loss = model(inputs.to(device), labels.to(device), shift_labels=False).item()
            total += torch.tensor([loss * len(inputs), len(inputs)], dtype=torch.float64)
    model.train()
    if env.enabled:
        total = total.to(device)
        torch.distributed.all_reduce(total)
    loss_sum, count = total.tolist()
    return loss_sum / count if count else math.nan


class _MetricsLog:
    """metrics.jsonl, the run's record (one JSON object per step), and with ``--log-to tensorboard``
    the same numbers as TensorBoard scalars in run_dir/tensorboard; a resumed run purges the events
    after its checkpoint's step, as it truncates metrics.jsonl."""

    TAGS = {
        "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tok_per_s": "train/tokens_per_s",
        "tokens": "train/tokens", "peak_memory_gib": "train/peak_memory_gib", "val_loss": "val/loss",
    }  # fmt: skip

    def __init__(self, run_dir: Path, log_to: str | None, start_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.events = None
        if log_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.events = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.events is not None:
            for key, value in record.items():
                if key in self.TAGS:
                    self.events.add_scalar(self.TAGS[key], value, record["step"])
            self.events.flush()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def _write_config(run_dir: Path, cfg: TrainConfig) -> None:
    """config.json, replaced atomically (an interrupted write leaves the previous one)."""
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(cfg.to_dict(), indent=1))
    os.replace(tmp, run_dir / "config.json")


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
    leaves nothing behind, and never over an existing directory. Under ``torchrun`` this is data
    parallel (module docstring); rank 0's ``run_dir`` is the run's, on every rank.
    """
    env, device = setup_distributed(cfg)
    try:
        if env.enabled:
            shared = [Path(run_dir)]
            torch.distributed.broadcast_object_list(shared, src=0)
            run_dir = shared[0]
        return _train(cfg, run_dir, resume, show_progress, env, device)
    finally:
        if env.owned:
            torch.distributed.destroy_process_group()


def _train(
    cfg: TrainConfig, run_dir: Path, resume: bool, show_progress: bool, env: Distributed, device: torch.device
) -> RunResult:
    config_error = cfg.layerwise_streaming_error() or cfg.fsdp_error()
    if config_error:
        raise ValueError(config_error)
    # --mixed-precision keeps fp32 weights (the compute dtype is the policy's)
    default = "bfloat16" if device.type == "cuda" and not cfg.mixed_precision else "float32"
    dtype = getattr(torch, cfg.dtype or default)
    if cfg.max_memory_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.max_memory_gb * 2**30 / total), device)

    # Rank 0 first: it trains and caches the tokenizer and the token stream, the others load them.
    data = _rank0_first(env, lambda: prepare_data(cfg.data, cfg.seq_len, cfg.vocab_size, cfg.tokenizer))
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(get_config(cfg.model, data.vocab_size, cfg.seq_len)).to(device=device, dtype=dtype)
    model.gradient_checkpointing = cfg.activation_checkpointing
    if cfg.fsdp:  # each decoder layer all-gathered on its own, the rest (embedding, head, norm) with the root
        from torch.distributed.fsdp import MixedPrecisionPolicy

        convert_layers(cfg, model)  # before sharding: FSDP keeps the layers it finds
        policy = None
        if cfg.mixed_precision:
            policy = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.mixed_precision), reduce_dtype=torch.float32)
        fully_shard_model(model, mp_policy=policy)
    optimizer = build_optimizer(cfg, model)  # may swap modules (Q-GaLore: QLinear): before any DDP wrapping
    # Each group's learning rate as built, which the schedule scales: a group may have its own (Muon's
    # AdamW group: MUON_ADAMW_LR beside Muon's cfg.lr). Taken before a resume loads the groups,
    # whose saved lr is the scheduled one of the last step.
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    # Layer-wise: the driver's hooks consume each gradient during backward (projected and
    # accumulated in low rank), then finish_step() clips, applies the NaN policy and updates
    # (streaming: each weight is updated in its hook of the last micro-batch instead).
    # Under DDP it averages the gradients itself and broadcasts rank 0's weights: the plain model.
    stepper = (
        layerwise(
            model,
            optimizer,
            grad_accum_steps=cfg.grad_accum,
            max_grad_norm=cfg.grad_clip or None,
            streaming=cfg.layerwise_streaming,
        )
        if cfg.layerwise
        else optimizer
    )

    metrics = run_dir / "metrics.jsonl"
    start_step, nonfinite, tokens_seen = 0, 0, 0
    if not resume:

        def create_run_dir() -> None:
            run_dir.mkdir(parents=True)
            _write_config(run_dir, cfg)
            data.tokenizer.save(str(run_dir / "tokenizer.json"))

        _rank0_first(env, create_run_dir, others=False)
    if env.is_main:  # only now: bad input (data, model, options) has left no directory to report
        print(f"run directory: {run_dir}", flush=True)
    if resume:
        checkpoint = find_checkpoint(run_dir)  # every rank loads it
        if checkpoint is None:
            raise ValueError(f"--resume {run_dir}: no checkpoint found in it")
        if is_sharded(checkpoint) != cfg.fsdp:
            saved_by = "an --fsdp run" if is_sharded(checkpoint) else "a run without --fsdp"
            raise ValueError(f"--resume {run_dir}: its checkpoint was saved by {saved_by}; resume it the same way")
        load = load_sharded_checkpoint if cfg.fsdp else load_checkpoint
        trainer = load(checkpoint, model, stepper)
        start_step, nonfinite, tokens_seen = trainer["step"], trainer["nonfinite_steps"], trainer["tokens"]
        if env.is_main:
            _truncate_metrics(metrics, start_step)
            _write_config(run_dir, cfg)  # an extended run records its new length (and schedule horizon)
            if not (run_dir / "tokenizer.json").exists():  # a run from before runs recorded it
                data.tokenizer.save(str(run_dir / "tokenizer.json"))

    # Gradients DDP cannot average: QLinear's INT8 codes get theirs from the layer, not autograd
    # (the weight does not require grad), and a layer that computes projected gradients
    # (fastgrad.nn.lowrank: QLinear, LowRankGradLinear) hands R = down(G, P) to the optimizer
    # between refreshes instead of G. DDP ignores these weights; they are averaged after backward.
    outside_ddp = [(n, p) for n, p in model.named_parameters() if not p.requires_grad or accepts_projected_grad(p)]
    ddp = None
    if env.enabled and not cfg.layerwise and not cfg.fsdp:
        # Rank 0's values of what DDP does not broadcast at construction: the weights it ignores, and
        # the buffers (rotary tables, QLinear scales/zeros), which then change only through identical
        # updates on every rank, so they are not broadcast again before every forward.
        for tensor in [p for _, p in outside_ddp] + list(model.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)
        DDP = torch.nn.parallel.DistributedDataParallel
        no_buffer_sync = (  # torch >= 2.13 renamed broadcast_buffers
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": False}
        )
        DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, p in outside_ddp if p.requires_grad])
        ddp = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # no second copy of the gradients
            **no_buffer_sync,
        )
    module = ddp if ddp is not None else model
    forward = torch.compile(module) if cfg.compile else module

    batches = data.train_batches(
        cfg.batch_size, seed=cfg.seed, grad_accum_steps=cfg.grad_accum, rank=env.rank, world_size=env.world_size
    )
    # Every trained tensor, QLinear's uint8 codes included (their fp32 .grad, or the projected
    # gradient of a low-rank-gradient layer, which fastgrad's clip_grad_norm_ also covers).
    params = [p for p in model.parameters() if p.requires_grad or accepts_projected_grad(p)]
    clip = cfg.grad_clip if cfg.grad_clip > 0 else None
    # A finite total norm means every gradient the optimizer reads is finite: fastgrad's optimizers
    # are told so and skip their own check (a host synchronisation); torch's AdamW does not check.
    step_kwargs = {"grads_finite": True} if isinstance(optimizer, LowRankOptimizer) else {}
    step, consecutive_bad, train_loss, val_loss = start_step, 0, float("nan"), float("nan")
    evaluated = False
    started = time.perf_counter()

    def checkpoint_now() -> None:
        trainer = {"step": step, "nonfinite_steps": nonfinite, "tokens": tokens_seen, "processes": env.world_size}
        if cfg.fsdp:  # every rank saves its shards
            save_sharded_checkpoint(run_dir, model, stepper, trainer, keep=cfg.keep_checkpoints)
        elif env.is_main:
            save_checkpoint(run_dir, model, stepper, trainer, keep=cfg.keep_checkpoints)

    def barrier() -> None:  # the other ranks wait for rank 0's files before exiting
        if env.enabled:
            torch.distributed.barrier()

    log = _MetricsLog(run_dir, cfg.log_to, start_step) if env.is_main else None  # events flushed every step
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        disable=not (show_progress and env.is_main),
        desc=f"{cfg.model} {cfg.optim}",
    )
    with InterruptAtStepBoundary() as interrupt:
        while step < cfg.steps:
            lr = lr_at(cfg, step)  # logged: the lr of the groups built with cfg.lr
            # Before any backward of the step: the streaming layer-wise driver updates during the last one.
            for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):  # shared with the driver
                group["lr"] = base_lr * (lr / cfg.lr)
            step_start = time.perf_counter()
            # Σ of the micro-batch losses on the device, in float64 (as Python floats would add them).
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(cfg.grad_accum):
                inputs, labels = batches.get(step, micro)
                last = micro == cfg.grad_accum - 1
                if cfg.fsdp:  # reduce-scatter the gradients once, after the last micro-batch
                    model.set_requires_gradient_sync(last)
                with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                    inputs, labels = _to_device(inputs, device), _to_device(labels, device)
                    loss = forward(inputs, labels, shift_labels=False) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            stop = interrupt.requested
            # [Σ loss, stop request], read once below with the gradient norm.
            agreed = torch.stack([loss_sum, torch.full((), float(stop), dtype=torch.float64, device=device)])
            if cfg.fsdp:  # the projected gradients of low-rank-gradient layers, in place of FSDP's G
                reduce_projected_grads(params)
            if env.enabled:
                if ddp is not None:
                    _average_gradients([p for _, p in outside_ddp], env.world_size)
                # One all-reduce per step: the mean loss for the metrics and the stop request.
                torch.distributed.all_reduce(agreed)
            if cfg.layerwise:
                # The driver skips a non-finite step for every parameter (streaming: for the non-finite
                # ones; the step's norm is then NaN/Inf and it counts as non-finite here). It reads
                # `agreed` with its norm.
                stats = stepper.finish_step(fetch=agreed)
                (loss_sum, stopped), grad_norm = stats.fetched, stats.grad_norm
                ok = not stats.skipped and math.isfinite(grad_norm)
            else:
                norm = clip_grad_norm_(params, clip)  # clips on the device
                loss_sum, stopped, grad_norm = torch.cat([agreed, norm.double().reshape(1).to(device)]).tolist()
                ok = math.isfinite(grad_norm) and math.isfinite(loss_sum)
                if ok:
                    optimizer.step(**step_kwargs)
                optimizer.zero_grad(set_to_none=True)
            if env.enabled:
                loss_sum, stop = loss_sum / env.world_size, stopped > 0
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
            record["peak_memory_gib"] = _peak_memory(device) / 2**30
            if consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
                bar.close()
                checkpoint_now()  # the last good state: the skipped steps changed nothing
                barrier()
                saved = (
                    "the state after the last step (streaming: the weights with finite gradients kept being updated)"
                    if cfg.layerwise_streaming
                    else "the last good state"
                )
                raise FloatingPointError(
                    f"{consecutive_bad} consecutive steps with a NaN/Inf loss or gradient at step {step}; "
                    f"{saved} is saved in {run_dir / 'checkpoint'}"
                )
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = evaluate(forward, data, cfg, device, env)
                record["val_loss"] = val_loss
            if log is not None:
                log.append(record)
            shown = {"loss": f"{loss_sum:.3f}"}
            if "val_loss" in record or evaluated:  # no validation column before the first evaluation
                shown["val"] = f"{val_loss:.3f}"
                evaluated = True
            bar.set_postfix(**shown, tok_s=f"{tok_per_s:,.0f}", mem=f"{record['peak_memory_gib']:.2f}G")
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.steps:
                checkpoint_now()
            if stop if env.enabled else interrupt.requested:  # one process: a Ctrl-C up to now counts
                bar.close()
                checkpoint_now()
                barrier()
                raise KeyboardInterrupt
    bar.close()
    if log is not None:
        log.close()
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
    if env.is_main:
        summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "run_dir"}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    barrier()
    return result
