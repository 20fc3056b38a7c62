"""Configuration of a pretraining run, with per-model defaults from the published recipes.

Recipes (docs/algorithms.md §9.1): LLaMA 60M/130M/350M/1B/7B on C4 with sequence length 256, cosine
schedule to 10% of the peak with 10% warmup. GaLore/Q-GaLore/Fira: lr 0.01, scale 0.25 (Fira
0.0625 at 1B/7B), projector refresh every 200 steps (500 at 7B), rank 128/256/256/512/1024.
APOLLO: rank 128/192/256/256/256, scale 1; APOLLO-Mini: rank 1, scale 128. FRUGAL: density 0.25,
lr 1e-3. AdamW baselines (adamw, adamw8bit) use lr 1e-3; galore8bit follows the GaLore recipe.
Muon (Keller Jordan's recipe): lr 0.02 for the attention and MLP weights (steps scaled by
√max(1, m/n)), AdamW at lr 1e-3 for the embedding, head and norms; muon8bit likewise, and
galore-muon (Muon in a GaLore subspace: the GaLore recipe's rank and refresh gap, scale 1) and
q-galore-muon (the same with INT8 weights and the INT4 projector).
``tiny`` is sized so that the default run finishes in minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

RANK = {"tiny": 32, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
APOLLO_RANK = {"tiny": 32, "60m": 128, "130m": 192, "350m": 256, "1b": 256, "7b": 256}
UPDATE_PROJ_GAP = {"tiny": 50, "7b": 500}  # others: 200
# scale α by optimizer (Fira uses 0.0625 at 1B and 7B); APOLLO's enters as √α.
SCALE = {
    "galore": 0.25,
    "galore8bit": 0.25,
    "q-galore": 0.25,
    "q-galore8bit": 0.25,
    "fira": 0.25,
    "apollo": 1.0,
    "apollo-mini": 128.0,
}
FIRA_LARGE_SCALE = {"1b": 0.0625, "7b": 0.0625}
DEFAULT_STEPS = {"tiny": 300, "60m": 10_000, "130m": 20_000, "350m": 60_000, "1b": 100_000, "7b": 150_000}
LOW_RANK_LR = 0.01  # GaLore/Q-GaLore/Fira/APOLLO recipes
FULL_RANK_LR = 1e-3  # AdamW recipes
MUON_LR = 0.02  # Muon's orthogonalized steps
# The Muon family's AdamW group (embeddings, norms, head): the lr GaLore's recipe gives the same
# parameters, so the comparison with GaLore differs in the attention and MLP updates alone.
MUON_ADAMW_LR = LOW_RANK_LR


@dataclass
class TrainConfig:
    """Everything that determines a run; saved as runs/<name>/config.json and checked on resume."""

    model: str = "tiny"
    optim: str = "q-galore"
    rank: int | None = None  # None: the model's recipe rank
    update_proj_gap: int | None = None
    scale: float | None = None  # None: the optimizer's recipe scale
    lr: float | None = None  # None: the optimizer's recipe lr
    min_lr_ratio: float = 0.1
    warmup: float = 0.1  # fraction of the steps when < 1, else a step count
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0: no clipping (the norm is still computed, to catch NaN/Inf)
    grad_accum: int = 1
    batch_size: int = 16
    seq_len: int = 128
    steps: int | None = None
    tokens: int | None = None  # alternative to steps
    # The step count the learning-rate schedule was planned for, when a finished run was extended
    # (``--resume RUN --steps N``): the cosine keeps this horizon and the extra steps run at its
    # floor, so the steps already taken keep their learning rates. None: ``steps``.
    schedule_steps: int | None = None
    dtype: str | None = None  # None: bfloat16 on GPU, float32 on CPU
    seed: int = 0
    compile: bool = False
    activation_checkpointing: bool = False
    layerwise: bool = False
    # With layerwise: update each weight in its gradient hook during backward and free its gradient at
    # once (fastgrad.optim.layerwise "Streaming"): no clipping (grad_clip must be 0), NaN/Inf per weight.
    layerwise_streaming: bool = False
    # GaLore-type optimizers: the attention/MLP Linear layers compute the projected gradient
    # themselves between refreshes (fastgrad.nn.lowrank); Q-GaLore's QLinear always does.
    lowrank_grad: bool = True
    # Shard weights, gradients and optimizer states over the processes (FSDP2, fully_shard), with
    # sharded checkpoints (torch.distributed.checkpoint) that resume on any number of processes.
    fsdp: bool = False
    # With fsdp: compute (and all-gather the weights) in this dtype ("bfloat16", "float16"), keep the
    # weights and optimizer states in `dtype` (float32 by default then) and reduce gradients in fp32.
    mixed_precision: str | None = None
    max_memory_gb: float | None = None
    data: str | None = None
    tokenizer: str | None = None
    vocab_size: int = 8192
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 200
    keep_checkpoints: int = 1  # the last k checkpoints: checkpoint/ and checkpoint-<step>/ for the older ones
    log_to: str | None = None  # "tensorboard": also write the metrics as TensorBoard events (run_dir/tensorboard)
    device: str | None = None
    extra: dict = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with every None default replaced by the model's recipe value."""
        cfg = dataclasses.replace(self)
        name = cfg.model.lower().removeprefix("llama-")
        cfg.model = name
        # FRUGAL sizes each subspace (or window of tensors) by density instead of a rank.
        if cfg.rank is None and cfg.optim not in ("frugal", "frugal-block"):
            if cfg.optim == "apollo-mini":
                cfg.rank = 1
            else:
                cfg.rank = (APOLLO_RANK if cfg.optim == "apollo" else RANK).get(name, 128)
        if cfg.scale is None:
            cfg.scale = FIRA_LARGE_SCALE.get(name, SCALE["fira"]) if cfg.optim == "fira" else SCALE.get(cfg.optim, 1.0)
        if cfg.update_proj_gap is None:
            cfg.update_proj_gap = UPDATE_PROJ_GAP.get(name, 200)
        if cfg.lr is None:
            full_rank = ("adamw", "adamw8bit", "frugal", "frugal-block")
            muon = ("muon", "muon8bit", "galore-muon", "q-galore-muon")
            cfg.lr = MUON_LR if cfg.optim in muon else FULL_RANK_LR if cfg.optim in full_rank else LOW_RANK_LR
        if cfg.steps is None:
            # --batch-size is per process: under torchrun a step takes WORLD_SIZE times as many tokens.
            world = int(os.environ.get("WORLD_SIZE", "1"))
            tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * world
            cfg.steps = -(-cfg.tokens // tokens_per_step) if cfg.tokens else DEFAULT_STEPS.get(name, 1000)
        return cfg

    def layerwise_streaming_error(self) -> str | None:
        """Why ``layerwise_streaming`` cannot be used with the rest of this config (None: it can)."""
        if not self.layerwise_streaming:
            return None
        if not self.layerwise:
            return "--layerwise-streaming is a mode of the layer-wise driver: add --layerwise"
        if self.grad_clip > 0:
            return (
                f"--layerwise-streaming cannot clip gradients (--grad-clip {self.grad_clip}): each weight is updated "
                "during backward, before the global gradient norm is known; use --grad-clip 0 (off, the default) "
                "with --layerwise-streaming, or --layerwise without --layerwise-streaming to clip"
            )
        return None

    def fsdp_error(self) -> str | None:
        """Why ``fsdp`` cannot be used with the rest of this config (None: it can)."""
        if not self.fsdp:
            if self.mixed_precision:
                return "--mixed-precision is FSDP2's (MixedPrecisionPolicy): add --fsdp"
            return None
        if self.layerwise:
            return "--fsdp with --layerwise is not supported yet: drop one of them"
        if self.mixed_precision and self.dtype not in (None, "float32"):
            return (
                f"--mixed-precision {self.mixed_precision} keeps the weights in --dtype, which must then be float32 "
                f"(got --dtype {self.dtype})"
            )
        return None

    def horizon(self) -> int:
        """The step count the learning-rate schedule decays over (see ``schedule_steps``)."""
        return self.schedule_steps or self.steps

    def warmup_steps(self) -> int:
        return int(self.warmup * self.horizon()) if self.warmup < 1 else int(self.warmup)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config.json has unknown keys {sorted(unknown)}")
        return cls(**d)
