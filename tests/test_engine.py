"""One engine behind both front-ends: the bugs the two copies had, golden values from outside the code, and the
state guards that keep one model's changes from leaking into another's."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import neat_peft
from neat_testing import assert_state_equal, state_snapshot
from neat_peft import NeatConfig, NeatModel, get_neat_model
from neat_peft import layers as neat_layers
from neat_peft.peft_plugin import convert_to_lora_exact

neat_peft.register_with_peft()


class AllKinds(nn.Module):
    def __init__(self, dilation=1, max_norm=None):
        super().__init__()
        self.emb = nn.Embedding(11, 6, max_norm=max_norm)
        self.c1d = Conv1D(6, 6)
        nn.init.normal_(self.c1d.weight, std=0.4)
        self.lin = nn.Linear(6, 6)
        self.conv = nn.Conv2d(3, 6, 3, padding=dilation, dilation=dilation)
        self.head = nn.Linear(6, 3)

    def forward(self, ids, img):
        h = self.lin(torch.tanh(self.c1d(self.emb(ids))))
        return self.head(h.mean(dim=1) + self.conv(img).mean(dim=(2, 3)))


TARGETS = ["emb", "c1d", "lin", "conv"]


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 11, (3, 5), generator=g), torch.randn(3, 3, 9, 9, generator=g)


def config(**kw):
    return NeatConfig(**{"r": 3, "depth": 1, "scaling": 0.7, "act_fn": "tanh", "target_modules": TARGETS,
                         "init_weights": False, **kw})


# --- bug 1: an embedding trains on the looked-up rows only ------------------------------------------------------------
def test_embedding_training_never_runs_the_network_over_the_whole_vocabulary(monkeypatch):
    torch.manual_seed(0)
    vocab = 50_000
    model = get_neat_model(nn.Sequential(nn.Embedding(vocab, 16)), NeatConfig(r=4, target_modules=["0"],
                                                                              init_weights=False))
    rows_seen = []
    real = neat_layers.weight_network

    def spy(rows, *args, **kwargs):
        rows_seen.append(rows.shape[1] if kwargs.get("on_columns") else rows.shape[0])
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(neat_layers, "weight_network", spy)
    monkeypatch.setattr("neat_peft.functional.weight_network", spy)
    ids = torch.tensor([[3, 17, 3, 49_999]])
    out = model(ids)
    out.sum().backward()
    assert rows_seen == [3]  # the three distinct ids, never 50,000
    # and the result is the full-vocabulary update restricted to those rows
    layer = model.base_model[0]
    with torch.no_grad():
        down, up = layer.factors("default")
        expected = layer.base_layer(ids) + torch.nn.functional.embedding(ids, down) @ up.t()
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-6)


# --- bug 3: one LoRA exporter, the same refusals ------------------------------------------------------------------
def _neat_and_peft(base_factory, **kw):
    torch.manual_seed(1)
    core = get_neat_model(base_factory(), config(**kw))
    torch.manual_seed(1)
    plugin = peft.get_peft_model(base_factory(), config(**kw))
    plugin.base_model.model.load_state_dict(core.base_model.state_dict())
    return core, plugin


@pytest.mark.parametrize("axis", ["out", "in"])
def test_plugin_and_core_export_the_same_lora_for_every_layer_kind(tmp_path, axis):
    from safetensors.torch import load_file

    core, plugin = _neat_and_peft(AllKinds, axis=axis)
    core.export_lora(tmp_path)
    exported = load_file(tmp_path / "adapter_model.safetensors")
    lora_config, state = convert_to_lora_exact(plugin)
    assert set(exported) == set(state)
    for key in state:
        torch.testing.assert_close(state[key], exported[key], rtol=0, atol=0)
    assert sorted(lora_config.target_modules) == sorted(TARGETS)
    # and that LoRA, run by peft itself, computes the NEAT model's outputs
    torch.manual_seed(1)
    lora = peft.get_peft_model(AllKinds(), lora_config)
    peft.set_peft_model_state_dict(lora, state)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(lora.eval()(*x), core.eval()(*x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base, culprit", [(lambda: AllKinds(dilation=2), r"'conv' \(dilation=\(2, 2\)"),
                                           (lambda: AllKinds(max_norm=1.0), r"'emb' \(max_norm is set")])
def test_plugin_and_core_refuse_the_same_exports(tmp_path, base, culprit):
    core, plugin = _neat_and_peft(base)
    with pytest.raises(ValueError, match=culprit) as core_error:
        core.export_lora(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=culprit) as plugin_error:
        convert_to_lora_exact(plugin)
    assert str(core_error.value) == str(plugin_error.value)


# --- bug 4: get_peft_model(model, NeatConfig(...)) end to end ------------------------------------------------------
def test_get_peft_model_takes_the_core_config_train_save_load_merge(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    pristine = copy.deepcopy(base)
    model = peft.get_peft_model(base, NeatConfig(r=2, depth=1, axis="in", target_modules=["0", "2"]))
    assert isinstance(model.peft_config["default"], NeatConfig)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(x)
        assert not torch.allclose(trained, pristine(x), atol=1e-3)  # it really trained
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained, rtol=0, atol=0)
        # the same directory loads in the standalone API too
        torch.testing.assert_close(NeatModel.from_pretrained(copy.deepcopy(pristine), tmp_path)(x), trained,
                                   rtol=0, atol=0)
        merged = loaded.merge_and_unload()
        assert isinstance(merged[0], nn.Linear)
        torch.testing.assert_close(merged(x), trained, rtol=1e-5, atol=1e-5)


def test_get_peft_model_takes_a_neat_config_without_a_registration_call():
    import subprocess
    import sys

    code = ("import peft, torch, neat_peft\n"
            "model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), "
            "neat_peft.NeatConfig(target_modules=['0']))\n"
            "print('OK', type(model.base_model).__name__, isinstance(model.base_model.model[0], neat_peft.NeatLayer))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "OK NeatPeftModel True" in result.stdout, result.stdout + result.stderr


def test_the_old_peft_config_name_keeps_working():
    NeatPeftConfig = neat_peft.register_with_peft()
    model = peft.get_peft_model(nn.Sequential(nn.Linear(4, 4)), NeatPeftConfig(r=2, target_modules=["0"]))
    assert isinstance(model.peft_config["default"], NeatConfig)


# --- golden values for axis "in", computed by hand (the authors' LLM formula) ------------------------------------
@pytest.mark.parametrize("depth, expected", [(0, [-0.5, 7.5]), (1, [-0.5, 12.0])])
def test_axis_in_golden_values_by_hand(depth, expected):
    """G = relu(W0 A^T) (one row of W0 per output), dW = s G B^T, y = W0 x + s (x B) G^T.

    W0 = [[1, -2, .5], [3, 1, -1]], A = [[.5, 1, -2]]:  W0 A^T = [-2.5, 4.5] -> G = [0, 4.5].
    depth 1, enc = [[2]], dec = [[.5]]: h = 4.5 -> saved; h = relu(2 * 4.5) = 9; h = relu(.5 * 9) + 4.5 = 9 -> G = [0, 9].
    B = [1, 2, -1]^T, x = [1, 1, 1]:  x B = 2;  s = .5;  W0 x = [-.5, 3].
    y = [-.5, 3] + .5 * 2 * G  =  [-.5, 7.5] (depth 0)  or  [-.5, 12] (depth 1).
    """
    base = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]]))
    model = get_neat_model(nn.Sequential(base), NeatConfig(r=1, depth=depth, axis="in", act_fn="relu", scaling=0.5,
                                                           target_modules=["0"]))
    layer = model.base_model[0]
    with torch.no_grad():
        layer.neat_A["default"].weight.copy_(torch.tensor([[0.5, 1.0, -2.0]]))
        layer.neat_B["default"].weight.copy_(torch.tensor([[1.0], [2.0], [-1.0]]))
        if depth:
            layer.neat_encoders["default"][0].weight.fill_(2.0)
            layer.neat_decoders["default"][0].weight.fill_(0.5)
    out = model(torch.ones(1, 3, dtype=torch.float64))
    assert out.tolist() == [expected]


# --- state guards -------------------------------------------------------------------------------------------------
def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))


def test_wrapping_a_model_twice_is_refused_and_keeps_the_trained_adapter():
    base = _tiny()
    first = get_neat_model(base, NeatConfig(r=2, target_modules=["0"], init_weights=False))
    before = state_snapshot(first)
    with pytest.raises(ValueError, match="already holds NEAT layers.*add_adapter"):
        get_neat_model(base, NeatConfig(r=2, target_modules=["2"]))
    with pytest.raises(TypeError, match="NeatModel already"):
        get_neat_model(first, NeatConfig(r=2, target_modules=["2"]))
    assert_state_equal(first, before)


def test_loading_twice_onto_one_base_is_refused_and_leaves_the_first_model_alone(tmp_path):
    base = _tiny()
    first = get_neat_model(copy.deepcopy(base), NeatConfig(r=2, target_modules=["0"], init_weights=False))
    first.save_pretrained(tmp_path / "a")
    second = get_neat_model(copy.deepcopy(base), NeatConfig(r=2, target_modules=["0"], init_weights=False,
                                                            act_fn="gelu"))
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.5)
    second.save_pretrained(tmp_path / "b")
    loaded_a = NeatModel.from_pretrained(base, tmp_path / "a")
    x = torch.randn(4, 6)
    with torch.no_grad():
        out_a = loaded_a(x)
    with pytest.raises(ValueError, match="already holds NEAT layers"):
        NeatModel.from_pretrained(base, tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(loaded_a(x), out_a, rtol=0, atol=0)


def test_set_adapter_while_merged_unmerges_first_like_peft():
    model = get_neat_model(_tiny(), NeatConfig(r=2, target_modules=["0", "2"], init_weights=False))
    model.add_adapter("b", NeatConfig(r=3, target_modules=["0", "2"], init_weights=False, act_fn="gelu"))
    model.eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        model.set_adapter("b")
        only_b = model(x)
        model.set_adapter("default")
        model.merge_adapter()
        with pytest.warns(UserWarning, match="unmerging"):
            model.set_adapter("b")
        assert not any(layer.merged for _, layer in model.neat_layers())
        torch.testing.assert_close(model(x), only_b, rtol=0, atol=0)


def test_a_neat_model_is_spent_after_merge_and_unload(tmp_path):
    model = get_neat_model(_tiny(), NeatConfig(r=2, target_modules=["0"], init_weights=False))
    plain = model.merge_and_unload()
    assert not any(isinstance(m, neat_peft.NeatLayer) for m in plain.modules())
    for call in (lambda: model.save_pretrained(tmp_path / "x"), lambda: model(torch.randn(1, 6)),
                 lambda: model.export_lora(tmp_path / "y"), lambda: model.merge_adapter()):
        with pytest.raises(RuntimeError, match="was unloaded"):
            call()
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_lazy_layer_elsewhere_is_refused_before_the_target_is_wrapped():
    base = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"uninitialized \(lazy\) parameters.*'1.weight'"):
            get_neat_model(base, NeatConfig(r=2, target_modules=["0"]))
    assert isinstance(base[0], nn.Linear) and type(base[0]) is nn.Linear


# --- hostile adapter files through the model API (formats.read_adapter + validate_adapter_tensors) ----------------
def _saved(tmp_path):
    model = get_neat_model(_tiny(), NeatConfig(r=2, target_modules=["0"], init_weights=False))
    model.save_pretrained(tmp_path)
    return tmp_path


def _rewrite_weights(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    save_file(change(tensors), path / "adapter_model.safetensors")  # no config hash: like a peft-written file


@pytest.mark.parametrize("change, message", [
    (lambda t: {k: v.fill_(float("nan")) if k.endswith("A.weight") else v for k, v in t.items()}, "NaN or inf"),
    (lambda t: {k: v.long() if k.endswith("B.weight") else v for k, v in t.items()}, "wrong dtype.*torch.int64"),
    (lambda t: {**t, **{k.replace("peanut_", "neat_"): v.clone() for k, v in t.items()}}, "two namings"),
])
def test_hostile_weights_are_refused_and_the_model_is_untouched(tmp_path, change, message):
    path = _saved(tmp_path)
    _rewrite_weights(path, change)
    base = _tiny()
    before = state_snapshot(base)
    with pytest.raises(ValueError, match=message) as error:
        NeatModel.from_pretrained(base, path)
    assert "adapter_model.safetensors" in str(error.value)
    assert_state_equal(base, before)
    assert not any(isinstance(m, neat_peft.NeatLayer) for m in base.modules())


def test_nonfinite_weights_load_when_asked_for(tmp_path):
    path = _saved(tmp_path)
    _rewrite_weights(path, lambda t: {k: v.fill_(float("inf")) if k.endswith("B.weight") else v for k, v in t.items()})
    model = NeatModel.from_pretrained(_tiny(), path, allow_nonfinite=True)
    assert torch.isinf(model.base_model[0].neat_B["default"].weight).all()


@pytest.mark.parametrize("name", ["../outside", "a/b", "c:\\\\d", "x.y"])
def test_adapter_names_that_could_write_outside_the_directory_are_refused(tmp_path, name):
    model = get_neat_model(_tiny(), NeatConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="cannot name an adapter"):
        model.add_adapter(name, NeatConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="cannot name an adapter"):
        model.load_adapter(_saved(tmp_path), name)
    assert list(model.peft_config) == ["default"]
