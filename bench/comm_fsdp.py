"""Bytes sent per training step under FSDP2 (``fully_shard``), by collective: AdamW (fp32, and with
bf16 mixed precision) against GaLore (G reduce-scattered by FSDP), GaLore with low-rank-gradient
layers (R averaged by fastgrad) and Q-GaLore (INT8 weights all-gathered as INT8, R averaged).

    python bench/comm_fsdp.py [--models 60m,130m,350m]   # 2 gloo processes on CPU; appends to
                                                          # bench/results/fsdp_comm.csv

Each configuration runs fastgrad's LLaMA (fp32, rank = the model's recipe, sharded by
:func:`fastgrad.nn.fully_shard_model`: one unit per decoder layer, and one for its INT8 layers) for
two steps of one sequence per process: the first step refreshes the subspace (GaLore gathers G), the
second is a steady step. The bytes are counted by :class:`fastgrad.train.profiling.CollectiveBytes`
on rank 0: the whole tensor each collective forms or reduces (an all-gather's output, a
reduce-scatter's input, an all-reduce's tensor), so the numbers do not depend on the process count's
share of them.
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
MODELS = ("60m", "130m", "350m")
OPTIMS = ("adamw", "adamw-bf16", "galore", "galore-lowrank-grad", "q-galore")
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")
VOCAB, SEQ_LEN, WORLD = 32000, 64, 2


def _measure(model_name: str, optim: str, rank: int) -> list[dict]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from fastgrad.models import LlamaForCausalLM, get_config
    from fastgrad.nn import fully_shard_model, lowrank_grad_model, quantize_model
    from fastgrad.nn.lowrank import reduce_projected_grads
    from fastgrad.optim import GaLoreAdamW, QGaLoreAdamW, galore_param_groups, qgalore_param_groups
    from fastgrad.train.config import RANK
    from fastgrad.train.optimizers import QLINEAR_GROUP_SIZE
    from fastgrad.train.profiling import CollectiveBytes

    torch.manual_seed(0)
    model = LlamaForCausalLM(get_config(model_name, VOCAB, SEQ_LEN))
    if optim == "galore-lowrank-grad":
        lowrank_grad_model(model)
    elif optim == "q-galore":
        quantize_model(model, group_size=QLINEAR_GROUP_SIZE)
    policy = None
    if optim == "adamw-bf16":  # fp32 weights and reduction, bf16 compute and all-gathers
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard_model(model, mp_policy=policy)
    rank_of = RANK[model_name]
    if optim.startswith("adamw"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    elif optim == "q-galore":
        opt = QGaLoreAdamW(qgalore_param_groups(model, rank=rank_of, update_proj_gap=200), lr=1e-3)
    else:
        opt = GaLoreAdamW(galore_param_groups(model, rank=rank_of, update_proj_gap=200), lr=1e-3)
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


def _worker(rank: int, store: str, out: str, models: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        rows = [row for m in models for o in OPTIMS for row in _measure(m, o, rank)]
        if rank == 0:
            torch.save(rows, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    models = parser.parse_args().models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(f"{tmp}/store", f"{tmp}/rows.pt", models), nprocs=WORLD)
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
