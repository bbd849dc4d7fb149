"""Property-based checks (hypothesis) over shapes, r, depth, axis and activation."""

import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from neat_testing import Single, adapter_tensors, reference_delta_weight
from neat_peft import NeatConfig, get_neat_model

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

adapters = st.fixed_dictionaries({
    "d_in": st.integers(1, 12),
    "d_out": st.integers(1, 12),
    "r": st.integers(1, 6),
    "depth": st.integers(0, 3),
    "axis": st.sampled_from(["out", "in"]),
    "act_fn": st.sampled_from(["relu", "gelu", "tanh", "sin", "identity", "silu", "sigmoid"]),
    "scaling": st.floats(-3, 3, allow_nan=False).filter(lambda s: abs(s) > 1e-3),
    "seed": st.integers(0, 2**16),
})


def build(p):
    torch.manual_seed(p["seed"])
    base = nn.Linear(p["d_in"], p["d_out"]).double()
    model = get_neat_model(Single(base), NeatConfig(r=p["r"], depth=p["depth"], axis=p["axis"], act_fn=p["act_fn"],
                                                    scaling=p["scaling"], target_modules=["layer"],
                                                    init_weights=False))
    layer = model.base_model.layer
    dW = reference_delta_weight(base.weight.detach(), *adapter_tensors(layer), p["act_fn"], p["axis"], p["scaling"])
    return model, layer, base, dW.detach()


@SETTINGS
@given(adapters, st.integers(1, 5))
def test_factored_forward_equals_materialised(p, batch):
    model, layer, base, dW = build(p)
    x = torch.randn(batch, p["d_in"], dtype=torch.float64)
    expected = x @ (base.weight + dW).t() + base.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    model.eval()
    with torch.no_grad():  # the cached path too
        model(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(adapters)
def test_rank_of_update_is_at_most_r(p):
    _, _, _, dW = build(p)
    assert dW.shape == (p["d_out"], p["d_in"])
    assert int(torch.linalg.matrix_rank(dW)) <= p["r"]


@SETTINGS
@given(adapters)
def test_exported_lora_factors_reproduce_delta_weight(p):
    model, _, _, dW = build(p)
    with tempfile.TemporaryDirectory() as tmp:
        model.export_lora(tmp)
        tensors = load_file(f"{tmp}/adapter_model.safetensors")
    lora_A = tensors["base_model.model.layer.lora_A.weight"]
    lora_B = tensors["base_model.model.layer.lora_B.weight"]
    assert lora_A.shape == (p["r"], p["d_in"]) and lora_B.shape == (p["d_out"], p["r"])
    torch.testing.assert_close(lora_B @ lora_A, dW, rtol=1e-10, atol=1e-10)  # scaling 1 = lora_alpha / r


@SETTINGS
@given(adapters)
def test_merge_round_trip(p):
    model, layer, base, dW = build(p)
    W0 = base.weight.detach().clone()
    x = torch.randn(3, p["d_in"], dtype=torch.float64)
    unmerged = model(x).detach()
    model.merge_adapter()
    torch.testing.assert_close(base.weight.detach(), W0 + dW, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-10, atol=1e-10)
    model.unmerge_adapter()
    assert torch.equal(base.weight, W0)
