"""The optimizers `fastgrad pretrain` can build, by name."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastgrad.train.config import TrainConfig


def _adamw(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _galore(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    from fastgrad.optim import GaLoreAdamW, galore_param_groups

    groups = galore_param_groups(model, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale)
    return GaLoreAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, Callable[[TrainConfig, torch.nn.Module], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "galore": _galore,
}


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optim not in OPTIMIZERS:
        raise ValueError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {cfg.optim!r}")
    return OPTIMIZERS[cfg.optim](cfg, model)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
