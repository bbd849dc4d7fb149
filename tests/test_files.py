"""Adapter files: our round trip, atomic saves, and LoRA export loaded by real peft."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from neat_testing import dir_snapshot
from neat_peft import NeatConfig, NeatLayer, NeatModel, get_neat_model
from neat_peft.layers import ModulesToSave

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class AllKinds(nn.Module):
    """One layer of each supported kind on two inputs (token ids and an image), and a head."""

    def __init__(self, conv_kwargs=None):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.c1d = Conv1D(6, 6)
        nn.init.normal_(self.c1d.weight, std=0.4)
        self.lin = nn.Linear(6, 6)
        self.conv = nn.Conv2d(3, 6, 3, **(conv_kwargs or {"stride": 2, "padding": 1}))
        self.head = nn.Linear(6, 3)

    def forward(self, ids, img):
        h = self.lin(torch.tanh(self.c1d(self.emb(ids))))
        return self.head(h.mean(dim=1) + self.conv(img).mean(dim=(2, 3)))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (3, 5), generator=g), torch.randn(3, 3, 9, 9, generator=g)


def trained_model(axis="out", depth=2, scaling=0.6, act="tanh", modules_to_save=("head",), conv_kwargs=None):
    torch.manual_seed(1)
    base = AllKinds(conv_kwargs)
    pristine = copy.deepcopy(base)
    model = get_neat_model(base, NeatConfig(r=3, depth=depth, axis=axis, scaling=scaling, act_fn=act,
                                            target_modules=["emb", "c1d", "lin", "conv"],
                                            modules_to_save=list(modules_to_save) or None, init_weights=False))
    if modules_to_save:
        with torch.no_grad():
            for p in model.base_model.head.copies["default"].parameters():
                p.add_(torch.randn_like(p))
    return model, pristine


# --- our own format -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", ["out", "in"])
def test_save_load_round_trip_is_exact(tmp_path, axis):
    model, pristine = trained_model(axis)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    # Conv1D/Embedding/Conv2d targets make this a NEAT-typed file, whose keys carry the "neat_" prefix.
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "NEAT"
    assert "base_model.model.lin.neat_A.weight" in keys and "base_model.model.conv.neat_decoders.1.weight" in keys
    assert "base_model.model.head.weight" in keys
    assert not any("peanut_" in k or ".default" in k for k in keys)
    x = inputs()
    model.eval()
    loaded = NeatModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    assert not loaded.training
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference by default
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), model(*x), rtol=0, atol=0)
    trainable = NeatModel.from_pretrained(copy.deepcopy(pristine), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_several_adapters_and_load_adapter(tmp_path):
    model, pristine = trained_model()
    model.add_adapter("b", NeatConfig(r=2, axis="in", target_modules=["lin", "emb"], init_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "adapter_config.json").is_file()
    loaded = NeatModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    loaded.load_adapter(tmp_path / "b", "b")
    x = inputs()
    for name in ("default", "b"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        torch.testing.assert_close(loaded(*x), model(*x), rtol=0, atol=0)
    model.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert sorted(p.name for p in (tmp_path / "only_b").iterdir()) == ["b"]


def test_save_of_merged_model_writes_the_adapter_not_the_merged_weights(tmp_path):
    model, pristine = trained_model()
    x = inputs()
    expected = model(*x).detach()
    model.merge_adapter()
    model.save_pretrained(tmp_path)
    model.export_lora(tmp_path / "lora")
    loaded = NeatModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    torch.testing.assert_close(loaded(*x), expected, rtol=1e-5, atol=1e-5)
    lora = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "lora")
    torch.testing.assert_close(lora(*x), expected, rtol=0, atol=1e-5)


def test_saves_are_atomic(tmp_path, monkeypatch):
    import neat_peft.formats as formats

    model, _ = trained_model()
    model.save_pretrained(tmp_path)
    before = dir_snapshot(tmp_path)
    with torch.no_grad():
        model.base_model.lin.neat_B["default"].weight.add_(1.0)

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert dir_snapshot(tmp_path) == before  # old adapter intact, no temporary files left
    monkeypatch.undo()
    model.save_pretrained(tmp_path)  # overwriting in place works
    assert dir_snapshot(tmp_path) != before
    assert sorted(dir_snapshot(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


# --- LoRA export through real peft ------------------------------------------------------------------------
@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("depth, scaling, act", [(1, 0.6, "tanh"), (2, 2.5, "gelu")])
@pytest.mark.parametrize("modules_to_save", [(), ("head",)])
def test_export_lora_loads_in_peft_with_equal_outputs(tmp_path, axis, depth, scaling, act, modules_to_save):
    model, pristine = trained_model(axis, depth, scaling, act, modules_to_save)
    model.export_lora(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 3
    assert sorted(config["target_modules"]) == ["c1d", "conv", "emb", "lin"]
    lora = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    wrapped = {n: type(m).__module__ for n, m in lora.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert set(wrapped) == {"emb", "c1d", "lin", "conv"} and all("peft.tuners.lora" in v for v in wrapped.values())
    x = inputs()
    torch.testing.assert_close(lora(*x), model(*x), rtol=0, atol=1e-5)
    # merged in peft too
    merged = lora.merge_and_unload()
    torch.testing.assert_close(merged(*x), model(*x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "conv2d"])
def test_export_lora_single_layer_kinds(tmp_path, kind):
    from neat_testing import Single, make_input, make_layer

    base = make_layer(kind, {"stride": 2, "padding": 2} if kind == "conv2d" else None)
    model = get_neat_model(Single(copy.deepcopy(base)), NeatConfig(r=4, depth=1, axis="in", scaling=0.3,
                                                                    act_fn="sin", target_modules=["layer"],
                                                                    init_weights=False))
    model.export_lora(tmp_path)
    lora = PeftModel.from_pretrained(Single(copy.deepcopy(base)), tmp_path)
    x = make_input(kind)
    torch.testing.assert_close(lora(x), model(x), rtol=0, atol=1e-5)


def test_export_lora_refuses_dilated_conv2d(tmp_path):
    """peft's LoRA Conv2d has no dilation: an export could not compute what NEAT computes, so refuse it."""
    model, pristine = trained_model(conv_kwargs={"dilation": 2, "padding": 2})
    target = tmp_path / "lora"
    with pytest.raises(ValueError, match="dilation"):
        model.export_lora(target)
    assert not target.exists()


def test_export_lora_of_non_default_adapter(tmp_path):
    model, pristine = trained_model()
    model.add_adapter("b", NeatConfig(r=2, depth=1, act_fn="sin", target_modules=["lin"], init_weights=False))
    model.export_lora(tmp_path, adapter_name="b")
    model.set_adapter("b")
    x = inputs()
    lora = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    torch.testing.assert_close(lora(*x), model(*x), rtol=0, atol=1e-5)
    assert not any(isinstance(m, (NeatLayer, ModulesToSave)) for m in lora.modules())


def test_export_lora_refuses_max_norm_embedding(tmp_path):
    base = AllKinds()
    base.emb.max_norm = 1.0
    model = get_neat_model(base, NeatConfig(r=2, target_modules=["emb", "lin"], init_weights=False))
    with pytest.raises(ValueError, match=r"'emb' \(max_norm is set"):
        model.export_lora(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
