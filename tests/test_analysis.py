"""neat_peft.analysis against independent computations (numpy SVD, peft's own LoRA layers)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from neat_peft import NeatConfig, get_neat_model
from neat_peft.analysis import analyze_updates, lora_updates, neat_updates, update_statistics


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))


def test_statistics_match_numpy_on_a_known_spectrum():
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    V, _ = np.linalg.qr(rng.standard_normal((15, 15)))
    sv = np.array([4.0, 2.0, 1.0])
    delta = (U[:, :3] * sv) @ V[:, :3].T
    W0 = rng.standard_normal((20, 15))
    stats = update_statistics(torch.tensor(delta), torch.tensor(W0))
    p = sv / sv.sum()
    assert stats["numerical_rank"] == 3
    assert stats["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert stats["stable_rank"] == pytest.approx((sv**2).sum() / 16.0, rel=1e-9)
    assert stats["relative_norm"] == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(W0), rel=1e-9)
    assert stats["singular_values"][:3] == pytest.approx(sv.tolist(), rel=1e-9)


def test_zero_update_has_rank_zero():
    stats = update_statistics(torch.zeros(4, 5), torch.ones(4, 5))
    assert stats["numerical_rank"] == 0 and stats["effective_rank"] == 0.0 and stats["relative_norm"] == 0.0


@pytest.mark.parametrize("axis", ["out", "in"])
def test_neat_updates_are_the_materialised_update_and_rank_at_most_r(axis):
    model = get_neat_model(_mlp(), NeatConfig(r=3, depth=1, axis=axis, scaling=0.5, init_weights=False,
                                              target_modules=["0", "2"]))
    updates = neat_updates(model)
    assert set(updates) == {"0", "2"}
    for path, (delta, W0) in updates.items():
        layer = model.base_model.get_submodule(path)
        x = torch.randn(5, layer.d_in)
        with torch.no_grad():
            adapter_out = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(x @ delta.t(), adapter_out, atol=1e-5, rtol=1e-5)
        assert torch.equal(W0, layer.base_layer.weight)
    report = analyze_updates(updates)
    assert all(s["numerical_rank"] <= 3 for s in report["layers"].values())


def test_lora_updates_match_peft_lora_product():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_mlp(), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"],
                                                        init_lora_weights=False))
    updates = lora_updates(model)
    assert set(updates) == {"0", "2"}
    for path, (delta, W0) in updates.items():
        layer = model.base_model.model.get_submodule(path)
        expected = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * 3.0
        torch.testing.assert_close(delta, expected)
        assert update_statistics(delta, W0)["numerical_rank"] <= 2
