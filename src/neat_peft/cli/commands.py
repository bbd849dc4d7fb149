"""`eval`, `predict`, `merge` and `export-lora`: what one does with a finished run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import data as data_mod
from . import features, models, recipe, report, rundir, tasks
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


def _eval_trainer(model, config: dict[str, Any], run_dir: Path, collator, n_classes: int):
    """A Trainer used for evaluation only, with the training run's settings (so numbers match train's)."""
    from .train import make_trainer_class, training_arguments

    classification = config["task"] != "causal-lm"

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return report.classification_metrics(logits, prediction.label_ids, n_classes)

    return make_trainer_class()(model=model, args=training_arguments(config, run_dir, for_training=False),
                                data_collator=collator, compute_metrics=compute_metrics if classification else None,
                                heads=[], head_lr=0.0, sums_loss=not classification)


def run_eval(run_dir: str, data_path: Optional[str]) -> dict[str, Any]:
    from .train import build_datasets, label_ids

    path, config, splits = open_run(run_dir)
    if tasks.handles(config):
        return tasks.run_eval(path, config, splits, data_path)
    source = "the run's test split"
    if data_path:
        if config["task"] == "image-classification":
            folder = data_mod.image_folder(data_path)
            _, labels = data_mod.load_images(folder, "test")
            splits.rows["test"] = [{"index": i, "part": "test"} for i in range(len(labels))]
            splits.info["folder"] = str(folder)
        else:
            splits.rows["test"] = data_mod.read_eval_rows(data_path, config, splits.labels)
        source = f"'{data_path}'"
    tokenizer = None if config["task"] == "image-classification" else models.load_tokenizer(config)
    model = load_run_model(path, config, splits)
    datasets, collator = build_datasets(config, splits, tokenizer)
    classification = config["task"] != "causal-lm"
    trainer = _eval_trainer(model, config, path, collator, len(splits.labels))
    result: dict[str, Any] = {"data": source, "examples": len(datasets["test"]), "method": config["method.name"]}
    if classification:
        prediction = trainer.predict(datasets["test"], metric_key_prefix="test")
        result["accuracy"] = prediction.metrics["test_accuracy"]
        result["macro_f1"] = prediction.metrics["test_macro_f1"]
        base = report.majority_baseline(label_ids(datasets["train"]), list(prediction.label_ids),
                                        len(splits.labels))
        rows = [[config["method.name"], f"{result['accuracy']:.4f}", f"{result['macro_f1']:.4f}"],
                [f"majority class ({splits.labels[base['class']]})", f"{base['accuracy']:.4f}",
                 f"{base['macro_f1']:.4f}"]]
        result["majority_baseline"] = {"accuracy": base["accuracy"], "macro_f1": base["macro_f1"]}
        text = report.table(rows, ["method", "accuracy", "macro-F1"])
    else:
        metrics = trainer.evaluate(datasets["test"], metric_key_prefix="test")
        result["loss"], result["perplexity"] = metrics["test_loss"], report.perplexity(metrics["test_loss"])
        text = report.table([[config["method.name"], f"{result['loss']:.4f}", f"{result['perplexity']:.2f}"]],
                            ["method", "loss", "perplexity"])
    print(f"evaluating {path} on {source} ({result['examples']:,} examples)\n{text}")
    return result


def _read_image(file: str, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        grey = np.asarray(Image.open(file).convert("L"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise CliError(f"Cannot read image '{file}': {e}. Give a PNG or JPEG file.") from None
    return features.image_tensor(grey, size)


def run_predict(run_dir: str, inputs: list[str], max_new_tokens: Optional[int], as_json: bool) -> list[dict[str, Any]]:
    path, config, splits = open_run(run_dir)
    if not inputs:
        raise CliError("Give at least one input to predict, e.g. neat-peft predict RUN_DIR \"some text\".")
    if max_new_tokens is not None:
        if config["task"] not in ("causal-lm", tasks.QA):
            raise CliError(f"--max-new-tokens applies to causal-lm and generative-qa runs; '{path}' is a "
                           f"{config['task']} run. Leave the option out.")
        if max_new_tokens < 1:
            raise CliError(f"--max-new-tokens must be at least 1 (got {max_new_tokens}).")
    if tasks.handles(config):
        if max_new_tokens is not None:
            config = {**config, "eval.max_new_tokens": max_new_tokens}
        results = tasks.run_predict(path, config, splits, inputs)
    else:
        results = _predict(path, config, splits, inputs, 16 if max_new_tokens is None else max_new_tokens)
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


def _predict(path: Path, config: dict[str, Any], splits: data_mod.Splits, inputs: list[str],
             max_new_tokens: int) -> list[dict[str, Any]]:
    task = config["task"]
    tokenizer = None if task == "image-classification" else models.load_tokenizer(config)
    model = load_run_model(path, config, splits)
    results = []
    with torch.no_grad():
        if task == "causal-lm":
            for prompt in inputs:
                enc = tokenizer(features.prompt_text(tokenizer, prompt), return_tensors="pt",
                                add_special_tokens=False)
                enc = {k: enc[k] for k in ("input_ids", "attention_mask")}  # BERT-style tokenizers add more
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                results.append({"input": prompt, "output": answer})
        else:
            if task == "image-classification":
                batch = {"pixel_values": torch.stack([_read_image(f, config["data.image_size"]) for f in inputs])}
            else:
                batch = tokenizer(inputs, truncation=True, max_length=config["data.max_length"], padding=True,
                                  return_tensors="pt")
            out = model(**batch)
            logits = out["logits"] if isinstance(out, dict) else out.logits
            probs = torch.softmax(logits.float(), -1)
            for text, p in zip(inputs, probs):
                scores = {label: float(v) for label, v in zip(splits.labels, p)}
                results.append({"input": text, "label": splits.labels[int(p.argmax())], "scores": scores})
    return results


def _sample_batch(config: dict[str, Any], splits: data_mod.Splits, tokenizer, n: int = 8):
    from .train import build_datasets

    few = data_mod.Splits({"test": splits.rows["test"][:n]}, splits.labels, splits.info)
    datasets, collator = build_datasets(config, few, tokenizer)
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
    tokenizer = None if config["task"] == "image-classification" else models.load_tokenizer(config)
    model = load_run_model(path, config, splits)
    batch = _sample_batch(config, splits, tokenizer)
    with torch.no_grad():
        before = _logits(model, batch)
        merged = models.merged_model(model, config["method.name"]).eval()
        diff = float((before - _logits(merged, batch)).abs().max())
    with rundir.output_folder(target, "merged model") as folder:
        if config["task"] == "image-classification" and not tasks.handles(config):
            state = {k: v.contiguous() for k, v in merged.state_dict().items()}
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
            models.write_json(folder / "neat_peft_model.json", {
                "architecture": "efficientnet-lite0 (efficientnet_lite_pytorch.EfficientNet) in "
                                "neat_peft.cli.models.ImageClassifier", "labels": splits.labels,
                "image_size": config["data.image_size"], "input_scaling": "(x - 0.5) / 0.5, 3 channels"})
        else:
            merged.save_pretrained(folder)
            # a transformers vision model keeps its image processor beside it, a text model its tokenizer
            (tokenizer or tasks.load_processor(config)).save_pretrained(folder)
    if config["task"] == "image-classification" and not tasks.handles(config):
        how = "load with neat_peft.cli.models.load_image_model (EfficientNet is not a transformers model)"
    else:
        loader = tasks.auto_class(config["task"])
        how = f"load with transformers.{loader}.from_pretrained('{target}')"
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
