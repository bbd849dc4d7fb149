"""Which modules of a model an adapter config selects (peft's matching rules, so configs mean the same)."""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from .config import NeatConfig
from .kinds import check_supported, kind_of
from .layers import ModulesToSave, NeatLayer
from .patterns import layers_pattern_regex, modules_to_save_regex, target_regex

# Defaults when target_modules is None, by transformers `config.model_type` (attention query and value).
DEFAULT_TARGET_MODULES = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "vit": ["q_proj", "v_proj"],  # transformers 5 renamed ViT's query/value
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
}

# peft's rule: the first numbered segment after a dot is the block index (lazy, so the expert index in
# "layers.1.experts.0.w1" is not taken for the layer index).
_DEFAULT_LAYER_PATTERN = target_regex(r".*?\.[^.]*\.(\d+)\.", "layers_pattern")


def _dotted_suffixes(name: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'b.c', 'c']: p matches `name` as in peft (name == p or name ends with '.' + p) exactly
    when p is one of these, so a set of names is matched in time independent of its size (files can be hostile)."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _name_matches(name: str, patterns: Union[str, list[str], frozenset[str]], field: str) -> bool:
    if isinstance(patterns, str):
        return target_regex(patterns, field).fullmatch(name) is not None
    patterns = patterns if isinstance(patterns, frozenset) else frozenset(patterns)
    return any(suffix in patterns for suffix in _dotted_suffixes(name))


def _layer_index(name: str, layers_pattern: Optional[Union[str, list[str]]]) -> Optional[int]:
    if not layers_pattern:
        match = _DEFAULT_LAYER_PATTERN.match(name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:  # a regex, as in peft; may be the model's top-level ModuleList
            match = layers_pattern_regex(pattern).match(name)
            if match:
                break
    return int(match.group(1)) if match else None


def is_excluded(name: str, config: NeatConfig) -> bool:
    """True if `name` matches config.exclude_modules (a list of names/suffixes, or a regex)."""
    return config.exclude_modules is not None and _name_matches(name, config.exclude_modules, "exclude_modules")


def is_target(name: str, config: NeatConfig, targets: Union[str, list[str]]) -> bool:
    """peft's check_target_module_exists: exclusions first, then a regex (full match), an exact name, or a
    name suffix; layers_to_transform filters suffix matches only (an exact name says which module already).
    `targets` is config.target_modules resolved (resolve_target_modules; "all-linear" expanded to names)."""
    if is_excluded(name, config):
        return False
    if config.modules_to_save and any(modules_to_save_regex(m).match(name) for m in config.modules_to_save):
        return False  # a module trained in full is never also adapted
    if isinstance(targets, str):
        return target_regex(targets).fullmatch(name) is not None
    if name in targets:
        return True
    if not _name_matches(name, targets, "target_modules"):
        return False
    if not config.layers_to_transform:
        return True
    index = _layer_index(name, config.layers_pattern)
    return index is not None and index in config.layers_to_transform


def _all_linear_names(model: nn.Module, config: NeatConfig) -> list[str]:
    skip = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output_layer = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        saved = config.modules_to_save and _name_matches(name, config.modules_to_save, "modules_to_save")
        if module is output_layer or saved:
            skip.add(name)

    def is_linear(m: nn.Module) -> bool:  # an already adapted linear layer counts as one
        kind = m.kind if isinstance(m, NeatLayer) else kind_of(m)
        return kind is not None and kind.dense

    return [name for name, m in model.named_modules() if is_linear(m) and name not in skip and not _inside(name, skip)]


def _inside(name: str, prefixes: set[str]) -> bool:
    """Whether `name` lies inside one of the modules named in `prefixes` (time independent of its size)."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


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
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear_names(model, config)
    # Never adapt the inside of an adapted layer or of a module trained in full (its original and copies).
    wrapped = {n for n, m in model.named_modules() if isinstance(m, (NeatLayer, ModulesToSave))}
    if not isinstance(targets, str):
        targets = frozenset(targets)
    found, found_names = [], set()
    for name, module in model.named_modules():
        if not name or _inside(name, wrapped) or not is_target(name, config, targets):
            continue
        if _inside(name, found_names):
            continue
        if not isinstance(module, NeatLayer):
            check_supported(name, module)
            _check_called_through_forward(model, name)
        found.append((name, module))
        found_names.add(name)
    if not found:
        names = [n for n, m in model.named_modules() if n and kind_of(m) is not None]
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module"
            + (f" (with layers_to_transform={config.layers_to_transform})" if config.layers_to_transform else "")
            + f". Adaptable modules in this model include: {names[:8]}"
            + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            + ". Pass names or suffixes of these, or a regex."
        )
    return found


def _check_called_through_forward(model: nn.Module, name: str) -> None:
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        raise ValueError(
            f"Cannot adapt {name!r}: nn.MultiheadAttention uses its out_proj's weight directly instead of calling "
            "it, so a NEAT adapter there would be silently ignored. Target other layers, or rebuild the attention "
            "with separate nn.Linear projections."
        )


def find_modules_to_save(model: nn.Module, names: Optional[list[str]]) -> list[tuple[str, nn.Module]]:
    """(name, module) for each entry of modules_to_save; each entry must match at least one module."""
    if not names:
        return []
    found, unmatched = [], []
    for wanted in names:
        hits = [(n, m) for n, m in model.named_modules() if n and _name_matches(n, [wanted], "modules_to_save")
                and not _inside(n, {f for f, _ in found})]
        if not hits:
            unmatched.append(wanted)
        found.extend(hits)
    if unmatched:
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"modules_to_save entries {unmatched} match no module. Top-level modules: {top}.")
    return found
