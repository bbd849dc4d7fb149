"""Every metric the CLI reports, on numpy only (scikit-learn and scipy are not in the [train] install).

Classification, from predicted class ids p and gold ids g over the classes C present in g or p:
  accuracy  = mean(p == g)
  macro_f1  = mean_{c in C} 2 TP_c / (2 TP_c + FP_c + FN_c)
  f1        = the same F1 for one positive class (GLUE's MRPC / QQP)
  matthews  = (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)), its multi-class form (Gorodkin's R_K)
Regression, from predictions x and gold y: pearson, spearman (pearson of average ranks, ties shared), mse.
tests/test_cli_metrics.py checks each against scikit-learn / scipy.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np

LOWER_IS_BETTER = ("mse", "loss")


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean()) if len(gold) else float("nan")


def _f1_of(pred: np.ndarray, gold: np.ndarray, c: int) -> float | None:
    tp = int(((pred == c) & (gold == c)).sum())
    fp = int(((pred == c) & (gold != c)).sum())
    fn = int(((pred != c) & (gold == c)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def macro_f1(pred: Sequence[int], gold: Sequence[int], n_classes: int) -> float:
    """Mean over the classes present in gold or pred of F1 = 2 TP / (2 TP + FP + FN)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    scores = [s for s in (_f1_of(pred, gold, c) for c in range(n_classes)) if s is not None]
    return float(np.mean(scores)) if scores else float("nan")


def binary_f1(pred: Sequence[int], gold: Sequence[int], positive: int) -> float:
    """F1 of the class `positive` (0 when it is neither predicted nor gold, scikit-learn's zero_division=0)."""
    score = _f1_of(np.asarray(pred), np.asarray(gold), positive)
    return float(score) if score is not None else 0.0


def matthews(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation, multi-class: (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = np.union1d(pred, gold)
    t = np.array([(gold == k).sum() for k in classes], dtype=np.float64)
    p = np.array([(pred == k).sum() for k in classes], dtype=np.float64)
    s, c = float(len(gold)), float((pred == gold).sum())
    denominator = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / denominator) if denominator else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """sum(dx dy) / (|dx| |dy|) with dx = x - mean(x), computed as scipy.stats.pearsonr 1.17 does it (each norm
    scaled by max |dx| first), so the value equals scipy's to the last bit."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    x_max, y_max = float(np.abs(dx).max()), float(np.abs(dy).max())
    if x_max == 0 or y_max == 0:  # a constant input: no correlation is defined
        return float("nan")
    norm = getattr(np.linalg, "vector_norm", np.linalg.norm)  # numpy >= 2 has scipy's own calls
    nx, ny = x_max * norm(dx / x_max), y_max * norm(dy / y_max)
    return float(np.clip(getattr(np, "vecdot", np.dot)(dx / nx, dy / ny), -1.0, 1.0))


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """The correlation of the average ranks, computed as scipy.stats.spearmanr 1.17 does it (numpy's corrcoef)."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if rx.min() == rx.max() or ry.min() == ry.max():  # a constant input: no correlation is defined
        return float("nan")
    return float(np.corrcoef(np.column_stack((rx, ry)), rowvar=False)[1, 0])


def classification(logits: np.ndarray, gold: np.ndarray, n_classes: int) -> dict[str, float]:
    """accuracy and macro-F1 of argmax(logits) (text-classification, the IDX image task)."""
    pred = np.asarray(logits).argmax(-1)
    return {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold, n_classes)}


def glue_classification(logits: np.ndarray, gold: np.ndarray, labels: list[str], pair: bool) -> dict[str, float]:
    """accuracy and macro-F1; for text pairs also Matthews and, with two classes, GLUE's F1 of label '1'."""
    pred, gold = np.asarray(logits).argmax(-1), np.asarray(gold).reshape(-1)
    out = {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold, len(labels))}
    if pair:
        out["matthews"] = matthews(pred, gold)
        if len(labels) == 2:  # GLUE's F1 (MRPC, QQP): of the positive class, label "1"
            out["f1"] = binary_f1(pred, gold, labels.index("1") if "1" in labels else 1)
    return out


def regression(predictions: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    pred = np.asarray(predictions).reshape(-1).astype(np.float64)
    gold = np.asarray(gold, dtype=np.float64).reshape(-1)
    return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold), "mse": float(np.mean((pred - gold) ** 2))}


def majority_baseline(train_labels: Sequence[int], test_labels: Sequence[int], n_classes: int) -> dict[str, Any]:
    """Always predict the most frequent training class."""
    majority = Counter(train_labels).most_common(1)[0][0]
    pred = [majority] * len(test_labels)
    return {"class": int(majority), "accuracy": accuracy(pred, test_labels),
            "macro_f1": macro_f1(pred, test_labels, n_classes)}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
