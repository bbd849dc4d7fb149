"""The task types of the paper's benchmarks, beside single-text classification and causal-LM tuning.

  text-pair-classification  two text columns, one class label (GLUE: MRPC, RTE, QNLI, QQP, MNLI; also
                            single-sentence CoLA / SST-2 with data.text_pair_column: null)
  text-regression           one float label, MSE loss, Pearson / Spearman (GLUE STS-B)
  image-classification      any `datasets` image set or image folder, ViT-style processors (the IDX /
                            EfficientNet path of the default image recipe stays in data.py / models.py)
  generative-qa             causal-LM training on prompt -> response; tested by generating an answer and
                            extracting it with a per-dataset extractor, as LLM-Adapters scores commonsense and math

Data come through `datasets.load_dataset(source, config, split=...)`: a hub name, or a local folder of split
files (train.jsonl, validation.jsonl, ...) or an image folder (train/<class>/*.png) read by the same call.
Metrics are scikit-learn's and scipy's. Evaluation sets beyond validation / test are kept as split rows
named `test-<name>`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import data as data_mod
from .errors import CliError

PAIR, REGRESSION, IMAGE, QA = "text-pair-classification", "text-regression", "image-classification", "generative-qa"
TEXT_TASKS = (PAIR, REGRESSION)
EXTRA_PREFIX = "test-"

# Metrics computed per task; the first is the default for choosing the best validation evaluation.
METRICS = {PAIR: ("accuracy", "f1", "matthews", "macro_f1"), IMAGE: ("accuracy", "macro_f1"),
           REGRESSION: ("pearson", "spearman", "mse"), QA: ("loss",)}
LOWER_IS_BETTER = ("mse", "loss")
TEMPLATES = ("chat", "alpaca", "plain")
# LLM-Adapters' instruction template (commonsense and math), without its optional "### Input:" block.
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")

# Answer extractors: the first of these words found in the generated text (LLM-Adapters' per-dataset choice
# lists), or for "number" the last number (commas removed), compared numerically within 1e-3.
_CHOICES = {
    "boolq": ("true", "false"), "piqa": ("solution1", "solution2"),
    "siqa": tuple(f"answer{i}" for i in range(1, 6)), "arc": tuple(f"answer{i}" for i in range(1, 6)),
    "obqa": tuple(f"answer{i}" for i in range(1, 6)), "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"), "true-false": ("true", "false"), "yes-no": ("yes", "no"),
    "letter": tuple("ABCDE"),
}
EXTRACTORS = (*_CHOICES, "number")
_CASE_FOLDED = ("yes-no", "true-false")  # LLM-Adapters' lists match case-sensitively; these two do not


def is_idx_source(config: dict[str, Any]) -> bool:
    """The default image recipe's path: Fashion-MNIST or a folder of IDX files (read by data.py)."""
    source = config["data.source"]
    if source == "fashion-mnist":
        return True
    folder = Path(source).expanduser()
    return folder.is_dir() and any(data_mod._find_idx(folder, stem) for pair in data_mod.IDX_FILES.values()
                                   for stem in pair)


def handles(config: dict[str, Any]) -> bool:
    """True for the tasks run by this module."""
    task = config["task"]
    return task in (PAIR, REGRESSION, QA) or (task == IMAGE and not is_idx_source(config))


def auto_class(task: str) -> str:
    """The transformers Auto class that loads a merged model of `task`."""
    return {IMAGE: "AutoModelForImageClassification", QA: "AutoModelForCausalLM",
            "causal-lm": "AutoModelForCausalLM"}.get(task, "AutoModelForSequenceClassification")


def primary_metric(config: dict[str, Any]) -> str:
    return config["eval.metric"] or METRICS[config["task"]][0]


def validate_task_keys(config: dict[str, Any]) -> None:
    """The enumerations and shapes of the task keys (called by recipe.validate)."""
    enums = {"train.eval_strategy": ("steps", "epoch"), "train.precision": ("fp32", "bf16", "fp16")}
    if config["data.prompt_template"] not in TEMPLATES and "{prompt}" not in config["data.prompt_template"]:
        raise CliError(f"data.prompt_template must be one of {', '.join(TEMPLATES)} or a format string holding "
                       f"{{prompt}} (e.g. 'Question: {{prompt}} Think step by step.\\nAnswer:'), got "
                       f"{config['data.prompt_template']!r}.")
    for key, allowed in enums.items():
        if config[key] not in allowed:
            raise CliError(f"{key} must be one of {', '.join(allowed)}, got {config[key]!r}.")
    task = config["task"]
    if config["eval.metric"] is not None and task in METRICS and config["eval.metric"] not in METRICS[task]:
        raise CliError(f"eval.metric={config['eval.metric']!r} is not a metric of task {task}; use one of "
                       f"{', '.join(METRICS[task])}.")
    for key in ("eval.num_beams", "eval.max_new_tokens"):
        if config[key] < 1:
            raise CliError(f"{key} must be at least 1, got {config[key]}.")
    if config["train.warmup_steps"] is not None and config["train.warmup_steps"] < 0:
        raise CliError(f"train.warmup_steps must be 0 or more (or null), got {config['train.warmup_steps']}.")
    if config["data.eval_splits"] is not None:
        if not config["data.eval_splits"] or not all(isinstance(s, str) for s in config["data.eval_splits"]):
            raise CliError(f"data.eval_splits must be a non-empty list of split names, got "
                           f"{config['data.eval_splits']!r}.")
    if config["eval.extractor"] is not None and config["eval.extractor"] not in EXTRACTORS:
        raise CliError(f"eval.extractor must be one of {', '.join(EXTRACTORS)}, got {config['eval.extractor']!r}.")
    sets = config["data.eval_sets"]
    if sets is not None:
        if task != QA:
            raise CliError(f"data.eval_sets is for task generative-qa (test sets scored by generation); task {task} "
                           "evaluates on data.eval_splits or held-out fractions.")
        for i, entry in enumerate(sets):
            if not isinstance(entry, dict) or not {"name", "source", "extractor"} <= set(entry) or \
                    set(entry) - {"name", "source", "extractor", "split", "hub_config"}:
                raise CliError(f"data.eval_sets[{i}] must be a mapping with name, source and extractor (and "
                               f"optionally split, hub_config), got {entry!r}.")
            if entry["extractor"] not in EXTRACTORS:
                raise CliError(f"data.eval_sets[{i}].extractor must be one of {', '.join(EXTRACTORS)}, got "
                               f"{entry['extractor']!r}.")
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(entry["name"])):
                raise CliError(f"data.eval_sets[{i}].name must be letters, digits, '_', '.' or '-' (it names a file "
                               f"in the run's split/ folder), got {entry['name']!r}.")
        names = [str(entry["name"]) for entry in sets]
        if len(set(names)) != len(names):
            raise CliError(f"data.eval_sets names must differ, got {names}.")
    if task == QA and sets is None and config["eval.extractor"] is None:
        raise CliError("generative-qa scores generated answers: set eval.extractor (one of "
                       f"{', '.join(EXTRACTORS)}) or list test sets with their extractors in data.eval_sets.")


# --- schema hints and column checks ----------------------------------------------------------------------
def schema_hint(config: dict[str, Any]) -> str:
    """The local stand-in that works offline for this task, named in 'cannot load' messages."""
    task = config["task"]
    if task == IMAGE:
        return (f"Offline, use a local image folder read by the same `datasets` call: <folder>/train/<class>/"
                f"<image>.png (and validation/, test/), or a folder of split files whose rows have the columns "
                f"'{config['data.image_column']}' and '{config['data.label_column']}'.")
    if task == QA:
        cols = [config["data.prompt_column"], config["data.response_column"], config["data.answer_column"]]
    elif task == "causal-lm":
        cols = [config["data.prompt_column"], config["data.response_column"]]
    elif task == "text-classification":
        cols = [config["data.text_column"], config["data.label_column"]]
    else:
        cols = [c for c in (config["data.text_column"], config["data.text_pair_column"], config["data.label_column"])
                if c is not None]
    number = f" ('{config['data.label_column']}' a number)" if task == REGRESSION else ""
    return ("Offline, use a local .csv/.json/.jsonl file, or a folder of split files (train.jsonl, "
            f"validation.jsonl, ...), whose rows have the columns {', '.join(repr(c) for c in cols)}{number}.")


def _require(columns: list[str], needed: dict[str, str], task: str, source: str, extra: str = "") -> None:
    missing = [f"'{col}' ({key})" for key, col in needed.items() if col not in columns]
    if missing:
        raise CliError(f"Task {task} needs the column{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
                       f"which '{source}' does not have. Its columns are: {', '.join(map(str, columns))}. Set "
                       f"the data.*_column keys to the right names, or pick the task that fits these columns.{extra}")


def _clean_text(values) -> list[str]:
    return ["" if v is None or (isinstance(v, float) and v != v) else str(v).strip() for v in values]


def _text_columns(config: dict[str, Any]) -> dict[str, str]:
    """The text columns a text task reads: data.text_pair_column too unless it is null (CoLA, SST-2)."""
    needed = {"data.text_column": config["data.text_column"]}
    if config["data.text_pair_column"] is not None:
        needed["data.text_pair_column"] = config["data.text_pair_column"]
    return needed


def _float_labels(values, column: str, source: str) -> list[float]:
    out = []
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise CliError(f"Task text-regression needs numeric labels, but column '{column}' of '{source}' holds "
                           f"{v!r}. Use a column of numbers, or task text-pair-classification / "
                           "text-classification for class names.") from None
        if not math.isfinite(x):
            raise CliError(f"Column '{column}' of '{source}' holds a non-finite label ({v!r}).")
        out.append(x)
    return out


def _text_rows(frame, config: dict[str, Any], source: str) -> list[dict[str, Any]]:
    task, columns = config["task"], [str(c) for c in frame.columns]
    needed = {**_text_columns(config), "data.label_column": config["data.label_column"]}
    _require(columns, needed, task, source, "" if config["data.text_pair_column"] is None else
             " A single-sentence task (CoLA, SST-2) sets data.text_pair_column: null.")
    texts = _clean_text(frame[needed["data.text_column"]].tolist())
    pairs = _clean_text(frame[needed["data.text_pair_column"]].tolist()) if "data.text_pair_column" in needed \
        else None
    raw = frame[config["data.label_column"]].tolist()
    labels = _float_labels(raw, config["data.label_column"], source) if task == REGRESSION else _clean_text(raw)
    rows = []
    for i, text in enumerate(texts):
        if not text or (pairs is not None and not pairs[i]) or labels[i] == "":
            continue
        row = {"text": text, "label": labels[i]}
        if pairs is not None:
            row["text_pair"] = pairs[i]
        rows.append(row)
    return rows


def _qa_rows(frame, config: dict[str, Any], source: str, need_response: bool, need_answer: bool):
    columns = [str(c) for c in frame.columns]
    needed = {"data.prompt_column": config["data.prompt_column"]}
    if need_response:
        needed["data.response_column"] = config["data.response_column"]
    if need_answer:
        needed["data.answer_column"] = config["data.answer_column"]
    _require(columns, needed, QA, source)
    rows = []
    values = {k: _clean_text(frame[c].tolist()) for k, c in needed.items()}
    for i, prompt in enumerate(values["data.prompt_column"]):
        row = {"prompt": prompt}
        if need_response:
            row["response"] = values["data.response_column"][i]
        if need_answer:
            row["answer"] = values["data.answer_column"][i]
        if all(row.values()):
            rows.append(row)
    return rows


# --- splits ---------------------------------------------------------------------------------------------
def _dedupe(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[list[dict[str, Any]], int]:
    seen, unique = set(), []
    for r in rows:
        key = tuple(r.get(k) for k in keys)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique, len(rows) - len(unique)


def _subset(rows: list[dict[str, Any]], limit: Optional[int], strata: list[str], rng) -> list[dict[str, Any]]:
    return [rows[i] for i in data_mod.stratified_subset(list(range(len(rows))), strata, limit, rng)]


def _strata(rows: list[dict[str, Any]], task: str) -> list[str]:
    return [str(r["label"]) for r in rows] if task in (PAIR, IMAGE) else ["all"] * len(rows)


def _finish(config: dict[str, Any], pools: dict[str, list[dict[str, Any]]], info: dict[str, Any],
            labels: list[str]) -> data_mod.Splits:
    """Subsets of each pool (data.max_*_examples), label checks, and the Splits."""
    rng = np.random.default_rng(config["train.seed"] + 1)
    task = config["task"]
    limits = {"train": config["data.max_train_examples"], "validation": config["data.max_validation_examples"]}
    rows = {}
    for name, pool in pools.items():
        limit = limits.get(name, config["data.max_test_examples"])
        rows[name] = _subset(pool, limit, _strata(pool, task), rng)
        if not rows[name]:
            raise CliError(f"The {name} split of the data is empty (source '{config['data.source']}'). Use more "
                           "data, larger data.validation_fraction / data.test_fraction, or check data.eval_splits "
                           "and data.test_split.")
    info["available"] = {k: len(v) for k, v in pools.items()}
    if info.get("test_is_validation"):  # GLUE's protocol: the dev set is both (the best epoch is reported)
        rows["test"], info["available"]["test"] = rows["validation"], info["available"]["validation"]
    info["used"] = {k: len(v) for k, v in rows.items()}
    if task in (PAIR, IMAGE):
        if not labels:
            labels = sorted({str(r["label"]) for r in rows["train"]})
        if len(labels) < 2:
            raise CliError(f"The training data of '{config['data.source']}' has a single label {labels}; "
                           "classification needs at least two.")
        for name, part in rows.items():
            if name != "train":
                data_mod.check_labels_seen(part, labels, f"the {name} split")
    return data_mod.Splits(rows, labels, info)


def _held_out(config: dict[str, Any], rows: list[dict[str, Any]], has_own_test: bool):
    parts = data_mod.split_rows(rows, _strata(rows, config["task"]), config, has_own_test)
    return {k: [rows[i] for i in v] for k, v in parts.items() if v or k != "test" or not has_own_test}


def _eval_pools(config, load: Callable[..., list[dict[str, Any]]], train_rows, info):
    """validation (and test-<name>) from data.eval_splits, or held out of the training rows; test from
    data.test_split (of data.test_source), else the first evaluation split, else held out."""
    splits, test_split = config["data.eval_splits"], config["data.test_split"]
    if splits:
        pools = {"train": train_rows, "validation": load(splits[0])}
        for name in splits[1:]:
            pools[EXTRA_PREFIX + name] = load(name)
        info["eval_splits"] = list(splits)
    else:
        pools = _held_out(config, train_rows, has_own_test=test_split is not None)
    if test_split is not None:
        pools["test"] = load(test_split, config["data.test_source"])
        info["test_split"] = f"{config['data.test_source'] or config['data.source']} [{test_split}]"
    elif splits:
        info["test_is_validation"] = True
    return pools


def _text_splits(config: dict[str, Any]) -> data_mod.Splits:
    source, hint = config["data.source"], schema_hint(config)
    read: dict[str, int] = {}

    def load(split: str, other: Optional[str] = None):
        where = other or source
        frame = data_mod.read_table(where, config["data.hub_config"] if other is None else None, split, hint)
        read[split] = len(frame)
        return _text_rows(frame, config, f"{where}" + (f" [{split}]" if not Path(where).is_file() else ""))

    if config["data.eval_splits"] and Path(source).expanduser().is_file():
        raise CliError(f"data.eval_splits={config['data.eval_splits']} names splits, but '{source}' is a single "
                       "file. Give a folder of split files (train.jsonl, validation.jsonl, ...) or a hub name, or "
                       "set data.eval_splits: null to hold out data.validation_fraction / data.test_fraction.")
    train_rows = load(config["data.hub_split"])
    info: dict[str, Any] = {"source": source, "rows_read": read[config["data.hub_split"]],
                            "rows_empty_dropped": read[config["data.hub_split"]] - len(train_rows)}
    if config["data.dedupe"] and not config["data.eval_splits"]:
        train_rows, info["duplicates_dropped"] = _dedupe(train_rows, ("text", "text_pair"))
    pools = _eval_pools(config, load, train_rows, info)
    return _finish(config, pools, info, [])


def _qa_splits(config: dict[str, Any]) -> data_mod.Splits:
    source, hint = config["data.source"], schema_hint(config)
    sets = config["data.eval_sets"]
    frame = data_mod.read_table(source, config["data.hub_config"], config["data.hub_split"], hint)
    train_rows = _qa_rows(frame, config, source, need_response=True, need_answer=sets is None)
    info: dict[str, Any] = {"source": source, "rows_read": len(frame),
                            "rows_empty_dropped": len(frame) - len(train_rows)}
    if config["data.dedupe"]:
        train_rows, info["duplicates_dropped"] = _dedupe(train_rows, ("prompt",))
    pools = _held_out(config, train_rows, has_own_test=sets is not None)
    extractors = {"test": config["eval.extractor"]}
    if sets:
        for i, entry in enumerate(sets):
            split = entry.get("split", "test")
            table = data_mod.read_table(entry["source"], entry.get("hub_config"), split, hint)
            rows = _qa_rows(table, config, entry["source"], need_response=False, need_answer=True)
            key = "test" if i == 0 else EXTRA_PREFIX + entry["name"]
            pools[key] = rows
            extractors[key] = entry["extractor"]
        info["test_names"] = {("test" if i == 0 else EXTRA_PREFIX + e["name"]): e["name"]
                              for i, e in enumerate(sets)}
    info["extractors"] = extractors
    return _finish(config, pools, info, [])


def _image_labels(dataset, column: str) -> tuple[list[str], list[str]]:
    """(class names, each row's class name) of an image split: ClassLabel names when the feature has them."""
    feature = dataset.features[column]
    values = dataset[column]
    names = getattr(feature, "names", None)
    if names:
        return list(names), [names[int(v)] for v in values]
    return [], [str(v) for v in values]


def _image_splits(config: dict[str, Any]) -> data_mod.Splits:
    source, hint = config["data.source"], schema_hint(config)
    image_col, label_col = config["data.image_column"], config["data.label_column"]
    class_names: list[str] = []

    def load(split: str, other: Optional[str] = None):
        nonlocal class_names
        where = other or source
        dataset = data_mod.load_split(where, config["data.hub_config"] if other is None else None, split, hint)
        _require(list(dataset.column_names), {"data.image_column": image_col, "data.label_column": label_col},
                 IMAGE, f"{where} [{split}]")
        names, labels = _image_labels(dataset, label_col)
        if class_names and names and names != class_names:
            raise CliError(f"The class names of '{where}' [{split}] ({names[:5]}...) differ from the training "
                           f"data's ({class_names[:5]}...): the label ids would not mean the same classes.")
        class_names = class_names or names
        return [{"source": where, "split": split, "index": i, "label": lab} for i, lab in enumerate(labels)]

    train_rows = load(config["data.hub_split"])
    info: dict[str, Any] = {"source": source, "image_splits": True}
    pools = _eval_pools(config, load, train_rows, info)
    return _finish(config, pools, info, class_names)


def build_splits(config: dict[str, Any]) -> data_mod.Splits:
    """Read, check and split the data of a task of this module, before anything is written."""
    task = config["task"]
    if task == IMAGE:
        return _image_splits(config)
    if task == QA:
        return _qa_splits(config)
    return _text_splits(config)


def eval_names(splits: data_mod.Splits) -> list[str]:
    """The rows keys evaluated at the end: test, then every test-<name>."""
    info = splits.info
    if "test_names" in info:
        return list(info["test_names"])
    return ["test", *(EXTRA_PREFIX + name for name in (info.get("eval_splits") or [])[1:])]


def display_name(splits: data_mod.Splits, key: str) -> str:
    info = splits.info
    if "test_names" in info:
        return info["test_names"].get(key, key)
    if key.startswith(EXTRA_PREFIX):
        return key[len(EXTRA_PREFIX):]
    return info["eval_splits"][0] if key == "test" and info.get("test_is_validation") else key


# --- features -------------------------------------------------------------------------------------------
def text_dataset(rows, tokenizer, config: dict[str, Any], labels: list[str]):
    from .features import ListDataset

    firsts = [r["text"] for r in rows]
    seconds = [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None
    encoded = tokenizer(firsts, seconds, truncation=True, max_length=config["data.max_length"])
    index = {name: i for i, name in enumerate(labels)}
    items = []
    for i, r in enumerate(rows):
        item = {k: v[i] for k, v in encoded.items()}
        if "label" in r:
            item["labels"] = float(r["label"]) if config["task"] == REGRESSION else index[str(r["label"])]
        items.append(item)
    return ListDataset(items)


def image_transforms(processor) -> tuple[Callable, Callable]:
    """(train, eval) transforms PIL image -> 3 x H x W float tensor normalised by the processor's mean/std.

    Train: a random crop of area fraction U(0.08, 1) and aspect ratio log-U(3/4, 4/3) resized to H x W, then
    a horizontal flip with probability 1/2 (RandomResizedCrop + RandomHorizontalFlip). Eval: the shorter side
    resized (to size.shortest_edge, or to cover size.height x size.width), then a centre crop (the authors'
    Resize + CenterCrop; for square images the same as the ViT processor's own resize)."""
    size = dict(processor.size)
    crop = dict(getattr(processor, "crop_size", None) or {}) if getattr(processor, "do_center_crop", False) else {}
    if "height" in size:
        out_hw = (crop.get("height", size["height"]), crop.get("width", size["width"]))
    else:
        out_hw = (crop.get("height", size["shortest_edge"]), crop.get("width", size["shortest_edge"]))
    mean = torch.tensor(processor.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(processor.image_std, dtype=torch.float32)[:, None, None]

    def to_tensor(image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - mean) / std

    def eval_transform(image):
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        # shorter side to shortest_edge, or just enough to cover height x width (the aspect ratio is kept)
        scale = size["shortest_edge"] / min(w, h) if "shortest_edge" in size else max(out_hw[0] / h, out_hw[1] / w)
        image = image.resize((max(out_hw[1], round(w * scale)), max(out_hw[0], round(h * scale))), Image.BILINEAR)
        w, h = image.size
        th, tw = out_hw
        left, top = max(0, (w - tw) // 2), max(0, (h - th) // 2)
        image = image.crop((left, top, left + tw, top + th))
        return to_tensor(image)

    def train_transform(image, rng: np.random.Generator):
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        box = (0, 0, w, h)
        for _ in range(10):
            area = w * h * rng.uniform(0.08, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                box = (left, top, left + cw, top + ch)
                break
        image = image.resize((out_hw[1], out_hw[0]), Image.BILINEAR, box=box)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(image)

    return train_transform, eval_transform


class ImageSetDataset(torch.utils.data.Dataset):
    """Rows {split, index, label} of `datasets` image splits, decoded and transformed when read."""

    def __init__(self, sources: dict[str, Any], rows, column: str, labels: list[str], transform,
                 rng: Optional[np.random.Generator] = None):
        self.sources, self.rows, self.column, self.rng = sources, rows, column, rng
        self.index, self.transform = {name: i for i, name in enumerate(labels)}, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows[i]
        image = self.sources[(r["source"], r["split"])][r["index"]][self.column]
        x = self.transform(image, self.rng) if self.rng is not None else self.transform(image)
        return {"pixel_values": x, "labels": self.index[r["label"]]}


def load_processor(config: dict[str, Any]):
    from transformers import AutoImageProcessor

    from .models import _from_pretrained, resolve_source

    source, _ = resolve_source(config)
    return _from_pretrained(AutoImageProcessor, source, config["model.name"])


def qa_dataset(rows, tokenizer, config: dict[str, Any]):
    """input_ids = template(prompt) + response + eos; labels IGNORE_INDEX on the prompt (loss on the response)."""
    from .features import causal_lm_dataset

    template = config["data.prompt_template"]
    return causal_lm_dataset(rows, tokenizer, config["data.max_length"],
                             lambda prompt: encode_prompt(tokenizer, prompt, template))


def encode_prompt(tokenizer, prompt: str, template: str) -> list[int]:
    """Token ids of the prompt as the model sees it, in training and in generation alike."""
    from .features import prompt_text

    if template == "chat":
        return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    text = ALPACA.format(prompt=prompt) if template == "alpaca" else prompt + "\n" if template == "plain" else \
        template.replace("{prompt}", prompt)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def build_datasets(config: dict[str, Any], splits: data_mod.Splits, tokenizer):
    """{rows key: Dataset} and the collator."""
    task = config["task"]
    if task in TEXT_TASKS:
        from transformers import DataCollatorWithPadding

        sets = {k: text_dataset(v, tokenizer, config, splits.labels) for k, v in splits.rows.items()}
        return sets, DataCollatorWithPadding(tokenizer)
    if task == QA:
        from .features import causal_lm_collator

        # test rows hold no response (they are scored by generation); as items they are the prompt and eos
        sets = {k: qa_dataset([{"response": "", **r} for r in v], tokenizer, config) for k, v in splits.rows.items()}
        return sets, causal_lm_collator(tokenizer)
    from .features import image_collate

    train_tf, eval_tf = image_transforms(load_processor(config))
    needed = {(r["source"], r["split"]) for rows in splits.rows.values() for r in rows}
    sources = {(where, s): data_mod.load_split(where, config["data.hub_config"] if where == config["data.source"]
                                               else None, s, schema_hint(config)) for where, s in sorted(needed)}
    rng = np.random.default_rng(config["train.seed"])
    sets = {k: ImageSetDataset(sources, rows, config["data.image_column"], splits.labels,
                               train_tf if k == "train" else eval_tf, rng if k == "train" else None)
            for k, rows in splits.rows.items()}
    return sets, image_collate


def eval_dataset(datasets: dict[str, Any], splits: data_mod.Splits):
    """What Trainer evaluates during training: the validation set, or (MNLI) {name: set} of every eval split."""
    extras = [k for k in splits.rows if k.startswith(EXTRA_PREFIX)]
    if splits.info.get("eval_splits") and extras:
        names = splits.info["eval_splits"]
        return {names[0]: datasets["validation"], **{k[len(EXTRA_PREFIX):]: datasets[k] for k in extras}}
    return datasets["validation"]


def validation_key(config: dict[str, Any], splits: data_mod.Splits) -> str:
    """The log_history key of the metric that picks the best validation evaluation."""
    extras = [k for k in splits.rows if k.startswith(EXTRA_PREFIX)]
    prefix = f"{splits.info['eval_splits'][0]}_" if splits.info.get("eval_splits") and extras else ""
    return f"eval_{prefix}{primary_metric(config)}"


# --- metrics --------------------------------------------------------------------------------------------
def prediction_metrics(task: str, logits: np.ndarray, gold: np.ndarray, labels: list[str]) -> dict[str, float]:
    """The task's metrics of predictions against gold labels (scikit-learn / scipy)."""
    logits = np.asarray(logits)
    if task == REGRESSION:
        from scipy.stats import pearsonr, spearmanr

        pred, gold = logits.reshape(-1).astype(np.float64), np.asarray(gold, dtype=np.float64).reshape(-1)
        return {"pearson": float(pearsonr(pred, gold)[0]), "spearman": float(spearmanr(pred, gold)[0]),
                "mse": float(np.mean((pred - gold) ** 2))}
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    pred, gold = logits.argmax(-1), np.asarray(gold).reshape(-1)
    out = {"accuracy": float(accuracy_score(gold, pred)),
           "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0))}
    if task == PAIR:
        out["matthews"] = float(matthews_corrcoef(gold, pred))
        if len(labels) == 2:  # GLUE's F1 (MRPC, QQP): of the positive class, label "1"
            positive = labels.index("1") if "1" in labels else 1
            out["f1"] = float(f1_score(gold, pred, pos_label=positive, average="binary", zero_division=0))
    return out


def metrics_fn(config: dict[str, Any], splits: data_mod.Splits):
    if config["task"] == QA:
        return None

    def compute(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return prediction_metrics(config["task"], logits, prediction.label_ids, splits.labels)

    return compute


def extract_answer(text: str, extractor: str) -> str:
    """The answer read from generated text ('' when none is found)."""
    if extractor == "number":
        numbers = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
        return numbers[-1] if numbers else ""
    choices = _CHOICES[extractor]
    flags = re.IGNORECASE if extractor in _CASE_FOLDED else 0
    pattern = r"\b(" + "|".join(map(re.escape, choices)) + r")\b" if extractor == "letter" else \
        "|".join(map(re.escape, choices))
    found = re.search(pattern, text.strip(), flags)
    return found.group(0).lower() if found and extractor in _CASE_FOLDED else (found.group(0) if found else "")


def is_correct(pred: str, gold: str, extractor: str) -> bool:
    if extractor == "number":
        try:
            return abs(float(pred) - float(gold.replace(",", ""))) <= 1e-3
        except ValueError:
            return False
    if extractor in _CASE_FOLDED:
        return pred == gold.strip().lower()
    return pred == gold.strip()


def generate(model, tokenizer, prompts: list[str], config: dict[str, Any]) -> list[str]:
    """Generated continuations (greedy, or beam search with eval.num_beams), batched with left padding."""
    left = copy.copy(tokenizer)
    left.padding_side = "left"
    device = next(model.parameters()).device
    outputs = []
    was_training = model.training
    model.eval()
    # the training run's mixed precision (train.precision) for generation too; the weights stay fp32
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["train.precision"])
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for start in range(0, len(prompts), config["train.eval_batch_size"]):
            ids = [encode_prompt(tokenizer, p, config["data.prompt_template"])
                   for p in prompts[start:start + config["train.eval_batch_size"]]]
            batch = left.pad({"input_ids": ids}, padding=True, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(**batch, max_new_tokens=config["eval.max_new_tokens"],
                                 num_beams=config["eval.num_beams"], do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            width = batch["input_ids"].shape[1]
            outputs += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    model.train(was_training)
    return outputs


def score_generation(model, tokenizer, rows, config: dict[str, Any], extractor: str) -> dict[str, Any]:
    outputs = generate(model, tokenizer, [r["prompt"] for r in rows], config)
    preds = [extract_answer(o, extractor) for o in outputs]
    correct = [is_correct(p, r["answer"], extractor) for p, r in zip(preds, rows)]
    return {"accuracy": float(np.mean(correct)), "examples": len(rows), "extractor": extractor,
            "unanswered": sum(not p for p in preds),
            "predictions": [{"output": o, "pred": p, "answer": r["answer"], "correct": c}
                            for o, p, r, c in zip(outputs, preds, rows, correct)]}


# --- test evaluation, best validation, the table ----------------------------------------------------------
def test_report(trainer, datasets, config: dict[str, Any], splits: data_mod.Splits, tokenizer,
                model=None) -> dict[str, Any]:
    """{display name: metrics} on every test set with the final model (generative-qa: `model`, or the
    trainer's, generates; the other tasks predict through the trainer)."""
    report: dict[str, Any] = {}
    for key in eval_names(splits):
        if config["task"] == QA:
            extractor = splits.info["extractors"][key]
            report[display_name(splits, key)] = score_generation(model or trainer.model, tokenizer, splits.rows[key],
                                                                 config, extractor)
        else:
            prediction = trainer.predict(datasets[key], metric_key_prefix="test")
            values = {k[len("test_"):]: v for k, v in prediction.metrics.items()
                      if k[len("test_"):] in METRICS[config["task"]]}
            report[display_name(splits, key)] = {**values, "examples": len(datasets[key])}
    return report


def best_validation(log_history: list[dict[str, Any]], config: dict[str, Any], splits) -> Optional[dict[str, Any]]:
    """The validation evaluation with the best eval.metric (the authors report the best epoch's figure)."""
    key = validation_key(config, splits)
    evals = [h for h in log_history if key in h]
    if not evals:
        return None
    pick = min if primary_metric(config) in LOWER_IS_BETTER else max
    best = pick(evals, key=lambda h: h[key])
    return {"metric": primary_metric(config), "value": best[key], "step": best["step"],
            "epoch": best.get("epoch"), "all": {k[5:]: v for k, v in best.items() if k.startswith("eval_")
                                                and not k.endswith(("_runtime", "_per_second"))}}


def validation_curve(log_history, config, splits) -> list[dict[str, Any]]:
    key = validation_key(config, splits)
    return [{"step": h["step"], "epoch": h.get("epoch"), primary_metric(config): h[key]}
            for h in log_history if key in h]


def final_table(metrics: dict[str, Any]) -> str:
    from .report import format_duration, table

    params = f"{metrics['trainable_params']:,} ({100 * metrics['trainable_params'] / metrics['total_params']:.2f}%)"
    rows = []
    for name, values in metrics["test"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
        rows.append([metrics["method"], params, format_duration(metrics["train_seconds"]), name, shown])
    best = metrics.get("best_validation")
    if best:
        rows.append([f"best validation ({best['metric']})", "-", "-", f"step {best['step']}", f"{best['value']:.4f}"])
    return table(rows, ["method", "trainable params", "train time", "evaluated on", "metrics (final model)"])


# --- eval and predict on a finished run -------------------------------------------------------------------
def _tokenizer(config: dict[str, Any]):
    from .models import load_tokenizer

    return None if config["task"] == IMAGE else load_tokenizer(config)


def run_eval(path: Path, config: dict[str, Any], splits: data_mod.Splits, data_path: Optional[str]) -> dict[str, Any]:
    """`neat-peft eval` for these tasks: the run's test sets, or `data_path` (a file or folder in the run's
    schema; an image folder's or split folder's 'test' split)."""
    from . import models
    from .report import table
    from .train import make_trainer_class, training_arguments

    if data_path:
        kept = {k: v for k, v in splits.rows.items() if k == "train"}
        if config["task"] == IMAGE:
            dataset = data_mod.load_split(data_path, None, "test", schema_hint(config))
            _require(list(dataset.column_names), {"data.image_column": config["data.image_column"],
                                                  "data.label_column": config["data.label_column"]}, IMAGE, data_path)
            _, labels = _image_labels(dataset, config["data.label_column"])
            kept["test"] = [{"source": data_path, "split": "test", "index": i, "label": lab}
                            for i, lab in enumerate(labels)]
        else:
            frame = data_mod.read_table(data_path, None, "test", schema_hint(config))
            kept["test"] = (_qa_rows(frame, config, data_path, need_response=False, need_answer=True)
                            if config["task"] == QA else _text_rows(frame, config, data_path))
        if config["task"] in (PAIR, IMAGE):
            data_mod.check_labels_seen(kept["test"], splits.labels, f"'{data_path}'")
        info = {k: v for k, v in splits.info.items() if k not in ("test_names", "eval_splits")}
        splits = data_mod.Splits(kept, splits.labels, info)
    tokenizer = _tokenizer(config)
    model = models.load_trained(path, config, splits.labels)
    datasets, trainer = {}, None
    if config["task"] != QA:
        datasets, collator = build_datasets(config, data_mod.Splits(
            {k: v for k, v in splits.rows.items() if k != "train"}, splits.labels, splits.info), tokenizer)
        trainer = make_trainer_class()(model=model, args=training_arguments(config, path, for_training=False),
                                       data_collator=collator, compute_metrics=metrics_fn(config, splits), heads=[],
                                       head_lr=0.0)
    result = test_report(trainer, datasets, config, splits, tokenizer, model=model)
    rows = [[name, ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float)), values["examples"]]
            for name, values in result.items()]
    where = data_path or "the run's test sets"
    print(f"evaluating {path} on {where}\n{table(rows, ['evaluated on', 'metrics', 'examples'])}")
    return {"data": where, "method": config["method.name"], "test": result}


PAIR_SEPARATOR = "|||"


def run_predict(path: Path, config: dict[str, Any], splits: data_mod.Splits, inputs: list[str]) -> list[dict[str, Any]]:
    """Predictions for texts ('first ||| second' for pairs), image files, or prompts (generated + extracted)."""
    from . import models

    tokenizer = _tokenizer(config)
    model = models.load_trained(path, config, splits.labels)
    task, results = config["task"], []
    if task == QA:
        outputs = generate(model, tokenizer, inputs, config)
        extractor = config["eval.extractor"] or splits.info.get("extractors", {}).get("test")
        for prompt, out in zip(inputs, outputs):
            results.append({"input": prompt, "output": out, "answer": extract_answer(out, extractor)})
        return results
    with torch.no_grad():
        if task == IMAGE:
            from PIL import Image, UnidentifiedImageError

            _, eval_tf = image_transforms(load_processor(config))
            images = []
            for file in inputs:
                try:
                    images.append(eval_tf(Image.open(file)))
                except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
                    raise CliError(f"Cannot read image '{file}': {e}. Give a PNG or JPEG file.") from None
            batch = {"pixel_values": torch.stack(images)}
        else:
            pairs = [tuple(part.strip() for part in text.split(PAIR_SEPARATOR, 1)) for text in inputs]
            if config["data.text_pair_column"] is not None and any(len(p) != 2 for p in pairs):
                raise CliError(f"This run reads text pairs: give each input as 'first text {PAIR_SEPARATOR} second "
                               "text'.")
            firsts = [p[0] for p in pairs]
            seconds = [p[1] for p in pairs] if config["data.text_pair_column"] is not None else None
            batch = dict(tokenizer(firsts, seconds, truncation=True, max_length=config["data.max_length"],
                                   padding=True, return_tensors="pt"))
        logits = model(**batch).logits.float()
    for text, row in zip(inputs, logits):
        if task == REGRESSION:
            results.append({"input": text, "score": float(row[0])})
        else:
            probs = torch.softmax(row, -1)
            results.append({"input": text, "label": splits.labels[int(probs.argmax())],
                            "scores": {label: float(v) for label, v in zip(splits.labels, probs)}})
    return results
