"""Selecting the weights that get low-rank treatment (the references' "attn"/"mlp" rule, docs/algorithms.md §1.2)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["target_linear_weights", "galore_param_groups"]


def target_linear_weights(model: nn.Module, target_modules: str | Iterable[str]) -> list[torch.Tensor]:
    """Weights of the ``nn.Linear`` modules whose qualified name matches any of ``target_modules``.

    A pattern matches when ``re.search(pattern, name)`` does, so a plain substring ("attn") works
    as in the references and a regex ("layers\\.[0-3]\\..*proj$") narrows it. Trainable weights
    only, each once (tied weights are not repeated), in module order.
    """
    patterns = [re.compile(p) for p in ([target_modules] if isinstance(target_modules, str) else target_modules)]
    seen: set[int] = set()
    selected = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not any(p.search(name) for p in patterns):
            continue
        w = module.weight
        if w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            selected.append(w)
    return selected


def galore_param_groups(
    model: nn.Module,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    target_modules: str | Iterable[str] = ("attn", "mlp"),
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """``[low-rank group, rest group]`` for the GaLore-family optimizers.

    The low-rank group holds the targeted Linear weights (see :func:`target_linear_weights`) with
    ``rank``, ``update_proj_gap``, ``scale`` and ``group_kwargs`` (e.g. ``projector="dct"``,
    ``proj_side="right"``, ``lr=...``); the rest group holds every other trainable parameter
    (embeddings, norms, biases, the output head) with the optimizer's defaults.
    """
    group = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, **group_kwargs}
    return lowrank_and_rest(model, target_linear_weights(model, target_modules), group)


def lowrank_and_rest(model: nn.Module, lowrank: list[torch.Tensor], options: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{"params": lowrank, **options}, {"params": every other trainable parameter of model}]``,
    each parameter once (tied weights are not repeated)."""
    chosen = {id(p) for p in lowrank}
    rest = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in chosen:
            chosen.add(id(p))
            rest.append(p)
    return [{"params": lowrank, **options}, {"params": rest}]
