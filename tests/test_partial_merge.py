"""Partial merges: with several active adapters, merging some keeps every active adapter's update in the output.

The merged adapters live in the weight, the others are still added factored; unmerge restores the pristine W0, so
the output is the same before, during and after. (peft drops the unmerged ones silently: its layers return the
base output whenever anything is merged.) The reference is materialised from scratch (neat_testing), per kind.
"""

import pytest
import torch

from neat_testing import TinyMLP, Single, make_input, make_layer, materialised_reference
from neat_peft import BASE_ONLY, NeatConfig, get_neat_model

KINDS = ["linear", "conv1d", "embedding", "conv2d"]


def two_adapters(base, targets):
    model = get_neat_model(base, NeatConfig(r=2, depth=1, act_fn="tanh", target_modules=targets, init_weights=False))
    torch.manual_seed(1)
    model.add_adapter("other", NeatConfig(r=3, act_fn="sin", axis="in", target_modules=targets, init_weights=False))
    model.set_adapter(["default", "other"])
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("merged", [["default"], ["other"]])
def test_partial_merge_keeps_the_other_active_adapters(kind, merged):
    torch.manual_seed(0)
    model = two_adapters(Single(make_layer(kind)), ["layer"])
    x = make_input(kind, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = materialised_reference(model, ["default", "other"])(x)
        model.merge_adapter(merged)
        assert model.base_model.layer.merged_adapters == merged
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        model.merge_adapter()  # then the rest: everything in the weight
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("merged", ["default", "other"])
def test_partial_merge_in_training_mode(kind, merged):
    """Training mode, autograd on (the embedding's looked-up-rows path too): the output is still right, the
    unmerged adapter still trains, the merged one is in the weight, not in the graph."""
    torch.manual_seed(0)
    model = two_adapters(Single(make_layer(kind)), ["layer"])
    x = make_input(kind, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = materialised_reference(model, ["default", "other"])(x)
    model.merge_adapter([merged])
    model.train()
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    unmerged = "other" if merged == "default" else "default"
    assert model.base_model.layer.neat_B[unmerged].weight.grad is not None
    assert model.base_model.layer.neat_B[merged].weight.grad is None


def test_partial_merge_in_a_deeper_model():
    torch.manual_seed(0)
    model = two_adapters(TinyMLP(), ["fc1", "fc2"])
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = materialised_reference(model, ["default", "other"])(x)
        model.merge_adapter(["other"], safe_merge=True)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_mixed_batches_still_refused_after_a_partial_merge():
    torch.manual_seed(0)
    model = two_adapters(TinyMLP(), ["fc1", "fc2"])
    model.merge_adapter(["default"])
    with pytest.raises(ValueError, match="merged adapters"):
        model(torch.randn(2, 6), adapter_names=["other", BASE_ONLY])
    with pytest.raises(ValueError, match="merged"):  # the layer itself refuses too (it is reachable directly)
        model.base_model.fc1(torch.randn(2, 6), adapter_names=["other", BASE_ONLY])
    model.unmerge_adapter()
    model(torch.randn(2, 6), adapter_names=["other", BASE_ONLY])  # fine again once unmerged


def test_deleting_an_inactive_adapter_keeps_the_merges():
    """Found by the state-machine walk: delete_adapter re-activated through set_adapter even when the deleted adapter
    was not active, and set_adapter's rule (unmerge when the merged set differs from the new active set) then undid
    an unrelated merge."""
    torch.manual_seed(0)
    model = two_adapters(TinyMLP(), ["fc1", "fc2"])
    model.add_adapter("spare", NeatConfig(r=1, target_modules=["fc1"], init_weights=False))
    model.set_adapter(["default"])
    model.merge_adapter(["default", "other"])
    x = torch.randn(4, 6)
    with torch.no_grad():
        before = model(x)
        model.delete_adapter("spare")
        assert model.base_model.fc1.merged_adapters == ["default", "other"]
        assert model.active_adapters == ["default"]
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
