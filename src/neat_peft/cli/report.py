"""What a run prints and draws: tables, durations and the training-curve plot (metrics.py computes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def params_cell(result: dict[str, Any]) -> str:
    """'trainable (percent of all)' for a final table."""
    return f"{result['trainable_params']:,} ({100 * result['trainable_params'] / result['total_params']:.2f}%)"


def plot_curves(log_history: list[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    """Training loss and the validation metric against the optimizer step, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    val = [(h["step"], h[f"eval_{metric}"]) for h in log_history if f"eval_{metric}" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        left.plot(*zip(*train), marker=".", color="tab:blue")
    left.set(xlabel="step", ylabel="training loss", title="training loss")
    if val:
        right.plot(*zip(*val), marker="o", color="tab:orange")
    right.set(xlabel="step", ylabel=f"validation {metric}", title=f"validation {metric}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
