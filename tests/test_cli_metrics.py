"""The CLI's metrics (numpy only, neat_peft/cli/metrics.py) against scikit-learn and scipy."""

from __future__ import annotations

import numpy as np
import pytest

from neat_peft.cli import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 5))
    gold = rng.integers(0, n_classes, size=int(rng.integers(5, 60)))
    pred = np.where(rng.random(len(gold)) < 0.6, gold, rng.integers(0, n_classes, size=len(gold)))
    assert metrics.accuracy(pred, gold) == pytest.approx(sklearn_metrics.accuracy_score(gold, pred), abs=1e-15)
    assert metrics.macro_f1(pred, gold, n_classes) == pytest.approx(
        sklearn_metrics.f1_score(gold, pred, average="macro", zero_division=0), rel=1e-12)
    assert metrics.matthews(pred, gold) == pytest.approx(sklearn_metrics.matthews_corrcoef(gold, pred), rel=1e-12,
                                                        abs=1e-15)
    assert metrics.binary_f1(pred, gold, 1) == pytest.approx(
        sklearn_metrics.f1_score(gold == 1, pred == 1, zero_division=0), rel=1e-12)


def test_constant_predictions_score_like_scikit_learn():
    gold, pred = np.array([0, 1, 1, 0, 1]), np.zeros(5, dtype=int)
    assert metrics.matthews(pred, gold) == sklearn_metrics.matthews_corrcoef(gold, pred) == 0.0
    assert metrics.binary_f1(pred, gold, 1) == sklearn_metrics.f1_score(gold, pred, zero_division=0) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_regression_metrics_equal_scipy(seed):
    rng = np.random.default_rng(seed)
    gold = np.round(rng.uniform(0, 5, size=40), 1)  # rounded: ties, as STS-B scores have
    pred = np.round(gold + rng.normal(0, 1, size=40), 1)
    out = metrics.regression(pred, gold)
    assert out["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0], rel=1e-12)
    assert out["spearman"] == pytest.approx(stats.spearmanr(pred, gold)[0], rel=1e-12)
    assert out["mse"] == pytest.approx(float(np.mean((pred - gold) ** 2)), rel=1e-15)


def test_glue_f1_is_of_label_1():
    labels = ["0", "1"]
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    gold = np.array([0, 1, 0, 1])
    out = metrics.glue_classification(logits, gold, labels, pair=True)
    assert out["f1"] == pytest.approx(sklearn_metrics.f1_score(gold, [0, 1, 1, 0]))
    assert set(metrics.glue_classification(logits, gold, labels, pair=False)) == {"accuracy", "macro_f1"}
