"""The ``fastgrad`` command: ``fastgrad pretrain``, ``fastgrad compare``, ``fastgrad memory`` and ``fastgrad env``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
from pathlib import Path

from fastgrad.train.config import TrainConfig
from fastgrad.train.optimizers import LAYERWISE, OPTIMIZERS

# CLI flag -> TrainConfig field, for the flags that set the config.
# TrainConfig fields that no flag sets (extra: free-form; schedule_steps: set by an extension).
_NOT_FLAGS = ("extra", "schedule_steps")
_CONFIG_FLAGS = {
    f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig) if f.name not in _NOT_FLAGS
}
# Options that --resume may change: they lengthen the run, keep more checkpoints or log elsewhere,
# and change no step already taken (extending keeps the schedule's horizon, TrainConfig.schedule_steps).
_RESUME_MAY_CHANGE = ("steps", "tokens", "keep_checkpoints", "log_to")


# The flags of _add_training_arguments that shape a step's memory (fastgrad memory takes these).
_MEMORY_FLAGS = {
    "--model",
    "--rank",
    "--grad-accum",
    "--batch-size",
    "--seq-len",
    "--dtype",
    "--activation-checkpointing",
    "--layerwise",
    "--layerwise-streaming",
    "--vocab-size",
    "--no-lowrank-grad",
    "--mixed-precision",
}
# Boolean config fields whose command-line flag turns them off.
_NEGATIVE_FLAGS = {"lowrank_grad": "--no-lowrank-grad"}


def _add_training_arguments(p: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """The flags that set a TrainConfig (all but --optim), shared by pretrain and compare; ``only``:
    just these flags (fastgrad memory)."""
    d = TrainConfig()

    def add(flag: str, **kwargs) -> None:
        if only is None or flag in only:
            p.add_argument(flag, **kwargs)

    add("--model", help=f"tiny, 60m, 130m, 350m, 1b or 7b (default {d.model})")
    add("--rank", type=int, help="projection rank (default: the model's recipe)")
    add("--update-proj-gap", type=int, help="projector refresh interval T in steps (default: recipe)")
    add("--scale", type=float, help="scale α (default: the optimizer's recipe: 0.25 GaLore, 1 APOLLO, ...)")
    add("--lr", type=float, help="peak learning rate (default: 0.01 low-rank, 1e-3 AdamW)")
    add("--min-lr-ratio", type=float, help=f"cosine floor as a fraction of --lr (default {d.min_lr_ratio})")
    add("--warmup", type=float, help=f"warmup: a fraction of the steps if < 1, else steps (default {d.warmup})")
    add("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    add("--grad-clip", type=float, help="clip the global gradient norm to this (default: off)")
    add("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    add(
        "--batch-size", type=int, help=f"sequences per micro-batch, per process under torchrun (default {d.batch_size})"
    )
    add("--seq-len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    add("--steps", type=int, help="optimizer steps (default: the model's recipe; tiny 300)")
    add("--tokens", type=int, help="train on this many tokens instead of --steps")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on GPU, float32 on CPU")
    add("--seed", type=int, help=f"(default {d.seed})")
    add("--compile", action="store_const", const=True, help="torch.compile the model")
    add("--activation-checkpointing", action="store_const", const=True, help="recompute layer activations")
    add(
        "--layerwise",
        action="store_const",
        const=True,
        help=f"update each weight during backward: at most one full gradient alive ({', '.join(sorted(LAYERWISE))})",
    )
    add(
        "--layerwise-streaming",
        action="store_const",
        const=True,
        help="with --layerwise: update each weight inside its gradient hook and free its gradient at once, instead "
        "of keeping the projected (and full-rank) gradients until the end of the step; no --grad-clip, and a "
        "NaN/Inf gradient skips that weight only",
    )
    add(
        "--fsdp",
        action="store_const",
        const=True,
        help="under torchrun (or alone): shard weights, gradients and optimizer states over the processes "
        "(FSDP2, fully_shard); sharded checkpoints resume on any number of processes "
        "(all optimizers but q-galore and q-galore8bit)",
    )
    add(
        "--mixed-precision",
        choices=["bfloat16", "float16"],
        help="with --fsdp: compute and all-gather the weights in this dtype, keep the weights and optimizer "
        "states in float32, reduce gradients in float32 (MixedPrecisionPolicy)",
    )
    add(
        "--no-lowrank-grad",
        dest="lowrank_grad",
        action="store_const",
        const=False,
        help="galore/galore8bit: let the Linear layers form full gradients (default: between projector refreshes "
        "they compute only the projected gradient, fastgrad.nn.lowrank)",
    )
    add("--max-memory-gb", type=float, help="cap CUDA memory to emulate a smaller GPU")
    add("--data", help="a .txt file, a folder of .txt files, or a Hugging Face dataset (default: built-in)")
    add("--tokenizer", help="a tokenizer.json to use instead of training one")
    add("--vocab-size", type=int, help=f"BPE vocabulary size when training one (default {d.vocab_size})")
    add("--eval-every", type=int, help=f"validate every this many steps (default {d.eval_every})")
    add("--eval-batches", type=int, help=f"validation batches per evaluation (default {d.eval_batches})")
    add("--save-every", type=int, help=f"checkpoint every this many steps (default {d.save_every})")
    add(
        "--keep-checkpoints",
        type=int,
        help=f"keep the last this many checkpoints, to roll back a diverged run (default {d.keep_checkpoints})",
    )
    add("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add(
        "--log-to",
        choices=["tensorboard"],
        help="also write the metrics as TensorBoard events in <run>/tensorboard (metrics.jsonl is always written)",
    )
    add("--out", default="runs", help="parent folder of the run directory (default runs)")
    add("--no-progress", action="store_true", help="no progress bar")


# The commands that take the training flags: name -> (help, description).
_TRAINING_COMMANDS = {
    "pretrain": (
        "pretrain a LLaMA-style model",
        "Pretrain a LLaMA-style model on the default corpus (or --data) with a memory-efficient optimizer. "
        "With no arguments: the 'tiny' model with Q-GaLore (INT8 weights, INT4 projector), on the GPU if there "
        "is one, else the CPU.",
    ),
    "compare": (
        "train the same model on the same data with several optimizers",
        "Run `fastgrad pretrain` once per optimizer (same model, data, seed and options; each in its "
        "own process, so peak memory is per run) and write a table and one plot of all loss curves.",
    ),
    "memory": (
        "estimate the memory of a training step, without running it",
        "Estimate, from the model's shapes alone (nothing is allocated), the bytes of one training step "
        "of `fastgrad pretrain` with these options: weights, gradients, optimizer states, projector transients and "
        "activations, and the peak over the step's phases (what torch.cuda.max_memory_allocated would report), "
        "beside the papers' published figures for the model and optimizer. The model is validated against the "
        "measured peak of real steps (tests/test_memory.py).",
    ),
}


def _training_parser(sub, name: str, only: set[str] | None = None) -> argparse.ArgumentParser:
    """The parser of a command of _TRAINING_COMMANDS: its optimizer flag (compare's comma-separated
    ``--optims``, else ``--optim``), then the flags of _add_training_arguments (``only``: just these)."""
    summary, description = _TRAINING_COMMANDS[name]
    p = sub.add_parser(name, help=summary, description=description)
    if name == "compare":
        p.add_argument(
            "--optims", default="adamw,galore,q-galore", help="comma-separated (default adamw,galore,q-galore)"
        )
    else:
        p.add_argument("--optim", choices=list(OPTIMIZERS), help=f"optimizer (default {TrainConfig().optim})")
    _add_training_arguments(p, only=only)
    return p


def _pretrain_parser(sub) -> argparse.ArgumentParser:
    p = _training_parser(sub, "pretrain")
    p.add_argument("--name", help="run directory name (default: <model>-<optim>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    return p


def _compare_parser(sub) -> argparse.ArgumentParser:
    p = _training_parser(sub, "compare")
    p.add_argument("--name", help="comparison directory name (default: compare-<model>-<time>)")
    return p


def _memory_parser(sub) -> argparse.ArgumentParser:
    p = _training_parser(sub, "memory", only=_MEMORY_FLAGS)
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="the device the step would run on (default cuda; the dtype defaults to bfloat16 there, float32 on cpu)",
    )
    p.add_argument(
        "--sm-count",
        type=int,
        help="SMs of the GPU the kernels' split-K workspaces are sized for (default: the visible GPU's, else 128)",
    )
    # pretrain's --fsdp is a switch (the process count is torchrun's); here the count is the question
    p.add_argument(
        "--fsdp",
        dest="fsdp_processes",
        type=int,
        metavar="N",
        help="the memory of one of N processes of `fastgrad pretrain --fsdp` (FSDP2: weights, gradients and "
        "optimizer states sharded by rows; the per-process batch is --batch-size)",
    )
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    return p


def _explicit_config(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in _CONFIG_FLAGS if getattr(args, name, None) is not None}


def _prepare_run(args: argparse.Namespace) -> tuple[TrainConfig, Path, bool]:
    """Resolve the config and the run directory; never overwrite an existing run."""
    explicit = _explicit_config(args)
    if args.resume:
        run_dir = Path(args.resume)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"--resume {run_dir}: not a run directory (no config.json)")
        cfg = TrainConfig.from_dict(json.loads(config_path.read_text()))
        # Everything that shaped the steps already taken must match for the continuation to be the
        # run that was started; --steps/--tokens may only lengthen it.
        conflicts = {
            k: (v, getattr(cfg, k)) for k, v in explicit.items() if v != getattr(cfg, k) and k not in _RESUME_MAY_CHANGE
        }
        if "batch_size" in conflicts and cfg.fsdp:
            # A sharded run resumes on another number of processes with the same global batch.
            from fastgrad.train.checkpoint import checkpoint_processes

            world = int(os.environ.get("WORLD_SIZE", "1"))
            saved = checkpoint_processes(run_dir)
            if explicit["batch_size"] * world == cfg.batch_size * saved:
                del conflicts["batch_size"]
                cfg = dataclasses.replace(cfg, batch_size=explicit["batch_size"])
            else:
                raise ValueError(
                    f"--resume {run_dir}: --batch-size {explicit['batch_size']} × {world} processes is not the run's "
                    f"global batch, --batch-size {cfg.batch_size} × {saved} processes"
                )
        if conflicts:
            listed = ", ".join(f"{_CONFIG_FLAGS[k]}={v!r} (run has {old!r})" for k, (v, old) in conflicts.items())
            raise ValueError(f"--resume {run_dir}: these options differ from the run's config: {listed}")
        return _extended(cfg, explicit, run_dir), run_dir, True
    cfg = TrainConfig(**explicit).resolved()
    name = args.name or f"{cfg.model}-{cfg.optim}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(args.out) / name
    if run_dir.exists():
        raise ValueError(f"run directory {run_dir} already exists; use --resume {run_dir} or another --name")
    return cfg, run_dir, False


def _extended(cfg: TrainConfig, explicit: dict, run_dir: Path) -> TrainConfig:
    """``cfg`` with the run lengthened to the given --steps (or --tokens) and --keep-checkpoints. The
    learning-rate schedule keeps the horizon it was planned for (its cosine ends where it ended)
    and the extra steps run at its floor, so no step already taken changes."""
    kept = {k: explicit[k] for k in ("keep_checkpoints", "log_to") if k in explicit}
    cfg = dataclasses.replace(cfg, **kept)
    if "steps" not in explicit and "tokens" not in explicit:
        return cfg
    steps = TrainConfig(**{**cfg.to_dict(), "steps": explicit.get("steps"), "tokens": explicit.get("tokens")})
    steps = steps.resolved().steps
    if steps < cfg.steps:
        raise ValueError(
            f"--resume {run_dir}: --steps {steps} is fewer than the run's {cfg.steps}; a run can be extended, not "
            "shortened (the remaining steps' learning rates were planned for its length)"
        )
    if steps == cfg.steps:
        return cfg
    return dataclasses.replace(cfg, steps=steps, tokens=explicit.get("tokens"), schedule_steps=cfg.horizon())


def _validate(cfg: TrainConfig) -> None:
    from fastgrad.models import get_config

    get_config(cfg.model, vocab_size=cfg.vocab_size)  # raises for an unknown model
    positive = ("batch_size", "seq_len", "grad_accum", "steps", "rank", "update_proj_gap", "eval_every", "save_every")
    for name in (*positive, "keep_checkpoints"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{_CONFIG_FLAGS[name]} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if cfg.device is not None and cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {cfg.device}: this torch ({torch.__version__}) sees no CUDA device; "
                "install a CUDA build of torch on a GPU machine, or use --device cpu"
            )
    if cfg.log_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("--log-to tensorboard needs the tensorboard package: pip install tensorboard") from None
    if cfg.layerwise and cfg.optim not in LAYERWISE:
        raise ValueError(f"--layerwise works with --optim {', '.join(sorted(LAYERWISE))}, not {cfg.optim}")
    config_error = cfg.layerwise_streaming_error() or cfg.fsdp_error()
    if config_error:
        raise ValueError(config_error)
    if cfg.max_memory_gb is not None:
        _check_memory_cap(cfg)


def _check_memory_cap(cfg: TrainConfig) -> None:
    """Refuse, before anything is built, a run whose step cannot fit in --max-memory-gb by fastgrad's
    memory model (fastgrad.train.memory, validated against measured steps); the CUDA cap itself is
    set by the training loop."""
    import torch

    from fastgrad.train.memory import MODELLED_OPTIMIZERS, estimate

    if not cfg.max_memory_gb > 0:
        raise ValueError(f"--max-memory-gb must be positive, got {cfg.max_memory_gb}")
    if cfg.optim not in MODELLED_OPTIMIZERS:
        return
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The whole config is modelled, --layerwise-streaming included (updates during backward).
    peak = estimate(cfg, device="cuda" if device.startswith("cuda") else "cpu").peak
    if peak > cfg.max_memory_gb * 2**30:
        options = "--layerwise-streaming" if cfg.layerwise and not cfg.layerwise_streaming else "--layerwise"
        raise ValueError(
            f"--max-memory-gb {cfg.max_memory_gb}: a training step of this configuration needs about "
            f"{peak / 2**30:.2f} GiB (fastgrad memory with the same options shows the breakdown); lower "
            f"--batch-size or --seq-len, or use --activation-checkpointing, {options}, a lower --rank or q-galore"
        )


def pretrain(args: argparse.Namespace) -> int:
    from fastgrad.train.checkpoint import checkpoint_step
    from fastgrad.train.loop import is_main_process, train
    from fastgrad.train.plot import plot_losses

    cfg, run_dir, resume = _prepare_run(args)
    _validate(cfg)
    main_process = is_main_process()  # under torchrun, rank 0 alone prints and writes
    if resume and (checkpoint_step(run_dir) or 0) >= cfg.steps:
        # Nothing left to train: leave the finished run's summary, metrics and plot as they are.
        if main_process:
            print(f"run {run_dir} already finished its {cfg.steps} steps: nothing to resume, no file changed")
        return 0
    try:
        result = train(cfg, run_dir, resume=resume, show_progress=not args.no_progress)
    except KeyboardInterrupt:
        if main_process:
            print(
                f"\ninterrupted: checkpoint saved; continue with: fastgrad pretrain --resume {run_dir}", file=sys.stderr
            )
        return 130
    if not main_process:
        return 0
    run_dir = result.run_dir  # rank 0's (the same in a single process)
    plot_losses({f"{cfg.model} {cfg.optim}": run_dir / "metrics.jsonl"}, run_dir / "loss.png")
    rows = [
        ("steps", f"{result.step}"),
        ("tokens", f"{result.tokens:,}"),
        ("train loss", f"{result.train_loss:.4f}"),
        (
            "validation loss",
            f"{result.val_loss:.4f} (perplexity {min(float('inf'), 2.718281828**result.val_loss):.1f})",
        ),
        ("time", f"{result.seconds:.0f} s ({result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s)"),
        ("peak memory", f"{result.peak_memory_bytes / 2**20:,.0f} MiB"),
        ("optimizer state", f"{result.optimizer_state_bytes / 2**20:,.2f} MiB"),
        ("skipped NaN/Inf steps", f"{result.nonfinite_steps}"),
        ("outputs", f"{run_dir}/ (config.json, metrics.jsonl, summary.json, checkpoint/, loss.png)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    return 0


def memory(args: argparse.Namespace) -> int:
    from fastgrad.models import get_config
    from fastgrad.train.memory import estimate, format_report

    explicit = _explicit_config(args)
    processes = args.fsdp_processes
    if processes is not None and processes < 1:
        raise ValueError(f"--fsdp takes the number of processes, a positive integer; got {processes}")
    cfg = TrainConfig(**explicit, fsdp=processes is not None).resolved()
    get_config(cfg.model, vocab_size=cfg.vocab_size)  # raises for an unknown model
    for name in ("batch_size", "seq_len", "grad_accum", "rank", "vocab_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{_CONFIG_FLAGS[name]} must be a positive integer, got {getattr(cfg, name)}")
    notes = []
    if cfg.layerwise:
        from fastgrad.train.memory import LOWRANK_OPTIMIZERS

        if cfg.optim not in LOWRANK_OPTIMIZERS | LAYERWISE:  # (the model replays frugal layer-wise too)
            raise ValueError(f"--layerwise works with --optim {', '.join(sorted(LAYERWISE))}, not {cfg.optim}")
        if cfg.optim not in LAYERWISE:
            notes.append(
                f"fastgrad pretrain does not take --layerwise with {cfg.optim} yet; this is the step of "
                "fastgrad.optim.layerwise driving it (as from Python)"
            )
    config_error = cfg.layerwise_streaming_error() or cfg.fsdp_error()  # pretrain's refusals, in its words
    if config_error:
        raise ValueError(config_error)
    if args.sm_count is not None and args.sm_count < 1:
        raise ValueError(f"--sm-count must be a positive integer, got {args.sm_count}")
    breakdown = estimate(cfg, device=args.device, sm_count=args.sm_count, processes=processes)
    if args.json:
        print(json.dumps({**dataclasses.asdict(breakdown), "total": breakdown.total}, indent=1))
    else:
        print(format_report(breakdown, tuple(notes)))
    return 0


def _as_flags(explicit: dict) -> list[str]:
    """TrainConfig values back to command-line flags."""
    flags = []
    for name, value in explicit.items():
        if name in _NEGATIVE_FLAGS:
            flags += [] if value else [_NEGATIVE_FLAGS[name]]
        elif isinstance(value, bool):
            flags += [_CONFIG_FLAGS[name]] if value else []
        else:
            flags += [_CONFIG_FLAGS[name], str(value)]
    return flags


def compare_table(rows: list[dict]) -> str:
    """The Markdown table of ``fastgrad compare``'s runs (its compare.json rows); bench/report.py
    renders the README's comparison from a committed compare.json with it."""
    table = [
        "| optimizer | final val loss | val perplexity | tokens/s | peak memory (MiB) | optimizer state (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['optimizer']} | {r['val_loss']:.4f} | {math.exp(r['val_loss']):.1f} | "
            f"{r['tokens'] / r['seconds']:,.0f} | {r['peak_memory_bytes'] / 2**20:,.0f} | "
            f"{r['optimizer_state_bytes'] / 2**20:,.2f} |"
        )
    return "\n".join(table)


def compare(args: argparse.Namespace) -> int:
    import subprocess

    from fastgrad.train.plot import plot_losses

    optims = [o.strip() for o in args.optims.split(",") if o.strip()]
    unknown = [o for o in optims if o not in OPTIMIZERS]
    if not optims or unknown:
        raise ValueError(f"--optims must list optimizers among {', '.join(OPTIMIZERS)}, got {args.optims!r}")
    explicit = _explicit_config(args)
    explicit.pop("optim", None)
    cfg = TrainConfig(**explicit).resolved()
    _validate(cfg)
    name = args.name or f"compare-{cfg.model}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out_dir = Path(args.out) / name
    if out_dir.exists():
        raise ValueError(f"comparison directory {out_dir} already exists; choose another --name")
    out_dir.mkdir(parents=True)
    rows = []
    for optim in optims:
        cmd = [sys.executable, "-m", "fastgrad.cli", "pretrain", "--optim", optim, *_as_flags(explicit)]
        cmd += ["--out", str(out_dir), "--name", optim] + (["--no-progress"] if args.no_progress else [])
        print(f"== {optim}: {' '.join(cmd[3:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise ValueError(f"the {optim} run failed; its output is above and its files are in {out_dir / optim}")
        summary = json.loads((out_dir / optim / "summary.json").read_text())
        rows.append({"optimizer": optim, **summary})
    text = compare_table(rows)
    (out_dir / "compare.md").write_text(text + "\n")
    (out_dir / "compare.json").write_text(json.dumps(rows, indent=1))
    plot_losses({o: out_dir / o / "metrics.jsonl" for o in optims}, out_dir / "compare.png", f"llama-{cfg.model}")
    print(text)
    print(f"table, JSON and plot in {out_dir}/ (compare.md, compare.json, compare.png)")
    return 0


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained run's model as a Hugging Face transformers folder",
        description="Write the model of RUN's last checkpoint as a folder that transformers' "
        "LlamaForCausalLM.from_pretrained and AutoTokenizer load: config.json, model.safetensors (fp32; INT8 "
        "weights de-quantized), tokenizer.json.",
    )
    p.add_argument("run", metavar="RUN", help="the run directory")
    p.add_argument("--to", choices=["hf"], default="hf", help="the format (hf: Hugging Face transformers)")
    p.add_argument("--out", required=True, help="the folder to create (must not exist)")


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="continue a prompt with a trained run's model")
    p.add_argument("run", metavar="RUN", help="the run directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampled")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")


def export(args: argparse.Namespace) -> int:
    from fastgrad.train.export import export_hf

    out = export_hf(Path(args.run), Path(args.out))
    print(f"wrote {out}/ (config.json, model.safetensors, tokenizer.json), for LlamaForCausalLM.from_pretrained")
    return 0


def sample(args: argparse.Namespace) -> int:
    from fastgrad.train.export import generate, load_run_model, run_tokenizer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    model, _ = load_run_model(Path(args.run))
    tokenizer = run_tokenizer(Path(args.run))
    ids = generate(model, tokenizer.encode(args.prompt).ids, args.max_new_tokens, args.temperature, args.seed)
    print(tokenizer.decode(ids))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastgrad", description="Memory-efficient LLM pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)
    _pretrain_parser(sub)
    _compare_parser(sub)
    _memory_parser(sub)
    _export_parser(sub)
    _sample_parser(sub)
    sub.add_parser("env", help="versions, devices and the backend serving each op")
    args = parser.parse_args(argv)
    try:
        if args.command == "env":
            from fastgrad.env import report

            print(report())
            return 0
        commands = {"memory": memory, "export": export, "sample": sample, "compare": compare, "pretrain": pretrain}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastgrad {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
