"""Quantized frozen bases (the QLoRA workflow), model-level: preparing a model, telling an adapter's base
quantization apart from another (`quantization_signatures` / `signature_mismatch`), and the full-precision model
(`merged_float_linear`, `dequantize_model`). The per-backend layer kinds are in kinds/quantized.py.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .functional import delta_weight
from .kinds import KINDS
from .kinds.quantized import (  # noqa: F401  (QUANTIZED_KINDS, QuantizedLinearKind: public names of this module)
    QUANTIZED_KINDS,
    SUPPORTED_QUANTIZATION,
    QuantizedLinearKind,
    quantized_kind,
    unsupported_quantization,
)


def prepare_model(model: nn.Module) -> None:
    """Model-wide preparation, once adapters are in: each kind that asks for it (`prepares_whole_model`, e.g.
    bitsandbytes 4-bit: its CPU repacking off) prepares every layer of its type, adapted or not.

    A repacked Linear4bit that NEAT does not adapt still breaks training: its repacked forward returns outputs with
    no gradient to the input, so every adapter before it would stop learning after an eval pass (Bnb4bitKind.prepare).
    """
    kinds = [kind for kind in KINDS if kind.prepares_whole_model]
    for module in model.modules():
        for kind in kinds:
            if kind.matches(module):
                kind.prepare(module)


def quantization_signature(module) -> str:
    """A short string naming how `module`'s frozen weight is quantized ("none" for a float layer), e.g.
    "bnb-nf4(blocksize=64, double_quant=False, dtype=float32, compute=float32)"."""
    kind = quantized_kind(getattr(module, "base_layer", module))  # a NeatLayer answers for its base layer
    return "none" if kind is None else kind.signature(getattr(module, "base_layer", module))


def quantization_signatures(layers: Iterable[tuple[str, nn.Module]]) -> dict[str, str]:
    """{path: signature} of the quantized layers among (path, layer) pairs; float layers are left out.

    H = act(W0^T A^T) reads the dequantized W0, so an adapter trained on one quantization gives a different
    update on another (nf4 vs fp4 vs int8 vs float). Stored with the adapter at save time; `signature_mismatch`
    compares it at load time.
    """
    signatures = {path: quantization_signature(module) for path, module in layers}
    return {path: sig for path, sig in signatures.items() if sig != "none"}


def signature_mismatch(saved: dict[str, str], layers: Iterable[tuple[str, nn.Module]]) -> Optional[str]:
    """One warning text naming the layers whose quantization differs from `saved` (absent: "none"), else None."""
    now = {path: quantization_signature(module) for path, module in layers}
    differ = [(path, saved.get(path, "none"), sig) for path, sig in now.items() if saved.get(path, "none") != sig]
    if not differ:
        return None
    path, was, is_now = differ[0]
    return (f"{len(differ)} adapted layer(s) are quantized differently from the base the adapter was trained on, "
            f"e.g. {path!r}: trained on {was}, this base is {is_now}. NEAT's update reads the frozen weight, so the "
            "outputs will differ from the trained model's. Load the base with the quantization it was trained on.")


def float_linear(module, weight: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """A plain nn.Linear equal to the quantized `module` at full precision: y = x W^T + b.

    W (d_out x d_in) is `weight` when given -- e.g. the pristine dequantized W0 plus the merged adapters' dW,
    never requantized -- else the module's dequantized W0. dtype: the new layer's (default W's dtype). This is
    the dequantize-merge people ship a QLoRA result with (peft's merge_and_unload on a dequantized model).
    """
    kind = quantized_kind(module)
    if kind is None:
        raise ValueError(f"{type(module).__name__} is not a quantized layer NEAT knows ({SUPPORTED_QUANTIZATION}).")
    W = (kind.weight(module) if weight is None else weight).detach()
    dtype = W.dtype if dtype is None else dtype
    d_out, d_in = kind.shape(module)
    if tuple(W.shape) != (d_out, d_in):
        raise ValueError(f"weight has shape {tuple(W.shape)}, the layer is {d_out} x {d_in}.")
    bias = getattr(module, "bias", None)
    linear = nn.Linear(d_in, d_out, bias=bias is not None, device=W.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(W)
        if bias is not None:
            linear.bias.copy_(bias.detach())
    linear.requires_grad_(False)
    linear.train(module.training)
    return linear


def merged_float_linear(layer: nn.Module, adapter_names: Optional[list[str]] = None,
                        dtype: Optional[torch.dtype] = None, safe_merge: bool = False) -> nn.Linear:
    """A NeatLayer on a quantized base as one plain nn.Linear: W = W0 + sum of the adapters' dW, at full precision.

    W0 is the pristine dequantized weight (from the kept snapshot if adapters were merged into the quantized
    storage); each dW = s * up @ down^T is computed from it, and the sum is never requantized, so the result
    carries only the base's own quantization error. Adapters: the ones already merged plus `adapter_names`
    (default: the active ones). For `merge_and_unload(dequantize=True)`; see `dequantize_model` for the rest.
    safe_merge: raise (changing nothing) if W would hold NaN/inf in `dtype`.
    """
    requested = layer.active_adapters if adapter_names is None else adapter_names
    names = list(dict.fromkeys([*layer.merged_adapters, *(n for n in requested if n in layer.adapter_configs)]))
    with torch.no_grad():
        W0 = layer.pristine_weight()
        total = W0.to(torch.promote_types(W0.dtype, torch.float32))
        for name in names:
            down, up = layer.factors(name, W0)
            total = total + delta_weight(down, up, layer.adapter_configs[name].scaling).to(total.dtype)
    dtype = W0.dtype if dtype is None else dtype
    if safe_merge and not torch.isfinite(total.to(dtype)).all():
        raise ValueError(f"Merging adapter(s) {names} into {getattr(layer, 'layer_name', '?')!r} would put NaN/inf "
                         "into the weights; nothing was merged. The adapter is broken (check training for divergence).")
    return float_linear(layer.base_layer, total, dtype)


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every quantized layer NEAT knows by its `float_linear` (in place) and drop transformers'
    quantization marks, so `save_pretrained` writes a plain full-precision checkpoint. Returns the model."""
    for path, module in list(model.named_modules()):
        if path and quantized_kind(module) is not None:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, float_linear(module, dtype=dtype))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr, value in (("is_quantized", False), ("hf_quantizer", None), ("is_loaded_in_4bit", False),
                        ("is_loaded_in_8bit", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, value)
    return model
