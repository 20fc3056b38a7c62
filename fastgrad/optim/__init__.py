"""Memory-efficient optimizers over low-rank gradient projections (GaLore, Q-GaLore, Fira, APOLLO,
FRUGAL with projected or block subspaces), 8-bit-moment GaLoreAdamW / AdamW, Muon (and Muon8bit), and
their projectors."""

from fastgrad.optim.apollo import Apollo, ApolloMini, apollo_param_groups
from fastgrad.optim.base import LowRankOptimizer, transfer_moments
from fastgrad.optim.fira import FiraAdamW
from fastgrad.optim.frugal import Frugal
from fastgrad.optim.frugal_block import FrugalBlock
from fastgrad.optim.galore import GaLoreAdamW
from fastgrad.optim.galore8bit import AdamW8bit, GaLoreAdamW8bit
from fastgrad.optim.galore_muon import GaLoreMuon, QGaLoreMuon, galore_muon_param_groups, qgalore_muon_param_groups
from fastgrad.optim.layerwise import (
    LayerwiseAsOptimizer,
    LayerwiseOptimizer,
    StepStats,
    StreamingLayerwiseOptimizer,
    layerwise,
)
from fastgrad.optim.muon import Muon, muon_param_groups
from fastgrad.optim.muon8bit import Muon8bit
from fastgrad.optim.param_groups import galore_param_groups, target_linear_weights
from fastgrad.optim.projectors import (  # noqa: F401 (in __all__ through PUBLIC_API)
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
from fastgrad.optim.projectors import PUBLIC_API as _PROJECTOR_API
from fastgrad.optim.qgalore import QGaLoreAdamW, QGaLoreAdamW8bit, qgalore_param_groups

__all__ = [
    "Muon",
    "GaLoreMuon",
    "galore_muon_param_groups",
    "QGaLoreMuon",
    "qgalore_muon_param_groups",
    "Muon8bit",
    "muon_param_groups",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "AdamW8bit",
    "QGaLoreAdamW",
    "QGaLoreAdamW8bit",
    "qgalore_param_groups",
    "layerwise",
    "LayerwiseOptimizer",
    "StreamingLayerwiseOptimizer",
    "LayerwiseAsOptimizer",
    "StepStats",
    "FiraAdamW",
    "Frugal",
    "FrugalBlock",
    "Apollo",
    "ApolloMini",
    "apollo_param_groups",
    "LowRankOptimizer",
    "galore_param_groups",
    "target_linear_weights",
    "transfer_moments",
    *_PROJECTOR_API,
]
