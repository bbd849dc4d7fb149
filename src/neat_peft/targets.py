"""Which modules of a model an adapter config selects (peft's matching rules, so configs mean the same)."""

from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

from .config import NeatConfig
from .layers import NeatLayer, check_supported, layer_kind

# Defaults when target_modules is None, by transformers `config.model_type` (attention query and value).
DEFAULT_TARGET_MODULES = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "vit": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
}

_DEFAULT_LAYER_PATTERN = r".*\.[^.]*\.(\d+)\."


def _name_matches(name: str, patterns: Union[str, list[str]]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _layer_index(name: str, layers_pattern: Optional[Union[str, list[str]]]) -> Optional[int]:
    if layers_pattern is None:
        match = re.match(_DEFAULT_LAYER_PATTERN, name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf".*\.{re.escape(pattern)}\.(\d+)\.", name)
            if match:
                break
    return int(match.group(1)) if match else None


def _all_linear_names(model: nn.Module, config: NeatConfig) -> list[str]:
    skip = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output_layer = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        if module is output_layer or (config.modules_to_save and _name_matches(name, config.modules_to_save)):
            skip.add(name)
    return [name for name, m in model.named_modules()
            if layer_kind(m) in ("linear", "conv1d") and name not in skip and not _inside(name, skip)]


def _inside(name: str, prefixes: set[str]) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def resolve_target_modules(model: nn.Module, config: NeatConfig) -> Union[str, list[str]]:
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    raise ValueError(
        "NeatConfig.target_modules is None and there is no default for this model"
        f"{f' (model_type {model_type!r})' if model_type else ''}. Name the modules to adapt, e.g. "
        "target_modules=['query', 'value'], a regex, or 'all-linear'."
    )


def find_targets(model: nn.Module, config: NeatConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module the config adapts, in model order. Raises a clear ValueError if the
    config selects nothing or selects a layer type NEAT cannot adapt. Reads the model; changes nothing."""
    targets = resolve_target_modules(model, config)
    if targets == "all-linear":
        targets = _all_linear_names(model, config)
    found = []
    for name, module in model.named_modules():
        if not name or not _name_matches(name, targets):
            continue
        if _inside(name, {n for n, _ in found}) or ".base_layer" in name or ".neat_" in name:
            continue  # never adapt the inside of an adapted layer
        if config.exclude_modules is not None and _name_matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            index = _layer_index(name, config.layers_pattern)
            if index is None or index not in config.layers_to_transform:
                continue
        if not isinstance(module, NeatLayer):
            check_supported(name, module)
        found.append((name, module))
    if not found:
        names = [n for n, m in model.named_modules() if n and layer_kind(m) is not None]
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module"
            + (f" (with layers_to_transform={config.layers_to_transform})" if config.layers_to_transform else "")
            + f". Adaptable modules in this model include: {names[:8]}"
            + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            + ". Pass names or suffixes of these, or a regex."
        )
    return found


def find_modules_to_save(model: nn.Module, names: Optional[list[str]]) -> list[tuple[str, nn.Module]]:
    """(name, module) for each entry of modules_to_save; each entry must match at least one module."""
    if not names:
        return []
    found, unmatched = [], []
    for wanted in names:
        hits = [(n, m) for n, m in model.named_modules() if n and _name_matches(n, [wanted])
                and not _inside(n, {f for f, _ in found})]
        if not hits:
            unmatched.append(wanted)
        found.extend(hits)
    if unmatched:
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"modules_to_save entries {unmatched} match no module. Top-level modules: {top}.")
    return found
