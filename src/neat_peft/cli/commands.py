"""`eval`, `predict`, `merge` and `export-lora`: what one does with a finished run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from . import data as data_mod
from . import features, models, recipe, rundir, tasks
from .errors import CliError

GGUF_NAME = "adapter.gguf"  # export-lora --gguf writes it beside the peft LoRA files


def open_run(run_dir: str) -> tuple[Path, dict[str, Any], data_mod.Splits]:
    """A finished run's directory, validated recipe and split (each damage explained by a CliError)."""
    path = Path(run_dir)
    rundir.check_run(path)
    config = recipe.load_resolved(path / "config.yaml")
    return path, config, data_mod.read_splits(path)


def load_run_model(path: Path, config: dict[str, Any], splits: data_mod.Splits):
    """The trained model of a finished run; a damaged weights file is named, not shown as a traceback."""
    from safetensors import SafetensorError

    try:
        return models.load_trained(path, config, splits.labels)
    except (ValueError, OSError, RuntimeError, KeyError, SafetensorError) as e:
        raise CliError(f"Cannot load the trained model of '{path}' ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}). Its adapter or weights files are damaged; "
                       "train the run again with --overwrite.") from None


def run_eval(run_dir: str, data_path: Optional[str]) -> dict[str, Any]:
    """`neat-peft eval`: the run's test data, or `data_path` (a file or folder in the run's schema)."""
    path, config, splits = open_run(run_dir)
    task = tasks.for_config(config)
    tokenizer = task.tokenizer()
    return task.evaluate(path, splits, load_run_model(path, config, splits), tokenizer, data_path)


def run_predict(run_dir: str, inputs: list[str], max_new_tokens: Optional[int], as_json: bool) -> list[dict[str, Any]]:
    path, config, splits = open_run(run_dir)
    if not inputs:
        raise CliError("Give at least one input to predict, e.g. neat-peft predict RUN_DIR \"some text\".")
    task = tasks.for_config(config)
    if max_new_tokens is not None:
        if not task.generates:
            raise CliError(f"--max-new-tokens applies to causal-lm and generative-qa runs; '{path}' is a "
                           f"{config['task']} run. Leave the option out.")
        if max_new_tokens < 1:
            raise CliError(f"--max-new-tokens must be at least 1 (got {max_new_tokens}).")
    tokenizer = task.tokenizer()
    results = task.predict(load_run_model(path, config, splits), tokenizer, splits, inputs, max_new_tokens)
    for r in results:
        if as_json:
            print(json.dumps(r, ensure_ascii=False))
        elif "output" in r:
            print(f"{r['input']!r} -> {r['output']}" + (f"  [answer: {r['answer'] or '-'}]" if "answer" in r else ""))
        elif "score" in r:
            print(f"{r['score']:.4f}\t{r['input']}")
        else:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items())
            print(f"{r['label']}\t({shown})\t{r['input']}")
    return results


def _sample_batch(task: tasks.Task, splits: data_mod.Splits, tokenizer, n: int = 8):
    few = data_mod.Splits({"test": splits.rows["test"][:n]}, splits.labels, splits.info)
    datasets, collator = task.datasets(few, tokenizer)
    batch = collator([datasets["test"][i] for i in range(len(datasets["test"]))])
    batch.pop("labels", None)
    return dict(batch)


def _logits(model, batch) -> torch.Tensor:
    out = model(**batch)
    return (out["logits"] if isinstance(out, dict) else out.logits).detach().float()


def run_merge(run_dir: str, out: str) -> float:
    """Fold the adapter into the weights and save a plain model; returns the max |logit difference| it checked."""
    from safetensors.torch import save_file

    path, config, splits = open_run(run_dir)
    target = Path(out)
    rundir.check_empty_output(target, "merged model")
    task = tasks.for_config(config)
    tokenizer = task.tokenizer()
    model = load_run_model(path, config, splits)
    batch = _sample_batch(task, splits, tokenizer)
    with torch.no_grad():
        before = _logits(model, batch)
        merged = models.merged_model(model, config["method.name"]).eval()
        diff = float((before - _logits(merged, batch)).abs().max())
    with rundir.output_folder(target, "merged model") as folder:
        if task.auto_class is None:  # EfficientNet-Lite0: not a transformers model
            state = {k: v.contiguous() for k, v in merged.state_dict().items()}
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
            models.write_json(folder / "neat_peft_model.json", {
                "architecture": "efficientnet-lite0 (efficientnet_lite_pytorch.EfficientNet) in "
                                "neat_peft.cli.models.ImageClassifier", "labels": splits.labels,
                "image_size": config["data.image_size"], "input_scaling": "(x - 0.5) / 0.5, 3 channels"})
        else:
            merged.save_pretrained(folder)
            # a transformers vision model keeps its image processor beside it, a text model its tokenizer
            (tokenizer or features.load_processor(config)).save_pretrained(folder)
    if task.auto_class is None:
        how = "load with neat_peft.cli.models.load_image_model (EfficientNet is not a transformers model)"
    else:
        how = f"load with transformers.{task.auto_class}.from_pretrained('{target}')"
    print(f"merged {config['method.name']} model saved to {target} ({how}); max |logit difference| merged vs "
          f"unmerged on {len(next(iter(batch.values())))} test examples: {diff:.2e}")
    return diff


def run_export_lora(run_dir: str, out: str, gguf: bool = False) -> None:
    path, config, splits = open_run(run_dir)
    target = Path(out)
    rundir.check_empty_output(target, "LoRA adapter")
    method = config["method.name"]
    if method not in ("neat", "lora"):
        raise CliError(f"export-lora needs a run trained with method neat or lora; '{path}' used method {method} "
                       "(no low-rank update to export). Use `neat-peft merge` for a full model.")
    model = load_run_model(path, config, splits) if method == "neat" or gguf else None
    with rundir.output_folder(target, "LoRA adapter") as folder:
        if gguf:  # first, so that an adapter GGUF cannot hold is refused before anything is written
            from neat_peft.gguf_export import export_gguf_lora

            try:
                export_gguf_lora(model if method == "neat" else path / "adapter", folder / GGUF_NAME,
                                 config=getattr(model, "config", None))
            except (ValueError, FileNotFoundError, ImportError) as e:
                raise CliError(f"Cannot write a GGUF adapter for '{path}': {e}") from None
        if method == "lora":
            for f in (path / "adapter").iterdir():
                shutil.copy2(f, folder / f.name)
        else:
            model.export_lora(folder)
    what = ("it computes exactly the NEAT update: lora_B @ lora_A = dW, scaling 1" if method == "neat"
            else "a copy of the run's LoRA adapter")
    print(f"LoRA adapter written to {target} (load with peft.PeftModel.from_pretrained(base_model, '{target}'); "
          f"{what})")
    if gguf:
        print(f"GGUF LoRA adapter written to {target / GGUF_NAME} (llama.cpp: llama-cli -m BASE.gguf --lora "
              f"{target / GGUF_NAME}; Ollama: ADAPTER {target / GGUF_NAME} in a Modelfile)")
