"""`NeatLayer`: a frozen base layer plus any number of named NEAT adapters.

One class serves nn.Linear, transformers' GPT-2 Conv1D, nn.Embedding and nn.Conv2d. Each is reduced to the
same thing: W0 in nn.Linear layout (d_out x d_in) and a way to apply a rank-r update s * up @ down^T to
the input without building it (see functional.py for the math).

  kind        stored weight            W0 (linear layout)          adapter output, factored
  linear      d_out x d_in             weight                      ((x @ down) * s) @ up^T
  conv1d      d_in x d_out             weight^T                    same as linear
  embedding   n_tokens x dim           weight^T (dim x n_tokens)   (down[ids] * s) @ up^T
  conv2d      c_out x c_in x kh x kw   weight.flatten(1)           conv(x, down^T as r kernels) then 1x1 conv with s * up
"""

from __future__ import annotations

import sys
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import NeatConfig
from .functional import delta_weight, get_activation, kaiming_uniform_, low_rank_factors, rms, weight_network

BASE_ONLY = "__base__"  # the name a sample uses in a mixed batch to bypass every adapter


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Only look at transformers if the model already imported it: the core does not depend on it.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def layer_kind(module: nn.Module) -> Optional[str]:
    """'linear', 'conv1d', 'embedding' or 'conv2d' for a layer NEAT can adapt, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_hf_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


SUPPORTED_LAYERS = "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv2d (groups=1, zero padding)"


def check_supported(name: str, module: nn.Module) -> str:
    """Return the layer kind, or raise a ValueError that names the module and what is supported."""
    kind = layer_kind(module)
    if kind is None:
        raise ValueError(
            f"Cannot adapt module {name!r} of type {type(module).__name__}: NEAT supports {SUPPORTED_LAYERS}. "
            "Remove it from target_modules (or add it to exclude_modules)."
        )
    if kind == "conv2d" and (module.groups != 1 or module.padding_mode != "zeros"):
        raise ValueError(
            f"Cannot adapt Conv2d {name!r}: groups={module.groups}, padding_mode={module.padding_mode!r}; NEAT "
            "supports groups=1 with zero padding (depthwise convolutions have too few weights per output)."
        )
    return kind


class NeatLayer(nn.Module):
    """A frozen `base_layer` with named NEAT adapters. Forward: base_layer(x) + sum over active adapters.

    Adapter parameters live in `neat_A[name]` (nn.Linear m -> r), `neat_B[name]` (nn.Linear r -> n),
    `neat_encoders[name]` and `neat_decoders[name]` (ModuleLists of r x r), mirroring peft's PEANuT.
    """

    def __init__(self, base_layer: nn.Module, name: str = "?"):
        super().__init__()
        self.kind = check_supported(name, base_layer)
        self.base_layer = base_layer
        self.training = base_layer.training  # wrapping a model in eval mode keeps it in eval mode
        self.d_out, self.d_in = self.base_weight().shape
        self.neat_A = nn.ModuleDict()
        self.neat_B = nn.ModuleDict()
        self.neat_encoders = nn.ModuleDict()
        self.neat_decoders = nn.ModuleDict()
        self.neat_dropout = nn.ModuleDict()
        self.adapter_configs: dict[str, NeatConfig] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Set by NeatModel.forward for a mixed-adapter batch: one adapter name per sample.
        self.batch_adapter_names: Optional[list[str]] = None
        self._pristine_weight: Optional[torch.Tensor] = None  # W0 as it was before the first merge (CPU)
        self._cache: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    # Models read `.weight` / `.bias` of their layers directly (T5 casts to `wo.weight.dtype`, HF ties
    # embeddings): answer with the base layer's, as peft's tuner layers do.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    # --- W0 in nn.Linear layout, and the way back --------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        if self.kind == "linear":
            return w
        if self.kind == "conv2d":
            return w.flatten(1)
        return w.t()  # conv1d stores d_in x d_out; an embedding is a linear map from one-hot ids

    def _to_stored_layout(self, delta: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return delta
        if self.kind == "conv2d":
            return delta.reshape(self.base_layer.weight.shape)
        return delta.t()

    def _network_width(self, axis: str) -> tuple[int, int]:
        """(length of the rows the network reads, length of what B produces) for the axis."""
        return (self.d_out, self.d_out) if axis == "out" else (self.d_in, self.d_in)

    # --- adapters --------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: NeatConfig) -> None:
        m, n = self._network_width(config.axis)
        r = config.r
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else None}
        # Adapter weights are kept in fp32 even on a half-precision base (peft's autocast_adapter_dtype).
        if factory["dtype"] in (torch.float16, torch.bfloat16, None):
            factory["dtype"] = torch.float32
        self.neat_A[adapter_name] = nn.Linear(m, r, bias=False, **factory)
        self.neat_B[adapter_name] = nn.Linear(r, n, bias=False, **factory)
        self.neat_encoders[adapter_name] = nn.ModuleList(
            nn.Linear(r, r, bias=False, **factory) for _ in range(config.depth)
        )
        self.neat_decoders[adapter_name] = nn.ModuleList(
            nn.Linear(r, r, bias=False, **factory) for _ in range(config.depth)
        )
        self.neat_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for store in (self.neat_A, self.neat_B, self.neat_encoders, self.neat_decoders, self.neat_dropout):
            store[adapter_name].train(self.training)  # new modules follow the layer's mode (dropout off in eval)
        self.adapter_configs[adapter_name] = config
        self.reset_adapter(adapter_name)

    def reset_adapter(self, adapter_name: str) -> None:
        kaiming_uniform_(self.neat_A[adapter_name].weight)
        for layer in [*self.neat_encoders[adapter_name], *self.neat_decoders[adapter_name]]:
            kaiming_uniform_(layer.weight)
        if self.adapter_configs[adapter_name].init_weights:
            nn.init.zeros_(self.neat_B[adapter_name].weight)
        else:
            kaiming_uniform_(self.neat_B[adapter_name].weight)
        self.clear_cache()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; unmerge it before deleting it.")
        for store in (self.neat_A, self.neat_B, self.neat_encoders, self.neat_decoders, self.neat_dropout):
            del store[adapter_name]
        del self.adapter_configs[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        self.clear_cache()

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [
            self.neat_A[adapter_name].weight,
            self.neat_B[adapter_name].weight,
            *(m.weight for m in self.neat_encoders[adapter_name]),
            *(m.weight for m in self.neat_decoders[adapter_name]),
        ]

    # --- the update ------------------------------------------------------------------------------------
    def factors(self, adapter_name: str, W0: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of this adapter with dW = s * up @ down^T, from W0 (default: the current base weight)."""
        cfg = self.adapter_configs[adapter_name]
        return low_rank_factors(
            self.base_weight() if W0 is None else W0,
            self.neat_A[adapter_name].weight,
            self.neat_B[adapter_name].weight,
            [m.weight for m in self.neat_encoders[adapter_name]],
            [m.weight for m in self.neat_decoders[adapter_name]],
            get_activation(cfg.act_fn),
            cfg.axis,
            cfg.normalize_weight,
        )

    def _cache_tensors(self, adapter_name: str) -> list[torch.Tensor]:
        return [self.base_layer.weight, *self.adapter_parameters(adapter_name)]

    @staticmethod
    def _cache_key(tensors: list[torch.Tensor]) -> tuple:
        # A tensor's _version moves on every in-place change (optimizer steps, load_state_dict, merges);
        # data_ptr moves when a tensor's storage is swapped. A weak reference to the tensor object itself
        # catches a replaced Parameter even when the allocator hands the new one the old one's address.
        return tuple((weakref.ref(t), t.data_ptr(), t._version) for t in tensors)

    @staticmethod
    def _key_matches(key: tuple, tensors: list[torch.Tensor]) -> bool:
        return len(key) == len(tensors) and all(
            ref() is t and ptr == t.data_ptr() and version == t._version for (ref, ptr, version), t in zip(key, tensors)
        )

    def cached_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """factors(), reused across calls in eval mode without autograd (unmerged inference at LoRA's cost)."""
        if self.training or torch.is_grad_enabled():
            return self.factors(adapter_name)
        tensors = self._cache_tensors(adapter_name)
        hit = self._cache.get(adapter_name)
        if hit is not None and self._key_matches(hit[0], tensors):
            return hit[1], hit[2]
        down, up = self.factors(adapter_name)
        self._cache[adapter_name] = (self._cache_key(tensors), down, up)
        return down, up

    def clear_cache(self) -> None:
        self._cache.clear()

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def __getstate__(self):
        # H is derived data (and its key holds weak references, which cannot be pickled): copies start empty.
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def _apply(self, fn, *args, **kwargs):
        # .to()/.half()/.float() swap weights via `param.data = ...`, which keeps the version counter: the
        # new storage may land at the old address, so drop H rather than trust the key.
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The materialised update in the base layer's stored layout, computed from the pristine W0."""
        down, up = self.factors(adapter_name, self.pristine_weight())
        return self._to_stored_layout(delta_weight(down, up, self.adapter_configs[adapter_name].scaling))

    def pristine_weight(self) -> torch.Tensor:
        """W0 in linear layout as it was before any merge (merged weights hold adapter updates)."""
        if self._pristine_weight is None:
            return self.base_weight()
        return self._to_linear_layout(self._pristine_weight.to(self.base_layer.weight.device))

    def _to_linear_layout(self, stored: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return stored
        if self.kind == "conv2d":
            return stored.flatten(1)
        return stored.t()

    def _adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        cfg = self.adapter_configs[adapter_name]
        down, up = self.cached_factors(adapter_name)
        s = cfg.scaling
        if self.kind == "embedding":
            emb = self.base_layer
            if cfg.axis == "out" and (self.training or torch.is_grad_enabled()):
                # The network is row-wise: run it on the looked-up tokens only, not the whole vocabulary.
                return self._embedding_rows_output(adapter_name, x)
            # No max_norm here: F.embedding renormalises the table it reads *in place*, which would rewrite B
            # (axis "in") or the cached H. max_norm is a property of the base table; the update is added after.
            rows = F.embedding(x, down, emb.padding_idx, None, emb.norm_type, emb.scale_grad_by_freq, emb.sparse)
            return F.linear(rows * s, up)
        x = self.neat_dropout[adapter_name](x.to(down.dtype))
        if self.kind == "conv2d":
            conv = self.base_layer
            kernels = down.t().reshape(cfg.r, *conv.weight.shape[1:])
            h = F.conv2d(x, kernels, None, conv.stride, conv.padding, conv.dilation)
            return F.conv2d(h * s, up[:, :, None, None])
        return F.linear(F.linear(x, down.t()) * s, up)

    def _embedding_rows_output(self, adapter_name: str, ids: torch.Tensor) -> torch.Tensor:
        cfg = self.adapter_configs[adapter_name]
        unique_ids, inverse = torch.unique(ids, return_inverse=True)
        A = self.neat_A[adapter_name].weight
        rows = self.base_layer.weight[unique_ids].to(A.dtype)
        if cfg.normalize_weight:  # the same constant as for the whole matrix
            rows = rows / rms(self.base_layer.weight.to(A.dtype))
        h = weight_network(
            rows, A,
            [m.weight for m in self.neat_encoders[adapter_name]],
            [m.weight for m in self.neat_decoders[adapter_name]],
            get_activation(cfg.act_fn),
        )
        return F.linear(h * cfg.scaling, self.neat_B[adapter_name].weight)[inverse]

    # --- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged_adapters:
            return result
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, result)
        for name in self.active_adapters:
            if name in self.adapter_configs:
                result = result + self._adapter_output(name, x).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        names = self.batch_adapter_names
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} samples.")
        result = result.clone()
        for name in dict.fromkeys(names):
            if name == BASE_ONLY or name not in self.adapter_configs:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            result[rows] = result[rows] + self._adapter_output(name, x[rows]).to(result.dtype)
        return result

    # --- merging ---------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Add the adapters' updates to the base weight. Every update is computed from the pristine W0."""
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.adapter_configs and n not in self.merged_adapters]
        if not names:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            acc_dtype = torch.promote_types(weight.dtype, torch.float32)
            total = self._to_stored_layout(self.pristine_weight()).to(acc_dtype)
            for name in [*self.merged_adapters, *names]:
                total = total + self.get_delta_weight(name).to(acc_dtype)
            new_weight = total.to(weight.dtype)  # round once, whatever the number of adapters
            if safe_merge and not torch.isfinite(new_weight).all():
                raise ValueError(
                    f"Merging adapter(s) {names} would put NaN/inf into the weights; nothing was merged. "
                    "The adapter is broken (check training for divergence)."
                )
            if self._pristine_weight is None:  # kept off the accelerator, like peft
                self._pristine_weight = weight.detach().to("cpu", copy=True)
            weight.copy_(new_weight)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Restore the pristine W0 exactly (a copy, not a subtraction)."""
        if self._pristine_weight is None:
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self._pristine_weight.to(self.base_layer.weight.device))
        self._pristine_weight = None
        self.merged_adapters.clear()
        self.clear_cache()

    def unload(self, merge: bool) -> nn.Module:
        """The base layer, with the active adapters merged if `merge`."""
        if merge:
            self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={c.r}, depth={c.depth}, axis={c.axis}" for n, c in self.adapter_configs.items())
        return f"kind={self.kind}, d_in={self.d_in}, d_out={self.d_out}, adapters=[{adapters}]"


class ModulesToSave(nn.Module):
    """A module trained in full alongside the adapters (e.g. a classifier head): one copy per adapter.

    The original stays untouched, so disabling adapters or switching between them also switches heads.
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.training = original_module.training
        self.copies = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.batch_adapter_names: Optional[list[str]] = None

    def add_adapter(self, adapter_name: str) -> None:
        import copy

        self.copies[adapter_name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.copies:
            del self.copies[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def active_module(self) -> nn.Module:
        for name in self.active_adapters:
            if name in self.copies and not self.disabled:
                return self.copies[name]
        return self.original_module

    def forward(self, x, *args, **kwargs):
        if self.batch_adapter_names is None or self.disabled:
            return self.active_module()(x, *args, **kwargs)
        names = self.batch_adapter_names
        outputs, rows_of = [], []
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            module = self.copies[name] if name in self.copies else self.original_module
            outputs.append(module(x[rows], *args, **kwargs))
            rows_of.append(rows)
        result = outputs[0].new_empty((x.shape[0], *outputs[0].shape[1:]))
        for rows, out in zip(rows_of, outputs):
            result[rows] = out
        return result
