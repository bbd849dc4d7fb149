"""The method section of a recipe: NEAT's keys generated from NeatConfig, method.a_lr_ratio reaching the
optimizer's groups; and generation handing the model back in its mode."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cli_helpers import ROOT, make_tiny_bert


def _neat_classifier(tmp_path):
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


def test_recipe_neat_keys_are_neatconfigs_fields():
    """Every NeatConfig field the CLI does not set itself is a method.* key with NeatConfig's default and help."""
    import dataclasses

    from neat_peft import NeatConfig
    from neat_peft.cli import models, recipe

    owned = {"modules_to_save", "task_type", "inference_mode", "base_model_name_or_path", "init_weights"}
    fields = {f.name: f for f in dataclasses.fields(NeatConfig)}
    assert set(models.NEAT_FIELDS.values()) == set(fields) - owned
    for key, name in models.NEAT_FIELDS.items():
        default, _, help_text = recipe.SCHEMA[key]
        assert default == fields[name].default and help_text.startswith(fields[name].metadata["help"])


NEW_FIELD = """
import dataclasses, sys
import neat_peft
from neat_peft import NeatConfig

@dataclasses.dataclass
class Extended(NeatConfig):
    init_scale: float = dataclasses.field(default=1.0, metadata={"help": "Scale of A's initialisation."})

neat_peft.NeatConfig = Extended
from neat_peft.cli import models, recipe
config = recipe.resolve(None, ["method.init_scale=0.5"])
print(recipe.SCHEMA["method.init_scale"][2], models.neat_config(config, []).init_scale)
"""


def test_a_new_neatconfig_field_becomes_a_recipe_key():
    """A field added to NeatConfig (here by a subclass standing in for it) is a recipe key with its help, and its
    value reaches NeatConfig, with no edit of the CLI."""
    out = subprocess.run([sys.executable, "-c", NEW_FIELD], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "Scale of A's initialisation. 0.5"
