"""Metrics (accuracy, macro-F1, perplexity), the majority-class baseline, the final table and the plot."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean()) if len(gold) else float("nan")


def macro_f1(pred: Sequence[int], gold: Sequence[int], n_classes: int) -> float:
    """Mean over the classes present in gold or pred of F1 = 2 TP / (2 TP + FP + FN)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    scores = []
    for c in range(n_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def classification_metrics(logits: np.ndarray, gold: np.ndarray, n_classes: int) -> dict[str, float]:
    pred = np.asarray(logits).argmax(-1)
    return {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold, n_classes)}


def majority_baseline(train_labels: Sequence[int], test_labels: Sequence[int], n_classes: int) -> dict[str, Any]:
    """Always predict the most frequent training class."""
    majority = Counter(train_labels).most_common(1)[0][0]
    pred = [majority] * len(test_labels)
    return {"class": int(majority), "accuracy": accuracy(pred, test_labels),
            "macro_f1": macro_f1(pred, test_labels, n_classes)}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def final_table(metrics: dict[str, Any]) -> str:
    """method | trainable params | time | test metrics, with the baseline row for classification."""
    test = metrics["test"]
    params = f"{metrics['trainable_params']:,} ({100 * metrics['trainable_params'] / metrics['total_params']:.2f}%)"
    time = format_duration(metrics["train_seconds"])
    if "accuracy" in test:
        base = metrics["majority_baseline"]
        rows = [[metrics["method"], params, time, f"{test['accuracy']:.4f}", f"{test['macro_f1']:.4f}"],
                [f"majority class ({base['label']})", "-", "-", f"{base['accuracy']:.4f}", f"{base['macro_f1']:.4f}"]]
        return table(rows, ["method", "trainable params", "train time", "test accuracy", "test macro-F1"])
    rows = [[metrics["method"], params, time, f"{test['loss']:.4f}", f"{test['perplexity']:.2f}"]]
    if "base_model" in metrics:
        rows.append(["base model, untrained", "-", "-", f"{metrics['base_model']['loss']:.4f}",
                     f"{metrics['base_model']['perplexity']:.2f}"])
    return table(rows, ["method", "trainable params", "train time", "test loss", "test perplexity"])


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
