"""Memory-efficient optimizers over low-rank gradient projections (GaLore family) and their projectors."""

from fastgrad.optim.base import LowRankOptimizer, transfer_moments
from fastgrad.optim.galore import GaLoreAdamW
from fastgrad.optim.param_groups import galore_param_groups, target_linear_weights
from fastgrad.optim.projectors import (
    PROJECTORS,
    DCTProjector,
    Projector,
    RandomizedProjector,
    RandomProjector,
    SVDProjector,
    dct_basis,
    make_projector,
    resolve_side,
)

__all__ = [
    "GaLoreAdamW",
    "LowRankOptimizer",
    "galore_param_groups",
    "target_linear_weights",
    "transfer_moments",
    "PROJECTORS",
    "Projector",
    "SVDProjector",
    "RandomizedProjector",
    "DCTProjector",
    "RandomProjector",
    "make_projector",
    "resolve_side",
    "dct_basis",
]
