"""The harness of the tests that run fastgrad on several CPU processes (gloo): spawn them, run a
function on each rank, collect what each returns."""

import gc
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

WORLD = 2  # processes


def run_on_ranks(fn: Callable, tmp: Path, *args) -> list:
    """``fn(rank, *args)`` on each of WORLD spawned processes sharing a gloo process group (one
    thread each); returns the ranks' results in rank order (tensors, containers, numbers, strings:
    what ``torch.load(weights_only=True)`` reads). ``fn`` must be a module-level function."""
    torch.multiprocessing.spawn(_worker, args=(fn, str(tmp / "store"), str(tmp / "result"), args), nprocs=WORLD)
    return [torch.load(tmp / f"result.{rank}", weights_only=True) for rank in range(WORLD)]


def _worker(rank: int, fn: Callable, store: str, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        result = fn(rank, *args)
        torch.save(result, f"{out}.{rank}")
        del result
        gc.collect()  # no FSDP state (and its pending collective work) outlives the process group
        dist.barrier()
    finally:
        dist.destroy_process_group()
