"""torch.compile with NEAT layers: fullgraph=True (no graph break) for one active adapter, in training and in
no-grad eval; multi-adapter modes still compile (with graph breaks allowed).

Graph capture is dynamo's job whatever the backend, so these tests use backend="aot_eager" (dynamo + AOTAutograd,
no C++ code generation): inductor's first compile takes ~25 s on a 2-core machine. NEAT_TEST_INDUCTOR=1 also
runs one fullgraph step with the default inductor backend.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from neat_peft import BASE_ONLY, NeatConfig, get_neat_model

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Mixed(nn.Module):
    """Every layer kind NEAT adapts in the core: embedding, Conv2d, Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.lin = nn.Linear(16, 8)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.conv(h[:, None]).mean(1)
        return self.lin(torch.relu(h))


def make_model(adapters=("default",)):
    torch.manual_seed(0)
    config = NeatConfig(r=3, depth=1, target_modules=["emb", "conv", "lin"], init_weights=False)
    model = get_neat_model(Mixed(), config, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, config)
    return model


IDS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fullgraph_training_step_matches_eager():
    model = make_model()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)  # raises on any graph break
    out = compiled(IDS)
    out.pow(2).mean().backward()
    compiled_grads = grads(model)
    model.zero_grad(set_to_none=True)
    expected = model(IDS)
    expected.pow(2).mean().backward()
    torch.testing.assert_close(out, expected)
    for name, grad in grads(model).items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=lambda m: f"{name}: {m}")
    assert any("neat_A" in n for n in compiled_grads)


def test_fullgraph_eval_is_never_stale():
    """In eval without grad the eager layer caches H; compiled, it recomputes H inside the graph (the cache's
    staleness check reads data pointers, a graph break), so in-place weight changes show up at once."""
    model = make_model().eval()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS), model(IDS))
        torch.testing.assert_close(compiled(IDS), model(IDS))  # second call: the eager cache is warm now
        for layer_name in ("emb", "conv", "lin"):
            getattr(model.base_model, layer_name).neat_A["default"].weight.mul_(1.5)
        after = compiled(IDS)
    model.clear_cache()
    with torch.no_grad():
        torch.testing.assert_close(after, model(IDS))


def test_multi_adapter_modes_compile_without_fullgraph():
    model = make_model(adapters=("a", "b")).eval()
    compiled = torch.compile(model, backend="eager")  # graph breaks allowed: dynamo alone is enough
    with torch.no_grad():
        model.set_adapter(["a", "b"])  # summed outputs
        torch.testing.assert_close(compiled(IDS), model(IDS))
        names = ["a", "b", BASE_ONLY]  # one adapter per sample
        torch.testing.assert_close(compiled(IDS, adapter_names=names), model(IDS, adapter_names=names))
        model.set_adapter("a")
        torch.testing.assert_close(compiled(IDS), model(IDS))


@pytest.mark.skipif(os.environ.get("NEAT_TEST_INDUCTOR") != "1",
                    reason="inductor's first compile takes ~25 s on 2 cores; set NEAT_TEST_INDUCTOR=1 to run it")
def test_fullgraph_inductor_training_step():
    model = make_model()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(IDS)
    out.pow(2).mean().backward()
    compiled_grads = grads(model)
    model.zero_grad(set_to_none=True)
    expected = model(IDS)
    expected.pow(2).mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5)
