"""Against peft 0.21's own PEANuT: same weights => same outputs and gradients; files load both ways."""

import copy
import json

import pytest
import torch
from peft import PeftType
from peft import PeanutConfig, PeftModel, get_peft_model

from neat_testing import Single, TinyEncoder, make_input, make_layer
from neat_peft import NeatConfig, NeatLayer, NeatModel, get_neat_model
from neat_peft.layers import ModulesToSave

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ids(batch=4, seq=5, seed=0):
    return torch.randint(0, 13, (batch, seq), generator=torch.Generator().manual_seed(seed))


def peft_layer(peft_model, path):
    return peft_model.base_model.model.get_submodule(path)


def copy_ours_into_peft(ours, theirs, adapter="default"):
    """Copy NEAT adapter weights (and modules_to_save copies) into a peft PEANuT model, by module path."""
    n = 0
    with torch.no_grad():
        for path, layer in ours.neat_layers():
            if adapter not in layer.adapter_configs:
                continue
            target = peft_layer(theirs, path)
            target.peanut_A[adapter].weight.copy_(layer.neat_A[adapter].weight)
            target.peanut_B[adapter].weight.copy_(layer.neat_B[adapter].weight)
            for i, (e, d) in enumerate(zip(layer.neat_encoders[adapter], layer.neat_decoders[adapter])):
                target.peanut_encoders[adapter][i].weight.copy_(e.weight)
                target.peanut_decoders[adapter][i].weight.copy_(d.weight)
            n += 1
        for path, saved in ours._saved_modules():
            peft_copy = peft_layer(theirs, path).modules_to_save[adapter]
            peft_copy.load_state_dict(saved.copies[adapter].state_dict())
    assert n > 0


def pair(depth, act="relu", scaling=1.0, targets=("query", "value", "ffn"), modules_to_save=("classifier",)):
    torch.manual_seed(depth)
    base = TinyEncoder()
    kwargs = dict(r=3, depth=depth, act_fn=act, scaling=scaling, target_modules=list(targets),
                  modules_to_save=list(modules_to_save) if modules_to_save else None, init_weights=False)
    theirs = get_peft_model(copy.deepcopy(base), PeanutConfig(**kwargs))
    ours = get_neat_model(copy.deepcopy(base), NeatConfig(**kwargs))
    if modules_to_save:  # make the trained head differ from the original
        with torch.no_grad():
            for _, saved in ours._saved_modules():
                for p in saved.copies["default"].parameters():
                    p.add_(torch.randn_like(p))
    copy_ours_into_peft(ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("act, scaling", [("relu", 1.0), ("gelu", 0.3), ("tanh", 2.0)])
def test_outputs_and_gradients_equal_peft_peanut(depth, act, scaling):
    ours, theirs = pair(depth, act, scaling)
    x = ids()
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=1e-5)
    upstream = torch.randn_like(out_ours)
    (out_ours * upstream).sum().backward()
    (out_theirs * upstream).sum().backward()
    compared = 0
    for path, layer in ours.neat_layers():
        target = peft_layer(theirs, path)
        pairs = [(layer.neat_A["default"], target.peanut_A["default"]),
                 (layer.neat_B["default"], target.peanut_B["default"]),
                 *zip(layer.neat_encoders["default"], target.peanut_encoders["default"]),
                 *zip(layer.neat_decoders["default"], target.peanut_decoders["default"])]
        for i, (a, b) in enumerate(pairs):
            assert a.weight.grad is not None
            if i < 2 or act != "relu":  # a relu encoder of width 3 can be dead for every row: zero grad is right
                assert torch.count_nonzero(a.weight.grad) > 0
            torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=0, atol=1e-5)
            compared += 1
    for path, saved in ours._saved_modules():
        for (n, p), (_, q) in zip(saved.copies["default"].named_parameters(),
                                  peft_layer(theirs, path).modules_to_save["default"].named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5)
            compared += 1
    assert compared == 6 * (2 + 2 * depth) + 2
    # the same trainable parameter count
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]


def test_merged_outputs_equal_peft_merged():
    ours, theirs = pair(1, "gelu", 0.5, modules_to_save=())
    x = ids()
    expected = theirs(x).detach()
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("depth", [0, 2])
def test_peft_save_loads_into_neat(tmp_path, depth):
    ours, theirs = pair(depth, "gelu", 0.7)
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PEANUT"
    x = ids()
    expected = theirs(x).detach()
    loaded = NeatModel.from_pretrained(fresh_base(ours), tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)
    assert loaded.peft_config["default"].depth == depth
    assert isinstance(loaded.base_model.classifier, ModulesToSave)


def fresh_base(neat_model):
    """The unadapted base model with the same frozen weights as `neat_model`'s (original heads)."""
    plain = copy.deepcopy(neat_model.base_model)
    for path, module in [(p, m) for p, m in plain.named_modules() if isinstance(m, (NeatLayer, ModulesToSave))]:
        parent_path, _, child = path.rpartition(".")
        parent = plain.get_submodule(parent_path) if parent_path else plain
        setattr(parent, child, module.base_layer if isinstance(module, NeatLayer) else module.original_module)
    assert not any(isinstance(m, (NeatLayer, ModulesToSave)) for m in plain.modules())
    return plain


@pytest.mark.parametrize("depth", [0, 1])
def test_neat_save_loads_into_peft(tmp_path, depth):
    ours, _ = pair(depth, "tanh", 1.5)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PEANUT" and "neat_peft" not in saved and "axis" not in saved
    x = ids()
    loaded = PeftModel.from_pretrained(fresh_base(ours), tmp_path)
    torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=1e-5)
    # and back: peft re-saves, we load, same outputs
    loaded.save_pretrained(tmp_path / "again")
    again = NeatModel.from_pretrained(fresh_base(ours), tmp_path / "again")
    torch.testing.assert_close(again(x), ours(x), rtol=0, atol=1e-5)


def test_several_adapters_save_like_peft(tmp_path):
    ours, _ = pair(0, modules_to_save=())
    ours.add_adapter("other", NeatConfig(r=2, target_modules=["value"], init_weights=False))
    ours.save_pretrained(tmp_path)
    x = ids()
    theirs = PeftModel.from_pretrained(fresh_base(ours), tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    theirs.set_adapter("other")
    ours.set_adapter("other")
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-5)


NOT_PEFT_COMPATIBLE = [
    ("axis in", dict(axis="in"), "linear"),
    ("dropout", dict(dropout=0.1), "linear"),
    ("normalize_weight", dict(normalize_weight=True), "linear"),
    ("act sin", dict(act_fn="sin"), "linear"),
    ("act identity", dict(act_fn="identity"), "linear"),
    ("Conv1D target", {}, "conv1d"),
    ("Embedding target", {}, "embedding"),
    ("Conv2d target", {}, "conv2d"),
]


@pytest.mark.parametrize("case, extra, kind", NOT_PEFT_COMPATIBLE, ids=[c[0] for c in NOT_PEFT_COMPATIBLE])
def test_non_peft_configs_are_written_as_neat_and_refused_by_peft(tmp_path, case, extra, kind):
    base = make_layer(kind)
    model = get_neat_model(Single(copy.deepcopy(base)), NeatConfig(r=2, target_modules=["layer"],
                                                                    init_weights=False, **extra))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "NEAT" and "version" in saved["neat_peft"]
    for field, value in extra.items():
        assert saved[field] == value
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = make_input(kind)
    model.eval()
    if "NEAT" not in PeftType.__members__:
        with pytest.raises((KeyError, ValueError), match="NEAT"):
            PeftModel.from_pretrained(Single(base), tmp_path)
    else:  # the plugin tests registered NEAT with peft in this process: then peft must compute the same thing
        with torch.no_grad():
            torch.testing.assert_close(PeftModel.from_pretrained(Single(copy.deepcopy(base)), tmp_path)(x),
                                       model(x), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    # ... while neat-peft reads it back exactly
    loaded = NeatModel.from_pretrained(Single(copy.deepcopy(base)), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.peft_config["default"].axis == extra.get("axis", "out")


def test_peanut_config_fields_round_trip(tmp_path):
    """Every field peft writes for PEANuT is understood (no 'unknown field' on load)."""
    base = TinyEncoder()
    theirs = get_peft_model(copy.deepcopy(base), PeanutConfig(r=2, depth=1, act_fn="gelu_new", scaling=0.25,
                                                              target_modules=["query"], layers_to_transform=[1],
                                                              layers_pattern="layers", exclude_modules=["value"]))
    theirs.save_pretrained(tmp_path)
    loaded = NeatModel.from_pretrained(copy.deepcopy(base), tmp_path)
    cfg = loaded.peft_config["default"]
    assert (cfg.r, cfg.depth, cfg.act_fn, cfg.scaling) == (2, 1, "gelu_new", 0.25)
    assert [p for p, _ in loaded.neat_layers()] == [p for p, m in theirs.base_model.model.named_modules()
                                                     if hasattr(m, "peanut_A")]
    x = ids()
    torch.testing.assert_close(loaded(x), theirs(x), rtol=0, atol=1e-5)


def test_layers_to_transform_selection_survives_both_ways(tmp_path):
    base = TinyEncoder(n_layers=3)
    kwargs = dict(r=2, target_modules=["query", "value"], layers_to_transform=[0, 2], layers_pattern="layers",
                  init_weights=False)
    ours = get_neat_model(copy.deepcopy(base), NeatConfig(**kwargs))
    assert [p for p, _ in ours.neat_layers()] == ["layers.0.query", "layers.0.value", "layers.2.query",
                                                  "layers.2.value"]
    ours.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert [p for p, m in theirs.base_model.model.named_modules() if hasattr(m, "peanut_A")] == [
        p for p, _ in ours.neat_layers()]
    x = ids()
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-5)
