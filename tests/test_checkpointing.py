"""transformers' gradient checkpointing with NEAT: the same adapter gradients as without it.

The trap (peft knows it too): with reentrant checkpointing a block whose inputs need no gradient gives none to the
parameters inside it, and with frozen embeddings the inputs of the first block need none. NeatModel's
gradient_checkpointing_enable makes the input embeddings' output require grad, so the adapters still train.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from neat_peft import NeatConfig, NeatLayer, get_neat_model

transformers = pytest.importorskip("transformers")


def tiny(arch: str):
    """(model, inputs, NEAT targets): tiny random-init transformers models without dropout."""
    torch.manual_seed(0)
    if arch == "bert":
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
        inputs = {"input_ids": torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))}
        return transformers.BertModel(config), inputs, ["query", "value"]
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        inputs = {"input_ids": torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))}
        return transformers.GPT2Model(config), inputs, ["c_attn"]  # transformers Conv1D
    # ViT: the main input is pixel_values, so transformers 5 does not enable input grads by itself.
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    inputs = {"pixel_values": torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    # Attention projections are query/value in transformers 4 and q_proj/v_proj in 5.
    return transformers.ViTModel(config, add_pooling_layer=False), inputs, r".*\.(query|value|q_proj|v_proj)$"


def adapter_grads(model, inputs) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    hidden = model(**inputs).last_hidden_state
    probe = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(2))
    (hidden @ probe).pow(2).mean().backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def count_layer_forwards(model) -> list[int]:
    """A counter of the first NeatLayer's forward calls: checkpointing reruns it during backward."""
    calls = [0]
    layer = next(m for m in model.modules() if isinstance(m, NeatLayer))
    layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def enable(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(**kwargs)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("arch", ["bert", "gpt2", "vit"])
def test_checkpointing_gives_the_same_gradients(arch, use_reentrant):
    base, inputs, targets = tiny(arch)
    config = NeatConfig(r=4, depth=1, target_modules=targets, init_weights=False)
    plain = get_neat_model(base, config)
    checkpointed = copy.deepcopy(plain)
    expected = adapter_grads(plain, inputs)

    enable(checkpointed, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = count_layer_forwards(checkpointed)
    actual = adapter_grads(checkpointed, inputs)
    assert calls[0] == 2, "the block was not recomputed: checkpointing is not on"

    assert actual.keys() == expected.keys() and len(actual) > 0
    for name, grad in expected.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert actual[name] is not None, f"{name}: no gradient under checkpointing"
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_checkpointing_enabled_before_wrapping_also_gets_input_grads():
    base, inputs, targets = tiny("vit")
    config = NeatConfig(r=4, target_modules=targets, init_weights=False)
    torch.manual_seed(3)
    expected = adapter_grads(get_neat_model(copy.deepcopy(base), config), inputs)
    enable(base, gradient_checkpointing_kwargs={"use_reentrant": True})
    torch.manual_seed(3)  # the same adapter init
    actual = adapter_grads(get_neat_model(base, config), inputs)
    for name, grad in expected.items():
        assert actual[name] is not None, name
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-7)


def test_the_trap_reentrant_checkpointing_on_the_base_model_alone_loses_adapter_grads():
    """Why NeatModel wraps gradient_checkpointing_enable: calling it on the base model after wrapping skips the
    input-grad fix for a model whose main input is not input_ids; the head still trains, the adapters silently
    get no gradient. (It is the base model's method: documented in docs/scaling.md, not something NEAT can see.)"""
    base, inputs, targets = tiny("vit")
    model = get_neat_model(base, NeatConfig(r=4, target_modules=targets, init_weights=False,
                                            modules_to_save=["layernorm"]))
    enable(model.base_model, gradient_checkpointing_kwargs={"use_reentrant": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "None of the inputs have requires_grad=True"
        grads = adapter_grads(model, inputs)
    assert all(grads[n] is None for n in grads if "neat_" in n)
    assert all(grads[n] is not None for n in grads if "layernorm" in n)

    enable(model, gradient_checkpointing_kwargs={"use_reentrant": True})  # the fix
    grads = adapter_grads(model, inputs)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_activation_checkpointing_enable_gets_the_same_fix():
    base, inputs, targets = tiny("vit")
    if not hasattr(base, "activation_checkpointing_enable"):
        pytest.skip("transformers < 5 has no activation_checkpointing_enable")
    model = get_neat_model(base, NeatConfig(r=4, target_modules=targets, init_weights=False))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    calls = count_layer_forwards(model)
    grads = adapter_grads(model, inputs)
    assert calls[0] == 2 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
