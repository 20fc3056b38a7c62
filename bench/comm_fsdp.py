"""Bytes sent per training step under FSDP2 (``fully_shard``), by collective: AdamW against GaLore
(G reduce-scattered by FSDP) and GaLore with low-rank-gradient layers (R averaged by fastgrad).

    python bench/comm_fsdp.py            # 2 gloo processes on CPU; appends to bench/results/fsdp_comm.csv

Each configuration runs fastgrad's LLaMA (fp32, rank = the model's recipe, one decoder layer per FSDP
unit) for two steps of one sequence per process: the first step refreshes the subspace (GaLore
gathers G), the second is a steady step. The bytes are counted by
:class:`fastgrad.train.profiling.CollectiveBytes` on rank 0: the whole tensor each collective forms
or reduces (an all-gather's output, a reduce-scatter's input, an all-reduce's tensor), so the
numbers do not depend on the process count's share of them.
"""

from __future__ import annotations

import csv
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "fsdp_comm.csv"
MODELS = ("60m", "350m")
OPTIMS = ("adamw", "galore", "galore-lowrank-grad")
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")
VOCAB, SEQ_LEN, WORLD = 32000, 64, 2


def _measure(model_name: str, optim: str, rank: int) -> list[dict]:
    from torch.distributed.fsdp import fully_shard

    from fastgrad.models import LlamaForCausalLM, get_config
    from fastgrad.nn import lowrank_grad_model
    from fastgrad.nn.lowrank import bind_sharded_weights, reduce_projected_grads
    from fastgrad.optim import GaLoreAdamW, galore_param_groups
    from fastgrad.train.config import RANK
    from fastgrad.train.profiling import CollectiveBytes

    torch.manual_seed(0)
    model = LlamaForCausalLM(get_config(model_name, VOCAB, SEQ_LEN))
    if optim == "galore-lowrank-grad":
        lowrank_grad_model(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    bind_sharded_weights(model)
    if optim == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = GaLoreAdamW(galore_param_groups(model, rank=RANK[model_name], update_proj_gap=200), lr=1e-3)
    ids = torch.randint(0, VOCAB, (1, SEQ_LEN), generator=torch.Generator().manual_seed(rank))
    rows = []
    for step in ("refresh", "steady"):
        with CollectiveBytes() as counted:
            opt.zero_grad(set_to_none=True)
            model(ids, ids).backward()
            reduce_projected_grads(model.parameters())
            opt.step()
        rows.append(
            {"model": model_name, "optimizer": optim, "step": step, **{k: counted.bytes.get(k, 0) for k in KINDS}}
        )
    return rows


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        rows = [row for m in MODELS for o in OPTIMS for row in _measure(m, o, rank)]
        if rank == 0:
            torch.save(rows, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(f"{tmp}/store", f"{tmp}/rows.pt"), nprocs=WORLD)
        rows = torch.load(f"{tmp}/rows.pt")
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["time", "processes", *rows[0].keys()])
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({"time": stamp, "processes": WORLD, **row})
    for row in rows:
        print(row)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
