"""How NEAT sees each type of frozen layer: the interface (`LayerKind`) and the dense kinds.

Every kind reduces its layer to the same two things: W0 in nn.Linear layout (d_out x d_in), exactly as the layer
computes with it, and a way to add the rank-r update s * up @ down^T to the layer's output without building it
(functional.py has the math):

  kind        stored weight            W0 (linear layout)          factored update
  linear      d_out x d_in             weight                      ((x @ down) * s) @ up^T
  conv1d      d_in x d_out             weight^T                    same as linear (transformers' GPT-2 Conv1D)
  embedding   n_tokens x dim           weight^T (dim x n_tokens)   (down[ids] * s) @ up^T
  conv2d      c_out x c_in x kh x kw   weight.flatten(1)           conv(x, down^T as r kernels), then 1x1 conv, s * up

Merging goes through `snapshot` / `assign_weight` / `restore`, so a kind whose storage is not a plain float tensor
(kinds/quantized.py) can requantize on merge and give back its exact original storage on unmerge.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..shards import full_shape


class LayerKind:
    """The interface NeatLayer uses; the base class implements it for a weight stored as a float tensor.

    Its members, by concern (a kind overrides only what differs for its layer type):

      recognising   name, matches, check, prepare, dense, prepares_whole_model
      reading W0    shape, weight, stored_weights, and the layout helpers linear_shape / to_linear / to_stored /
                    stored_shape they are built from
      forward       update, reads_ids, recompute_weight
      merging       snapshot, restore, snapshot_weight, assign_weight, weight_dtype
      export        lora_tensors, lora_problem, lora_fan_in_fan_out, peanut_compatible
    """

    # --- recognising the layer -----------------------------------------------------------------------------
    name = "?"
    dense = False                 # a Linear-like matmul layer: "all-linear" selects it
    prepares_whole_model = False  # `prepare` runs on every layer of this kind in the model, adapted or not

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, path: str, module: nn.Module) -> None:
        """Raise a ValueError naming `path` if this instance of the kind cannot be adapted."""

    def prepare(self, module: nn.Module) -> None:
        """Called once when NEAT wraps the layer."""

    # --- reading W0 (a plain float weight; layouts in the module docstring's table) -------------------------
    def shape(self, module: nn.Module) -> tuple[int, int]:
        """(d_out, d_in) of the whole W0, also for a DeepSpeed ZeRO-3 partitioned weight."""
        return self.linear_shape(full_shape(module.weight))

    def weight(self, module: nn.Module) -> torch.Tensor:
        """W0 in nn.Linear layout, exactly what the layer's forward computes with."""
        return self.to_linear(module, module.weight)

    def stored_weights(self, module: nn.Module, d_out: int, d_in: int) -> list[tuple[str, torch.Tensor, tuple]]:
        """(name, tensor, whole shape) of the stored tensors W0 is read from (checked to be whole, not shards)."""
        return [("base_layer.weight", module.weight, self.stored_shape(module, d_out, d_in))]

    def linear_shape(self, stored: tuple[int, ...]) -> tuple[int, int]:
        return stored[0], stored[1]

    def to_linear(self, module: nn.Module, stored: torch.Tensor) -> torch.Tensor:
        return stored

    def to_stored(self, module: nn.Module, W: torch.Tensor) -> torch.Tensor:
        return W

    def stored_shape(self, module: nn.Module, d_out: int, d_in: int) -> tuple[int, ...]:
        return d_out, d_in

    # --- the forward ---------------------------------------------------------------------------------------
    reads_ids = False          # the input is token ids (no dropout; the network can run on looked-up rows only)
    recompute_weight = False   # compute H under checkpointing, so autograd keeps the stored weight, not W0

    def update(self, module: nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
               s: float) -> torch.Tensor:
        """The factored update s * x @ down @ up^T in this layer's geometry (down: d_in x r, up: d_out x r)."""
        raise NotImplementedError

    # --- merging -------------------------------------------------------------------------------------------
    def weight_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype a merged weight is rounded to."""
        return module.weight.dtype

    def snapshot(self, module: nn.Module) -> Any:
        """What `restore` needs to put the layer back exactly (taken before the first merge; kept on CPU)."""
        return module.weight.detach().to("cpu", copy=True)

    def restore(self, module: nn.Module, snapshot: Any) -> None:
        with torch.no_grad():
            module.weight.copy_(snapshot.to(module.weight.device))

    def snapshot_weight(self, module: nn.Module, snapshot: Any) -> torch.Tensor:
        """The pristine W0 (linear layout) held by a snapshot."""
        return self.to_linear(module, snapshot.to(module.weight.device))

    def assign_weight(self, module: nn.Module, W: torch.Tensor) -> None:
        """Make the layer compute with W (linear layout), rounded once to the layer's dtype."""
        with torch.no_grad():
            module.weight.copy_(self.to_stored(module, W).to(module.weight.dtype))

    # --- export (peft's LoRA and PEANuT) -------------------------------------------------------------------
    lora_fan_in_fan_out = False
    peanut_compatible = False  # peft 0.21's PEANuT computes an adapter on this kind identically

    def lora_tensors(self, module: nn.Module, down: torch.Tensor, up: torch.Tensor, s: float) -> dict:
        """peft LoRA tensors (keys relative to the layer) with lora_B @ lora_A = s * up @ down^T, LoRA scaling 1."""
        return {"lora_A.weight": down.t().contiguous(), "lora_B.weight": (s * up).contiguous()}

    def lora_problem(self, module: nn.Module) -> Optional[str]:
        """Why peft's LoRA layer for this module would not compute the update exactly, or None."""
        return None

    def __repr__(self) -> str:
        return self.name


class LinearKind(LayerKind):
    name = "linear"
    peanut_compatible = True
    dense = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def update(self, module, x, down, up, s):
        # down^T as a contiguous r x d_in weight, like LoRA's lora_A: autograd then forms down's gradient as
        # g^T x, not x^T g (a skinny matmul with a transposed operand, several times slower on CPU).
        return F.linear(F.linear(x, down.t().contiguous()) * s, up)


class Conv1DKind(LinearKind):
    """transformers' GPT-2 Conv1D: a linear layer whose weight is stored transposed (d_in x d_out)."""

    name = "conv1d"
    peanut_compatible = False  # peft's PEANuT has no Conv1D layer
    lora_fan_in_fan_out = True

    def matches(self, module: nn.Module) -> bool:
        # Only look at transformers if the model already imported it: the core does not depend on it.
        pytorch_utils = sys.modules.get("transformers.pytorch_utils")
        return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)

    def linear_shape(self, stored):
        return stored[1], stored[0]

    def to_linear(self, module, stored):
        return stored.t()

    def to_stored(self, module, W):
        return W.t()

    def stored_shape(self, module, d_out, d_in):
        return d_in, d_out


class EmbeddingKind(LayerKind):
    """nn.Embedding as a linear map from one-hot token ids: W0 = weight^T (dim x n_tokens)."""

    name = "embedding"
    reads_ids = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    linear_shape = Conv1DKind.linear_shape
    to_linear = Conv1DKind.to_linear
    to_stored = Conv1DKind.to_stored
    stored_shape = Conv1DKind.stored_shape

    def update(self, module, ids, down, up, s):
        # No max_norm here: F.embedding renormalises the table it reads *in place*, which would rewrite B
        # (axis "in") or the cached H. max_norm is a property of the base table; the update is added after.
        rows = F.embedding(ids, down, module.padding_idx, None, module.norm_type, module.scale_grad_by_freq,
                           module.sparse)
        return F.linear(rows * s, up)

    def lora_tensors(self, module, down, up, s):
        return {"lora_embedding_A": down.t().contiguous(), "lora_embedding_B": (s * up).contiguous()}

    def lora_problem(self, module):
        if module.max_norm is not None:
            return ("max_norm is set, and peft's LoRA embedding applies max_norm to its lora_A rows, which changes "
                    "the update")
        return None


class Conv2dKind(LayerKind):
    """nn.Conv2d with groups=1: W0 = weight.flatten(1), c_out x (c_in * kh * kw)."""

    name = "conv2d"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def check(self, path, module):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError(
                f"Cannot adapt Conv2d {path!r}: groups={module.groups}, padding_mode={module.padding_mode!r}; NEAT "
                "supports groups=1 with zero padding (depthwise convolutions have too few weights per output)."
            )

    def linear_shape(self, stored):
        return stored[0], int(torch.Size(stored[1:]).numel())

    def to_linear(self, module, stored):
        return stored.flatten(1)

    def to_stored(self, module, W):
        return W.reshape(W.shape[0], module.in_channels, *module.kernel_size)

    def stored_shape(self, module, d_out, d_in):
        return (d_out, module.in_channels, *module.kernel_size)

    def update(self, module, x, down, up, s):
        kernels = down.t().reshape(down.shape[1], module.in_channels, *module.kernel_size)
        h = F.conv2d(x, kernels, None, module.stride, module.padding, module.dilation)
        return F.conv2d(h * s, up[:, :, None, None])

    def lora_tensors(self, module, down, up, s):
        lora_A = down.t().reshape(down.shape[1], module.in_channels, *module.kernel_size).contiguous()
        return {"lora_A.weight": lora_A, "lora_B.weight": (s * up)[:, :, None, None].contiguous()}

    def lora_problem(self, module):
        if tuple(module.dilation) != (1, 1):  # peft builds lora_A without the base conv's dilation
            return f"dilation={tuple(module.dilation)}, and peft's LoRA Conv2d has no dilation"
        return None
