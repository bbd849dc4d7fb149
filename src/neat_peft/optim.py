"""Optimizer parameter groups for NEAT (LoRA+-style: a separate learning rate for the first layer A).

Why A: NEAT's network reads W0, H = act(W0^T A^T), so dL/dA = (act'(.) * dL/dH)^T W0^T is proportional to the scale
of W0 (exactly, for ReLU at depth 0). Layers with small weights (GPT-2-style std-0.02 init) therefore train A
slowly at a learning rate that suits B. Two remedies, both off by default (the paper's method):
  - NeatConfig(normalize_weight=True): the network reads W0 / rms(W0), which removes the dependence;
  - neat_param_groups(model, lr, a_lr_ratio): A's learning rate is lr * a_lr_ratio, everything else trains at lr.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .layers import NeatLayer


def neat_param_groups(model: nn.Module, lr: float, a_lr_ratio: float = 1.0,
                      weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Parameter groups for `torch.optim`: NEAT's A matrices at lr * a_lr_ratio, every other trainable parameter
    (B, the r x r layers, modules_to_save) at lr. Works for a `NeatModel` and for a peft model with NEAT adapters.

    >>> optimizer = torch.optim.AdamW(neat_param_groups(model, lr=1e-3, a_lr_ratio=16))
    """
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    if not isinstance(a_lr_ratio, (int, float)) or a_lr_ratio <= 0:
        raise ValueError(f"a_lr_ratio must be a positive number (A's learning rate is lr * a_lr_ratio), "
                         f"got {a_lr_ratio!r}.")
    a_ids = set()
    for module in model.modules():
        if isinstance(module, NeatLayer):
            a_ids.update(id(linear.weight) for linear in module.neat_A.values())
    if not a_ids:
        raise ValueError(f"{type(model).__name__} has no NEAT layers; wrap it with get_neat_model or, with the peft "
                         "plugin, peft.get_peft_model(model, NeatPeftConfig(...)) first.")
    a_params, other_params, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (a_params if id(param) in a_ids else other_params).append(param)
    if not a_params and not other_params:
        raise ValueError("The model has no trainable parameters (adapters loaded for inference? load with "
                         "is_trainable=True).")
    groups = []
    if a_params:
        groups.append({"params": a_params, "lr": lr * a_lr_ratio, "weight_decay": weight_decay, "name": "neat_A"})
    if other_params:
        groups.append({"params": other_params, "lr": lr, "weight_decay": weight_decay, "name": "other"})
    return groups
