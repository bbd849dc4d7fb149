"""The CLI's metrics (numpy only, neat_peft/cli/metrics.py) equal scikit-learn's and scipy's to the last bit (the
paper tasks computed them with those libraries before, so a run's reported figures do not change)."""

from __future__ import annotations

import numpy as np
import pytest

from neat_peft.cli import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def test_classification_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_classes = int(rng.integers(2, 5))
        gold = rng.integers(0, n_classes, size=int(rng.integers(3, 80)))
        pred = np.where(rng.random(len(gold)) < 0.6, gold, rng.integers(0, n_classes, size=len(gold)))
        assert metrics.accuracy(pred, gold) == sklearn_metrics.accuracy_score(gold, pred)
        assert metrics.macro_f1(pred, gold, n_classes) == \
            sklearn_metrics.f1_score(gold, pred, average="macro", zero_division=0)
        assert metrics.matthews(pred, gold) == sklearn_metrics.matthews_corrcoef(gold, pred)
        assert metrics.binary_f1(pred, gold, 1) == sklearn_metrics.f1_score(gold == 1, pred == 1, zero_division=0)


def test_constant_predictions_score_like_scikit_learn():
    gold, pred = np.array([0, 1, 1, 0, 1]), np.zeros(5, dtype=int)
    assert metrics.matthews(pred, gold) == sklearn_metrics.matthews_corrcoef(gold, pred) == 0.0
    assert metrics.binary_f1(pred, gold, 1) == sklearn_metrics.f1_score(gold, pred, zero_division=0) == 0.0


def test_regression_metrics_equal_scipy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(3, 120))
        gold = np.round(rng.uniform(0, 5, size=n), int(rng.integers(0, 2)))  # rounded: ties, as STS-B scores have
        pred = (gold + rng.normal(0, 1, size=n)).astype(np.float32)  # a model's float32 outputs
        out = metrics.regression(pred, gold)
        assert out["pearson"] == stats.pearsonr(pred.astype(np.float64), gold)[0]
        assert out["spearman"] == stats.spearmanr(pred, gold)[0]
        assert out["mse"] == float(np.mean((pred.astype(np.float64) - gold) ** 2))


def test_glue_f1_is_of_label_1():
    labels = ["0", "1"]
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    gold = np.array([0, 1, 0, 1])
    out = metrics.glue_classification(logits, gold, labels, pair=True)
    assert out["f1"] == pytest.approx(sklearn_metrics.f1_score(gold, [0, 1, 1, 0]))
    assert set(metrics.glue_classification(logits, gold, labels, pair=False)) == {"accuracy", "macro_f1"}
