"""The tasks of the CLI: one class per task, each owning its key rules, split, datasets, metrics, evaluation and
prediction. `train`, `eval`, `predict` and `merge` call a task and never branch on its kind.

  text-classification       one text column, one class label; accuracy, macro-F1, the majority-class baseline
  causal-lm                 prompt -> response, loss on the response only; test loss, perplexity, the base model's
  image-classification      IDX files (Fashion-MNIST, EfficientNet-Lite0) or any `datasets` image set (ViT-style)
  text-pair-classification  two text columns, one class label (GLUE: MRPC, RTE, QNLI, QQP, MNLI; also
                            single-sentence CoLA / SST-2 with data.text_pair_column: null)
  text-regression           one float label, MSE loss, Pearson / Spearman (GLUE STS-B)
  generative-qa             causal-LM training on prompt -> response; tested by generating an answer and
                            extracting it with a per-dataset extractor, as LLM-Adapters scores commonsense and math

What a harness needs (`neat-peft train`, and a comparison of methods): `Task.for_config(config)`, then
`build_splits()` (seeded by train.seed: every method at one seed sees the same examples), `datasets(splits,
tokenizer)`, `compute_metrics(splits)` for Trainer, `primary_metric` and `lower_is_better`, `test_report(...)`
(the metrics.json entries), `validation_curve(log_history, splits)`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import data as data_mod
from . import features, generation, metrics, models, report, splits as splits_mod
from .errors import CliError
from .splits import IMAGE, PAIR, QA, REGRESSION
from .trainer import make_trainer_class, training_arguments

PAIR_SEPARATOR = "|||"


def _logits(prediction) -> np.ndarray:
    return prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions


def _shown(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))


class Task:
    """A task of the CLI. Subclasses set `name` and `metrics` (the first picks the best validation evaluation
    unless eval.metric names another) and implement the methods below."""

    name: str = ""
    metrics: tuple[str, ...] = ()
    summary: str = ""
    uses_tokenizer = True  # image tasks read pixels, not tokens
    loss_only = False  # Trainer evaluates the loss only (causal LMs: no logits are kept)
    sums_loss = False  # the model's loss is a sum over tokens that Trainer normalises (causal LMs)
    auto_class = "AutoModelForSequenceClassification"  # what loads a merged model of the task
    generates = False  # predict generates text (--max-new-tokens applies)
    chooses_metric = False  # eval.metric may pick the validation metric among `metrics`

    def __init__(self, config: dict[str, Any]):
        self.config = config

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> "Task":
        return cls(config)

    @classmethod
    def check_keys(cls, config: dict[str, Any], where: str = "") -> None:
        """The recipe's rules that depend on the task (called by recipe.validate once every key has its type and
        rule checked; where: ' (in <file>)' for a run's own recipe)."""
        metric = config["eval.metric"]
        if metric is not None and not cls.chooses_metric:
            raise CliError(f"Recipe key 'eval.metric'{where} picks the validation metric of the tasks "
                           f"{', '.join(n for n, t in TASKS.items() if t.chooses_metric)}; task {cls.name} reports "
                           "its own metrics. Drop eval.metric.")
        if metric is not None and metric not in cls.metrics:
            raise CliError(f"eval.metric={metric!r} is not a metric of task {cls.name}; use one of "
                           f"{', '.join(cls.metrics)}.")
        if config["data.eval_sets"] is not None:
            raise CliError(f"data.eval_sets is for task generative-qa (test sets scored by generation); task "
                           f"{cls.name} evaluates on data.eval_splits or held-out fractions.")

    @property
    def primary_metric(self) -> str:
        return self.config["eval.metric"] or self.metrics[0]

    @property
    def lower_is_better(self) -> bool:
        return self.primary_metric in metrics.LOWER_IS_BETTER

    def schema_hint(self) -> str:
        return splits_mod.schema_hint(self.config)

    def tokenizer(self):
        return models.load_tokenizer(self.config) if self.uses_tokenizer else None

    # --- training -------------------------------------------------------------------------------------------
    def build_splits(self) -> data_mod.Splits:
        raise NotImplementedError

    def datasets(self, splits: data_mod.Splits, tokenizer) -> tuple[dict[str, Any], Any]:
        """{split rows key: Dataset} and the collator."""
        raise NotImplementedError

    def compute_metrics(self, splits: data_mod.Splits):
        """Trainer's compute_metrics (None: the loss is the only metric)."""
        return None

    def eval_dataset(self, datasets: dict[str, Any], splits: data_mod.Splits):
        """What Trainer evaluates during training."""
        return datasets["validation"]

    def before_training(self, trainer, datasets) -> Optional[dict[str, Any]]:
        """An evaluation recorded before training (None: none)."""
        return None

    def test_report(self, trainer, datasets, splits: data_mod.Splits, tokenizer,
                    before: Optional[dict[str, Any]]) -> dict[str, Any]:
        """The metrics.json entries of the final model on the test data ("test" and what goes with it)."""
        raise NotImplementedError

    def validation_curve(self, log_history: list[dict[str, Any]], splits: data_mod.Splits) -> list[dict[str, Any]]:
        key = f"eval_{self.primary_metric}"
        return [{"step": h["step"], self.primary_metric: h[key]} for h in log_history if key in h]

    def final_table(self, result: dict[str, Any]) -> str:
        raise NotImplementedError

    # --- a finished run -------------------------------------------------------------------------------------
    def eval_trainer(self, model, run_dir: Path, collator, splits: data_mod.Splits):
        """A Trainer for evaluation only, with the training run's settings (so numbers match train's)."""
        return make_trainer_class()(model=model, args=training_arguments(self.config, run_dir, for_training=False,
                                                                         loss_only=self.loss_only),
                                    data_collator=collator, compute_metrics=self.compute_metrics(splits), heads=[],
                                    head_lr=0.0, sums_loss=self.sums_loss,
                                    logits_at_labels=self.config["train.logits_to_keep"] == "labels")

    def evaluate(self, run_dir: Path, splits: data_mod.Splits, model, tokenizer,
                 data_path: Optional[str]) -> dict[str, Any]:
        """`neat-peft eval`: the run's test data, or `data_path` in the run's schema; prints a table."""
        raise NotImplementedError

    def predict(self, model, tokenizer, splits: data_mod.Splits, inputs: list[str],
                max_new_tokens: Optional[int]) -> list[dict[str, Any]]:
        raise NotImplementedError


# --- text classification, causal LM and IDX images: one test split, reported beside a baseline ----------------
class TextClassification(Task):
    name, metrics = "text-classification", ("accuracy", "macro_f1")
    summary = "one text column, one class label"

    def build_splits(self):
        return data_mod.build_text_splits(self.config, self.schema_hint())

    def datasets(self, splits, tokenizer):
        from transformers import DataCollatorWithPadding

        sets = {k: features.classification_dataset(v, tokenizer, splits.labels, self.config["data.max_length"])
                for k, v in splits.rows.items()}
        return sets, DataCollatorWithPadding(tokenizer)

    def compute_metrics(self, splits):
        n_classes = len(splits.labels)
        return lambda prediction: metrics.classification(_logits(prediction), prediction.label_ids, n_classes)

    @staticmethod
    def label_ids(dataset) -> list[int]:
        return [it["labels"] for it in dataset.items]

    def _scored(self, trainer, datasets, splits) -> tuple[dict[str, Any], dict[str, Any]]:
        prediction = trainer.predict(datasets["test"], metric_key_prefix="test")
        test = {"accuracy": prediction.metrics["test_accuracy"], "macro_f1": prediction.metrics["test_macro_f1"],
                "examples": len(datasets["test"])}
        base = metrics.majority_baseline(self.label_ids(datasets["train"]), list(prediction.label_ids),
                                         len(splits.labels))
        base["label"] = splits.labels[base["class"]]
        return test, base

    def test_report(self, trainer, datasets, splits, tokenizer, before):
        test, base = self._scored(trainer, datasets, splits)
        return {"test": test, "majority_baseline": base}

    def final_table(self, result):
        test, base = result["test"], result["majority_baseline"]
        rows = [[result["method"], report.params_cell(result), report.format_duration(result["train_seconds"]),
                 f"{test['accuracy']:.4f}", f"{test['macro_f1']:.4f}"],
                [f"majority class ({base['label']})", "-", "-", f"{base['accuracy']:.4f}", f"{base['macro_f1']:.4f}"]]
        return report.table(rows, ["method", "trainable params", "train time", "test accuracy", "test macro-F1"])

    def _replace_test_rows(self, splits, data_path: str) -> None:
        splits.rows["test"] = data_mod.read_eval_rows(data_path, self.config, splits.labels)

    def evaluate(self, run_dir, splits, model, tokenizer, data_path):
        source = "the run's test split"
        if data_path:
            self._replace_test_rows(splits, data_path)
            source = f"'{data_path}'"
        datasets, collator = self.datasets(splits, tokenizer)
        test, base = self._scored(self.eval_trainer(model, run_dir, collator, splits), datasets, splits)
        result = {"data": source, "examples": test["examples"], "method": self.config["method.name"],
                  "accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
                  "majority_baseline": {"accuracy": base["accuracy"], "macro_f1": base["macro_f1"]}}
        rows = [[self.config["method.name"], f"{result['accuracy']:.4f}", f"{result['macro_f1']:.4f}"],
                [f"majority class ({base['label']})", f"{base['accuracy']:.4f}", f"{base['macro_f1']:.4f}"]]
        text = report.table(rows, ["method", "accuracy", "macro-F1"])
        print(f"evaluating {run_dir} on {source} ({result['examples']:,} examples)\n{text}")
        return result

    def _batch(self, tokenizer, inputs: list[str]) -> dict[str, Any]:
        return tokenizer(inputs, truncation=True, max_length=self.config["data.max_length"], padding=True,
                         return_tensors="pt")

    def predict(self, model, tokenizer, splits, inputs, max_new_tokens):
        with torch.no_grad():
            out = model(**self._batch(tokenizer, inputs))
            logits = out["logits"] if isinstance(out, dict) else out.logits
            probs = torch.softmax(logits.float(), -1)
        return [{"input": text, "label": splits.labels[int(p.argmax())],
                 "scores": {label: float(v) for label, v in zip(splits.labels, p)}} for text, p in zip(inputs, probs)]


class CausalLM(Task):
    name, metrics = "causal-lm", ("loss",)
    summary = "prompt -> response, loss on the response only"
    loss_only, sums_loss, auto_class, generates = True, True, "AutoModelForCausalLM", True
    default_new_tokens = 16

    def build_splits(self):
        return data_mod.build_text_splits(self.config, self.schema_hint())

    def datasets(self, splits, tokenizer):
        sets = {k: features.causal_lm_dataset(v, tokenizer, self.config["data.max_length"])
                for k, v in splits.rows.items()}
        return sets, features.causal_lm_collator(tokenizer)

    def before_training(self, trainer, datasets):
        # Adapters start at zero, so before training every method computes the base model: its test loss.
        return trainer.evaluate(datasets["test"], metric_key_prefix="test")

    def test_report(self, trainer, datasets, splits, tokenizer, before):
        test = trainer.evaluate(datasets["test"], metric_key_prefix="test")
        out: dict[str, Any] = {"test": {"loss": test["test_loss"], "perplexity": metrics.perplexity(test["test_loss"]),
                                        "examples": len(datasets["test"])}}
        if before is not None:
            out["base_model"] = {"loss": before["test_loss"], "perplexity": metrics.perplexity(before["test_loss"])}
        if self.config["eval.generate_answers"]:
            answers = {part: self.label_answers(trainer.model, tokenizer, splits, part)
                       for part in ("validation", "test")}
            out["majority_baseline"] = answers["test"].pop("majority_baseline")
            out["test"].update(answers["test"])
            out["validation"] = answers["validation"]
        return out

    def label_answers(self, model, tokenizer, splits, part: str) -> dict[str, Any]:
        """eval.generate_answers: greedy answers to every prompt of split `part`, scored as labels
        (generation.score_labels); the majority class is the training split's most frequent response."""
        from collections import Counter

        c, rows = self.config, splits.rows[part]
        majority = Counter(r["response"].strip().lower() for r in splits.rows["train"]).most_common(1)[0][0]
        outputs = generation.generate(model, tokenizer, [generation.encode_prompt(tokenizer, r["prompt"], "chat")
                                                         for r in rows],
                                      c["eval.max_new_tokens"], c["train.eval_batch_size"],
                                      precision=c["train.precision"])
        return generation.score_labels(outputs, [r["response"] for r in rows], majority)

    def final_table(self, result):
        test, answers = result["test"], "accuracy" in result["test"]
        extra = [f"{test['accuracy']:.4f}", f"{test['macro_f1']:.4f}"] if answers else []
        rows = [[result["method"], report.params_cell(result), report.format_duration(result["train_seconds"]),
                 f"{test['loss']:.4f}", f"{test['perplexity']:.2f}", *extra]]
        if "base_model" in result:
            rows.append(["base model, untrained", "-", "-", f"{result['base_model']['loss']:.4f}",
                         f"{result['base_model']['perplexity']:.2f}", *(["-", "-"] if answers else [])])
        if answers:
            base = result["majority_baseline"]
            rows.append([f"majority class ({base['label']})", "-", "-", "-", "-", f"{base['accuracy']:.4f}",
                         f"{base['macro_f1']:.4f}"])
        return report.table(rows, ["method", "trainable params", "train time", "test loss", "test perplexity",
                                   *(["test answer accuracy", "test answer macro-F1"] if answers else [])])

    def evaluate(self, run_dir, splits, model, tokenizer, data_path):
        source = "the run's test split"
        if data_path:
            splits.rows["test"] = data_mod.read_eval_rows(data_path, self.config, splits.labels)
            source = f"'{data_path}'"
        datasets, collator = self.datasets(splits, tokenizer)
        loss = self.eval_trainer(model, run_dir, collator, splits).evaluate(
            datasets["test"], metric_key_prefix="test")["test_loss"]
        result = {"data": source, "examples": len(datasets["test"]), "method": self.config["method.name"],
                  "loss": loss, "perplexity": metrics.perplexity(loss)}
        text = report.table([[self.config["method.name"], f"{loss:.4f}", f"{result['perplexity']:.2f}"]],
                            ["method", "loss", "perplexity"])
        print(f"evaluating {run_dir} on {source} ({result['examples']:,} examples)\n{text}")
        return result

    def predict(self, model, tokenizer, splits, inputs, max_new_tokens):
        # one prompt at a time, without padding: what a user sees for each prompt alone
        n = self.default_new_tokens if max_new_tokens is None else max_new_tokens
        results = []
        with torch.no_grad():
            for prompt in inputs:
                ids = torch.tensor([features.prompt_ids(tokenizer, prompt)])
                enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                results.append({"input": prompt, "output": answer})
        return results


class IdxImageClassification(TextClassification):
    """Fashion-MNIST or a folder of IDX files, on EfficientNet-Lite0 (grey images scaled to 3 channels)."""

    name, uses_tokenizer, auto_class = IMAGE, False, None

    def build_splits(self):
        return data_mod.build_image_splits(self.config)

    def datasets(self, splits, tokenizer):
        folder = Path(splits.info["folder"])
        arrays = {part: data_mod.load_images(folder, part) for part in ("train", "test")}
        sets = {}
        for k, rows in splits.rows.items():
            images, labels = arrays["test" if k == "test" else "train"]
            sets[k] = features.ImageDataset(images, labels, [r["index"] for r in rows], self.config["data.image_size"])
        return sets, features.image_collate

    @staticmethod
    def label_ids(dataset) -> list[int]:
        return [int(dataset.labels[j]) for j in dataset.indices]

    def _replace_test_rows(self, splits, data_path):
        folder = data_mod.image_folder(data_path)
        _, labels = data_mod.load_images(folder, "test")
        splits.rows["test"] = [{"index": i, "part": "test"} for i in range(len(labels))]
        splits.info["folder"] = str(folder)

    def _batch(self, tokenizer, inputs):
        return {"pixel_values": torch.stack([_read_grey_image(f, self.config["data.image_size"]) for f in inputs])}


def _read_grey_image(file: str, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        grey = np.asarray(Image.open(file).convert("L"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise CliError(f"Cannot read image '{file}': {e}. Give a PNG or JPEG file.") from None
    return features.image_tensor(grey, size)


# --- datasets-sourced tasks: several test sets, the best validation evaluation (the paper's protocol) --------
class _EvalSetsTask(Task):
    """Tasks whose data come through `datasets` (splits.py): one or more test sets, each reported by name, and
    the best validation evaluation (the authors report the best epoch's figure)."""

    chooses_metric = True
    has_classes = True  # a user's test data may only hold labels that training saw

    def build_splits(self):
        return splits_mod.build_splits(self.config)

    def eval_dataset(self, datasets, splits):
        return splits_mod.eval_dataset(datasets, splits)

    def _validation_key(self, splits) -> str:
        return splits_mod.validation_key(self.primary_metric, splits)

    def validation_curve(self, log_history, splits):
        key = self._validation_key(splits)
        return [{"step": h["step"], "epoch": h.get("epoch"), self.primary_metric: h[key]}
                for h in log_history if key in h]

    def best_validation(self, log_history, splits) -> Optional[dict[str, Any]]:
        key = self._validation_key(splits)
        evals = [h for h in log_history if key in h]
        if not evals:
            return None
        best = (min if self.lower_is_better else max)(evals, key=lambda h: h[key])
        return {"metric": self.primary_metric, "value": best[key], "step": best["step"], "epoch": best.get("epoch"),
                "all": {k[5:]: v for k, v in best.items() if k.startswith("eval_")
                        and not k.endswith(("_runtime", "_per_second"))}}

    def score_sets(self, trainer, model, datasets, splits, tokenizer) -> dict[str, Any]:
        """{display name: metrics} on every test set."""
        result: dict[str, Any] = {}
        for key in splits_mod.eval_names(splits):
            prediction = trainer.predict(datasets[key], metric_key_prefix="test")
            values = {k[len("test_"):]: v for k, v in prediction.metrics.items() if k[len("test_"):] in self.metrics}
            result[splits_mod.display_name(splits, key)] = {**values, "examples": len(datasets[key])}
        return result

    def test_report(self, trainer, datasets, splits, tokenizer, before):
        return {"test": self.score_sets(trainer, trainer.model, datasets, splits, tokenizer),
                "best_validation": self.best_validation(trainer.state.log_history, splits)}

    def final_table(self, result):
        params, time = report.params_cell(result), report.format_duration(result["train_seconds"])
        rows = [[result["method"], params, time, name, _shown(values)] for name, values in result["test"].items()]
        best = result.get("best_validation")
        if best:
            rows.append([f"best validation ({best['metric']})", "-", "-", f"step {best['step']}",
                         f"{best['value']:.4f}"])
        return report.table(rows, ["method", "trainable params", "train time", "evaluated on", "metrics (final model)"])

    def read_test_rows(self, data_path: str) -> list[dict[str, Any]]:
        """Rows of a user's test file or folder in this run's schema."""
        frame = data_mod.read_table(data_path, None, "test", self.schema_hint())
        return splits_mod.text_rows(frame, self.config, data_path)

    def evaluate(self, run_dir, splits, model, tokenizer, data_path):
        if data_path:
            kept = {k: v for k, v in splits.rows.items() if k == "train"}
            kept["test"] = self.read_test_rows(data_path)
            if self.has_classes:
                data_mod.check_labels_seen(kept["test"], splits.labels, f"'{data_path}'")
            info = {k: v for k, v in splits.info.items() if k not in ("test_names", "eval_splits")}
            splits = data_mod.Splits(kept, splits.labels, info)
        result = self.score_finished(run_dir, splits, model, tokenizer)
        rows = [[name, _shown(values), values["examples"]] for name, values in result.items()]
        where = data_path or "the run's test sets"
        print(f"evaluating {run_dir} on {where}\n{report.table(rows, ['evaluated on', 'metrics', 'examples'])}")
        return {"data": where, "method": self.config["method.name"], "test": result}

    def score_finished(self, run_dir, splits, model, tokenizer) -> dict[str, Any]:
        datasets, collator = self.datasets(data_mod.Splits(
            {k: v for k, v in splits.rows.items() if k != "train"}, splits.labels, splits.info), tokenizer)
        return self.score_sets(self.eval_trainer(model, run_dir, collator, splits), model, datasets, splits,
                               tokenizer)

    def predict(self, model, tokenizer, splits, inputs, max_new_tokens):
        with torch.no_grad():
            logits = model(**self._batch(tokenizer, inputs)).logits.float()
        return [self._result(text, row, splits) for text, row in zip(inputs, logits)]

    def _result(self, text: str, row: torch.Tensor, splits) -> dict[str, Any]:
        probs = torch.softmax(row, -1)
        return {"input": text, "label": splits.labels[int(probs.argmax())],
                "scores": {label: float(v) for label, v in zip(splits.labels, probs)}}


class TextPairClassification(_EvalSetsTask):
    name, metrics = PAIR, ("accuracy", "f1", "matthews", "macro_f1")
    summary = "two text columns, one class label (GLUE)"

    def datasets(self, splits, tokenizer):
        from transformers import DataCollatorWithPadding

        sets = {k: features.text_dataset(v, tokenizer, self.config["data.max_length"], splits.labels,
                                         regression=not self.has_classes) for k, v in splits.rows.items()}
        return sets, DataCollatorWithPadding(tokenizer)

    def compute_metrics(self, splits):
        return lambda p: metrics.glue_classification(_logits(p), p.label_ids, splits.labels, pair=True)

    def _batch(self, tokenizer, inputs):
        pairs = [tuple(part.strip() for part in text.split(PAIR_SEPARATOR, 1)) for text in inputs]
        paired = self.config["data.text_pair_column"] is not None
        if paired and any(len(p) != 2 for p in pairs):
            raise CliError(f"This run reads text pairs: give each input as 'first text {PAIR_SEPARATOR} second "
                           "text'.")
        return dict(tokenizer([p[0] for p in pairs], [p[1] for p in pairs] if paired else None, truncation=True,
                              max_length=self.config["data.max_length"], padding=True, return_tensors="pt"))


class TextRegression(TextPairClassification):
    name, metrics, has_classes = REGRESSION, ("pearson", "spearman", "mse"), False
    summary = "one float label, MSE loss, Pearson / Spearman (GLUE STS-B)"

    def compute_metrics(self, splits):
        return lambda p: metrics.regression(_logits(p), p.label_ids)

    def _result(self, text, row, splits):
        return {"input": text, "score": float(row[0])}


class DatasetImageClassification(_EvalSetsTask):
    """Any `datasets` image set or image folder, on a transformers vision model (ViT-style processors)."""

    name, metrics, uses_tokenizer, auto_class = IMAGE, ("accuracy", "macro_f1"), False, \
        "AutoModelForImageClassification"

    def datasets(self, splits, tokenizer):
        train_tf, eval_tf = features.image_transforms(features.load_processor(self.config))
        needed = {(r["source"], r["split"]) for rows in splits.rows.values() for r in rows}
        sources = {(where, s): data_mod.load_split(where, self.config["data.hub_config"]
                                                   if where == self.config["data.source"] else None, s,
                                                   self.schema_hint()) for where, s in sorted(needed)}
        rng = np.random.default_rng(self.config["train.seed"])
        sets = {k: features.ImageSetDataset(sources, rows, self.config["data.image_column"], splits.labels,
                                            train_tf if k == "train" else eval_tf, rng if k == "train" else None)
                for k, rows in splits.rows.items()}
        return sets, features.image_collate

    def compute_metrics(self, splits):
        return lambda p: metrics.glue_classification(_logits(p), p.label_ids, splits.labels, pair=False)

    def read_test_rows(self, data_path):
        config = self.config
        dataset = data_mod.load_split(data_path, None, "test", self.schema_hint())
        splits_mod.require_columns(list(dataset.column_names), {"data.image_column": config["data.image_column"],
                                                         "data.label_column": config["data.label_column"]},
                            IMAGE, data_path)
        _, labels = splits_mod.image_labels(dataset, config["data.label_column"])
        return [{"source": data_path, "split": "test", "index": i, "label": lab} for i, lab in enumerate(labels)]

    def _batch(self, tokenizer, inputs):
        from PIL import Image, UnidentifiedImageError

        _, eval_tf = features.image_transforms(features.load_processor(self.config))
        images = []
        for file in inputs:
            try:
                images.append(eval_tf(Image.open(file)))
            except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
                raise CliError(f"Cannot read image '{file}': {e}. Give a PNG or JPEG file.") from None
        return {"pixel_values": torch.stack(images)}


class ImageClassification(Task):
    """The image task: IDX files (Fashion-MNIST) on EfficientNet-Lite0, or any `datasets` image set."""

    name, chooses_metric = IMAGE, True
    metrics = DatasetImageClassification.metrics
    summary = "IDX files (Fashion-MNIST) or any `datasets` image set / image folder"

    @classmethod
    def for_config(cls, config):
        return (IdxImageClassification if splits_mod.is_idx_source(config) else DatasetImageClassification)(config)


class GenerativeQA(_EvalSetsTask):
    name, metrics = QA, ("loss",)
    summary = "prompt -> response training, scored by generating an answer and extracting it"
    loss_only, sums_loss, auto_class, has_classes, generates = True, True, "AutoModelForCausalLM", False, True

    @classmethod
    def check_keys(cls, config, where=""):
        sets = config["data.eval_sets"]
        for i, entry in enumerate(sets or []):
            if not isinstance(entry, dict) or not {"name", "source", "extractor"} <= set(entry) or \
                    set(entry) - {"name", "source", "extractor", "split", "hub_config"}:
                raise CliError(f"data.eval_sets[{i}] must be a mapping with name, source and extractor (and "
                               f"optionally split, hub_config), got {entry!r}.")
            if entry["extractor"] not in generation.EXTRACTORS:
                raise CliError(f"data.eval_sets[{i}].extractor must be one of {', '.join(generation.EXTRACTORS)}, "
                               f"got {entry['extractor']!r}.")
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(entry["name"])):
                raise CliError(f"data.eval_sets[{i}].name must be letters, digits, '_', '.' or '-' (it names a file "
                               f"in the run's split/ folder), got {entry['name']!r}.")
        names = [str(entry["name"]) for entry in sets or []]
        if len(set(names)) != len(names):
            raise CliError(f"data.eval_sets names must differ, got {names}.")
        if config["eval.metric"] not in (None, *cls.metrics):
            raise CliError(f"eval.metric={config['eval.metric']!r} is not a metric of task {cls.name}; use one of "
                           f"{', '.join(cls.metrics)}.")
        if sets is None and config["eval.extractor"] is None:
            raise CliError("generative-qa scores generated answers: set eval.extractor (one of "
                           f"{', '.join(generation.EXTRACTORS)}) or list test sets with their extractors in "
                           "data.eval_sets.")

    def encode(self, tokenizer, prompt: str) -> list[int]:
        return generation.encode_prompt(tokenizer, prompt, self.config["data.prompt_template"])

    def examples(self, rows, tokenizer):
        """input_ids = template(prompt) + response + eos; labels IGNORE_INDEX on the prompt."""
        return features.causal_lm_dataset(rows, tokenizer, self.config["data.max_length"],
                                          lambda prompt: self.encode(tokenizer, prompt))

    def datasets(self, splits, tokenizer):
        # test rows hold no response (they are scored by generation); as items they are the prompt and eos
        sets = {k: self.examples([{"response": "", **r} for r in v], tokenizer) for k, v in splits.rows.items()}
        return sets, features.causal_lm_collator(tokenizer)

    def generate(self, model, tokenizer, prompts: list[str]) -> list[str]:
        c = self.config
        return generation.generate(model, tokenizer, [self.encode(tokenizer, p) for p in prompts],
                                   c["eval.max_new_tokens"], c["train.eval_batch_size"], c["eval.num_beams"],
                                   c["train.precision"])

    def score_sets(self, trainer, model, datasets, splits, tokenizer):
        result = {}
        for key in splits_mod.eval_names(splits):
            rows = splits.rows[key]
            outputs = self.generate(model, tokenizer, [r["prompt"] for r in rows])
            result[splits_mod.display_name(splits, key)] = generation.score(
                outputs, [r["answer"] for r in rows], splits.info["extractors"][key])
        return result

    def score_finished(self, run_dir, splits, model, tokenizer):
        return self.score_sets(None, model, {}, splits, tokenizer)

    def read_test_rows(self, data_path):
        frame = data_mod.read_table(data_path, None, "test", self.schema_hint())
        return splits_mod.qa_rows(frame, self.config, data_path, need_response=False, need_answer=True)

    def predict(self, model, tokenizer, splits, inputs, max_new_tokens):
        task = self if max_new_tokens is None else GenerativeQA({**self.config, "eval.max_new_tokens": max_new_tokens})
        outputs = task.generate(model, tokenizer, inputs)
        extractor = self.config["eval.extractor"] or splits.info.get("extractors", {}).get("test")
        return [{"input": p, "output": o, "answer": generation.extract_answer(o, extractor)}
                for p, o in zip(inputs, outputs)]


TASKS: dict[str, type[Task]] = {t.name: t for t in (TextClassification, CausalLM, ImageClassification,
                                                     TextPairClassification, TextRegression, GenerativeQA)}


def for_config(config: dict[str, Any]) -> Task:
    """The task object of a validated recipe."""
    return TASKS[config["task"]].for_config(config)
# Validation metrics that eval.metric may pick, per task (the first: the default).
METRICS = {name: cls.metrics for name, cls in TASKS.items() if cls.chooses_metric}
