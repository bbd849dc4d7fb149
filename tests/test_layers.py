"""NeatLayer on all four layer kinds: outputs and gradients against the materialised reference; the eval cache."""

import pytest
import torch
from torch import nn

from neat_testing import (
    Single,
    adapter_tensors,
    linear_layout,
    make_input,
    make_layer,
    reference_delta_weight,
    reference_layer_output,
    stored_layout,
)
import neat_peft.layers as layers_module
from neat_peft import NeatConfig, NeatLayer, get_neat_model

KINDS = ["linear", "conv1d", "embedding", "conv2d"]
ACTS = ["relu", "gelu", "tanh", "sin", "identity"]


def build(kind, axis="out", depth=0, act="relu", scaling=0.7, r=3, conv_kwargs=None, **cfg):
    base = make_layer(kind, conv_kwargs)
    config = NeatConfig(r=r, depth=depth, act_fn=act, axis=axis, scaling=scaling, target_modules=["layer"],
                        init_weights=False, **cfg)
    model = get_neat_model(Single(base), config)
    return model, model.base_model.layer


def reference_forward_and_grads(layer, x, upstream, name="default"):
    """Materialised output and the gradients of <output, upstream> w.r.t. fresh leaf copies of the adapter."""
    cfg = layer.adapter_configs[name]
    A, B, encs, decs = adapter_tensors(layer, name)
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    A, B, encs, decs = leaf(A), leaf(B), [leaf(t) for t in encs], [leaf(t) for t in decs]
    W0_stored = layer.base_layer.weight.detach()
    W0 = linear_layout(layer.kind.name, W0_stored)
    dW = reference_delta_weight(W0, A, B, encs, decs, cfg.act_fn, cfg.axis, cfg.scaling)
    x_ref = x.detach().clone().requires_grad_(True) if x.is_floating_point() else x
    weight = W0_stored + stored_layout(layer.kind.name, dW, W0_stored.shape)
    out = reference_layer_output(layer.kind.name, layer.base_layer, weight, x_ref)
    leaves = [A, B, *encs, *decs] + ([x_ref] if x.is_floating_point() else [])
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    return out.detach(), grads


def check_against_reference(model, layer, kind, x, name="default"):
    x_in = x.clone().requires_grad_(True) if x.is_floating_point() else x
    out = model(x_in)
    upstream = torch.randn_like(out)
    params = [layer.neat_A[name].weight, layer.neat_B[name].weight,
              *(m.weight for m in layer.neat_encoders[name]), *(m.weight for m in layer.neat_decoders[name])]
    grads = torch.autograd.grad((out * upstream).sum(), params + ([x_in] if x.is_floating_point() else []))
    ref_out, ref_grads = reference_forward_and_grads(layer, x, upstream, name)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(ref_grads)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)
    return out


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_gradients_match_materialised_formula(kind, axis, depth, act):
    model, layer = build(kind, axis, depth, act)
    assert isinstance(layer, NeatLayer) and layer.kind.name == kind
    check_against_reference(model, layer, kind, make_input(kind))
    # the adapter does something: the output differs from the base layer's
    with torch.no_grad():
        base_out = layer.base_layer(make_input(kind, generator=torch.Generator().manual_seed(1)))
        adapted = model(make_input(kind, generator=torch.Generator().manual_seed(1)))
    assert (adapted - base_out).abs().max() > 1e-4


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"stride": 2},
        {"padding": 2},
        {"dilation": 2},
        {"stride": 2, "padding": 1, "dilation": 2},
        {"stride": (1, 2), "padding": (0, 1), "dilation": (2, 1)},
        {"padding": "same"},
        {"bias": False, "stride": 3},
    ],
)
def test_conv2d_geometry(conv_kwargs, axis):
    model, layer = build("conv2d", axis, depth=1, act="tanh", conv_kwargs=conv_kwargs)
    check_against_reference(model, layer, "conv2d", torch.randn(2, 3, 9, 10))


def test_conv2d_non_square_kernel():
    base = nn.Conv2d(2, 5, kernel_size=(1, 3), padding=(0, 1))
    model = get_neat_model(Single(base), NeatConfig(r=2, target_modules=["layer"], init_weights=False, act_fn="sin"))
    check_against_reference(model, model.base_model.layer, "conv2d", torch.randn(2, 2, 4, 6))


def test_embedding_with_padding_idx_and_repeated_ids():
    base = nn.Embedding(10, 4, padding_idx=0)
    model = get_neat_model(Single(base), NeatConfig(r=2, depth=1, target_modules=["layer"], init_weights=False))
    ids = torch.tensor([[0, 3, 3, 9], [9, 0, 1, 3]])
    layer = model.base_model.layer
    # Gradients agree here because nn.Embedding zeroes the padding row of W0 and relu(0) = 0, so the padding
    # token adds nothing to the adapter. (With an activation where act(0) != 0, padding tokens do send gradient
    # to A and B, unlike an nn.Embedding holding W0 + dW: a known, documented difference.)
    check_against_reference(model, layer, "embedding", ids)
    model.eval()  # eval path (whole-vocabulary H, cached) equals the training path (looked-up rows only)
    with torch.no_grad():
        eval_out = model(ids)
    model.train()
    torch.testing.assert_close(eval_out, model(ids).detach(), rtol=1e-6, atol=1e-6)


def test_initial_adapter_is_the_identity():
    for kind in KINDS:
        base = make_layer(kind)
        x = make_input(kind)
        expected = base(x)
        model = get_neat_model(Single(base), NeatConfig(r=2, depth=2, target_modules=["layer"]))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        assert torch.count_nonzero(model.base_model.layer.neat_B["default"].weight) == 0


def test_factored_forward_never_builds_delta_weight(monkeypatch):
    """Training and unmerged inference must not materialise dW: delta_weight is only for merging."""
    calls = []
    monkeypatch.setattr(layers_module, "delta_weight", lambda *a, **k: calls.append(1) or pytest.fail("built dW"))
    for kind in KINDS:
        model, _ = build(kind, "out", 1)
        model(make_input(kind)).sum().backward()
        model.eval()
        with torch.no_grad():
            model(make_input(kind))
    assert calls == []


def test_multiple_active_adapters_sum():
    model, layer = build("linear", "out", 1, "tanh")
    model.add_adapter("b", NeatConfig(r=2, axis="in", act_fn="sin", scaling=0.3, target_modules=["layer"],
                                      init_weights=False))
    model.set_adapter(["default", "b"])
    x = torch.randn(4, 7)
    W0 = layer.base_layer.weight
    total = W0.clone()
    for name in ("default", "b"):
        cfg = layer.adapter_configs[name]
        total = total + reference_delta_weight(W0, *adapter_tensors(layer, name), cfg.act_fn, cfg.axis, cfg.scaling)
    torch.testing.assert_close(model(x), torch.nn.functional.linear(x, total, layer.base_layer.bias),
                               rtol=1e-5, atol=1e-5)


def test_dropout_applies_to_adapter_input_in_training_only():
    model, layer = build("linear", "out", 0, "relu", dropout=0.5)
    x = torch.randn(64, 7)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)  # dropout is live in training
    # With a fixed mask, the adapter sees drop(x) and the base layer sees x.
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    cfg = layer.adapter_configs["default"]
    W0 = layer.base_layer.weight
    dW = reference_delta_weight(W0, *adapter_tensors(layer), cfg.act_fn, cfg.axis, cfg.scaling)
    torch.testing.assert_close(out, layer.base_layer(x) + dropped @ dW.t(), rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), layer.base_layer(x) + x @ dW.t(), rtol=1e-5, atol=1e-5)


def test_adapters_added_to_an_eval_model_start_in_eval_mode():
    """get_neat_model / add_adapter on a model in eval mode must not switch dropout (and the cache) off/on."""
    base = Single(nn.Linear(7, 5)).eval()
    model = get_neat_model(base, NeatConfig(r=3, dropout=0.5, target_modules=["layer"], init_weights=False))
    layer = model.base_model.layer
    assert not layer.training and not layer.neat_dropout["default"].training
    model.add_adapter("b", NeatConfig(r=2, dropout=0.5, target_modules=["layer"], init_weights=False))
    assert not layer.neat_dropout["b"].training
    x = torch.randn(32, 7)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no dropout noise in eval
    model.train()
    assert layer.training and layer.neat_dropout["b"].training


# --- the eval cache of H --------------------------------------------------------------------------------
class FactorCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = layers_module.low_rank_factors

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(layers_module, "low_rank_factors", counting)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", ["out", "in"])
def test_cache_is_used_and_equals_uncached(kind, axis, monkeypatch):
    model, layer = build(kind, axis, 1, "tanh")
    counter = FactorCounter(monkeypatch)
    x = make_input(kind)
    model.eval()
    with torch.no_grad():
        first = model(x)
        n_first = counter.calls
        second = model(x)
        assert counter.calls == n_first, "second eval forward recomputed H"
        model.clear_cache()
        uncached = model(x)
        assert counter.calls == n_first + 1
    assert n_first == 1
    assert torch.equal(first, second)
    torch.testing.assert_close(first, uncached, rtol=0, atol=0)
    # and it is the right answer
    with torch.enable_grad():
        check_against_reference(model, layer, kind, x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("autocast_first", [True, False])
def test_cache_is_keyed_on_the_autocast_state(kind, axis, autocast_first):
    """An eval forward under bf16 autocast, then a plain one (and the other order): each equals its own uncached
    forward. A cache that ignored autocast handed the plain forward a bf16 H (a dtype error in the matmul)."""
    model, layer = build(kind, axis, 1, "tanh")
    x = make_input(kind)
    model.eval()

    def run(autocast, cached):
        if not cached:
            model.clear_cache()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(x)

    order = [True, False] if autocast_first else [False, True]
    outputs = [run(autocast, cached=True) for autocast in order]  # the second forward meets the first one's cache
    for autocast, out in zip(order, outputs):
        assert torch.equal(out, run(autocast, cached=False)), f"autocast={autocast}"
    assert outputs[order.index(False)].dtype == torch.float32


def test_no_cache_in_training_or_with_grad(monkeypatch):
    model, _ = build("linear", "out", 0)
    counter = FactorCounter(monkeypatch)
    x = torch.randn(2, 7)
    model.train()
    with torch.no_grad():
        model(x)
        model(x)
    assert counter.calls == 2
    model.eval()
    model(x)
    model(x)  # grad enabled: every call computes (the graph must reach A)
    assert counter.calls == 4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["A", "B", "enc", "dec", "W0"])
def test_in_place_change_invalidates_cache(kind, which):
    model, layer = build(kind, "out", 1, "tanh")
    x = make_input(kind)
    model.eval()
    with torch.no_grad():
        before = model(x)
        param = {"A": layer.neat_A["default"].weight, "B": layer.neat_B["default"].weight,
                 "enc": layer.neat_encoders["default"][0].weight, "dec": layer.neat_decoders["default"][0].weight,
                 "W0": layer.base_layer.weight}[which]
        param.mul_(1.5).add_(0.1)  # in place through the Parameter
        after = model(x)
    assert not torch.allclose(before, after)
    with torch.enable_grad():
        check_against_reference(model, layer, kind, x)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
def test_optimizer_step_invalidates_cache(optimizer):
    """Fill the cache, take a training step without calling train() (eval mode with grad), then the next
    no_grad forward must see the new parameters."""
    model, layer = build("linear", "in", 2, "gelu")
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(5, 7)
    model.eval()
    with torch.no_grad():
        cached = model(x)
        assert layer._cache
    model(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(cached, after)
    with torch.enable_grad():
        reference = check_against_reference(model, layer, "linear", x)
    torch.testing.assert_close(after, reference.detach(), rtol=1e-5, atol=1e-5)


def test_load_state_dict_invalidates_cache():
    model, layer = build("conv1d", "out", 0, "relu")
    x = make_input("conv1d")
    model.eval()
    with torch.no_grad():
        model(x)
    new_state = {k: torch.randn_like(v) if "neat_" in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(new_state)
    with torch.no_grad():
        out = model(x)
    with torch.enable_grad():
        ref = check_against_reference(model, layer, "conv1d", x)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)


def test_replaced_weight_parameter_invalidates_cache():
    """Assigning new Parameters (as load_state_dict(assign=True) does) must not reuse H of the old ones, even
    when the allocator gives a new tensor the address (and version count) of a freed one."""
    model, layer = build("linear", "out", 0, "tanh", r=4)
    layer.base_layer = nn.Linear(64, 64)  # big enough for malloc to hand freed blocks straight back
    layer.d_out = layer.d_in = 64
    layer.neat_A["default"] = nn.Linear(64, 4, bias=False)
    layer.neat_B["default"] = nn.Linear(4, 64, bias=False)
    x = torch.randn(3, 64)
    model.eval()
    for _ in range(20):
        with torch.no_grad():
            model(x)
        version = layer.base_layer.weight._version
        for _ in range(2):  # the second new tensor may land where the cached (first) one was
            new_W0 = torch.empty(64, 64).normal_()
            while new_W0._version < version:
                new_W0.add_(0)
            layer.base_layer.weight = nn.Parameter(new_W0, requires_grad=False)
        with torch.no_grad():
            out = model(x)
        ref = reference_forward_and_grads(layer, x, torch.zeros(3, 64))[0]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dtype_round_trip_invalidates_cache():
    """model.half().float() rounds W0 and swaps storage through `.data`: the cache must not survive it."""
    model = get_neat_model(Single(nn.Linear(64, 64)), NeatConfig(r=4, depth=1, axis="in", act_fn="tanh",
                                                                target_modules=["layer"], init_weights=False))
    x = torch.randn(3, 64)
    model.eval()
    for _ in range(10):
        with torch.no_grad():
            model(x)
        model.half()
        model.float()
        with torch.no_grad():
            out = model(x)
            model.clear_cache()
            fresh = model(x)
        assert torch.equal(out, fresh)


def test_train_clears_cache_and_set_adapter_switches(monkeypatch):
    model, layer = build("linear", "out", 0)
    model.add_adapter("b", NeatConfig(r=2, target_modules=["layer"], init_weights=False))
    x = torch.randn(2, 7)
    model.eval()
    with torch.no_grad():
        out_default = model(x)
        assert layer._cache
        model.train()
        assert not layer._cache
        model.eval()
        model.set_adapter("b")
        out_b = model(x)
        model.set_adapter("default")
        again = model(x)
    assert not torch.allclose(out_default, out_b)
    assert torch.equal(out_default, again)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_embedding_max_norm_forward_never_rewrites_adapter_weights(axis):
    """F.embedding(max_norm=...) renormalises the table it reads in place; the adapter's table is B (axis "in")
    or the cached H, so the adapter lookup must not pass max_norm on."""
    base = nn.Embedding(10, 4, max_norm=0.05)
    model = get_neat_model(Single(base), NeatConfig(r=3, axis=axis, target_modules=["layer"], init_weights=False))
    layer = model.base_model.layer
    adapter_before = [t.detach().clone() for t in [layer.neat_A["default"].weight, layer.neat_B["default"].weight]]
    ids = torch.tensor([[1, 2, 3, 2]])
    train_out = model(ids).detach()  # (the base lookup renormalises rows 1-3 of W0, as nn.Embedding does)
    model.eval()
    with torch.no_grad():
        eval_out = model(ids)
        again = model(ids)
    for before, now in zip(adapter_before, [layer.neat_A["default"].weight, layer.neat_B["default"].weight]):
        assert torch.equal(before, now)
    torch.testing.assert_close(eval_out, train_out, rtol=1e-6, atol=1e-7)
    assert torch.equal(eval_out, again)
    cfg = layer.adapter_configs["default"]
    W0 = base.weight.detach()
    dW = reference_delta_weight(W0.t(), *adapter_tensors(layer), cfg.act_fn, axis, cfg.scaling)
    torch.testing.assert_close(eval_out, (W0 + dW.t())[ids], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_base_keeps_float32_adapter(kind):
    base = make_layer(kind).to(torch.bfloat16)
    model = get_neat_model(Single(base), NeatConfig(r=3, depth=1, act_fn="tanh", target_modules=["layer"],
                                                    init_weights=False))
    layer = model.base_model.layer
    assert layer.neat_A["default"].weight.dtype == torch.float32
    x = make_input(kind)
    x = x.to(torch.bfloat16) if x.is_floating_point() else x
    out = model(x)
    assert out.dtype == torch.bfloat16
    # reference: the float32 update added to the bf16 base output, rounded once at the end
    W0 = linear_layout(kind, base.weight.detach().float())
    cfg = layer.adapter_configs["default"]
    dW = reference_delta_weight(W0, *adapter_tensors(layer), "tanh", "out", cfg.scaling).detach()
    x32 = x.float() if x.is_floating_point() else x
    if kind in ("linear", "conv1d"):
        update = x32 @ dW.t()
    elif kind == "embedding":
        update = dW.t()[x]
    else:
        update = torch.nn.functional.conv2d(x32, dW.reshape(base.weight.shape))
    expected = (base(x).float() + update).to(torch.bfloat16)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert layer.neat_A["default"].weight.grad.dtype == torch.float32
    assert base.weight.grad is None
    # merge / unmerge in bf16: W0 restored bit-exactly
    W0_bits = base.weight.detach().clone()
    model.merge_adapter()
    assert base.weight.dtype == torch.bfloat16
    model.unmerge_adapter()
    assert torch.equal(base.weight, W0_bits)


def test_models_with_a_filled_cache_can_be_copied_and_pickled():
    import io
    import copy as copy_module

    model, layer = build("linear", "out", 1, "tanh")
    x = torch.randn(2, 7)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert layer._cache
    copied = copy_module.deepcopy(model)
    assert not copied.base_model.layer._cache and layer._cache
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)  # our own in-memory object, not a downloaded file
    with torch.no_grad():
        copied.base_model.layer.neat_A["default"].weight.add_(1.0)  # the copy has its own parameters
        assert torch.equal(restored(x), expected)
        assert torch.equal(model(x), expected)
        assert not torch.allclose(copied(x), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", ["out", "in"])
def test_normalize_weight_feeds_w0_over_its_rms(kind, axis):
    """normalize_weight: the network reads W0 / rms(W0); the base layer still uses W0 (train and eval paths)."""
    model, layer = build(kind, axis, 1, "tanh", normalize_weight=True)
    with torch.no_grad():
        layer.base_layer.weight.mul_(0.02)  # a small-init layer, where normalising matters
    W0_stored = layer.base_layer.weight.detach()
    W0 = linear_layout(kind, W0_stored)
    cfg = layer.adapter_configs["default"]
    dW = reference_delta_weight(W0 / W0.pow(2).mean().sqrt(), *adapter_tensors(layer), "tanh", axis, cfg.scaling)
    x = make_input(kind)
    expected = reference_layer_output(kind, layer.base_layer, W0_stored + stored_layout(kind, dW, W0_stored.shape), x)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
