"""The CLI's metrics (numpy only, neat_peft/cli/metrics.py) against scikit-learn and scipy, the CLI's
a_lr_ratio optimizer groups, and generation restoring the model's mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def _neat_classifier(tmp_path):
    from cli_helpers import make_tiny_bert

    from neat_peft.cli import models, recipe

    config = recipe.resolve(None, [f"model.name={make_tiny_bert(tmp_path / 'bert')}", "method.a_lr_ratio=4",
                                   "train.lr=1e-3", "train.head_lr=5e-3"])
    model = models.load_base_model(config, ["a", "b", "c"])
    return config, *models.apply_method(model, config)


def test_a_lr_ratio_gives_neat_a_its_own_learning_rate(tmp_path):
    """method.a_lr_ratio=4: every NEAT A weight trains at 4 * train.lr, every other adapter tensor at train.lr,
    the head at train.head_lr (the groups the trainer hands to AdamW)."""
    from transformers import TrainingArguments

    from neat_peft.cli.trainer import make_trainer_class

    config, model, info = _neat_classifier(tmp_path)
    trainer = make_trainer_class()(model=model, args=TrainingArguments(str(tmp_path / "out"), learning_rate=1e-3,
                                                                       report_to="none", use_cpu=True),
                                   heads=info["heads"], head_lr=5e-3, a_lr_ratio=4.0)
    groups = trainer.create_optimizer().param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert sorted(by_lr) == [1e-3, 4e-3, 5e-3]
    assert by_lr[4e-3] and all(".neat_A." in n for n in by_lr[4e-3])
    assert by_lr[1e-3] and not any(".neat_A." in n for n in by_lr[1e-3])
    assert by_lr[5e-3] and all("classifier" in n for n in by_lr[5e-3])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(n for g in by_lr.values() for n in g) == trainable
    a_weights = sorted(n for n in trainable if ".neat_A." in n)
    assert by_lr[4e-3] == a_weights  # every A weight is in the A group


def test_a_lr_ratio_is_refused_for_other_methods():
    from neat_peft.cli import recipe
    from neat_peft.cli.errors import CliError

    with pytest.raises(CliError, match=r"method.a_lr_ratio.*method.name is lora"):
        recipe.resolve(None, ["method.name=lora", "method.a_lr_ratio=2"])
    with pytest.raises(CliError, match="a_lr_ratio' must be greater than 0"):
        recipe.resolve(None, ["method.a_lr_ratio=0"])
    assert recipe.resolve(None, ["method.name=lora", "method.a_lr_ratio=1"])["method.a_lr_ratio"] == 1


def test_generation_restores_training_mode_when_it_fails():
    """A generate() that raises still hands the model back in training mode."""
    from neat_peft.cli.generation import generate

    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, **kwargs):
            raise RuntimeError("out of memory")

    class Tok:
        padding_side, pad_token_id = "right", 0

        def pad(self, batch, padding, return_tensors):
            return {"input_ids": torch.tensor(batch["input_ids"])}

    model = Failing().train()
    with pytest.raises(RuntimeError, match="out of memory"):
        generate(model, Tok(), [[1, 2]], max_new_tokens=2, batch_size=1)
    assert model.training
