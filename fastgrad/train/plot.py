"""Loss curves as PNG (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_losses(runs: dict[str, Path], out: Path, title: str = "") -> None:
    """One PNG with the training loss (thin) and validation loss (markers) of each labelled run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, metrics_path in runs.items():
        records = read_metrics(metrics_path)
        line = ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, alpha=0.7)[0]
        val = [r for r in records if "val_loss" in r]
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, color=line.get_color(), label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "training (thin) and validation (dots) loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
