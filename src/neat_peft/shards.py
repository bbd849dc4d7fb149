"""Telling a whole tensor from a shard: the low-level checks NeatLayer runs before it reads W0.

NEAT's update reads the whole frozen weight (H = act(W0^T A^T) uses every entry), so a layer must raise instead of
computing H from an FSDP2 DTensor shard, a DeepSpeed ZeRO-3 partition or an FSDP1 flat shard. The model-level
helpers (where to apply fully_shard, checking a sharded model) are in distributed.py, which builds on this module.
torch.distributed is only looked at when the model uses it.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch
from torch import nn

FSDP2_HINT = (
    "FSDP2 unshards a module's parameters only while the module fully_shard was applied to runs: apply "
    "fully_shard to the NeatLayer or to a module containing it (e.g. each transformer block, then the root), not "
    "to its base_layer or adapter submodules alone, and call get_neat_model before fully_shard "
    "(neat_peft.distributed.shard_model does both right)."
)
ZERO3_HINT = (
    "DeepSpeed ZeRO-3 gathers each module's own parameters only while that module runs; NeatLayer reads its base "
    "weight and adapter weights directly, so mark it as a leaf module before deepspeed.initialize: "
    "deepspeed.utils.set_z3_leaf_modules(model, [neat_peft.NeatLayer]). Outside forward (merging, saving) gather "
    "first: with deepspeed.zero.GatheredParameters(list(model.parameters())): ... Or use ZeRO stage 1/2."
)


class ShardingError(RuntimeError):
    """NEAT was asked to use a weight that is sharded, partitioned or otherwise not whole."""


def _dtensor_type() -> Optional[type]:
    # A DTensor can only exist once torch.distributed.tensor was imported; importing it here would cost ~0.5 s.
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a torch.distributed DTensor (what FSDP2 makes of a sharded parameter)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def is_zero3_param(t: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 manages (it sets ds_* attributes on it)."""
    return hasattr(t, "ds_status") or hasattr(t, "ds_numel")


def is_zero3_partitioned(t: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter that is not gathered right now (its visible tensor is empty or a shard)."""
    if not is_zero3_param(t):
        return False
    status = getattr(t, "ds_status", None)
    status_name = getattr(status, "name", str(status))
    return status_name != "AVAILABLE" or t.numel() != getattr(t, "ds_numel", t.numel())


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor: a DTensor's shape is already global, a ZeRO-3 parameter keeps it in ds_shape."""
    if is_zero3_param(t) and hasattr(t, "ds_shape"):
        return tuple(t.ds_shape)
    return tuple(t.shape)


def why_not_whole(t: torch.Tensor, expected_shape: tuple[int, ...]) -> Optional[str]:
    """None if `t` is the whole tensor of `expected_shape` in this process, else what it is instead (and a hint)."""
    if is_dtensor(t):
        return f"is a DTensor sharded as {tuple(t.placements)} over {t.device_mesh}. {FSDP2_HINT}"
    if is_zero3_partitioned(t):
        status = getattr(t, "ds_status", None)
        return (f"is a DeepSpeed ZeRO-3 partition (ds_status={getattr(status, 'name', status)}, "
                f"{t.numel()} of {getattr(t, 'ds_numel', '?')} elements here). {ZERO3_HINT}")
    if tuple(t.shape) != tuple(expected_shape):
        return (f"has shape {tuple(t.shape)} instead of {tuple(expected_shape)} (a flattened or partitioned shard, "
                "e.g. FSDP1 wrapping the layer's base_layer on its own). Shard whole NeatLayers or blocks instead.")
    return None


def require_whole(layer_name: str, tensors: Iterable[tuple[str, torch.Tensor, tuple[int, ...]]]) -> None:
    """Raise a ShardingError unless every (name, tensor, expected shape) is whole in this process.

    The common case costs one shape comparison and one isinstance per tensor (both static under torch.compile).
    """
    dtensor = _dtensor_type()
    for name, t, shape in tensors:
        if t.shape != shape or (dtensor is not None and isinstance(t, dtensor)):
            reason = why_not_whole(t, shape)
            if reason is not None:
                raise ShardingError(f"NEAT needs the whole {name} of layer {layer_name!r} to compute its update "
                                    f"H = act(W0^T A^T), but it {reason}")


def check_wrappable(layer_name: str, module: nn.Module) -> None:
    """Raise at wrap time if `module` was sharded by FSDP2 before NEAT was added (its new adapters would be
    outside FSDP's parameter groups: never synchronised across ranks, so every rank would train its own)."""
    weight = getattr(module, "weight", None)
    if weight is not None and is_dtensor(weight):
        raise ShardingError(
            f"Cannot add NEAT to {layer_name!r}: its weight is already a sharded DTensor (fully_shard was applied "
            "before NEAT). Call get_neat_model on the unsharded model, then fully_shard (see "
            "neat_peft.distributed.shard_model)."
        )


def gather_full(t: torch.Tensor, name: str) -> torch.Tensor:
    """The whole tensor for saving: a DTensor is all-gathered (a collective: every rank must call this)."""
    if is_dtensor(t):
        return t.full_tensor()
    if is_zero3_partitioned(t):
        raise ShardingError(f"Cannot save {name}: it {why_not_whole(t, full_shape(t))}")
    return t


def is_main_process() -> bool:
    """True unless torch.distributed is initialised and this is not rank 0 (so only one process writes files)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return True
    return dist.get_rank() == 0
