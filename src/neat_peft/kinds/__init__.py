"""Layer kinds: how NEAT reads W0 from each type of frozen layer and adds the factored update to its output.

  dense.py       LayerKind (the interface) and the float kinds: nn.Linear, transformers' Conv1D, nn.Embedding,
                 nn.Conv2d
  quantized.py   the quantized linear kinds, one per backend (bitsandbytes 4/8-bit, torchao int8, hqq, quanto)

This module owns the registry: `kind_of` finds a module's kind, `check_supported` explains a refusal. Callers ask
kinds for capabilities (`dense`, `reads_ids`, `recompute_weight`, `prepares_whole_model`, ...), never for a list
position.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .dense import Conv1DKind, Conv2dKind, EmbeddingKind, LayerKind, LinearKind
from .quantized import QUANTIZED_KINDS, SUPPORTED_QUANTIZATION, QuantizedLinearKind, unsupported_quantization

__all__ = ["KINDS", "SUPPORTED_LAYERS", "LayerKind", "LinearKind", "Conv1DKind", "EmbeddingKind", "Conv2dKind",
           "QuantizedLinearKind", "kind_of", "check_supported"]

# Checked in order: a subclass's kind comes before its parent's (bitsandbytes' Linear4bit is an nn.Linear).
KINDS: list[LayerKind] = [*QUANTIZED_KINDS, LinearKind(), Conv1DKind(), EmbeddingKind(), Conv2dKind()]
SUPPORTED_LAYERS = ("nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv2d (groups=1, zero padding), and quantized "
                    f"linears: {SUPPORTED_QUANTIZATION}")


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    """The kind of a layer NEAT can adapt, else None."""
    return next((kind for kind in KINDS if kind.matches(module)), None)


def check_supported(path: str, module: nn.Module) -> LayerKind:
    """Return the layer's kind, or raise a ValueError that names the module and what is supported."""
    why = unsupported_quantization(module)  # a quantized layer that would pass for an nn.Linear
    if why is not None:
        raise ValueError(f"Cannot adapt module {path!r} of type {type(module).__name__}: {why} Remove it from "
                         "target_modules (or add it to exclude_modules).")
    kind = kind_of(module)
    if kind is None:
        raise ValueError(
            f"Cannot adapt module {path!r} of type {type(module).__name__}: NEAT supports {SUPPORTED_LAYERS}. "
            "Remove it from target_modules (or add it to exclude_modules)."
        )
    kind.check(path, module)
    return kind
