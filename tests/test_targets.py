"""Module selection follows peft's rules exactly (so a peft file adapts the same modules in both libraries)."""

import pytest
import torch
from peft import PeanutConfig
from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
from torch import nn

from neat_peft import NeatConfig, NeatLayer, get_neat_model
from neat_peft.targets import find_targets


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(4, 4)
        self.value = nn.Linear(4, 4)


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(4, 4)}) for _ in range(3))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()
        self.moe = Experts()


class Nested(nn.Module):
    """model.encoder.layers.<i>.attn.{query,value}, ...moe.experts.<j>.w1, top-level blocks.<i>.fc, classifier."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.encoder = nn.Module()
        self.model.encoder.layers = nn.ModuleList(Layer() for _ in range(3))
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(4, 4)}) for _ in range(3))
        self.classifier = nn.Linear(4, 2)


CONFIGS = [
    dict(target_modules=["query", "value"]),
    dict(target_modules=["query"], layers_to_transform=[1]),
    dict(target_modules=["query", "w1"], layers_to_transform=[0, 2]),  # first index is the layer, not the expert
    dict(target_modules=["w1"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["fc"], layers_to_transform=[1], layers_pattern="blocks"),  # top-level ModuleList
    dict(target_modules=["fc", "query"], layers_to_transform=[2], layers_pattern=["blocks", "layers"]),
    dict(target_modules=r".*\.attn\.(query|value)"),
    dict(target_modules=["model.encoder.layers.0.attn.query", "value"], layers_to_transform=[2]),  # exact names too
    dict(target_modules=["query", "value"], exclude_modules=["layers.1.attn.value"]),
    dict(target_modules=["query", "value", "fc"], exclude_modules=r".*\.(0|2)\..*"),
    dict(target_modules=["query", "classifier"], modules_to_save=["classifier"]),  # never adapt a saved module
]


def peft_selection(config_kwargs):
    config = PeanutConfig(**config_kwargs)
    names = []
    for name, _ in Nested().named_modules():
        hit = check_target_module_exists(config, name)
        if hit and not isinstance(hit, _ExcludedModule):
            names.append(name)
    return names


@pytest.mark.parametrize("config_kwargs", CONFIGS, ids=range(len(CONFIGS)))
def test_selection_equals_peft(config_kwargs):
    expected = peft_selection(config_kwargs)
    assert expected, "a test config should select something"
    ours = [name for name, _ in find_targets(Nested(), NeatConfig(r=2, **config_kwargs))]
    assert ours == expected
    model = get_neat_model(Nested(), NeatConfig(r=2, **config_kwargs))
    assert [n for n, m in model.base_model.named_modules() if isinstance(m, NeatLayer)] == expected


def test_all_linear_skips_output_embeddings_and_saved_modules():
    class WithHead(Nested):
        def get_output_embeddings(self):
            return self.classifier

    names = [n for n, _ in find_targets(WithHead(), NeatConfig(r=2, target_modules="all-linear"))]
    linear = [n for n, m in WithHead().named_modules() if isinstance(m, nn.Linear)]
    assert names == [n for n in linear if n != "classifier"]
    names = [n for n, _ in find_targets(Nested(), NeatConfig(r=2, target_modules="all-linear",
                                                                modules_to_save=["classifier"]))]
    assert names == [n for n in linear if n != "classifier"]


def test_second_adapter_targets_inside_wrapped_model():
    model = get_neat_model(Nested(), NeatConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    model.add_adapter("b", NeatConfig(r=2, target_modules="all-linear"))
    b_layers = sorted(n for n, m in model.base_model.named_modules()
                      if isinstance(m, NeatLayer) and "b" in m.adapter_configs)
    expected = sorted(n for n, m in Nested().named_modules() if isinstance(m, nn.Linear) and n != "classifier")
    assert b_layers == expected  # no adapter on base_layer/neat_* internals nor on the saved head's copies
    x = torch.randn(2, 4)
    assert model.base_model.model.encoder.layers[0].attn.query(x).shape == (2, 4)


def test_layers_to_transform_with_a_string_target_is_refused():
    """peft's PEANuT silently ignores layers_to_transform for a regex; peft's LoRA refuses it. So do we."""
    for target in (r".*\.attn\.(query|value)", "all-linear"):
        with pytest.raises(ValueError, match="layers_to_transform cannot be used when target_modules is a string"):
            NeatConfig(r=2, target_modules=target, layers_to_transform=[0])


def test_default_targets_match_vit_in_the_installed_transformers():
    from transformers import ViTConfig, ViTModel

    from neat_peft.targets import find_targets

    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=16))
    names = [name for name, _ in find_targets(vit, NeatConfig(target_modules=None))]
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
