"""Published memory figures of the methods fastgrad implements, which ``fastgrad memory`` prints
beside its estimate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastgrad.train.memory.model import MemoryBreakdown

# ------------------------------------------------------------------------------------------------
# published figures (docs/algorithms.md §9)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anchor:
    """A memory figure a paper or reference repository states (as docs/algorithms.md §9 quotes it).

    ``quantity`` says what it measures, and so which of our numbers it is printed beside: "peak"
    (a training run's peak; its setting rarely matches yours), "weights+states" (the papers' memory
    estimates: weights and optimizer states, BF16), "weights+states+grads", "states" (optimizer
    states only)."""

    model: str
    optims: tuple[str, ...]  # the fastgrad optimizers it is the published counterpart of
    method: str  # as the source names it
    figure: str  # GB, as printed by the source
    quantity: str
    setting: str
    source: str

    def ours(self, b: MemoryBreakdown) -> int:
        if self.quantity == "peak":
            return b.peak
        if self.quantity == "states":
            return b.optimizer_states
        if self.quantity == "weights+states+grads":
            return b.weights + b.optimizer_states + b.gradients
        return b.weights + b.optimizer_states


_G8, _A8 = ("galore", "galore8bit"), ("adamw", "adamw8bit")
ANCHORS: tuple[Anchor, ...] = (
    # LLaMA-7B (docs/algorithms.md §9.2)
    Anchor(
        "7b",
        ("q-galore", "q-galore8bit"),
        "Q-GaLore",
        "15.26",
        "peak",
        "batch 16, activation checkpointing, A6000",
        "Q-GaLore README",
    ),
    Anchor(
        "7b", ("q-galore", "q-galore8bit"), "Q-GaLore", "15", "weights+states", "memory estimate", "Q-GaLore Table 2"
    ),
    Anchor("7b", _G8 + ("q-galore",), "8-bit GaLore", "18", "weights+states", "memory estimate", "GaLore Table 3"),
    Anchor(
        "7b",
        _G8,
        "8-bit GaLore, layer-wise",
        "22.0",
        "peak",
        "token batch ≤ ~500, no checkpointing",
        "GaLore §5.5/Fig. 1",
    ),
    Anchor(
        "7b",
        _G8,
        "8-bit GaLore, layer-wise",
        "22.8",
        "peak",
        "batch 16, activation checkpointing, RTX 4090",
        "GaLore README",
    ),
    Anchor("7b", _G8, "8-bit GaLore", "4.9", "states", "optimizer states", "APOLLO Table 3"),
    Anchor("7b", _A8, "8-bit Adam", "26", "weights+states", "memory estimate", "GaLore Table 3"),
    Anchor("7b", _A8, "8-bit Adam", "13", "states", "optimizer states", "APOLLO Table 3"),
    Anchor(
        "7b",
        ("adamw",),
        "BF16 Adam",
        "22.0 + 37.92",
        "peak",
        "8-bit GaLore's 22.0 GB plus its stated saving over BF16 Adam (63.3%)",
        "GaLore §5.5",
    ),
    Anchor("7b", ("apollo",), "APOLLO", "1.6", "states", "optimizer states", "APOLLO Table 3"),
    Anchor("7b", ("apollo-mini",), "APOLLO-Mini", "0.0", "states", "optimizer states", "APOLLO Table 3"),
    Anchor("7b", ("apollo-mini",), "Q-APOLLO-Mini", "< 12", "peak", "INT8 weights, layer-wise updates", "APOLLO"),
    # LLaMA-1B measured (docs/algorithms.md §9.3): token batch 256, single device
    Anchor("1b", ("adamw",), "AdamW", "13.60", "peak", "token batch 256", "GaLore Table 11"),
    Anchor("1b", ("adamw8bit",), "Adam8bit", "9.54", "peak", "token batch 256", "GaLore Table 11"),
    Anchor("1b", _G8, "8-bit GaLore", "7.95", "peak", "token batch 256", "GaLore Table 11"),
    Anchor("1b", ("adamw",), "AdamW, layer-wise", "9.63", "peak", "token batch 256", "GaLore Table 11"),
    Anchor("1b", ("adamw8bit",), "Adam8bit, layer-wise", "6.93", "peak", "token batch 256", "GaLore Table 11"),
    Anchor("1b", _G8, "8-bit GaLore, layer-wise", "5.63", "peak", "token batch 256", "GaLore Table 11"),
    Anchor("1b", ("adamw",), "AdamW", "25.6", "peak", "peak allocated, setting not stated", "torchao GaLore README"),
    Anchor("1b", ("galore",), "GaLoreAdamW r128", "15.3", "peak", "peak allocated", "torchao GaLore README"),
    Anchor("1b", ("adamw8bit",), "bnb AdamW8bit", "13.6", "peak", "peak allocated", "torchao GaLore README"),
    Anchor("1b", ("galore8bit",), "GaLore AdamW8bit", "14.2", "peak", "peak allocated", "torchao GaLore README"),
)
# C4 pre-training tables (docs/algorithms.md §9.1): memory estimates of weights + optimizer states in BF16, and Fira's
# with gradients, for 60M / 130M / 350M / 1B.
for _method, _optims, _figures, _quantity, _source in (
    ("Full-rank Adam", ("adamw",), ("0.36", "0.76", "2.06", "7.80"), "weights+states", "GaLore Table 2"),
    ("GaLore", ("galore",), ("0.24", "0.52", "1.22", "4.38"), "weights+states", "GaLore Table 2"),
    ("Q-GaLore", ("q-galore", "q-galore8bit"), ("0.18", "0.39", "0.88", "3.08"), "weights+states", "Q-GaLore Table 1"),
    ("APOLLO", ("apollo",), ("0.24", "0.52", "1.22", "4.38"), "weights+states", "APOLLO Table 2"),
    ("APOLLO-Mini", ("apollo-mini",), ("0.12", "0.25", "0.69", "2.60"), "weights+states", "APOLLO Table 2"),
    ("Full-rank", ("adamw",), ("0.48", "1.01", "2.74", "10.40"), "weights+states+grads", "Fira Table 3"),
    ("GaLore & Fira", ("galore", "fira"), ("0.36", "0.77", "1.90", "6.98"), "weights+states+grads", "Fira Table 3"),
):
    ANCHORS += tuple(
        Anchor(model, _optims, _method, figure, _quantity, "memory estimate, BF16", _source)
        for model, figure in zip(("60m", "130m", "350m", "1b"), _figures, strict=True)
    )


def anchors_for(model: str, optim: str) -> list[Anchor]:
    """The published figures for ``model`` whose method is ``optim``'s counterpart."""
    key = model.lower().removeprefix("llama-")
    return [a for a in ANCHORS if a.model == key and optim in a.optims]
