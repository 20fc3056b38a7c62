"""Per-process memory of a training step under FSDP2 (``fastgrad pretrain --fsdp``): the memory
model's estimate at 1, 2, 4 and 8 processes, and the per-process persistent bytes measured with 2.

    python bench/memory_fsdp.py    # appends to bench/results/memory_fsdp.csv, renders README's memory-fsdp block

Estimates (``fastgrad memory --fsdp N``, fastgrad.train.memory.fsdp): LLaMA 60M, 130M, 1B and 7B with
AdamW, GaLore, Q-GaLore (8-bit moments) and Muon at the recipe's rank, one process's batch of
``BATCH`` × ``SEQ_LEN`` tokens with activation checkpointing, bfloat16, a 32000-token vocabulary, on
a GPU (``--device cuda``). Measured: 60M and 130M on 2 gloo processes on CPU (fp32, one sequence of
64 tokens): rank 0's local shards of the weights and of the gradients after a step's backward
(between subspace refreshes, as most steps are) and its optimizer state, beside the model's numbers
for the same configuration.

The measurement functions here (a model sharded as ``fastgrad pretrain --fsdp`` shards it, a step as
it takes one, the persistent bytes, the profiler's peak of each phase) are also the harness of
tests/test_memory_fsdp.py, which loads this file.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "memory_fsdp.csv"
BEGIN, END = "<!-- memory-fsdp:begin -->", "<!-- memory-fsdp:end -->"
MODELS = ("60m", "130m", "1b", "7b")
OPTIMS = ("adamw", "galore", "q-galore8bit", "muon")
PROCESSES = (1, 2, 4, 8)
BATCH, SEQ_LEN, VOCAB = 4, 256, 32000
MEASURED_MODELS, MEASURED_SEQ_LEN, WORLD = ("60m", "130m"), 64, 2
PHASE_MARKS = {7771: "forward", 7772: "backward", 7773: "optimizer step"}
STEP_MARK = 7777  # bytes of the marker allocation that starts the profiled step


# ------------------------------------------------------------------------------------------------
# measuring a sharded step (also tests/test_memory_fsdp.py's harness)
# ------------------------------------------------------------------------------------------------


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def settle_collectives() -> None:
    """In this process, make the collectives FSDP and fastgrad issue return only once gloo's worker
    thread has dropped its references to their tensors. Otherwise gloo's thread sometimes releases a
    buffer (an all-gather's output, a gathered gradient) after this thread dropped it, unseen by the
    profiler, and the measured live bytes drift by that buffer from run to run."""

    def wait_unreferenced(tensors: list[torch.Tensor], counts: list[int]) -> None:
        deadline = time.monotonic() + 1.0
        while any(_use_count(t) > c for t, c in zip(tensors, counts, strict=True)) and time.monotonic() < deadline:
            time.sleep(0)

    def settled(fn):
        def call(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            counts = [_use_count(t) for t in tensors]
            work = fn(*args, **kwargs)
            if work is None:  # synchronous: done, but gloo's thread may still hold the tensors
                wait_unreferenced(tensors, counts)
            return work

        return call

    names = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor")
    for name in (*names, "all_reduce", "broadcast"):
        if hasattr(dist, name):
            setattr(dist, name, settled(getattr(dist, name)))
    from torch.distributed.tensor import DTensor

    full_tensor = DTensor.full_tensor

    def settled_full_tensor(self, *args, **kwargs):
        out = full_tensor(self, *args, **kwargs)
        wait_unreferenced([out], [3 if out._base is not None else 2])  # the tensor (its base) and storage
        return out

    DTensor.full_tensor = settled_full_tensor


def memory_events(fn) -> list[int]:
    """This thread's allocator events while ``fn`` runs, in time order (+bytes, −bytes), from the
    profiler's event tree. A collective's own copies (allocated inside a ``c10d::``/``gloo:`` op) are
    counted as released at once: gloo's thread releases them, unseen by the profiler, or this one
    does, at a time that depends on the threads' race."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node, inside: bool) -> None:
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, fields.alloc_size, fields.ptr, inside))
        inside = inside or node.name.startswith(("c10d::", "gloo:"))
        for child in node.children:
            walk(child, inside)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, False)
    events.sort(key=lambda e: e[0])
    out, copies = [], set()
    for _, nbytes, ptr, inside in events:
        if ptr in copies:  # the copy's release, or (released on gloo's thread) its address reused
            copies.discard(ptr)
            if nbytes < 0:
                continue
        if nbytes > 0 and inside:
            copies.add(ptr)
            out += [nbytes, -nbytes]
        else:
            out.append(nbytes)
    return out


def build(mc, cfg):
    """The model and optimizer of ``fastgrad pretrain --fsdp`` (fastgrad.train.loop): layers converted,
    fully_shard_model with the --mixed-precision policy, then the optimizer."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from fastgrad.models import LlamaForCausalLM
    from fastgrad.nn import fully_shard_model
    from fastgrad.nn.lowrank import accepts_projected_grad
    from fastgrad.train.optimizers import build_optimizer, convert_layers

    torch.manual_seed(0)
    model = LlamaForCausalLM(mc).to(getattr(torch, cfg.dtype))
    model.gradient_checkpointing = cfg.activation_checkpointing
    convert_layers(cfg, model)
    policy = None
    if cfg.mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.mixed_precision), reduce_dtype=torch.float32)
    fully_shard_model(model, mp_policy=policy)
    optimizer = build_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad or accepts_projected_grad(p)]
    return model, optimizer, params


def train_step(model, optimizer, params, cfg, batches, mark: bool = False, after_backward=None) -> None:
    """One step as fastgrad.train.loop takes it under --fsdp (``mark``: a marker allocation before
    each phase; ``after_backward()`` runs once the gradients are reduced)."""
    from fastgrad.nn.lowrank import clip_grad_norm_, reduce_projected_grads
    from fastgrad.optim import LowRankOptimizer

    def marker(phase: str) -> None:
        if mark:
            torch.empty(next(k for k, v in PHASE_MARKS.items() if v == phase), dtype=torch.uint8)

    for micro, (ids, labels) in enumerate(batches):
        model.set_requires_gradient_sync(micro == len(batches) - 1)  # reduce-scatter after the last one
        marker("forward")
        loss = model(ids, labels, shift_labels=False) / len(batches)
        marker("backward")
        loss.backward()
    reduce_projected_grads(params)
    if after_backward is not None:
        after_backward()
    marker("optimizer step")
    clip_grad_norm_(params, None)
    optimizer.step(**({"grads_finite": True} if isinstance(optimizer, LowRankOptimizer) else {}))
    optimizer.zero_grad(set_to_none=True)


def measure(mc, cfg, rank: int, warmup: int, phases: bool = True) -> dict:
    """This rank's bytes in the step after ``warmup`` steps: ``weights`` (the local shards and the
    buffers), ``gradients`` (the local shards of the gradients, and of the averaged projected ones,
    after backward), ``optimizer_states`` (the local tensors of the optimizer state), and with
    ``phases`` the profiler's peak of each phase (the live total from the resident bytes: weights,
    state, token batches)."""
    from fastgrad.nn.lowrank import projected_grad
    from fastgrad.optim.sharding import local
    from fastgrad.train.profiling import storage_bytes

    model, optimizer, params = build(mc, cfg)
    gen = torch.Generator().manual_seed(1 + rank)
    shape = (cfg.batch_size, cfg.seq_len)
    batches = [
        (torch.randint(0, mc.vocab_size, shape, generator=gen), torch.randint(0, mc.vocab_size, shape, generator=gen))
        for _ in range(cfg.grad_accum)
    ]
    got: dict = {}

    def gradients() -> None:
        grads = [local(p.grad) for p in params if p.grad is not None]
        grads += [local(projected_grad(p)) for p in params if projected_grad(p) is not None]
        got["gradients"] = storage_bytes(grads)

    def weights() -> list[torch.Tensor]:
        return [*(local(p) for p in model.parameters()), *model.buffers()]

    def state() -> list[torch.Tensor]:
        return [local(t) for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]

    # oneDNN's bf16 GEMMs allocate scratch of their own, which the profiled peaks must not see; the
    # persistent bytes do not depend on it (and Muon's bf16 Newton–Schulz is 300× slower without it)
    onednn = torch.backends.mkldnn.flags(enabled=False) if phases else contextlib.nullcontext()
    with onednn:
        for _ in range(warmup):  # FSDP's lazy initialisation, the optimizer state: before measuring
            train_step(model, optimizer, params, cfg, batches)
        resident = storage_bytes([*weights(), *state(), *(t for b in batches for t in b)])

        def step() -> None:
            torch.empty(STEP_MARK, dtype=torch.uint8)
            train_step(model, optimizer, params, cfg, batches, mark=phases, after_backward=gradients)

        events = memory_events(step) if phases else step()
    got["weights"], got["optimizer_states"] = storage_bytes(weights()), storage_bytes(state())
    if phases:
        live, phase, peaks = resident, None, {}
        for nbytes in events:
            if abs(nbytes) in PHASE_MARKS:  # a phase starts (its marker is not counted)
                if nbytes > 0:
                    phase = PHASE_MARKS[nbytes]
                    peaks[phase] = max(peaks.get(phase, 0), live)
                continue
            live += nbytes
            if phase is not None:
                peaks[phase] = max(peaks[phase], live)
        got["phases"] = peaks
    return got


def run_ranks(fn, *args, world: int = WORLD) -> list:
    """``fn(rank, *args)`` on ``world`` spawned gloo processes (one thread each, collectives settled);
    the results in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(fn, world, tmp, args), nprocs=world)
        return [torch.load(f"{tmp}/result.{rank}", weights_only=False) for rank in range(world)]


def _worker(rank: int, fn, world: int, tmp: str, args: tuple) -> None:
    torch.set_num_threads(1)
    settle_collectives()
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, *args), f"{tmp}/result.{rank}")
        import gc

        gc.collect()  # no FSDP state outlives the process group
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------


def _estimate_config(model: str, optim: str):
    from fastgrad.train.config import TrainConfig

    return TrainConfig(
        model=model, optim=optim, fsdp=True, batch_size=BATCH, seq_len=SEQ_LEN, vocab_size=VOCAB,
        activation_checkpointing=True, dtype="bfloat16",
    )  # fmt: skip


def _measured_config(model: str, optim: str):
    from fastgrad.train.config import TrainConfig

    return TrainConfig(
        model=model, optim=optim, fsdp=True, batch_size=1, seq_len=MEASURED_SEQ_LEN, vocab_size=VOCAB,
        dtype="float32",
    ).resolved()  # fmt: skip


def _measure_all(rank: int, cases: list[tuple[str, str]]) -> list[dict]:
    from fastgrad.models import get_config

    out = []
    for model, optim in cases:
        cfg = _measured_config(model, optim)
        out.append(measure(get_config(model, VOCAB, cfg.seq_len), cfg, rank, warmup=1, phases=False))
    return out


def main() -> None:
    from fastgrad.models import get_config
    from fastgrad.train.memory import estimate

    started = time.perf_counter()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    rows = []
    for model in MODELS:
        for optim in OPTIMS:
            for n in PROCESSES:
                b = estimate(_estimate_config(model, optim), device="cuda", processes=n)
                rows.append({
                    "model": model, "optimizer": optim, "processes": n, "source": "model", "device": "cuda",
                    "dtype": "bfloat16", "tokens": BATCH * SEQ_LEN, "weights": b.weights,
                    "gradients": b.sharding["sharded gradients (between refreshes)"],
                    "optimizer_states": b.optimizer_states, "peak": b.peak,
                    "peak_between_refreshes": b.peak_between_refreshes,
                })  # fmt: skip
    cases = [(m, o) for m in MEASURED_MODELS for o in OPTIMS]
    measured = run_ranks(_measure_all, cases)[0]  # rank 0 holds the most rows
    for (model, optim), got in zip(cases, measured, strict=True):
        cfg = _measured_config(model, optim)
        b = estimate(cfg, model_config=get_config(model, VOCAB, cfg.seq_len), device="cpu", processes=WORLD)
        common = {"model": model, "optimizer": optim, "processes": WORLD, "device": "cpu", "dtype": "float32",
                  "tokens": MEASURED_SEQ_LEN, "peak": "", "peak_between_refreshes": ""}  # fmt: skip
        modelled = (b.weights, b.sharding["sharded gradients (between refreshes)"], b.optimizer_states)
        for source, (w, g, s) in (("model", modelled), ("measured", (got["weights"], got["gradients"],
                                                                     got["optimizer_states"]))):  # fmt: skip
            rows.append({**common, "source": source, "weights": w, "gradients": g, "optimizer_states": s})
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["time", *rows[0].keys()])
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({"time": stamp, **row})
    sys.path.insert(0, str(ROOT / "bench"))
    import report

    readme = ROOT / "README.md"
    readme.write_text(report.replace_block(readme.read_text(), BEGIN, END, report.render_memory_fsdp()))
    print(report.render_memory_fsdp())
    print(f"\n{len(rows)} rows in {RESULTS.relative_to(ROOT)}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
