"""`NeatConfig`: what to adapt and how. Field names follow peft's `PeanutConfig` so files interoperate."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .functional import NON_ACT2FN_ACTIVATIONS, get_activation
from .patterns import layers_pattern_regex, modules_to_save_regex, target_regex

_FLOAT32_MAX = torch.finfo(torch.float32).max
MAX_DEPTH = 1024  # loads loop over the layers: a hostile depth=10**9 would hang before any shape check
MAX_REGEX_ENTRIES = 64  # modules_to_save / layers_pattern entries; real configs have a handful

class PeftNotRegisteredError(AttributeError):
    """peft asked a NeatConfig for its peft type, but NEAT is not registered with peft in this process."""


# Filled in by the package (neat_peft/__init__.py, which imports the plugin lazily) and by
# neat_peft.peft_plugin.register_with_peft; this module never imports the plugin (the plugin depends on it).
#   peft_type:    peft's PeftType.NEAT once registered.
#   config_class: () -> the peft view of NeatConfig (a subclass that is also a peft.PeftConfig), or None where peft
#                 is not importable or refused the registration.
PEFT_REGISTRATION: dict[str, Any] = {"peft_type": None, "config_class": lambda: None}

# The fields peft's PeanutConfig lacks, with the value that means what PEANuT computes (a PEANUT file omits them).
PEANUT_IMPLIED = {"axis": "out", "dropout": 0.0, "normalize_weight": False}
# peft's own bookkeeping fields: accepted when reading a file, carried through, never interpreted.
PEFT_META_FIELDS = ("auto_mapping", "peft_version", "peft_type", "revision", "base_model_name_or_path")


@dataclass
class NeatConfig:
    """Configuration of one NEAT adapter. Every field has a `help` text in its metadata.

    Where peft is importable, `NeatConfig(...)` returns an instance of `neat_peft.peft_plugin.NeatPeftConfig`, the
    subclass that is also a `peft.PeftConfig` (same fields, same checks), so TRL, transformers and peft accept it;
    building the first one imports peft and registers NEAT with it. Without peft it is this plain dataclass, and
    the core (NeatModel, get_neat_model, files) works the same with either.
    """

    def __new__(cls, *args, **kwargs):
        # Only NeatConfig(...) itself is redirected: subclasses, copy, pickle and peft's own loads name their class.
        if cls is NeatConfig:
            cls = PEFT_REGISTRATION["config_class"]() or cls
        return super().__new__(cls)

    r: int = field(default=8, metadata={"help": "Width of NEAT's network (the rank of the update dW)."})
    depth: int = field(
        default=0,
        metadata={"help": "Number of residual encoder/decoder pairs of r x r layers between A and B (0 = A, B only)."},
    )
    act_fn: str = field(
        default="relu",
        metadata={"help": "Activation of the network: relu, gelu, silu, tanh, sigmoid, identity, sin, or any "
                  "transformers ACT2FN name."},
    )
    scaling: float = field(default=1.0, metadata={"help": "Multiplier s of the update: y = W0 x + s * dW x."})
    axis: str = field(
        default="out",
        metadata={"help": "'out': the network reads the columns of W0 (length d_out; peft PEANuT, paper's GLUE/ViT). "
                  "'in': it reads the rows (length d_in; the paper's LLM code)."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input x, in [0, 1)."})
    normalize_weight: bool = field(
        default=False,
        metadata={"help": "Divide W0 by its root-mean-square before the network. A's gradient scales with |W0|, so "
                  "layers with small weights (std 0.02 init) train A slowly; this removes that dependence. "
                  "Off by default (the paper's method)."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules to adapt: a list of names or name suffixes, a regex matched against the full "
                  "name, or 'all-linear'. None: a default for known transformers architectures."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never to adapt: a list of names or suffixes, or a regex."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Adapt only the blocks with these indices (e.g. [4, 5, ..., 11])."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the ModuleList holding the blocks (e.g. 'layer', 'layers', 'h'); used with "
                  "layers_to_transform."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Other modules (e.g. a classifier head) to train fully and save with the adapter."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: B starts at zero, so the adapted model starts equal to the base model. False: "
                  "B gets Kaiming-uniform init too (for tests)."},
    )
    task_type: Optional[str] = field(default=None, metadata={"help": "peft task type, kept for peft files."})
    inference_mode: bool = field(default=False, metadata={"help": "True when loaded for inference only."})
    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Where the base model came from."})

    def __post_init__(self):
        """Check every field strictly (a config also comes from files: booleans must be booleans, regexes safe)."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"NeatConfig.r must be a positive integer, got {self.r!r}.")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or not 0 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"NeatConfig.depth must be an integer >= 0 (at most {MAX_DEPTH}), got {self.depth!r}.")
        if not isinstance(self.act_fn, str):
            raise ValueError(f"NeatConfig.act_fn must be an activation name, got {self.act_fn!r}.")
        try:
            get_activation(self.act_fn)
        except ValueError as e:
            raise ValueError(f"NeatConfig.act_fn: {e}") from None
        if not isinstance(self.axis, str) or self.axis not in ("out", "in"):
            raise ValueError(f"NeatConfig.axis must be 'out' or 'in', got {self.axis!r}.")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"NeatConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        # The update is computed in the adapter's dtype: a scaling that overflows float32 is inf there.
        if not _is_number(self.scaling) or not math.isfinite(self.scaling) or abs(self.scaling) > _FLOAT32_MAX:
            raise ValueError(f"NeatConfig.scaling must be a finite number within float32's range "
                             f"(|s| <= {_FLOAT32_MAX:.4g}), got {self.scaling!r}.")
        for name in ("normalize_weight", "init_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"NeatConfig.{name} must be true or false (a boolean), got {getattr(self, name)!r}.")
        for name in ("task_type", "base_model_name_or_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"NeatConfig.{name} must be a string or None, got {getattr(self, name)!r}.")
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            setattr(self, name, _names_field(name, getattr(self, name), string_allowed=name != "modules_to_save"))
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), str):
                target_regex(getattr(self, name), name)
        layers_pattern = self.layers_pattern
        layers_patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []
        for name, entries in (("modules_to_save", self.modules_to_save or []), ("layers_pattern", layers_patterns)):
            if len(entries) > MAX_REGEX_ENTRIES:  # each entry is a regex matched against every module name
                raise ValueError(f"NeatConfig.{name} has {len(entries)} entries (at most {MAX_REGEX_ENTRIES}).")
        for entry in self.modules_to_save or ():
            modules_to_save_regex(entry)
        for pattern in layers_patterns:
            layers_pattern_regex(pattern)
        layers = self.layers_to_transform
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if layers is not None and (not isinstance(layers, (list, tuple))
                                   or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                              for i in layers)):
            raise ValueError("NeatConfig.layers_to_transform must be a block index (an integer >= 0), a list of "
                             f"them, or None, got {self.layers_to_transform!r}.")
        self.layers_to_transform = None if layers is None else list(layers)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "NeatConfig.layers_to_transform cannot be used when target_modules is a string (a regex or "
                "'all-linear'), as in peft's LoraConfig: write the block indices into the regex instead, e.g. "
                r"r'.*\.layer\.(4|5|6)\..*\.(query|value)', or pass target_modules as a list of names."
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("NeatConfig.layers_pattern needs layers_to_transform (which block indices to adapt).")

    # --- what peft reads from a config, so that peft.get_peft_model(model, NeatConfig(...)) works -------------
    @property
    def peft_type(self) -> str:
        """peft's name of the method, once neat_peft.register_with_peft() has made it a peft method."""
        if PEFT_REGISTRATION["peft_type"] is None:
            raise PeftNotRegisteredError(
                "NeatConfig.peft_type: NEAT is not registered with peft in this process (this config was built while "
                "peft was not importable, or the registration was refused with a warning). Call "
                "neat_peft.register_with_peft() to register or see why, then build the NeatConfig again."
            )
        return PEFT_REGISTRATION["peft_type"]

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def peft_compatible(self) -> bool:
        """True when peft's PEANuT computes exactly this adapter (it knows no axis 'in', dropout, normalising,
        nor the activations transformers' ACT2FN lacks)."""
        return (all(getattr(self, name) == value for name, value in PEANUT_IMPLIED.items())
                and self.act_fn not in NON_ACT2FN_ACTIVATIONS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NeatConfig":
        """Build from an adapter_config.json dict (ours or peft's PEANuT); peft's bookkeeping keys are ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"An adapter config must be a JSON object ({{...}}), got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - set(PEFT_META_FIELDS) - {"neat_peft"})
        if unknown:
            raise ValueError(
                f"Adapter config has fields NEAT does not know: {unknown}. It may come from a newer neat-peft or "
                "another method; upgrade neat-peft or check the file."
            )
        return cls(**{k: v for k, v in data.items() if k in known})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _names_field(name: str, value, string_allowed: bool):
    """A module-name field: None, a list of strings (a set or tuple becomes a sorted list), or one string."""
    if value is None or (string_allowed and isinstance(value, str)):
        return value
    if isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, tuple)) else list(value)
    kinds = "a list of module names, a regex string, or None" if string_allowed else "a list of module names or None"
    raise ValueError(f"NeatConfig.{name} must be {kinds}, got {value!r}.")

