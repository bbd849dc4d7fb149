"""NEAT adapters through transformers' own PEFT integration: `model.load_adapter(dir)` and
`AutoModelFor....from_pretrained(adapter_dir)` (which reads base_model_name_or_path from adapter_config.json, loads
that base and puts the adapter in). Three files of one adapter: peft's PEANuT format (what save_pretrained writes
for a peft-compatible config), the LoRA that `export_lora` writes, and the NEAT format (axis "in", which peft's
PEANuT cannot compute; needs `neat_peft.register_with_peft()`). Each must give neat-peft's own outputs.
The base models are tiny random ones saved to tmp_path, so the tests run offline in a second.
"""

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import neat_peft  # noqa: E402
from neat_peft import NeatConfig, get_neat_model  # noqa: E402

neat_peft.register_with_peft()

FORMATS = {  # file format -> (how to write it, the adapter's axis, peft_type in adapter_config.json)
    "peanut": ("save_pretrained", "out", "PEANUT"),
    "lora": ("export_lora", "out", "LORA"),
    "neat": ("save_pretrained", "in", "NEAT"),
}


def _llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)


def _bert_classifier(path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(path)


def _write(fmt, model_class, base_dir, out_dir, **config):
    """Wrap the saved base with a random (B != 0) NEAT adapter, write it in `fmt`; returns the adapted logits."""
    how, axis, _ = FORMATS[fmt]
    neat = get_neat_model(model_class.from_pretrained(base_dir), NeatConfig(
        r=4, axis=axis, init_weights=False, base_model_name_or_path=str(base_dir), **config)).eval()
    getattr(neat, how)(out_dir)
    with torch.no_grad():
        return neat(**INPUTS).logits


INPUTS = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0)),
          "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}


def _check(fmt, out_dir, loaded, expected, base_logits):
    import json

    assert json.loads((out_dir / "adapter_config.json").read_text())["peft_type"] == FORMATS[fmt][2]
    with torch.no_grad():
        logits = loaded.eval()(**INPUTS).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter changes the outputs, so equality means something
    # peft's PEANuT materialises dW and adds W0 x + dW x; ours is W0 x + (x H) B^T: float rounding apart, the same
    tolerance = 1e-5 if fmt == "peanut" else 1e-6
    torch.testing.assert_close(logits, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_causal_lm_load_adapter_and_auto_from_pretrained(fmt, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    base_dir, out_dir = tmp_path / "base", tmp_path / "adapter"
    _llama(base_dir)
    expected = _write(fmt, LlamaForCausalLM, base_dir, out_dir, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        base_logits = LlamaForCausalLM.from_pretrained(base_dir).eval()(**INPUTS).logits

    model = LlamaForCausalLM.from_pretrained(base_dir)
    model.load_adapter(str(out_dir))
    _check(fmt, out_dir, model, expected, base_logits)

    auto = AutoModelForCausalLM.from_pretrained(out_dir)  # the adapter directory itself
    assert isinstance(auto, LlamaForCausalLM) and auto._hf_peft_config_loaded
    _check(fmt, out_dir, auto, expected, base_logits)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_sequence_classifier_with_trained_head(fmt, tmp_path):
    """The default `neat-peft train` shape: adapters on query/value plus a trained head (modules_to_save)."""
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    base_dir, out_dir = tmp_path / "base", tmp_path / "adapter"
    _bert_classifier(base_dir)
    torch.manual_seed(1)
    neat = get_neat_model(BertForSequenceClassification.from_pretrained(base_dir), NeatConfig(
        r=4, axis=FORMATS[fmt][1], init_weights=False, base_model_name_or_path=str(base_dir),
        target_modules=["query", "value"], modules_to_save=["classifier"]))
    with torch.no_grad():  # a trained head differs from the base's random one
        neat.base_model.classifier.copies["default"].weight.add_(0.5)
    neat.eval()
    getattr(neat, FORMATS[fmt][0])(out_dir)
    with torch.no_grad():
        expected = neat(**INPUTS).logits
        base_logits = BertForSequenceClassification.from_pretrained(base_dir).eval()(**INPUTS).logits

    model = BertForSequenceClassification.from_pretrained(base_dir)
    model.load_adapter(str(out_dir))
    _check(fmt, out_dir, model, expected, base_logits)
    _check(fmt, out_dir, AutoModelForSequenceClassification.from_pretrained(out_dir), expected, base_logits)
