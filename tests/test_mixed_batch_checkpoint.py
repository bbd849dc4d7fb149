"""A mixed batch (adapter_names=) under a hand-written torch.utils.checkpoint, in eval mode.

The names reach the layers through hooks that live for one call; checkpointing reruns the block during backward,
after they are gone, so the rerun would route every sample through the active adapters: wrong gradients with
use_reentrant=True, torch's opaque CheckpointError with use_reentrant=False. The layer notices the rerun and
raises a ValueError that says what to do. A plain (not mixed) batch under the same checkpoint still trains.
"""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from neat_peft import BASE_ONLY, NeatConfig, get_neat_model


class CheckpointedMLP(nn.Module):
    def __init__(self, use_reentrant):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)
        self.use_reentrant = use_reentrant

    def block(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=self.use_reentrant)


def model_with_two_adapters(use_reentrant):
    torch.manual_seed(0)
    cfg = dict(r=2, act_fn="tanh", target_modules=["fc1", "fc2"], init_weights=False)
    model = get_neat_model(CheckpointedMLP(use_reentrant), NeatConfig(**cfg))
    model.add_adapter("other", NeatConfig(**cfg))
    return model.eval()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_mixed_batch_is_refused_clearly(use_reentrant):
    model = model_with_two_adapters(use_reentrant)
    x = torch.randn(3, 6, requires_grad=True)  # reentrant checkpointing needs an input that requires grad
    out = model(x, adapter_names=["default", BASE_ONLY, "default"])
    with pytest.raises(ValueError, match="checkpoint.*adapter_names|adapter_names.*checkpoint"):
        out.sum().backward()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_a_plain_batch_under_the_same_checkpoint_still_trains(use_reentrant):
    """After a mixed batch, a plain batch is checkpointed as usual and gets the un-checkpointed gradients."""
    model = model_with_two_adapters(use_reentrant)
    with torch.no_grad():
        model(torch.randn(3, 6), adapter_names=["default", BASE_ONLY, "other"])  # inference, leaves nothing behind
    x = torch.randn(3, 6, requires_grad=True)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    plain = model.base_model.block(x)  # the same computation without checkpointing
    plain.sum().backward()
    expected = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == len(expected) > 0
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
