"""`NeatConfig`: what to adapt and how. Field names follow peft's `PeanutConfig` so files interoperate."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .functional import NON_ACT2FN_ACTIVATIONS, get_activation

# The fields peft's PeanutConfig lacks, with the value that means what PEANuT computes (a PEANUT file omits them).
PEANUT_IMPLIED = {"axis": "out", "dropout": 0.0, "normalize_weight": False}
# peft's own bookkeeping fields: accepted when reading a file, carried through, never interpreted.
PEFT_META_FIELDS = ("auto_mapping", "peft_version", "peft_type", "revision", "base_model_name_or_path")


@dataclass
class NeatConfig:
    """Configuration of one NEAT adapter. Every field has a `help` text in its metadata."""

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
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"NeatConfig.r must be a positive integer, got {self.r!r}.")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 0:
            raise ValueError(f"NeatConfig.depth must be an integer >= 0, got {self.depth!r}.")
        if not isinstance(self.act_fn, str):
            raise ValueError(f"NeatConfig.act_fn must be an activation name, got {self.act_fn!r}.")
        try:
            get_activation(self.act_fn)
        except ValueError as e:
            raise ValueError(f"NeatConfig.act_fn: {e}") from None
        if self.axis not in ("out", "in"):
            raise ValueError(f"NeatConfig.axis must be 'out' or 'in', got {self.axis!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"NeatConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        scaling_is_number = isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool)
        if not scaling_is_number or not math.isfinite(self.scaling):
            raise ValueError(f"NeatConfig.scaling must be a finite number, got {self.scaling!r}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "NeatConfig.layers_to_transform cannot be used when target_modules is a string (a regex or "
                "'all-linear'), as in peft's LoraConfig: write the block indices into the regex instead, e.g. "
                r"r'.*\.layer\.(4|5|6)\..*\.(query|value)', or pass target_modules as a list of names."
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("NeatConfig.layers_pattern needs layers_to_transform (which block indices to adapt).")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))

    # --- what peft reads from a config, so that peft.get_peft_model(model, NeatConfig(...)) works -------------
    @property
    def peft_type(self) -> str:
        """peft's name of the method. Reading it while peft is imported registers NEAT with peft (once, guarded:
        see neat_peft.peft_plugin), so get_peft_model, which looks the type up, finds it."""
        if "peft" in sys.modules:
            from .peft_plugin import register_with_peft

            register_with_peft()
        return "NEAT"

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - set(PEFT_META_FIELDS) - {"neat_peft"})
        if unknown:
            raise ValueError(
                f"Adapter config has fields NEAT does not know: {unknown}. It may come from a newer neat-peft or "
                "another method; upgrade neat-peft or check the file."
            )
        return cls(**{k: v for k, v in data.items() if k in known})
