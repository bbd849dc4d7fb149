"""NEAT under data parallelism and parameter sharding: what works, and guards for what does not.

NEAT's update reads the whole frozen weight: H = act(W0^T A^T) uses every entry of W0, so a shard of it gives other
numbers, not an error. Engines that shard parameters only hold a module's full weights while that module (or a
wrapper around it) runs:

  DDP                  every rank holds full weights: nothing to do.
  FSDP2 (fully_shard)  the parameters of the module fully_shard was applied to are unsharded from its pre-forward
                       to its post-forward hook (and again for its backward). NeatLayer computes H inside its own
                       forward, so W0 is whole when fully_shard is applied to the NeatLayer or to a module that
                       contains it (one call per transformer block), and NOT when it is applied to the NeatLayer's
                       base_layer or adapter submodules alone (W0 is resharded by the time H is computed).
  DeepSpeed ZeRO-3     parameters are gathered module by module, each module's direct parameters only. NeatLayer
                       reads base_layer.weight and its adapter weights without calling those modules, so DeepSpeed
                       must gather the NeatLayer as one unit:  deepspeed.utils.set_z3_leaf_modules(model, [NeatLayer]).

This module holds the model-level helpers (shard_model, check_sharding); the per-tensor checks a layer runs
before reading W0 (a DTensor shard, a ZeRO-3 partition, an FSDP1 flat shard -> ShardingError) are in shards.py
and re-exported here. torch.distributed is only looked at when the model uses it.
"""

from __future__ import annotations

import sys
from typing import Iterable

from torch import nn

from .layers import NeatLayer
from .shards import (  # noqa: F401  (re-exported: the public names of neat_peft.distributed)
    FSDP2_HINT,
    ZERO3_HINT,
    ShardingError,
    check_wrappable,
    full_shape,
    gather_full,
    is_dtensor,
    is_main_process,
    is_zero3_param,
    is_zero3_partitioned,
    require_whole,
    why_not_whole,
)


def _sharding_wrapper_types() -> tuple[type, ...]:
    types = []
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        for name in ("FSDPModule", "FullyShardedDataParallel"):
            if hasattr(fsdp, name):
                types.append(getattr(fsdp, name))
    return tuple(types)


def check_sharding(model: nn.Module) -> None:
    """Check that FSDP (FSDP2 fully_shard or FSDP1) was applied where NEAT can see whole weights.

    Raises a ShardingError naming the first module that was sharded on its own inside a NeatLayer. Call it right
    after sharding (shard_model does) to fail at wrap time rather than at the first forward.
    """
    wrappers = _sharding_wrapper_types()
    if not wrappers:
        return
    for path, module in model.named_modules():
        if not isinstance(module, NeatLayer):
            continue
        for inner_path, inner in module.named_modules():
            if inner_path and isinstance(inner, wrappers):
                raise ShardingError(
                    f"{path}.{inner_path} was sharded on its own ({type(inner).__name__}) inside the NeatLayer "
                    f"{path!r}: its weights are not whole while the NeatLayer computes H. {FSDP2_HINT}"
                )


def shard_model(model: nn.Module, blocks: Iterable[nn.Module], **fully_shard_kwargs) -> nn.Module:
    """Apply FSDP2's fully_shard to each block (e.g. each transformer layer), then to `model`, and check the result.

    `model` must already hold its NEAT adapters (get_neat_model first). Keyword arguments (mesh=...,
    reshard_after_forward=..., mp_policy=...) go to every fully_shard call.
    """
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    check_sharding(model)
    return model


