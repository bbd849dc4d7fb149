"""What a trained update looks like: singular values of dW, its effective rank and its size relative to W0.

Works on NEAT models and on peft LoRA models alike, so the two can be put side by side. Every dW here is
materialised (d_out x d_in), which is fine for analysis and never happens in training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import NeatLayer


def update_statistics(delta: torch.Tensor, W0: torch.Tensor, top_k: int = 32) -> dict[str, Any]:
    """Spectrum statistics of one update `delta` (d_out x d_in) of the weight `W0` (same shape).

    effective_rank: exp of the entropy of the normalised singular values (Roy & Vetterli, 2007);
    stable_rank: ||dW||_F^2 / ||dW||_2^2; relative_norm: ||dW||_F / ||W0||_F.
    """
    delta = delta.detach().to(torch.float64)
    sv = torch.linalg.svdvals(delta)
    total = sv.sum()
    if total > 0:
        p = sv / total
        p = p[p > 0]
        effective_rank = float(torch.exp(-(p * p.log()).sum()))
        stable_rank = float((sv.pow(2).sum() / sv[0].pow(2)))
        numerical_rank = int((sv > sv[0] * max(delta.shape) * torch.finfo(torch.float32).eps).sum())
    else:
        effective_rank = stable_rank = 0.0
        numerical_rank = 0
    return {
        "shape": list(delta.shape),
        "singular_values": sv[:top_k].tolist(),
        "effective_rank": effective_rank,
        "stable_rank": stable_rank,
        "numerical_rank": numerical_rank,
        "relative_norm": float(delta.norm() / W0.detach().to(torch.float64).norm()),
    }


def neat_updates(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """path -> (dW, W0) in nn.Linear layout for every NEAT layer of `model` holding `adapter_name`."""
    out = {}
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, NeatLayer) and adapter_name in module.adapter_configs:
                W0 = module.pristine_weight()
                down, up = module.factors(adapter_name, W0)
                out[_strip(path)] = (module.adapter_configs[adapter_name].scaling * up @ down.t(), W0)
    return out


def lora_updates(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """path -> (dW, W0) in nn.Linear layout for every peft LoRA nn.Linear layer of `model`."""
    out = {}
    with torch.no_grad():
        for path, module in model.named_modules():
            lora_A = getattr(module, "lora_A", None)
            if isinstance(lora_A, nn.ModuleDict) and adapter_name in lora_A and hasattr(module, "get_delta_weight"):
                W0 = module.get_base_layer().weight
                delta = module.get_delta_weight(adapter_name)
                if getattr(module, "fan_in_fan_out", False):
                    W0, delta = W0.t(), delta.t()
                out[_strip(path)] = (delta.reshape(W0.shape[0], -1), W0.reshape(W0.shape[0], -1))
    return out


def _strip(path: str) -> str:
    # NeatModel and PeftModel wrap the user's model at different depths; report paths inside the user's model.
    for prefix in ("base_model.model.", "base_model."):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def analyze_updates(updates: dict[str, tuple[torch.Tensor, torch.Tensor]], top_k: int = 32) -> dict[str, Any]:
    """Statistics per layer plus their means over layers."""
    layers = {path: update_statistics(delta, W0, top_k) for path, (delta, W0) in updates.items()}
    summary = {}
    for key in ("effective_rank", "stable_rank", "relative_norm"):
        values = [s[key] for s in layers.values()]
        summary[f"mean_{key}"] = sum(values) / len(values) if values else float("nan")
    return {"layers": layers, "summary": summary}
