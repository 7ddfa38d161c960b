"""Loss and accuracy curves of a run from its metrics records (matplotlib, imported lazily).

The gradient-health picture (`grad_norms.png`) is gradxform's own `gradxform.plots.plot_health`,
drawn from the same records: they hold `gx.read_health`'s names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training loss and accuracy per logged step, test accuracy where evaluated."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [r["loss"] for r in records], label="train")
    ax_acc.plot(steps, [r["accuracy"] for r in records], label="train")
    tested = [r for r in records if "test_loss" in r]
    if tested:
        test_steps = [r["step"] for r in tested]
        ax_loss.plot(test_steps, [r["test_loss"] for r in tested], "o-", label="test")
        ax_acc.plot(test_steps, [r["test_accuracy"] for r in tested], "o-", label="test")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.01))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
