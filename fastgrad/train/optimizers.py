"""The optimizers `fastgrad pretrain` can build, by name."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastgrad.train.config import MUON_ADAMW_LR, TrainConfig

QLINEAR_GROUP_SIZE = 256  # Q-GaLore's INT8 weights: groups of 256 values along each row


def _adamw(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _adamw8bit(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (torch's update rule) with 8-bit blockwise moments for tensors of ≥ 4096 elements."""
    from fastgrad.optim import AdamW8bit

    return AdamW8bit(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


# The optimizers whose targeted Linear layers compute R themselves with cfg.lowrank_grad.
LOWRANK_GRAD = ("galore", "galore8bit", "galore-muon")
# The optimizers that train INT8 weights: their targeted Linear layers become QLinear.
QUANTIZED = ("q-galore", "q-galore8bit", "q-galore-muon")


def convert_layers(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Swap the targeted Linear layers (attention and MLP projections) for the optimizer's layers, in
    place: QLinear (INT8 weights) for Q-GaLore; LowRankGradLinear (R = down(G, P) in backward, same
    parameters; fastgrad.nn.lowrank) with cfg.lowrank_grad for the optimizers of LOWRANK_GRAD. A
    model already converted is left as it is, so this runs before sharding and again when the
    optimizer is built."""
    if cfg.optim in QUANTIZED:
        from fastgrad.nn import quantize_model

        quantize_model(model, group_size=QLINEAR_GROUP_SIZE)
    elif cfg.lowrank_grad and cfg.optim in LOWRANK_GRAD:
        from fastgrad.nn import lowrank_grad_model

        lowrank_grad_model(model)


def _galore(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Converts the attention and MLP Linear layers to LowRankGradLinear (in place) first, unless
    --no-lowrank-grad."""
    from fastgrad.optim import GaLoreAdamW, galore_param_groups

    convert_layers(cfg, model)
    groups = galore_param_groups(model, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale)
    return GaLoreAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _galore8bit(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """GaLoreAdamW with 8-bit blockwise moments (projected moments of ≥ 4096 elements)."""
    from fastgrad.optim import GaLoreAdamW8bit, galore_param_groups

    convert_layers(cfg, model)
    groups = galore_param_groups(model, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale)
    return GaLoreAdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _fira(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    from fastgrad.optim import FiraAdamW, galore_param_groups

    groups = galore_param_groups(model, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale)
    return FiraAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _apollo(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    from fastgrad.optim import Apollo, ApolloMini, apollo_param_groups

    groups = apollo_param_groups(model, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale)
    cls = ApolloMini if cfg.optim == "apollo-mini" else Apollo
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _frugal(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """State-full AdamW in a subspace of density 0.25 per weight (or --rank), signSGD on the rest."""
    from fastgrad.optim import Frugal, galore_param_groups

    size = {"rank": cfg.rank} if cfg.rank is not None else {"rank": None, "density": 0.25}
    groups = galore_param_groups(model, update_proj_gap=cfg.update_proj_gap, **size)
    return Frugal(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _frugal_block(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The paper's pre-training FRUGAL: AdamW on a descending window of 25% of the attention/MLP
    weights, re-chosen every --update-proj-gap steps, signSGD on the others."""
    from fastgrad.optim import FrugalBlock, galore_param_groups

    lowrank, rest = galore_param_groups(model, rank=1)
    block = {"params": lowrank["params"], "density": 0.25, "update_proj_gap": cfg.update_proj_gap}
    return FrugalBlock([block, rest], lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed)


def _qgalore(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Converts the model's attention and MLP Linear layers to INT8 QLinear (in place) first."""
    from fastgrad.optim import QGaLoreAdamW, QGaLoreAdamW8bit, qgalore_param_groups

    convert_layers(cfg, model)
    groups = qgalore_param_groups(
        model, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale, seed=cfg.seed
    )
    if cfg.optim == "q-galore8bit":  # the recipe's optimizer: 8-bit Adam moments too
        return QGaLoreAdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return QGaLoreAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _muon(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Muon (lr = cfg.lr, 0.02 by default, steps scaled by √max(1, m/n)) on the attention and MLP
    weights, AdamW at MUON_ADAMW_LR (GaLore's 0.01) on the rest; the same weight decay for both.
    muon8bit: Muon8bit (8-bit momentum buffers, 8-bit AdamW moments; tensors of ≥ 4096 elements)."""
    from fastgrad.optim import Muon, Muon8bit, muon_param_groups

    groups = muon_param_groups(model, lr=MUON_ADAMW_LR)
    cls = Muon8bit if cfg.optim == "muon8bit" else Muon
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _galore_muon(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """GaLoreMuon (lr = cfg.lr, 0.02 by default; rank, refresh gap and scale as cfg) on the attention
    and MLP weights, converted to LowRankGradLinear first unless --no-lowrank-grad; AdamW at
    MUON_ADAMW_LR on the rest."""
    from fastgrad.optim import GaLoreMuon, galore_muon_param_groups

    convert_layers(cfg, model)
    groups = galore_muon_param_groups(
        model, cfg.rank, cfg.update_proj_gap, cfg.scale, adamw_options={"lr": MUON_ADAMW_LR}
    )
    return GaLoreMuon(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _qgalore_muon(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """QGaLoreMuon: GaLoreMuon on INT8 QLinear weights (converted in place first) with the INT4
    projector and adaptive refresh interval; AdamW at MUON_ADAMW_LR on the rest."""
    from fastgrad.optim import QGaLoreMuon, qgalore_muon_param_groups

    convert_layers(cfg, model)
    groups = qgalore_muon_param_groups(
        model, cfg.rank, cfg.update_proj_gap, cfg.scale, adamw_options={"lr": MUON_ADAMW_LR}, seed=cfg.seed
    )
    return QGaLoreMuon(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, Callable[[TrainConfig, torch.nn.Module], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "galore": _galore,
    "galore8bit": _galore8bit,
    "q-galore": _qgalore,
    "q-galore8bit": _qgalore,
    "fira": _fira,
    "apollo": _apollo,
    "apollo-mini": _apollo,
    "frugal": _frugal,
    "frugal-block": _frugal_block,
    "muon": _muon,
    "muon8bit": _muon,
    "galore-muon": _galore_muon,
    "q-galore-muon": _qgalore_muon,
}
# Optimizers whose layer-wise mode (fastgrad.optim.layerwise) is supported.
LAYERWISE = {
    "galore", "galore8bit", "q-galore", "q-galore8bit", "fira", "apollo", "apollo-mini",
    "muon", "muon8bit", "galore-muon", "q-galore-muon",
}  # fmt: skip


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optim not in OPTIMIZERS:
        raise ValueError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {cfg.optim!r}")
    return OPTIMIZERS[cfg.optim](cfg, model)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state, on this process (a DTensor's local shard)."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    from fastgrad.optim.sharding import local

    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += local(value).numel() * value.element_size()
    return total
