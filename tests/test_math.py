"""The NEAT math in functional.py against the materialised reference, and gradcheck in float64."""

import pytest
import torch
from torch.func import functional_call

from neat_testing import (
    REFERENCE_ACTIVATIONS,
    Single,
    make_input,
    make_layer,
    reference_delta_weight,
    reference_network,
)
from neat_peft import NeatConfig, get_neat_model
from neat_peft import functional as NF

ACTS = ["relu", "gelu", "tanh", "sin", "identity"]


def random_adapter(m, n, r, depth, dtype=torch.float64):
    A = torch.randn(r, m, dtype=dtype)
    B = torch.randn(n, r, dtype=dtype)
    encs = [torch.randn(r, r, dtype=dtype) / r**0.5 for _ in range(depth)]
    decs = [torch.randn(r, r, dtype=dtype) / r**0.5 for _ in range(depth)]
    return A, B, encs, decs


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_low_rank_factors_reproduce_materialised_delta(act, depth, axis):
    d_out, d_in, r, s = 6, 9, 3, 0.7
    W0 = torch.randn(d_out, d_in, dtype=torch.float64)
    width = d_out if axis == "out" else d_in
    A, B, encs, decs = random_adapter(width, width, r, depth)
    down, up = NF.low_rank_factors(W0, A, B, encs, decs, NF.get_activation(act), axis)
    assert down.shape == (d_in, r) and up.shape == (d_out, r)
    expected = reference_delta_weight(W0, A, B, encs, decs, act, axis, s)
    torch.testing.assert_close(NF.delta_weight(down, up, s), expected, rtol=1e-12, atol=1e-12)
    # The factored product x @ down @ up^T * s is x @ dW^T without building dW.
    x = torch.randn(4, d_in, dtype=torch.float64)
    torch.testing.assert_close(s * (x @ down) @ up.t(), x @ expected.t(), rtol=1e-12, atol=1e-12)


def test_residual_structure_is_nested_like_peft():
    """depth 2: h1 = act(XA^T); h2 = act(h1 e0^T); h3 = act(h2 e1^T); h4 = act(h3 d0^T) + h2; h5 = act(h4 d1^T) + h1."""
    X = torch.randn(5, 4, dtype=torch.float64)
    A, _, (e0, e1), (d0, d1) = random_adapter(4, 4, 3, 2)
    act = torch.tanh
    h1 = act(X @ A.t())
    h2 = act(h1 @ e0.t())
    h3 = act(h2 @ e1.t())
    h4 = act(h3 @ d0.t()) + h2
    h5 = act(h4 @ d1.t()) + h1
    torch.testing.assert_close(NF.weight_network(X, A, [e0, e1], [d0, d1], act), h5, rtol=0, atol=1e-12)


def test_weight_network_is_row_wise():
    X = torch.randn(7, 5, dtype=torch.float64)
    A, _, encs, decs = random_adapter(5, 5, 3, 1)
    full = NF.weight_network(X, A, encs, decs, torch.relu)
    rows = [2, 5, 0]
    torch.testing.assert_close(NF.weight_network(X[rows], A, encs, decs, torch.relu), full[rows], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["relu", "gelu", "silu", "tanh", "sigmoid", "identity", "sin"])
def test_builtin_activations_are_the_named_functions(name):
    t = torch.linspace(-3, 3, 25, dtype=torch.float64)
    torch.testing.assert_close(NF.get_activation(name)(t), REFERENCE_ACTIVATIONS[name](t), rtol=1e-12, atol=1e-12)


def test_builtin_names_missing_from_act2fn_are_listed():
    """Names peft's PEANuT cannot read must be exactly the built-ins ACT2FN lacks (they decide the file type)."""
    from transformers.activations import ACT2FN

    assert NF.NON_ACT2FN_ACTIVATIONS == set(NF._BUILTIN_ACTIVATIONS) - set(ACT2FN)
    t = torch.linspace(-3, 3, 25)
    for name in set(NF._BUILTIN_ACTIVATIONS) & set(ACT2FN):  # the shared names mean the same function
        torch.testing.assert_close(NF.get_activation(name)(t), ACT2FN[name](t))


def test_transformers_activation_names_are_accepted():
    from transformers.activations import ACT2FN

    t = torch.linspace(-3, 3, 25)
    torch.testing.assert_close(NF.get_activation("gelu_new")(t), ACT2FN["gelu_new"](t))
    assert NeatConfig(act_fn="gelu_new", target_modules=["x"]).act_fn == "gelu_new"
    with pytest.raises(ValueError, match="Unknown act_fn 'nope'"):
        NF.get_activation("nope")


def test_low_rank_factors_rejects_unknown_axis():
    W0 = torch.randn(3, 4)
    A, B, _, _ = random_adapter(3, 3, 2, 0, torch.float32)
    with pytest.raises(ValueError, match="axis must be 'out' or 'in'"):
        NF.low_rank_factors(W0, A, B, [], [], torch.relu, "sideways")


def test_normalize_weight_divides_by_rms():
    W0 = torch.randn(6, 5, dtype=torch.float64) * 0.02
    A, B, encs, decs = random_adapter(6, 6, 2, 0)
    down, up = NF.low_rank_factors(W0, A, B, encs, decs, torch.tanh, "out", normalize=True)
    W0n = W0 / W0.pow(2).mean().sqrt()
    torch.testing.assert_close(NF.delta_weight(down, up, 1.0),
                               reference_delta_weight(W0n, A, B, encs, decs, "tanh", "out", 1.0))


def test_low_rank_factors_cast_half_base_to_adapter_dtype():
    W0 = torch.randn(6, 5).to(torch.bfloat16)
    A, B, _, _ = random_adapter(6, 6, 2, 0, torch.float32)
    down, up = NF.low_rank_factors(W0, A, B, [], [], torch.relu, "out")
    assert down.dtype == torch.float32
    torch.testing.assert_close(down, reference_network(W0.float().t(), A, [], [], torch.relu))


# --- gradcheck (float64, tiny) through a real NeatLayer ---------------------------------------------------
@pytest.mark.parametrize(
    "kind, axis, depth, act",
    [
        ("linear", "out", 0, "tanh"),
        ("linear", "in", 2, "gelu"),
        ("linear", "out", 1, "sin"),
        ("conv1d", "out", 1, "tanh"),
        ("conv1d", "in", 0, "sin"),
        ("embedding", "out", 1, "gelu"),
        ("embedding", "in", 1, "tanh"),
        ("conv2d", "out", 1, "sin"),
        ("conv2d", "in", 2, "tanh"),
    ],
)
def test_gradcheck_float64(kind, axis, depth, act):
    base = make_layer(kind, {"stride": 2, "padding": 1, "dilation": 1} if kind == "conv2d" else None).double()
    model = get_neat_model(Single(base), NeatConfig(r=2, depth=depth, act_fn=act, axis=axis, scaling=0.5,
                                                    target_modules=["layer"], init_weights=False))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    assert any("neat_A" in n for n in names) and any("neat_B" in n for n in names)
    assert sum("neat_encoders" in n for n in names) == depth
    x = make_input(kind, batch=2)
    if kind == "conv2d":
        x = torch.randn(2, 3, 5, 5)
    x = x.double().requires_grad_(True) if x.is_floating_point() else x

    def f(*tensors):
        if x.is_floating_point():
            inp, tensors = tensors[0], tensors[1:]
        else:
            inp = x
        return functional_call(model, dict(zip(names, tensors)), (inp,))

    inputs = ((x,) if x.is_floating_point() else ()) + tuple(params[n] for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
