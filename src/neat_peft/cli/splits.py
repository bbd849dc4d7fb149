"""Reading and splitting `datasets` sources for text-pair classification, text regression, `datasets` image sets
and generative QA: a hub name, or a local file, or a folder of split files (train.jsonl, validation.jsonl, ...) or
an image folder (train/<class>/*.png) read by the same `datasets.load_dataset` call.

The split is seeded by train.seed (held-out fractions, then seeded stratified subsets of data.max_*_examples), so
every method at one seed sees the same examples. Evaluation sets beyond validation / test are kept as split rows
named `test-<name>`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from . import data as data_mod
from .errors import CliError

PAIR, REGRESSION, IMAGE, QA = "text-pair-classification", "text-regression", "image-classification", "generative-qa"
EXTRA_PREFIX = "test-"


def is_idx_source(config: dict[str, Any]) -> bool:
    """The default image recipe's path: Fashion-MNIST or a folder of IDX files (read by data.py)."""
    source = config["data.source"]
    if source == "fashion-mnist":
        return True
    folder = Path(source).expanduser()
    return folder.is_dir() and any(data_mod._find_idx(folder, stem) for pair in data_mod.IDX_FILES.values()
                                   for stem in pair)


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


def require_columns(columns: list[str], needed: dict[str, str], task: str, source: str, extra: str = "") -> None:
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


def text_rows(frame, config: dict[str, Any], source: str) -> list[dict[str, Any]]:
    task, columns = config["task"], [str(c) for c in frame.columns]
    needed = {**_text_columns(config), "data.label_column": config["data.label_column"]}
    require_columns(columns, needed, task, source, "" if config["data.text_pair_column"] is None else
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


def qa_rows(frame, config: dict[str, Any], source: str, need_response: bool, need_answer: bool):
    columns = [str(c) for c in frame.columns]
    needed = {"data.prompt_column": config["data.prompt_column"]}
    if need_response:
        needed["data.response_column"] = config["data.response_column"]
    if need_answer:
        needed["data.answer_column"] = config["data.answer_column"]
    require_columns(columns, needed, QA, source)
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
        return text_rows(frame, config, f"{where}" + (f" [{split}]" if not Path(where).is_file() else ""))

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
    train_rows = qa_rows(frame, config, source, need_response=True, need_answer=sets is None)
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
            rows = qa_rows(table, config, entry["source"], need_response=False, need_answer=True)
            key = "test" if i == 0 else EXTRA_PREFIX + entry["name"]
            pools[key] = rows
            extractors[key] = entry["extractor"]
        info["test_names"] = {("test" if i == 0 else EXTRA_PREFIX + e["name"]): e["name"]
                              for i, e in enumerate(sets)}
    info["extractors"] = extractors
    return _finish(config, pools, info, [])


def image_labels(dataset, column: str) -> tuple[list[str], list[str]]:
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
        require_columns(list(dataset.column_names), {"data.image_column": image_col, "data.label_column": label_col},
                 IMAGE, f"{where} [{split}]")
        names, labels = image_labels(dataset, label_col)
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

def eval_dataset(datasets: dict[str, Any], splits: data_mod.Splits):
    """What Trainer evaluates during training: the validation set, or (MNLI) {name: set} of every eval split."""
    extras = [k for k in splits.rows if k.startswith(EXTRA_PREFIX)]
    if splits.info.get("eval_splits") and extras:
        names = splits.info["eval_splits"]
        return {names[0]: datasets["validation"], **{k[len(EXTRA_PREFIX):]: datasets[k] for k in extras}}
    return datasets["validation"]


def validation_key(primary: str, splits: data_mod.Splits) -> str:
    """The log_history key of the metric that picks the best validation evaluation."""
    extras = [k for k in splits.rows if k.startswith(EXTRA_PREFIX)]
    prefix = f"{splits.info['eval_splits'][0]}_" if splits.info.get("eval_splits") and extras else ""
    return f"eval_{prefix}{primary}"

