"""Measured memory of one training step: layer-wise GaLore vs layer-wise GaLore with low-rank weight
gradients vs layer-wise Q-GaLore (INT8 QLinear weights, which always deliver projected gradients).

    python bench/memory_lowrank.py                 # LLaMA-130M, batch 1 × 256 tokens, CPU, fp32
    python bench/memory_lowrank.py --model 60m --activation-checkpointing

Per configuration: build the model and the layer-wise optimizer, run two steps (k = 0 refreshes
the projectors: SVD of the full gradients; k = 1 is an ordinary step), then measure step k = 2 (no
refresh) with the torch profiler's memory events: the peak of bytes allocated minus bytes freed
since the start of the step, plus what was resident before it (every tensor of the model and of
the optimizer state, counted once). Also reported: the largest single allocation of the step.
Rows are appended to bench/results/memory.csv and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
from pathlib import Path

import torch

from fastgrad.models import LlamaForCausalLM, get_config
from fastgrad.nn import lowrank_grad_model, quantize_model
from fastgrad.optim import GaLoreAdamW, QGaLoreAdamW, galore_param_groups, layerwise, qgalore_param_groups
from fastgrad.train.profiling import live_peak, measured_memory_events, storage_bytes

RESULTS = Path(__file__).parent / "results" / "memory.csv"
RANK = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}
CONFIGS = ("galore-layerwise", "galore-layerwise+lowrank-grad", "q-galore-layerwise")


def _resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return storage_bytes(tensors)


def _profile(fn) -> tuple[int, int]:
    """(peak of allocated − freed during fn, largest single allocation) from profiler memory events."""
    events = measured_memory_events(fn)
    return live_peak(events), max(events, default=0)


def measure(config: str, model_name: str, tokens: int, checkpointing: bool, vocab: int) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(get_config(model_name, vocab, tokens))
    model.gradient_checkpointing = checkpointing
    rank, gap = RANK[model_name], 200
    if config.startswith("q-galore"):
        quantize_model(model, 256)

        def factory(m):
            return QGaLoreAdamW(qgalore_param_groups(m, rank=rank, update_proj_gap=gap), lr=1e-3)
    else:
        if config.endswith("lowrank-grad"):
            lowrank_grad_model(model)

        def factory(m):
            return GaLoreAdamW(galore_param_groups(m, rank=rank, update_proj_gap=gap), lr=1e-3)

    lw = layerwise(model, factory)
    ids = torch.randint(0, vocab, (1, tokens))

    def step():
        model(ids, ids).backward()
        lw.finish_step()

    step()  # k = 0: refresh
    step()  # k = 1
    resident = _resident_bytes(model, lw.optimizer)
    peak, largest = _profile(step)  # k = 2
    weights = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
    biggest_grad = max(p.numel() for p in weights) * 4
    return {
        "config": config,
        "resident_mib": resident / 2**20,
        "step_peak_mib": peak / 2**20,
        "total_peak_mib": (resident + peak) / 2**20,
        "largest_alloc_mib": largest / 2**20,
        "largest_layer_fp32_grad_mib": biggest_grad / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="130m", choices=list(RANK))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000, help="LLaMA tokenizer size, as in the GaLore runs")
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    rows = [measure(c, args.model, args.tokens, args.activation_checkpointing, args.vocab) for c in CONFIGS]
    command = "python bench/memory_lowrank.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"LLaMA-{args.model}, batch 1 × {args.tokens} tokens, fp32 on CPU, step without refresh ({command.strip()})")
    print("| configuration | resident MiB | step peak MiB | total peak MiB | largest allocation MiB |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['config']} | {r['resident_mib']:.1f} | {r['step_peak_mib']:.1f} | {r['total_peak_mib']:.1f} "
            f"| {r['largest_alloc_mib']:.2f} |"
        )
    print(f"largest Linear layer's fp32 gradient: {rows[0]['largest_layer_fp32_grad_mib']:.2f} MiB")
    RESULTS.parent.mkdir(exist_ok=True)
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["date", "model", "tokens", "activation_checkpointing", "command", *rows[0].keys()]
        )
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "model": args.model,
                    "tokens": args.tokens,
                    "activation_checkpointing": args.activation_checkpointing,
                    "command": command.strip(),
                    **{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()},
                }
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
