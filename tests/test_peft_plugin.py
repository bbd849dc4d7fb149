"""NEAT inside peft (neat_peft.peft_plugin): outputs against a materialised reference and against peft's own PEANuT
and LoRA, file round trips with the standalone core and transformers, mixed batches, merging, LoRA conversion, the
A-gradient property and its remedies, bad input. Registration guards run in a fresh process
(peft_registration_script.py). peft's generic test matrix is in peft_matrix/.
"""

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peft  # noqa: E402
from peft import LoraConfig, PeanutConfig, PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import neat_peft  # noqa: E402
from neat_peft import NeatConfig, NeatModel, get_neat_model  # noqa: E402
from neat_peft.optim import neat_param_groups  # noqa: E402

NeatPeftConfig = neat_peft.register_with_peft()
from neat_peft.peft_plugin import NeatPeftLayer, convert_to_lora_exact  # noqa: E402

HERE = Path(__file__).parent


# --- models -------------------------------------------------------------------------------------------------------
class FourKinds(nn.Module):
    """One layer of each kind NEAT adapts: ids -> Embedding -> HF Conv1D -> Conv2d -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.conv1d = Conv1D(16, 12)  # HF layout: weight is d_in x d_out = 12 x 16
        self.conv2d = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(96, 3)
        with torch.no_grad():  # unit-scale weights everywhere, so every adapter changes the output visibly
            self.conv1d.weight.normal_(0, 0.3)

    def forward(self, ids):
        h = torch.relu(self.conv1d(self.emb(ids)))  # (b, 4, 16)
        h = torch.relu(self.conv2d(h.view(-1, 4, 4, 4)))  # (b, 6, 4, 4)
        return self.head(h.flatten(1))


def four_kinds():
    torch.manual_seed(0)
    return FourKinds().eval()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)).eval()


IDS = torch.randint(0, 30, (6, 4), generator=torch.Generator().manual_seed(1))
ALL_KINDS = ["emb", "conv1d", "conv2d", "head"]


# --- an independent reference: NEAT's update written out from the method's description ----------------------------
def reference_delta(W0, layer, name):
    """dW (linear layout d_out x d_in) from NEAT's definition, not from the library's code.

    axis out: H = act(W0^T A^T) with residual pairs, dW^T = s * H B^T.  axis in: G = act(W0 A^T), dW = s * G B^T.
    """
    cfg = layer.adapter_configs[name]
    act = {"relu": torch.relu, "gelu": F.gelu}[cfg.act_fn]
    if cfg.normalize_weight:
        W0 = W0 / W0.pow(2).mean().sqrt()
    A = layer.neat_A[name].weight
    B = layer.neat_B[name].weight
    X = W0.t() if cfg.axis == "out" else W0
    h = act(X @ A.t())
    saved = []
    for enc in layer.neat_encoders[name]:
        saved.append(h)
        h = act(h @ enc.weight.t())
    for i, dec in enumerate(layer.neat_decoders[name]):
        h = act(h @ dec.weight.t()) + saved[-1 - i]
    if cfg.axis == "out":
        return cfg.scaling * (h @ B.t()).t()
    return cfg.scaling * (h @ B.t())


def linear_layout(module):
    w = module.weight
    if isinstance(module, nn.Linear):
        return w
    if isinstance(module, nn.Conv2d):
        return w.flatten(1)
    return w.t()  # HF Conv1D stores d_in x d_out; an embedding table is the transpose of a linear map from one-hot ids


def merged_reference(base, peft_model, adapter_names):
    """A copy of the base model with each adapter's dW (computed from the pristine W0) added to the weights."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for path, layer in peft_model.base_model.model.named_modules():
            if not isinstance(layer, NeatPeftLayer):
                continue
            target = ref.get_submodule(path)
            W0 = linear_layout(target).clone()
            for name in adapter_names:
                if name in layer.adapter_configs:
                    delta = reference_delta(W0, layer, name)
                    if isinstance(target, nn.Conv2d):
                        target.weight += delta.reshape(target.weight.shape)
                    elif isinstance(target, nn.Linear):
                        target.weight += delta
                    else:
                        target.weight += delta.t()
    return ref


# --- forward ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(r=2),
    dict(r=3, depth=1, act_fn="gelu", scaling=0.5),
    dict(r=2, axis="in"),
    dict(r=2, axis="in", depth=2, normalize_weight=True),
    dict(r=2, normalize_weight=True),
])
def test_all_four_layer_kinds_match_the_materialised_update(kwargs):
    model = get_peft_model(four_kinds(), NeatPeftConfig(target_modules=ALL_KINDS, init_weights=False, **kwargs))
    assert sum(isinstance(m, NeatPeftLayer) for m in model.modules()) == 4
    expected = merged_reference(four_kinds(), model, ["default"])(IDS)
    model.eval()
    with torch.no_grad():
        eval_cached = model(IDS)
        eval_cached_again = model(IDS)  # second call reuses the cached factors
    model.train()  # training path: factors recomputed with autograd, embedding rows looked up before the network
    train_out = model(IDS)
    train_out.sum().backward()
    torch.testing.assert_close(eval_cached, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eval_cached_again, eval_cached, atol=0, rtol=0)
    torch.testing.assert_close(train_out.detach(), expected, atol=1e-5, rtol=1e-5)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert not expected.allclose(four_kinds()(IDS), atol=1e-3)  # the adapter does change the output


def test_equals_peft_peanut_on_what_peanut_supports():
    config = dict(target_modules=["0", "2"], r=3, depth=1, act_fn="gelu", scaling=0.7, init_weights=False)
    neat = get_peft_model(mlp(), NeatPeftConfig(**config))
    peanut = get_peft_model(mlp(), PeanutConfig(**config))
    with torch.no_grad():
        for name, p in peanut.named_parameters():
            if "peanut_" in name:
                p.copy_(neat.get_parameter(name.replace("peanut_", "neat_")))
    x = torch.randn(7, 10)
    with torch.no_grad():
        torch.testing.assert_close(neat(x), peanut(x), atol=1e-6, rtol=1e-6)
        neat_merged, peanut_merged = neat.merge_and_unload(), peanut.merge_and_unload()
    for (name, a), (_, b) in zip(neat_merged.named_parameters(), peanut_merged.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_dropout_is_applied_in_training_only():
    model = get_peft_model(mlp(), NeatPeftConfig(target_modules=["0"], r=2, dropout=0.5, init_weights=False))
    x = torch.randn(64, 10)
    model.train()
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(4)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), merged_reference(mlp(), model, ["default"])(x), atol=1e-5, rtol=1e-5)


# --- files --------------------------------------------------------------------------------------------------------
def _keys(directory):
    from safetensors.torch import load_file

    return sorted(load_file(str(Path(directory) / "adapter_model.safetensors")))


def test_peft_files_load_in_the_core_and_back(tmp_path):
    config = NeatPeftConfig(target_modules=["emb", "conv1d", "conv2d"], modules_to_save=["head"], r=2, depth=1,
                            axis="in", dropout=0.1, init_weights=False)
    model = get_peft_model(four_kinds(), config)
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.mul_(2)  # a trained head is saved too
    model.eval()
    with torch.no_grad():
        expected = model(IDS)
    model.save_pretrained(tmp_path / "from_peft")
    data = json.loads((tmp_path / "from_peft" / "adapter_config.json").read_text())
    assert data["peft_type"] == "NEAT" and data["neat_peft"]["version"] == neat_peft.__version__
    assert "base_model.model.conv1d.neat_encoders.0.weight" in _keys(tmp_path / "from_peft")

    core = NeatModel.from_pretrained(four_kinds(), tmp_path / "from_peft")
    with torch.no_grad():
        assert torch.equal(core(IDS), expected)
    core.save_pretrained(tmp_path / "from_core")
    assert _keys(tmp_path / "from_core") == _keys(tmp_path / "from_peft")

    back = PeftModel.from_pretrained(four_kinds(), tmp_path / "from_core")
    assert isinstance(back.peft_config["default"], NeatPeftConfig) and back.peft_config["default"].axis == "in"
    with torch.no_grad():
        assert torch.equal(back(IDS), expected)


def test_core_peanut_files_load_in_native_peft_and_match_the_plugin(tmp_path):
    core = get_neat_model(mlp(), NeatConfig(target_modules=["0", "2"], r=2, depth=1, init_weights=False))
    core.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PEANUT"
    native = PeftModel.from_pretrained(mlp(), tmp_path)
    assert isinstance(native.peft_config["default"], PeanutConfig)
    plugin = get_peft_model(mlp(), NeatPeftConfig(target_modules=["0", "2"], r=2, depth=1))
    with torch.no_grad():
        for name, p in plugin.named_parameters():
            if "neat_" in name:
                p.copy_(native.get_parameter(name.replace("neat_", "peanut_")))
    x = torch.randn(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(plugin(x), core(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(native(x), core(x), atol=1e-6, rtol=1e-6)


def test_neat_files_with_the_older_peanut_key_names_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model = get_peft_model(mlp(), NeatPeftConfig(target_modules=["0"], r=2, axis="in", init_weights=False)).eval()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k.replace(".neat_", ".peanut_"): v for k, v in load_file(str(weights)).items()}, str(weights))
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(mlp(), tmp_path)(x), model(x))
        assert torch.equal(NeatModel.from_pretrained(mlp(), tmp_path)(x), model(x))


def test_transformers_load_adapter_reads_core_written_neat_files(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
                            eos_token_id=0)
        return GPT2LMHeadModel(config).eval()

    core = get_neat_model(gpt2(), NeatConfig(target_modules=["c_attn", "wte"], r=2, axis="in", init_weights=False))
    core.save_pretrained(tmp_path)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = core(input_ids=ids).logits
    torch.manual_seed(123)  # the injected adapters start from different random weights than the core's
    model = gpt2()
    model.load_adapter(str(tmp_path))
    assert isinstance(model.transformer.h[0].attn.c_attn, NeatPeftLayer)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)


# --- several adapters -----------------------------------------------------------------------------------------------
def _two_adapters():
    model = get_peft_model(four_kinds(), NeatPeftConfig(target_modules=ALL_KINDS, r=2, init_weights=False), "first")
    model.add_adapter("second", NeatPeftConfig(target_modules=["emb", "conv2d"], r=3, depth=1, axis="in",
                                          init_weights=False))
    return model.eval()


def test_mixed_adapter_batch_matches_each_adapter_alone():
    model = _two_adapters()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(IDS)
        model.set_adapter("first")
        out_a = model(IDS)
        model.set_adapter("second")
        out_b = model(IDS)
        names = ["__base__", "first", "second"] * 2
        mixed = model(IDS, adapter_names=names)
    torch.testing.assert_close(mixed[0::3], base[0::3], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1::3], out_a[1::3], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[2::3], out_b[2::3], atol=1e-6, rtol=0)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)


def test_mixed_adapter_batch_routes_modules_to_save_too():
    model = get_peft_model(mlp(), NeatPeftConfig(target_modules=["0"], modules_to_save=["2"], r=2,
                                                 init_weights=False), "first")
    model.add_adapter("second", NeatPeftConfig(target_modules=["0"], modules_to_save=["2"], r=2, axis="in",
                                               init_weights=False))
    with torch.no_grad():  # distinct trained heads, so a wrong head shows in the output
        model.base_model.model[2].modules_to_save["first"].bias.add_(1.0)
        model.base_model.model[2].modules_to_save["second"].bias.sub_(1.0)
    model.eval()
    x = torch.randn(6, 10)
    with torch.no_grad():
        model.set_adapter("first")
        out_first = model(x)
        model.set_adapter("second")
        out_second = model(x)
        mixed = model(x, adapter_names=["first", "second"] * 3)
    torch.testing.assert_close(mixed[0::2], out_first[0::2], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1::2], out_second[1::2], atol=1e-6, rtol=0)


def test_generate_with_mixed_adapters_and_beam_search():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    model = get_peft_model(GPT2LMHeadModel(config).eval(),
                           NeatPeftConfig(target_modules=["c_attn"], r=2, init_weights=False, scaling=4.0), "first")
    model.add_adapter("second", NeatPeftConfig(target_modules=["c_attn", "c_fc"], r=2, axis="in",
                                               init_weights=False, scaling=4.0))
    model.eval()
    ids = torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.set_adapter("first")
        alone_first = model.generate(input_ids=ids, **kwargs)
        model.set_adapter("second")
        alone_second = model.generate(input_ids=ids, **kwargs)
        mixed = model.generate(input_ids=ids, adapter_names=["first", "second"], **kwargs)
    assert not torch.equal(alone_first, alone_second)  # the two adapters generate differently
    assert torch.equal(mixed[0], alone_first[0]) and torch.equal(mixed[1], alone_second[1])


def test_mixed_adapter_batch_bad_input():
    model = _two_adapters()
    with pytest.raises(ValueError, match="non-existing adapter.*typo"):
        model(IDS, adapter_names=["first", "typo"] * 3)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(IDS, adapter_names=["first"] * 5)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(IDS, adapter_names=["first"] * 6)
    model.eval()
    model.merge_adapter(["first"])
    with pytest.raises(ValueError, match="merged adapters"):
        model(IDS, adapter_names=["first"] * 6)


def test_merging_two_adapters_uses_the_pristine_weight_and_unmerge_restores_it():
    model = _two_adapters()
    pristine = {n: p.clone() for n, p in four_kinds().named_parameters()}
    model.base_model.set_adapter(["first", "second"])
    with torch.no_grad():
        unmerged = model(IDS)
        model.merge_adapter(["first", "second"])
        merged = model(IDS)
    expected = merged_reference(four_kinds(), model, ["first", "second"])
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, expected(IDS), atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for name, p in model.get_base_model().named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in pristine:
            assert torch.equal(p, pristine[clean]), name


@pytest.mark.parametrize("default_targets, c_targets, expected", [(["head", "conv1d"], ["emb"], "c"),
                                                                   (["emb"], ["conv2d"], "b")])
def test_deleting_the_active_adapter_activates_one_adapter_on_every_layer(default_targets, c_targets, expected):
    """Found by the state machine (PeftWalk). peft let each layer pick its own next adapter among those it holds and
    reported the first layer's pick: in the first case `head` went on computing "b" while the model said "c"; in the
    second the first layer (emb) had nothing left, and the model kept the deleted name (KeyError at the forward)."""
    torch.manual_seed(0)
    model = get_peft_model(FourKinds(), NeatConfig(r=2, target_modules=default_targets, init_weights=False))
    model.add_adapter("b", NeatConfig(r=2, target_modules=["head", "conv1d"], init_weights=False))
    model.add_adapter("c", NeatConfig(r=2, target_modules=c_targets, init_weights=False))
    model.set_adapter("default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Adapter default was active which is now deleted"
        model.delete_adapter("default")
    assert model.active_adapters == [expected]
    layers = {name: m.active_adapters for name, m in model.named_modules() if isinstance(m, NeatPeftLayer)}
    assert all(active == [expected] for active in layers.values()), layers
    alone = copy.deepcopy(model)
    for module in alone.modules():  # the reference: that adapter alone, on its layers, and nothing else
        if isinstance(module, NeatPeftLayer) and expected not in module.adapter_configs:
            module.enable_adapters(False)
    torch.testing.assert_close(model(IDS), alone(IDS), rtol=0, atol=0)


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing():
    model = get_peft_model(mlp(), NeatPeftConfig(target_modules=["0"], r=2, init_weights=False))
    with torch.no_grad():
        model.base_model.model[0].neat_B["default"].weight[0, 0] = float("nan")
    before = model.base_model.model[0].base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model[0].base_layer.weight, before)
    assert not model.base_model.model[0].merged


# --- LoRA conversion ------------------------------------------------------------------------------------------------
class LinearAndConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = Conv1D(12, 8)
        self.out = nn.Linear(12, 4)
        with torch.no_grad():
            self.proj.weight.normal_(0, 0.3)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def linear_and_conv1d():
    torch.manual_seed(0)
    return LinearAndConv1D().eval()


def test_peft_convert_to_lora_reproduces_the_adapter_at_rank_r():
    config = NeatPeftConfig(target_modules=["proj", "out"], r=3, depth=1, axis="in", init_weights=False)
    model = get_peft_model(linear_and_conv1d(), config).eval()
    assert model.supports_lora_conversion()
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = model(x)
    lora_config, state_dict = peft.convert_to_lora(model, rank=3)
    lora = get_peft_model(linear_and_conv1d(), lora_config).eval()
    assert not set_peft_model_state_dict(lora, state_dict).unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-5)


def test_peft_convert_to_lora_refuses_embedding_and_conv2d_layers():
    model = get_peft_model(four_kinds(), NeatPeftConfig(target_modules=ALL_KINDS, r=2))
    assert not model.supports_lora_conversion()
    with pytest.raises(TypeError, match="NeatPeftLayer"):
        peft.convert_to_lora(model, rank=2)


def test_exact_lora_conversion_covers_all_four_kinds():
    config = NeatPeftConfig(target_modules=["emb", "conv1d", "conv2d"], modules_to_save=["head"], r=2, depth=1,
                            scaling=0.5, init_weights=False)
    model = get_peft_model(four_kinds(), config).eval()
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].bias.add_(1.0)
        expected = model(IDS)
    lora_config, state_dict = convert_to_lora_exact(model)
    assert isinstance(lora_config, LoraConfig) and lora_config.r == lora_config.lora_alpha == 2
    lora = get_peft_model(four_kinds(), lora_config).eval()
    result = set_peft_model_state_dict(lora, state_dict)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(lora(IDS), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no NEAT adapter named 'other'"):
        convert_to_lora_exact(model, "other")


# --- A's gradient scales with |W0|: normalize_weight and neat_param_groups ---------------------------------------
def _grad_of_A(scale, normalize_weight):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    with torch.no_grad():
        base.weight.mul_(scale)
    model = get_peft_model(nn.Sequential(base), NeatPeftConfig(target_modules=["0"], r=4, init_weights=False,
                                                               normalize_weight=normalize_weight))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    target = torch.randn(8, 12, generator=torch.Generator().manual_seed(2))
    # a loss linear in the adapter's contribution: its gradient w.r.t. H = relu(W0^T A^T) depends on x, B and the
    # target only, so dL/dA = (relu'(.) * dL/dH)^T W0^T is exactly proportional to the scale of W0
    layer = model.base_model.model[0]
    ((layer(x) - layer.base_layer(x)) * target).sum().backward()
    return layer.neat_A["default"].weight.grad


def test_A_gradient_is_proportional_to_the_weight_scale_unless_normalized():
    c = 0.02
    plain, small = _grad_of_A(1.0, False), _grad_of_A(c, False)
    torch.testing.assert_close(small, c * plain, atol=1e-7, rtol=1e-4)  # ReLU, depth 0: exactly linear in |W0|
    normalized, small_normalized = _grad_of_A(1.0, True), _grad_of_A(c, True)
    torch.testing.assert_close(small_normalized, normalized, atol=1e-6, rtol=1e-4)
    assert small.abs().max() < 0.05 * normalized.abs().max()


@pytest.mark.parametrize("wrap", ["peft", "core"])
def test_neat_param_groups_give_A_its_own_learning_rate(wrap):
    config = dict(target_modules=["0", "2"], r=2, depth=1, init_weights=False, modules_to_save=None)
    if wrap == "peft":
        model = get_peft_model(mlp(), NeatPeftConfig(**config))
    else:
        model = get_neat_model(mlp(), NeatConfig(**config))
    groups = neat_param_groups(model, lr=0.1, a_lr_ratio=8.0)
    a_params = [m.neat_A[n].weight for m in model.modules() if isinstance(m, neat_peft.NeatLayer) for n in m.neat_A]
    assert [g["name"] for g in groups] == ["neat_A", "other"]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in a_params} and groups[0]["lr"] == pytest.approx(0.8)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert not {id(p) for p in groups[0]["params"]} & {id(p) for p in groups[1]["params"]}

    before = {id(p): p.detach().clone() for p in model.parameters() if p.requires_grad}
    model(torch.randn(4, 10)).sum().backward()
    torch.optim.SGD(groups).step()  # plain SGD: each step is -lr * grad, so the ratio shows exactly
    for group in groups:
        for p in group["params"]:
            torch.testing.assert_close(p.detach(), before[id(p)] - group["lr"] * p.grad, atol=1e-7, rtol=0)


def test_neat_param_groups_bad_input():
    model = get_peft_model(mlp(), NeatPeftConfig(target_modules=["0"], r=2))
    with pytest.raises(ValueError, match="lr must be a positive"):
        neat_param_groups(model, lr=0)
    with pytest.raises(ValueError, match="a_lr_ratio must be a positive"):
        neat_param_groups(model, lr=1e-3, a_lr_ratio=-1)
    with pytest.raises(ValueError, match="no NEAT layers"):
        neat_param_groups(mlp(), lr=1e-3)


# --- configuration and bad input -----------------------------------------------------------------------------------
def test_config_mirrors_the_core_config_and_validates_the_same_way():
    import dataclasses

    core_fields = {f.name for f in dataclasses.fields(NeatConfig)}
    assert core_fields <= {f.name for f in dataclasses.fields(NeatPeftConfig)}
    assert issubclass(NeatPeftConfig, peft.PeftConfig) and issubclass(NeatPeftConfig, NeatConfig)
    assert issubclass(NeatPeftLayer, neat_peft.NeatLayer)  # the plugin adapts the core layer, no second copy
    assert NeatPeftConfig().peft_type == "NEAT"
    for bad, match in [(dict(r=0), "r must be a positive"), (dict(axis="sideways"), "axis must be"),
                       (dict(dropout=1.0), "dropout must be"), (dict(act_fn="nope"), "act_fn"),
                       (dict(depth=-1), "depth must be")]:
        with pytest.raises(ValueError, match=match):
            NeatPeftConfig(**bad)


def test_unsupported_target_raises_before_touching_the_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="Cannot adapt module '1' of type LayerNorm"):
        get_peft_model(model, NeatPeftConfig(target_modules=["0", "1"], r=2))
    assert isinstance(model[0], nn.Linear) and not hasattr(model, "peft_config")


def test_registration_guards_in_a_fresh_process(tmp_path):
    result = subprocess.run([sys.executable, str(HERE / "peft_registration_script.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ALL OK"), result.stdout + result.stderr
    assert "UNKNOWN TYPE ERROR: KeyError: 'NEAT'" in result.stdout


def _fresh(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_core_works_where_peft_cannot_be_imported():
    """neat_peft and its core need torch + safetensors only: with peft blocked, NeatConfig is the plain dataclass."""
    out = _fresh("import sys; sys.modules['peft'] = None\n"
                 "import torch, neat_peft\n"
                 "config = neat_peft.NeatConfig(r=2, target_modules=['0'], init_weights=False)\n"
                 "model = neat_peft.get_neat_model(torch.nn.Sequential(torch.nn.Linear(3, 3)), config)\n"
                 "print(type(config).__name__, tuple(model(torch.randn(2, 3)).shape), sys.modules['peft'])\n")
    assert out.strip() == "NeatConfig (2, 3) None"


def test_a_fresh_process_loads_a_neat_dir_through_peft_without_a_registration_call(tmp_path):
    """NEAT registers itself when peft is imported after neat_peft (AutoPeftModel*, PeftModel.from_pretrained)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    from safetensors.torch import save_file

    model = get_peft_model(copy.deepcopy(base), NeatPeftConfig(r=2, axis="in", target_modules=["0"], init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randn(4, 6)
    with torch.no_grad():
        save_file({**{f"base.{k}": v for k, v in base.state_dict().items()}, "x": x, "y": model(x)},
                  tmp_path / "case.safetensors")
    out = _fresh(f"import sys, torch, neat_peft\n"
                 f"from safetensors.torch import load_file\n"
                 f"assert 'peft' not in sys.modules\n"
                 f"from peft import PeftModel\n"
                 f"case = load_file({str(tmp_path / 'case.safetensors')!r})\n"
                 f"base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
                 f"base.load_state_dict({{k[5:]: v for k, v in case.items() if k.startswith('base.')}})\n"
                 f"model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r})\n"
                 f"print(float((model(case['x']) - case['y']).abs().max()))\n")
    assert float(out.strip().splitlines()[-1]) < 1e-6  # not a KeyError 'NEAT': the NEAT adapter's outputs
