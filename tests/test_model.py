"""NeatModel: injection, trainability, several adapters, disabling, mixed batches, merging, budgets."""

import pytest
import torch
from torch import nn

from neat_testing import (
    Single,
    TinyEncoder,
    TinyMLP,
    adapter_tensors,
    assert_state_equal,
    linear_layout,
    make_input,
    make_layer,
    materialised_reference,
    reference_delta_weight,
    state_snapshot,
    stored_layout,
)
from neat_peft import BASE_ONLY, NeatConfig, NeatLayer, count_adapter_parameters, get_neat_model, match_lora_budget
from neat_peft.layers import ModulesToSave

KINDS = ["linear", "conv1d", "embedding", "conv2d"]


def encoder_model(**cfg):
    base = TinyEncoder()
    defaults = dict(r=2, depth=1, act_fn="tanh", target_modules=["query", "value", "embed"],
                    modules_to_save=["classifier"], init_weights=False)
    defaults.update(cfg)
    return get_neat_model(base, NeatConfig(**defaults))


def ids(batch=4, seq=5, seed=0):
    return torch.randint(0, 13, (batch, seq), generator=torch.Generator().manual_seed(seed))


def perturb_head(model, adapter="default"):
    """Make a modules_to_save copy differ from the original, so switching heads is observable."""
    for _, m in model.base_model.named_modules():
        if isinstance(m, ModulesToSave) and adapter in m.copies:
            with torch.no_grad():
                for p in m.copies[adapter].parameters():
                    p.add_(torch.randn_like(p))


# --- injection and trainability ---------------------------------------------------------------------------
def test_injection_wraps_exactly_the_targets():
    model = encoder_model()
    wrapped = sorted(n for n, m in model.base_model.named_modules() if isinstance(m, NeatLayer))
    assert wrapped == ["embed", "layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"]
    assert [n for n, m in model.base_model.named_modules() if isinstance(m, ModulesToSave)] == ["classifier"]
    x = ids()
    torch.testing.assert_close(model(x), materialised_reference(model, ["default"])(x), rtol=1e-5, atol=1e-5)


def test_only_adapter_and_saved_copies_are_trainable():
    model = encoder_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        is_adapter = any(f".neat_{s}.default" in n for s in ("A", "B", "encoders", "decoders"))
        is_saved_copy = ".copies.default." in n
        assert (n in trainable) == (is_adapter or is_saved_copy), n
    n_expected = count_adapter_parameters(TinyEncoder(), model.peft_config["default"]) + sum(
        p.numel() for p in TinyEncoder().classifier.parameters())
    assert model.get_nb_trainable_parameters()[0] == n_expected


def test_optimizer_step_changes_only_adapter_params():
    model = encoder_model(init_weights=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = ids(8), torch.randint(0, 3, (8,))
    for _ in range(2):  # B starts at zero: A, encoders, decoders get a gradient from the second step on
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, f"frozen {n} got a gradient"
        opt.step()
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), f"frozen {n} changed"
    for n, before in trainable.items():
        assert not torch.equal(params[n], before), f"trainable {n} did not change"


def test_print_trainable_parameters(capsys):
    model = get_neat_model(TinyMLP(), NeatConfig(r=2, target_modules=["fc1", "fc2"]))
    model.print_trainable_parameters()
    # fc1: d_out 5 -> 2*2*5; fc2: d_out 4 -> 2*2*4
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * 2 * 5 + 2 * 2 * 4
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out


# --- several adapters ---------------------------------------------------------------------------------------
def test_add_set_delete_adapter():
    model = encoder_model()
    model.add_adapter("b", NeatConfig(r=3, axis="in", act_fn="sin", target_modules=["value", "ffn"],
                                      modules_to_save=["classifier"], init_weights=False))
    perturb_head(model, "b")
    x = ids()
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(model(x), materialised_reference(model, ["default"])(x), rtol=1e-5, atol=1e-5)
    model.set_adapter("b")
    torch.testing.assert_close(model(x), materialised_reference(model, ["b"])(x), rtol=1e-5, atol=1e-5)
    # only the active adapter trains
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".default" in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".b" in n)
    model.set_adapter(["default", "b"])
    torch.testing.assert_close(model(x), materialised_reference(model, ["default", "b"])(x), rtol=1e-5, atol=1e-5)
    model.delete_adapter("b")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert not any(".b." in n or n.endswith(".b") for n, _ in model.named_parameters())
    torch.testing.assert_close(model(x), materialised_reference(model, ["default"])(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("default")
    with pytest.raises(ValueError, match="No adapter named"):
        model.set_adapter("b")


def test_delete_merged_adapter_refused():
    model = encoder_model()
    model.add_adapter("b", NeatConfig(r=2, target_modules=["query"], init_weights=False))
    model.merge_adapter(["b"])
    with pytest.raises(ValueError, match="merged"):
        model.delete_adapter("b")
    assert "b" in model.peft_config


def test_disable_adapter_unmerged_and_merged():
    model = encoder_model()
    perturb_head(model)
    x = ids()
    plain = materialised_reference(model, [])  # base model, original head
    adapted = model(x).detach()
    with model.disable_adapter():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)

    model.merge_adapter()
    merged_weights = state_snapshot(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        assert not any(layer.merged for _, layer in model.neat_layers())
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert all(layer.merged for _, layer in model.neat_layers())
    assert_state_equal(model, merged_weights)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_disable_adapter_after_a_cast_puts_the_merged_weights_back_bit_for_bit(cast):
    """Found by the state machine: merged, then .half(), then disable_adapter re-merged from the half-precision
    adapters, which rounds differently from the merged weights .half() had rounded: the block changed them."""
    model = encoder_model()
    model.merge_adapter()
    model = getattr(model, cast)()
    merged_weights = state_snapshot(model)
    with model.disable_adapter():
        assert not any(layer.merged for _, layer in model.neat_layers())
    assert all(layer.merged for _, layer in model.neat_layers())
    assert_state_equal(model, merged_weights)


def test_mixed_adapter_batch_equals_per_sample_runs():
    model = encoder_model()
    model.add_adapter("b", NeatConfig(r=3, axis="in", act_fn="gelu", target_modules=["value", "embed", "ffn"],
                                      modules_to_save=["classifier"], init_weights=False))
    perturb_head(model, "default")
    perturb_head(model, "b")
    model.eval()
    names = ["b", BASE_ONLY, "default", "b", "default", BASE_ONLY]
    x = ids(len(names))
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        expected = []
        for i, name in enumerate(names):
            if name == BASE_ONLY:
                with model.disable_adapter():
                    expected.append(model(x[i:i + 1]))
            else:
                model.set_adapter(name)
                expected.append(model(x[i:i + 1]))
    torch.testing.assert_close(mixed, torch.cat(expected), rtol=1e-5, atol=1e-5)
    # and the per-sample runs agree with the reference
    torch.testing.assert_close(expected[0], materialised_reference(model, ["b"])(x[:1]), rtol=1e-5, atol=1e-5)


def test_mixed_batch_is_refused_where_a_backward_pass_could_recompute_it():
    """Routing lives for one call; a checkpointed forward re-run in backward would lose it: refuse, as peft does."""
    model = encoder_model()
    model.add_adapter("b", NeatConfig(r=2, target_modules=["query"], init_weights=False))
    names = ["default", BASE_ONLY, "default"]
    with pytest.raises(ValueError, match="training mode"):
        model(ids(3), adapter_names=names)
    model.eval()
    out = model(ids(3), adapter_names=names)  # eval mode: gradients of a mixed batch are fine without checkpointing
    out.sum().backward()
    for n, p in model.named_parameters():
        if ".neat_B.b" in n:  # "b" is in no sample
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
        if ".neat_B.default" in n:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_mixed_batch_under_activation_checkpointing_is_refused_not_silently_wrong(use_reentrant):
    """Before: gradients off by ~1.1 (reentrant) or torch's CheckpointError (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    model = encoder_model()  # training mode, where transformers' gradient checkpointing runs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids(3)
    with pytest.raises(ValueError, match="adapter_names"):
        checkpoint(lambda t: model(t, adapter_names=["default", BASE_ONLY, "default"]), x,
                   use_reentrant=use_reentrant).sum().backward()
    assert_state_equal(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_mixed_batch_errors():
    model = encoder_model()
    model.eval()
    torch.set_grad_enabled(False)
    try:
        _mixed_batch_errors(model)
    finally:
        torch.set_grad_enabled(True)


def _mixed_batch_errors(model):
    with pytest.raises(ValueError, match=r"non-existing adapter\(s\): nope"):
        model(ids(2), adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names`.* 1 and 2"):
        model(ids(2), adapter_names=["default"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        model(ids(2), adapter_names=["default", "default"])
    assert all(not layer._forward_pre_hooks for _, layer in model.neat_layers())  # routing hooks removed


# --- merging --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", ["out", "in"])
def test_merge_equals_unmerged_and_unmerge_restores_bits(kind, axis):
    base = make_layer(kind, {"stride": 2, "padding": 1, "dilation": 2} if kind == "conv2d" else None)
    model = get_neat_model(Single(base), NeatConfig(r=3, depth=2, axis=axis, act_fn="gelu", scaling=0.4,
                                                    target_modules=["layer"], init_weights=False))
    W0 = base.weight.detach().clone()
    x = make_input(kind)
    unmerged = model(x).detach()
    model.merge_adapter()
    layer = model.base_model.layer
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    cfg = layer.adapter_configs["default"]
    dW = reference_delta_weight(linear_layout(kind, W0), *adapter_tensors(layer), cfg.act_fn, axis, cfg.scaling)
    torch.testing.assert_close(base.weight.detach(), W0 + stored_layout(kind, dW, W0.shape), rtol=1e-6, atol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(base.weight, W0) and not layer.merged
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=0)


def test_merging_one_after_another_equals_merging_together_from_pristine_W0():
    """Every adapter's dW is computed from the pristine W0, never from a weight already holding another
    adapter's update (peft's PEANuT had exactly this bug)."""
    def two_adapter_model():
        torch.manual_seed(5)
        m = get_neat_model(TinyMLP(), NeatConfig(r=2, depth=1, act_fn="tanh", target_modules=["fc1", "fc2"],
                                                 init_weights=False))
        m.add_adapter("b", NeatConfig(r=3, axis="in", act_fn="sin", scaling=0.5, target_modules=["fc2", "head"],
                                      init_weights=False))
        return m

    one_by_one, together = two_adapter_model(), two_adapter_model()
    pristine = {n: l.base_layer.weight.detach().clone() for n, l in one_by_one.neat_layers()}
    reference = {}
    for path, layer in one_by_one.neat_layers():
        W = pristine[path].clone()
        for name in ("default", "b"):
            if name in layer.adapter_configs:
                cfg = layer.adapter_configs[name]
                W = W + reference_delta_weight(pristine[path], *adapter_tensors(layer, name), cfg.act_fn, cfg.axis,
                                               cfg.scaling)
        reference[path] = W.detach()

    one_by_one.merge_adapter(["default"])
    one_by_one.merge_adapter(["b"])
    together.merge_adapter(["default", "b"])
    for (path, a), (_, b) in zip(one_by_one.neat_layers(), together.neat_layers()):
        assert torch.equal(a.base_layer.weight, b.base_layer.weight), path
        torch.testing.assert_close(a.base_layer.weight.detach(), reference[path], rtol=1e-6, atol=1e-6)
        assert set(a.merged_adapters) == set(b.merged_adapters)
    # the wrong way (b's dW from W0 + dW_a) differs measurably on fc2, which both adapters adapt
    fc2 = together.base_model.fc2
    cfg = fc2.adapter_configs["b"]
    W_a = pristine["fc2"] + reference_delta_weight(pristine["fc2"], *adapter_tensors(fc2, "default"), "tanh", "out",
                                                   1.0)
    wrong = W_a + reference_delta_weight(W_a, *adapter_tensors(fc2, "b"), "sin", "in", cfg.scaling)
    assert (wrong.detach() - reference["fc2"]).abs().max() > 1e-3
    # outputs: merged model == materialised sum of both adapters
    x = torch.randn(4, 6)
    fresh = two_adapter_model()
    torch.testing.assert_close(together(x), materialised_reference(fresh, ["default", "b"])(x), rtol=1e-5, atol=1e-5)
    together.unmerge_adapter()
    for path, layer in together.neat_layers():
        assert torch.equal(layer.base_layer.weight, pristine[path])


def test_merge_and_unload_returns_plain_model():
    model = encoder_model()
    perturb_head(model)
    x = ids()
    expected = model(x).detach()
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (NeatLayer, ModulesToSave)) for m in plain.modules())
    assert type(plain) is TinyEncoder
    assert set(plain.state_dict()) == set(TinyEncoder().state_dict())
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_unload_returns_original_model():
    base = TinyEncoder()
    original = state_snapshot(base)
    model = get_neat_model(base, NeatConfig(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                            init_weights=False))
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, (NeatLayer, ModulesToSave)) for m in plain.modules())
    assert_state_equal(plain, original)


def test_safe_merge_with_nan_adapter_leaves_everything_unmerged():
    model = encoder_model()
    model.add_adapter("b", NeatConfig(r=2, target_modules=["query", "value"], init_weights=False))
    model.merge_adapter(["b"])  # an earlier merge must survive the failed one exactly
    merged_before = {p: list(l.merged_adapters) for p, l in model.neat_layers()}
    # break the *last* adapted layer, so earlier layers have merged by the time it fails
    last_path, last = list(model.neat_layers())[-1]
    with torch.no_grad():
        last.neat_B["default"].weight[0, 0] = float("nan")
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(["default"], safe_merge=True)
    assert_state_equal(model, before)
    assert {p: list(l.merged_adapters) for p, l in model.neat_layers()} == merged_before
    model.unmerge_adapter()
    assert not any(l.merged for _, l in model.neat_layers())


# --- parameter budgets ------------------------------------------------------------------------------------------
def test_count_adapter_parameters_matches_real_model():
    for axis in ("out", "in"):
        for kind in KINDS:
            cfg = NeatConfig(r=3, depth=2, axis=axis, target_modules=["layer"])
            base = Single(make_layer(kind))
            expected = count_adapter_parameters(base, cfg)
            assert get_neat_model(base, cfg).get_nb_trainable_parameters()[0] == expected


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")
@pytest.mark.parametrize("lora_r", [1, 4, 8])
@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_match_lora_budget_against_peft_lora_count(lora_r, depth, axis):
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 16)
            self.lin = nn.Linear(16, 24)
            self.c1d = Conv1D(12, 24)
            self.conv = nn.Conv2d(3, 6, 3)

    targets = ["emb", "lin", "c1d", "conv"]
    lora_count = get_peft_model(Mixed(), LoraConfig(r=lora_r, target_modules=targets)).get_nb_trainable_parameters()[0]
    cfg = NeatConfig(r=1, depth=depth, axis=axis, target_modules=targets)
    count = lambda rr: get_neat_model(Mixed(), NeatConfig(r=rr, depth=depth, axis=axis, target_modules=targets)  # noqa
                                      ).get_nb_trainable_parameters()[0]
    if count(1) > lora_count:  # NEAT's smallest adapter can cost more than a rank-1 LoRA (axis "in" here)
        with pytest.raises(ValueError, match=f"Even r=1 NEAT .* exceeds LoRA r={lora_r} \\({lora_count} params\\)"):
            match_lora_budget(Mixed(), cfg, lora_r)
        return
    r = match_lora_budget(Mixed(), cfg, lora_r)
    assert count(r) <= lora_count < count(r + 1)


def test_models_that_read_a_target_layers_weight_still_work():
    """T5 casts its input to `self.wo.weight.dtype`: a wrapped layer must expose its base weight and bias."""
    from transformers import T5Config, T5EncoderModel

    base = T5EncoderModel(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2)).eval()
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = base(input_ids=x).last_hidden_state
    model = get_neat_model(base, NeatConfig(r=2, target_modules=["wo", "q"], init_weights=False)).eval()
    wo = model.base_model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, NeatLayer) and wo.weight is wo.base_layer.weight and wo.bias is None
    with torch.no_grad():
        adapted = model(input_ids=x).last_hidden_state
        assert (adapted - expected).abs().max() > 1e-4
        torch.testing.assert_close(adapted, materialised_reference(model, ["default"])(input_ids=x).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    assert "weight" not in dict(wo.named_parameters(recurse=False))  # not registered twice
