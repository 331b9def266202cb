"""Matplotlib, headless, set up once; and the loss curve every run logs."""

from __future__ import annotations

import math
import os
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(history: list[dict], best_step: int | None, early_stop_step: int | None, path: Path) -> Path:
    """Train and val loss against the optimizer step, with the best and the early-stop steps marked."""
    plt = pyplot()
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h.get("train_loss", math.nan) for h in history], label="train (mean since last eval)")
    ax.plot(steps, [h["val_loss"] for h in history], label="val (fixed slice)")
    if best_step is not None:
        ax.axvline(best_step, color="green", ls=":", label=f"best step {best_step}")
    if early_stop_step is not None:
        ax.axvline(early_stop_step, color="red", ls="--", label=f"early stop {early_stop_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
