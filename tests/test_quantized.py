"""NEAT on quantized frozen bases (neat_peft.quantized): bitsandbytes 4-bit (nf4, fp4 + double quant) and 8-bit,
torchao int8 weight-only, hqq HQQLinear, optimum-quanto QLinear (int8, int4).

The independent reference is an fp32 twin: the same tiny random Llama in full precision whose linear weights are
the quantized layers' weights as the *base forward* computes with them, read off by probing each quantized layer
with the identity matrix (layer(I) - layer(0) = W0^T), not through neat_peft's dequantization code. With the same
NEAT parameters, the quantized NEAT model and the twin NEAT model must agree:

  layer level (one adapted layer, same input): adapter output and A/B gradients equal to fp32 rounding (1e-5);
  model level: outputs and adapter gradients equal within the base's own mismatch |base_q(x) - base_twin(x)|
  (zero except bitsandbytes int8, whose eval/no-grad forward also quantizes activations), plus 1e-4.

Each backend is skipped with the reason when its package is missing (CI installs all four through `.[test]`).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from neat_peft import NeatConfig, NeatModel, get_neat_model, quantized  # noqa: E402
from neat_testing import probed_weight  # noqa: E402

BACKENDS = ["bnb-nf4", "bnb-fp4-dq", "bnb-int8", "torchao-int8", "hqq4", "quanto-int8", "quanto-int4"]
BACKEND_PACKAGE = {"bnb": "bitsandbytes", "torchao": "torchao", "hqq": "hqq.core.quantize", "quanto": "optimum.quanto"}
# Upper bounds on the relative error of the dequantized W0 against the float weights it was made from
# (max |dW0| / max |W0|) on this tiny model (measured 0.11-0.13 for 4-bit bnb/hqq, 0.05 for quanto int4, 0.004 for
# int8); docs/quantized.md has the errors at d = 512 and 1024.
QUANTIZATION_ERROR_BOUND = {"bnb-nf4": 0.15, "bnb-fp4-dq": 0.15, "bnb-int8": 0.006, "torchao-int8": 0.006,
                            "hqq4": 0.15, "quanto-int8": 0.006, "quanto-int4": 0.1}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _backend_module(backend: str):
    return pytest.importorskip(BACKEND_PACKAGE[backend.split("-")[0].rstrip("0123456789")])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def quantized_llama(backend: str, directory, keep_cpu_repacking: bool = False) -> nn.Module:
    """The tiny Llama quantized with `backend`, in train mode. bitsandbytes' CPU repacking of 4-bit layers
    (bnb issue #2078) is switched off on every layer unless asked for: NEAT switches it off only on the layers
    it wraps, and the LoRA/probe comparisons need the other layers in one layout too."""
    _backend_module(backend)
    kwargs = {"dtype": torch.float32}
    if backend.startswith("bnb"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = {
            "bnb-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32),
            "bnb-nf4-bf16": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",  # QLoRA's usual
                                               bnb_4bit_compute_dtype=torch.bfloat16),
            "bnb-fp4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
            "bnb-int8": BitsAndBytesConfig(load_in_8bit=True),
        }[backend]
    elif backend == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        kwargs["quantization_config"] = TorchAoConfig(Int8WeightOnlyConfig())
    elif backend.startswith("quanto"):
        from transformers import QuantoConfig

        kwargs["quantization_config"] = QuantoConfig(weights=backend.split("-")[1])
    model = _quiet(LlamaForCausalLM.from_pretrained, directory, **kwargs)
    if backend == "hqq4":  # transformers 5.24's HqqConfig path raises NotImplementedError: use hqq directly
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        for path, module in list(model.model.named_modules()):
            if isinstance(module, nn.Linear):
                parent, _, child = path.rpartition(".")
                setattr(model.model.get_submodule(parent), child, _quiet(
                    HQQLinear, module, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32,
                    device="cpu"))
    if not keep_cpu_repacking:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model.train()


def quantized_paths(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if quantized.quantized_kind(m) is not None}


def fp32_twin(qmodel: nn.Module, directory) -> nn.Module:
    """The float Llama with every quantized layer's probed W0 (the reference)."""
    twin = _quiet(LlamaForCausalLM.from_pretrained, directory, dtype=torch.float32)
    with torch.no_grad():
        for path, module in quantized_paths(qmodel).items():
            target = twin.get_submodule(path)
            target.weight.copy_(probed_weight(module, target.in_features))
    return twin.train()


def neat_config(**kwargs) -> NeatConfig:
    # init_weights=False: B is random, so the update is not zero and every comparison sees it.
    return NeatConfig(**{"r": 4, "target_modules": TARGETS, "init_weights": False, "scaling": 0.5, **kwargs})


def copy_adapter(src: NeatModel, dst: NeatModel) -> None:
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if p.requires_grad:
                dst_params[name].copy_(p)


def adapter_grads(model: NeatModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def ids(seed=0, batch=2, length=12):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model: NeatModel, x):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    return out.logits.detach(), adapter_grads(model)


def base_mismatch(qmodel, twin, x) -> float:
    """max |base_q - base_twin| over the logits in eval mode (bnb int8 quantizes activations there)."""
    qmodel.eval(), twin.eval()
    with torch.no_grad():
        mismatch = (qmodel(input_ids=x).logits - twin(input_ids=x).logits).abs().max().item()
    qmodel.train(), twin.train()
    return mismatch


# --- the layer kinds ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_kind_reads_what_the_base_forward_computes_with(backend, llama_dir):
    """weight() is exactly the probed W0 of every quantized layer, in the logical (d_out, d_in) shape (not the
    packed storage's), and within the backend's quantization error of the float weights."""
    qmodel = quantized_llama(backend, llama_dir)
    float_model = _quiet(LlamaForCausalLM.from_pretrained, llama_dir, dtype=torch.float32)
    layers = quantized_paths(qmodel)
    assert len(layers) == 2 * 7  # every linear of both blocks, lm_head left in float
    worst = 0.0
    for path, module in layers.items():
        kind = quantized.quantized_kind(module)
        W = kind.weight(module)
        W_float = float_model.get_submodule(path).weight
        assert kind.shape(module) == tuple(W_float.shape) == tuple(W.shape)
        torch.testing.assert_close(W.float(), probed_weight(module, W.shape[1]), rtol=1e-5, atol=1e-6)
        worst = max(worst, ((W.float() - W_float).abs().max() / W_float.abs().max()).item())
    assert 0 < worst < QUANTIZATION_ERROR_BOUND[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_requantize_then_restore_is_exact(backend, llama_dir):
    """assign_weight requantizes with the layer's own settings: the layer then computes with a weight within
    the quantization error of the target (the same bound as quantizing the original), and restore() puts the
    original storage back bit for bit."""
    qmodel = quantized_llama(backend, llama_dir)
    path, module = next(iter(quantized_paths(qmodel).items()))
    kind = quantized.quantized_kind(module)
    kind.prepare(module)
    W0 = kind.weight(module).float()
    x = torch.randn(3, W0.shape[1], requires_grad=True)
    y0 = module(x).detach()
    signature = kind.signature(module)
    snapshot = kind.snapshot(module)
    target = W0 + 0.05 * W0.abs().max() * torch.randn_like(W0)
    kind.assign_weight(module, target)
    W1 = probed_weight(module, W0.shape[1])
    error = ((W1 - target).abs().max() / target.abs().max()).item()
    assert 0 < error < QUANTIZATION_ERROR_BOUND[backend]
    assert kind.signature(module) == signature  # same quantization settings after requantizing
    torch.testing.assert_close(kind.snapshot_weight(module, snapshot), W0.to(kind.weight(module).dtype))
    kind.restore(module, snapshot)
    assert torch.equal(kind.weight(module).float(), W0)
    assert torch.equal(module(x).detach(), y0)


def test_signatures_tell_quantizations_apart(llama_dir):
    pytest.importorskip("bitsandbytes")
    sigs = {}
    for backend in ["bnb-nf4", "bnb-fp4-dq", "bnb-int8"]:
        module = quantized_llama(backend, llama_dir).model.layers[0].self_attn.q_proj
        sigs[backend] = quantized.quantization_signature(module)
    assert len(set(sigs.values())) == 3, sigs
    assert "nf4" in sigs["bnb-nf4"] and "double_quant=True" in sigs["bnb-fp4-dq"]
    assert quantized.quantization_signature(nn.Linear(4, 4)) == "none"


def test_refusals_name_the_type_and_what_is_supported(llama_dir):
    torchao = pytest.importorskip("torchao")  # noqa: F841
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from transformers import TorchAoConfig

    model = _quiet(LlamaForCausalLM.from_pretrained, llama_dir, dtype=torch.float32,
                   quantization_config=TorchAoConfig(Int8DynamicActivationInt8WeightConfig()))
    module = model.model.layers[0].self_attn.q_proj
    message = quantized.unsupported_quantization(module)
    assert "Int8Tensor" in message and "dynamic activation" in message and "Int8WeightOnlyConfig" in message
    integer = nn.Linear(4, 4)
    integer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    assert "int8 codes" in quantized.unsupported_quantization(integer)
    assert quantized.unsupported_quantization(nn.Linear(4, 4)) is None


def test_quanto_with_quantized_activations_is_refused():
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import qint8, quantize

    model = nn.Sequential(nn.Linear(8, 8))
    quantize(model, weights=qint8, activations=qint8)
    kind = quantized.quantized_kind(model[0])
    with pytest.raises(ValueError, match="activations"):
        kind.check("0", model[0])


def test_float_linear_is_the_dequantized_layer(llama_dir):
    pytest.importorskip("bitsandbytes")
    module = quantized_llama("bnb-nf4", llama_dir).model.layers[0].mlp.down_proj
    linear = quantized.float_linear(module)
    x = torch.randn(5, module.in_features, requires_grad=True)
    assert type(linear) is nn.Linear and linear.weight.dtype == torch.float32
    torch.testing.assert_close(linear(x), module(x), rtol=1e-5, atol=1e-6)
    assert quantized.float_linear(module, dtype=torch.bfloat16).weight.dtype == torch.bfloat16


def test_prepare_stops_bitsandbytes_cpu_repacking(llama_dir):
    """bnb issue #2078: on a CPU with AVX512-BF16 an eval/no-grad forward repacks a Linear4bit weight in place,
    and dequantize_4bit then reads garbage. After prepare() the layer keeps its layout through eval forwards;
    a layer repacked before wrapping is unpacked back to a consistent layout."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    qmodel = quantized_llama("bnb-nf4", llama_dir, keep_cpu_repacking=True).eval()
    wrapped, other = qmodel.model.layers[0].self_attn.q_proj, qmodel.model.layers[0].self_attn.k_proj
    kind = quantized.quantized_kind(wrapped)
    kind.prepare(wrapped)
    W0 = kind.weight(wrapped)
    x = torch.randn(3, 64)
    with torch.no_grad():
        wrapped(x), other(x)
    assert not getattr(wrapped.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(kind.weight(wrapped), W0)
    if not bnbf.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here (the trap cannot occur)")
    assert other.weight.quant_state.packing_format_for_cpu  # the trap is real on this machine
    kind.check("k_proj", other)
    kind.prepare(other)  # unpacks
    assert not other.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(kind.weight(other), probed_weight(other, 64), rtol=1e-5, atol=1e-6)


# --- NEAT on a quantized model against its fp32 twin -------------------------------------------------------------
def neat_pair(backend, llama_dir, **config):
    """(NEAT on the quantized Llama, NEAT on its fp32 twin, the two bases' own eval output mismatch), same adapter.

    bitsandbytes' CPU repacking is left on in the quantized model: NEAT must switch it off on every layer."""
    plain = quantized_llama(backend, llama_dir)
    mismatch = base_mismatch(plain, fp32_twin(plain, llama_dir), ids(1))
    qmodel = quantized_llama(backend, llama_dir, keep_cpu_repacking=True)
    twin = fp32_twin(qmodel, llama_dir)
    torch.manual_seed(1)
    q_neat = get_neat_model(qmodel, neat_config(**config))
    t_neat = get_neat_model(twin, neat_config(**config))
    copy_adapter(q_neat, t_neat)
    return q_neat, t_neat, mismatch


def assert_same(a, b, mismatch):
    # The base's own numerics (bnb int8 quantizes activations in eval) propagate through the adapted model.
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 + 4 * mismatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_and_gradients_equal_the_fp32_twin_also_after_an_eval_pass(backend, llama_dir):
    q_neat, t_neat, mismatch = neat_pair(backend, llama_dir)
    x = ids()
    q_logits, q_grads = loss_and_grads(q_neat, x)
    t_logits, t_grads = loss_and_grads(t_neat, x)
    assert_same(q_logits, t_logits, 0.0)  # training kernels: the quantized base is exactly the twin's
    assert q_grads.keys() == t_grads.keys() and len(q_grads) == 2 * 2 * len(TARGETS)
    for name in q_grads:
        torch.testing.assert_close(q_grads[name], t_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    q_neat.eval(), t_neat.eval()
    with torch.no_grad():  # eval: H comes from the cache, and bnb would repack its 4-bit weights here
        assert_same(q_neat(input_ids=x).logits, t_neat(input_ids=x).logits, mismatch)
    q_neat.train()
    again_logits, again_grads = loss_and_grads(q_neat, x)  # train -> eval -> train: the same numbers
    assert torch.equal(again_logits, q_logits)
    for name in q_grads:
        assert torch.equal(again_grads[name], q_grads[name]), name


@pytest.mark.parametrize("backend", ["bnb-nf4", "bnb-nf4-bf16", "bnb-int8", "hqq4"])
def test_adapter_update_is_exact_at_the_layer(backend, llama_dir):
    """One adapted layer, same input: the adapter's contribution and its gradients equal the twin's to fp32
    rounding (the base's own output is left out: that is the backend's business). With bf16 compute, W0 is the
    bf16 weight the base multiplies with, and the adapter still computes in fp32."""
    q_neat, t_neat, _ = neat_pair(backend, llama_dir, axis="in", depth=1)
    path = "model.layers.1.self_attn.v_proj"
    q_layer, t_layer = q_neat.base_model.get_submodule(path), t_neat.base_model.get_submodule(path)
    x = torch.randn(2, 5, 64, requires_grad=True)
    g = torch.randn(2, 5, q_layer.base_layer.out_features)
    deltas, grads = [], []
    for layer in (q_layer, t_layer):
        layer.zero_grad(set_to_none=True)
        delta = layer(x) - layer.base_layer(x)
        (delta * g).sum().backward()
        deltas.append(delta.detach())
        grads.append([p.grad for p in layer.parameters() if p.requires_grad])
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["bnb-fp4-dq", "torchao-int8", "quanto-int4"])
def test_save_load_gives_the_same_model_and_tells_another_quantization_apart(backend, llama_dir, tmp_path):
    q_neat, _, _ = neat_pair(backend, llama_dir)
    x = ids(2)
    q_neat.eval()
    with torch.no_grad():
        expected = q_neat(input_ids=x).logits
    q_neat.save_pretrained(tmp_path)
    loaded = NeatModel.from_pretrained(quantized_llama(backend, llama_dir), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, expected)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "NEAT"  # not PEANuT's format
    saved = quantized.quantization_signatures(loaded.neat_layers())
    assert len(saved) == 2 * len(TARGETS)
    paths = list(saved)

    def layers_of(model):
        return [(path, model.get_submodule(path)) for path in paths]

    assert quantized.signature_mismatch(saved, layers_of(quantized_llama(backend, llama_dir))) is None
    other = "bnb-int8" if backend != "bnb-int8" else "bnb-nf4"
    _backend_module(other)
    message = quantized.signature_mismatch(saved, layers_of(quantized_llama(other, llama_dir)))
    assert message.startswith(f"{len(paths)} adapted layer(s)") and saved[paths[0]] in message
    float_base = _quiet(LlamaForCausalLM.from_pretrained, llama_dir, dtype=torch.float32)
    assert "this base is none" in quantized.signature_mismatch(saved, layers_of(float_base))
    # the model API stores the signatures with the adapter and warns on a base quantized otherwise
    assert json.loads((tmp_path / "adapter_config.json").read_text())["neat_peft"]["base_quantization"] == saved
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*quantized differently")
        NeatModel.from_pretrained(quantized_llama(backend, llama_dir), tmp_path)
    with pytest.warns(UserWarning, match="quantized differently"):
        NeatModel.from_pretrained(quantized_llama(other, llama_dir), tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_error_is_the_requantization_error_and_unmerge_is_exact(backend, llama_dir):
    q_neat, t_neat, mismatch = neat_pair(backend, llama_dir)
    q_neat.eval(), t_neat.eval()
    x = ids(3)
    path = "model.layers.0.mlp.down_proj"
    layer = q_neat.base_model.get_submodule(path)
    kind = quantized.quantized_kind(layer.base_layer)
    storage_before = kind.snapshot(layer.base_layer)
    with torch.no_grad():
        unmerged = q_neat(input_ids=x).logits
        t_neat.merge_adapter()  # the twin merges in fp32: the exact W0 + dW
        exact = t_neat.base_model.get_submodule(path).base_layer.weight.detach().clone()
        q_neat.merge_adapter()
        merged_weight = probed_weight(layer.base_layer, exact.shape[1])
        error = ((merged_weight - exact).abs().max() / exact.abs().max()).item()
        assert 0 < error < QUANTIZATION_ERROR_BOUND[backend]  # bounded by requantizing W0 + dW
        q_neat.unmerge_adapter()
        assert torch.equal(q_neat(input_ids=x).logits, unmerged)
    after = kind.snapshot(layer.base_layer)
    for a, b in zip(*(s if isinstance(s, tuple) else (s,) for s in (storage_before, after))):
        assert a is b  # the original quantized storage is back, not a requantized copy


def test_dequantize_merge_gives_a_float_model_equal_to_the_adapted_one(llama_dir):
    pytest.importorskip("bitsandbytes")
    q_neat, t_neat, _ = neat_pair("bnb-nf4", llama_dir)
    q_neat.eval()
    x = ids(4)
    with torch.no_grad():
        expected = q_neat(input_ids=x).logits
    merged = q_neat.merge_and_unload(safe_merge=True, dequantize=True)
    assert not quantized_paths(merged) and not hasattr(merged.config, "quantization_config")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, expected, rtol=1e-4, atol=1e-4)
        t_merged = t_neat.eval().merge_and_unload()
        for path, module in merged.named_modules():
            if isinstance(module, nn.Linear):
                torch.testing.assert_close(module.weight, t_merged.get_submodule(path).weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["bnb-nf4", "bnb-int8", "torchao-int8", "hqq4", "quanto-int8"])
def test_exported_lora_through_peft_on_the_same_quantized_base_gives_the_neat_outputs(backend, llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    q_neat, _, _ = neat_pair(backend, llama_dir)
    q_neat.eval()
    x = ids(5)
    with torch.no_grad():
        expected = q_neat(input_ids=x).logits
    q_neat.export_lora(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora = _quiet(peft.PeftModel.from_pretrained, quantized_llama(backend, llama_dir), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)


def test_unsupported_quantization_is_refused_and_the_model_left_untouched(llama_dir):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from transformers import TorchAoConfig

    model = _quiet(LlamaForCausalLM.from_pretrained, llama_dir, dtype=torch.float32,
                   quantization_config=TorchAoConfig(Int8DynamicActivationInt8WeightConfig()))
    def state(m):
        return [(name, type(module)) for name, module in m.named_modules()], \
            [(name, p.requires_grad) for name, p in m.named_parameters()]

    before = state(model)
    with pytest.raises(ValueError, match=r"q_proj.*Int8Tensor.*Int8WeightOnlyConfig"):
        get_neat_model(model, neat_config())
    assert state(model) == before


def test_peft_plugin_on_a_kbit_prepared_bnb_model(llama_dir):
    """peft users: BitsAndBytesConfig, prepare_model_for_kbit_training (gradient checkpointing on, its default),
    get_peft_model with NEAT; outputs and gradients equal the standalone NEAT model's with the same parameters
    (no checkpointing there)."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import neat_peft

    peft_config = neat_peft.register_with_peft()
    model = peft.prepare_model_for_kbit_training(quantized_llama("bnb-nf4", llama_dir, keep_cpu_repacking=True))
    assert model.is_gradient_checkpointing
    plugin = peft.get_peft_model(model, peft_config(**neat_config().to_dict()))
    core = get_neat_model(quantized_llama("bnb-nf4", llama_dir), neat_config())
    with torch.no_grad():
        core_params = dict(core.named_parameters())
        for name, p in plugin.named_parameters():
            if p.requires_grad:
                core_params["base_model." + name.removeprefix("base_model.model.")].copy_(p)
    x = ids(6)
    plugin.eval()
    with torch.no_grad():
        plugin(input_ids=x)  # an eval pass first: the plugin must have switched bnb's CPU repacking off too
    plugin.train(), core.train()
    logits, grads = loss_and_grads(plugin, x)
    core_logits, core_grads = loss_and_grads(core, x)
    torch.testing.assert_close(logits, core_logits, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(core_grads) == 2 * 2 * len(TARGETS)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, core_grads["base_model." + name.removeprefix("base_model.model.")],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["bnb-nf4", "hqq4"])
def test_training_keeps_the_packed_weight_not_the_dequantized_w0(backend, llama_dir):
    """recompute_weight: autograd saves no d_out x d_in float tensor for backward (H is recomputed there from the
    packed weight); the same layer without recomputation would keep W0 -- the control shows the check can fail."""
    import copy as copy_module

    q_neat = get_neat_model(quantized_llama(backend, llama_dir), neat_config(target_modules=["down_proj"]))
    layer = q_neat.base_model.get_submodule("model.layers.0.mlp.down_proj")
    d_out, d_in = layer.d_out, layer.d_in
    assert d_out != d_in  # a saved W0 cannot be mistaken for anything else

    def saved_w0_count() -> int:
        found = []

        def pack(t):
            if t.is_floating_point() and t.numel() == d_out * d_in:
                found.append(tuple(t.shape))
            return t

        x = torch.randn(2, 5, d_in, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(x)
        out.sum().backward()
        return len(found)

    assert saved_w0_count() == 0
    layer.kind = copy_module.copy(layer.kind)
    layer.kind.recompute_weight = False
    assert saved_w0_count() > 0


def test_transformers_trainer_fine_tunes_neat_on_a_4bit_base(llama_dir, tmp_path):
    """The QLoRA workflow with the standalone NeatModel: transformers' Trainer accepts it (it refuses a quantized
    model without attached adapters), the adapter trains and the quantized storage stays as it was."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = get_neat_model(quantized_llama("bnb-nf4", llama_dir), neat_config())
    layer = model.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    storage = layer.base_layer.weight.detach().clone()
    A = layer.neat_A["default"].weight.detach().clone()
    data = [{"input_ids": ids(i, 1)[0], "labels": ids(i, 1)[0]} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, remove_unused_columns=False, learning_rate=1e-2, save_strategy="no")
    _quiet(Trainer(model=model, args=args, train_dataset=data).train)
    assert not torch.equal(layer.neat_A["default"].weight, A)
    assert torch.equal(layer.base_layer.weight, storage)


@pytest.mark.parametrize("backend", ["bnb-nf4", "bnb-int8", "torchao-int8", "hqq4", "quanto-int4"])
def test_eval_cache_dequantizes_once_and_a_merge_invalidates_it(backend, llama_dir, monkeypatch):
    q_neat, _, _ = neat_pair(backend, llama_dir)
    q_neat.eval()
    kind = next(layer.kind for _, layer in q_neat.neat_layers())
    calls = []
    real = kind.weight
    monkeypatch.setattr(kind, "weight", lambda module: (calls.append(module), real(module))[1])
    x = ids(7)
    with torch.no_grad():
        first = q_neat(input_ids=x).logits
        assert torch.equal(q_neat(input_ids=x).logits, first)
        assert len(calls) == 2 * len(TARGETS)  # once per adapted layer, not per call
        q_neat.merge_adapter()
        q_neat.unmerge_adapter()
        assert torch.equal(q_neat(input_ids=x).logits, first)
    assert len(calls) > 2 * len(TARGETS)  # H was recomputed after the storage changed


def test_dequantize_merge_with_safe_merge_refuses_a_broken_adapter(llama_dir):
    pytest.importorskip("bitsandbytes")
    q_neat, _, _ = neat_pair("bnb-nf4", llama_dir)
    path, layer = next(iter(q_neat.neat_layers()))
    with torch.no_grad():
        layer.neat_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        quantized.merged_float_linear(layer, safe_merge=True)
    assert q_neat.base_model.get_submodule(path) is layer and not layer.merged


@pytest.mark.parametrize("backend", ["bnb-nf4", "hqq4"])
def test_partial_merge_keeps_the_other_adapters_h_from_the_pristine_weight(backend, llama_dir):
    """After merging one adapter into a quantized layer (requantized W0 + dW), another active adapter's H still comes
    from the pristine W0, in eval (the cache) and in training (the recompute-in-backward path): the same factors as
    before the merge, so the output is the merged weight plus that adapter's unchanged update."""
    q_neat, _, _ = neat_pair(backend, llama_dir)
    torch.manual_seed(2)
    q_neat.add_adapter("other", neat_config(axis="in", depth=1))
    q_neat.set_adapter(["default", "other"])
    layer = q_neat.base_model.get_submodule("model.layers.1.self_attn.v_proj")
    with torch.no_grad():
        before = [t.clone() for t in layer.factors("other")]
    q_neat.merge_adapter(["default"])
    assert layer.merged_adapters == ["default"]
    for training in (False, True):
        q_neat.train(training)
        with torch.set_grad_enabled(training):
            after = layer.factors("other")
        for a, b in zip(after, before):
            torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        q_neat.eval()
        delta = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(delta, layer.adapter_output("other", x), rtol=1e-5, atol=1e-6)
