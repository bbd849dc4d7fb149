"""NEAT through transformers' own adapter API on a tiny Llama with SmolLM2's tokenizer (tests/hf_tiny.py), each
result compared with peft's PeftModel holding the same NEAT adapter (peft_type "NEAT", axis "in": only neat-peft
computes it).

transformers 5.24/5.25 refuse every released peft (newest 0.21.2) in add_adapter, set_adapter, enable_adapters,
disable_adapters, active_adapters, get_adapter_state_dict and delete_adapter ("please use a version >= 0.22.0",
LoRA included); load_adapter, Trainer and pipeline work. The refused ones are tested here and skip, with that
reason, exactly while transformers' own version check would refuse.
"""

import importlib.metadata

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hf_tiny import needs_tokenizer, save_base, tokenizer  # noqa: E402
from packaging.version import Version  # noqa: E402

from neat_peft import NeatConfig, NeatLayer  # noqa: E402

pytestmark = needs_tokenizer
MIN_PEFT = getattr(transformers.integrations.peft, "MIN_PEFT_VERSION", "0.0")
refused_by_transformers = pytest.mark.skipif(
    Version(importlib.metadata.version("peft")) < Version(MIN_PEFT),
    reason=f"transformers {transformers.__version__} refuses peft {importlib.metadata.version('peft')} here "
           f"(needs peft >= {MIN_PEFT}, not released yet); runs as soon as it is installed")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def ids():
    return tokenizer()(["the cat sat on", "a dog ran in the"], return_tensors="pt", padding=True)


def logits(model):
    with torch.no_grad():
        return model.eval()(**ids()).logits


@pytest.fixture
def dirs(tmp_path):
    """A saved base (with the tokenizer) and two NEAT adapters written by peft; their PeftModel logits."""
    from transformers import AutoModelForCausalLM

    base = save_base(tmp_path / "base", tokenizer())
    expected = {"base": logits(AutoModelForCausalLM.from_pretrained(base))}
    for seed, name in enumerate(("one", "two")):
        torch.manual_seed(seed)
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), NeatConfig(
            r=4, axis="in", target_modules=TARGETS, init_weights=False, scaling=0.5, task_type="CAUSAL_LM"))
        model.save_pretrained(tmp_path / name)
        tokenizer().save_pretrained(tmp_path / name)
        expected[name] = logits(model)
        assert (expected[name] - expected["base"]).abs().max() > 1e-2
    return base, tmp_path, expected


def loaded(base, path, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter(str(path), **kwargs)
    assert sum(isinstance(m, NeatLayer) for m in model.modules()) == 6
    return model


def test_load_adapter(dirs):
    base, root, expected = dirs
    torch.testing.assert_close(logits(loaded(base, root / "one")), expected["one"], rtol=0, atol=1e-6)


@refused_by_transformers
def test_set_enable_disable_adapters(dirs):
    base, root, expected = dirs
    model = loaded(base, root / "one", adapter_name="one")
    model.load_adapter(str(root / "two"), adapter_name="two")
    model.set_adapter("two")
    torch.testing.assert_close(logits(model), expected["two"], rtol=0, atol=1e-6)
    model.disable_adapters()
    torch.testing.assert_close(logits(model), expected["base"], rtol=0, atol=1e-6)
    model.enable_adapters()
    model.set_adapter("one")
    torch.testing.assert_close(logits(model), expected["one"], rtol=0, atol=1e-6)


@refused_by_transformers
def test_add_adapter_with_a_neat_config(dirs):
    from transformers import AutoModelForCausalLM

    base, _, expected = dirs
    model = AutoModelForCausalLM.from_pretrained(base)
    model.add_adapter(NeatConfig(r=4, target_modules=TARGETS))  # B = 0: the base model's outputs
    assert sum(isinstance(m, NeatLayer) for m in model.modules()) == 6
    torch.testing.assert_close(logits(model), expected["base"], rtol=0, atol=1e-6)


def test_trainer_on_a_loaded_adapter(dirs, tmp_path):
    """transformers' Trainer trains the NEAT adapter that load_adapter put in; the trained weights, loaded into a
    PeftModel, give the trained model's logits."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    base, root, _ = dirs
    model = loaded(base, root / "one", is_trainable=True)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    assert before and all("neat_" in k for k in before)
    batch = tokenizer()(["the cat sat on the mat", "a dog ran in the park"] * 2)
    data = Dataset.from_dict({**batch, "labels": batch["input_ids"]})
    trainer = Trainer(model=model, train_dataset=data, args=TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-2,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0] - 0.1, losses
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[k], after[k]) for k in before)
    # the same weights in a PeftModel, copied by name, compute the same logits
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(root / "one"))
    trained = {k: v for k, v in model.state_dict().items() if "neat_" in k}
    peft_state = {k.replace("base_model.model.", "", 1): v for k, v in reference.state_dict().items() if "neat_" in k}
    assert trained.keys() == peft_state.keys()
    with torch.no_grad():
        for key, value in reference.state_dict().items():
            if "neat_" in key:
                value.copy_(trained[key.replace("base_model.model.", "", 1)])
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-6)


def test_pipeline_text_generation_from_an_adapter_dir(dirs):
    """pipeline("text-generation", model=adapter_dir) reads base_model_name_or_path, loads the base, puts NEAT in:
    the greedy continuation is PeftModel's."""
    from transformers import AutoModelForCausalLM, pipeline

    base, root, _ = dirs
    generator = pipeline("text-generation", model=str(root / "one"))
    assert sum(isinstance(m, NeatLayer) for m in generator.model.modules()) == 6
    out = generator("the cat sat on", max_new_tokens=8, do_sample=False,
                    return_tensors=True)[0]["generated_token_ids"]
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(root / "one")).eval()
    prompt = tokenizer()(["the cat sat on"], return_tensors="pt")
    expected = reference.generate(**prompt, max_new_tokens=8, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    base_only = AutoModelForCausalLM.from_pretrained(base).eval().generate(**prompt, max_new_tokens=8,
                                                                          do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert not torch.equal(expected, base_only)  # the adapter changes the continuation
    assert list(out)[-len(expected):] == expected.tolist()
