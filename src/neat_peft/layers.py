"""`NeatLayer`: a frozen base layer plus any number of named NEAT adapters -- the one engine.

The standalone `NeatModel` and the peft plugin both put this layer into models. What differs between nn.Linear,
transformers' Conv1D, nn.Embedding and nn.Conv2d lives in one `LayerKind` object per layer (kinds/); the math is
in functional.py; the list of an adapter's tensors in tensors.py.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from .config import NeatConfig
from .functional import delta_weight, get_activation, kaiming_uniform_, low_rank_factors, rms, weight_network
from .kinds import check_supported, kind_of  # noqa: F401  (kind_of: the old import path, neat_peft.layers.kind_of)
from .shards import check_wrappable, require_whole
from .tensors import CONTAINERS, AdapterTensor, adapter_tensors

BASE_ONLY = "__base__"  # the name a sample uses in a mixed batch to bypass every adapter


class CachedFactors:
    """One adapter's (down, up) and a fingerprint of everything they were computed from.

    Valid while the autocast state is the same (it sets H's dtype) and each tensor H reads (W0's storage, the
    adapter's weights) is the same object at the same address with the same in-place version counter: an optimizer
    step, load_state_dict, a merge or a replaced Parameter all invalidate it. `.to()` / `.half()` and merges clear
    the cache outright (NeatLayer._apply, merge, unmerge); after changing a weight through `.data`, which no counter
    sees, call clear_cache().
    """

    __slots__ = ("down", "up", "device", "autocast", "tensors")

    def __init__(self, tensors: list[torch.Tensor], down: torch.Tensor, up: torch.Tensor):
        self.down, self.up = down, up
        self.device = tensors[0].device.type
        self.autocast = self._autocast()
        # Weak references: the entry must not keep a replaced weight alive, and a live referent cannot share its id.
        self.tensors = [(weakref.ref(t), t.data_ptr(), t._version) for t in tensors]

    def _autocast(self) -> tuple:
        return torch.is_autocast_enabled(self.device), torch.get_autocast_dtype(self.device)

    def valid(self, tensors: list[torch.Tensor]) -> bool:
        if len(tensors) != len(self.tensors) or self._autocast() != self.autocast:
            return False
        for (ref, address, version), t in zip(self.tensors, tensors):
            if ref() is not t or t.data_ptr() != address or t._version != version:
                return False
        return True


class NeatLayer(nn.Module):
    """A frozen `base_layer` with named NEAT adapters.

    With W0 the base weight in nn.Linear layout (d_out x d_in, kinds/dense.py), x of shape (..., d_in), and per adapter
    A (r x m), B (m x r), `depth` residual pairs of r x r encoders/decoders and scaling s::

        axis "out" (m = d_out):  H = net(W0^T) (d_in x r)     y = base_layer(x) + s * (x @ H) @ B^T
        axis "in"  (m = d_in):   G = net(W0)   (d_out x r)    y = base_layer(x) + s * (x @ B) @ G^T
        net(X) = act(X A^T), then the residual pairs (functional.weight_network), row by row

    Both are y = base_layer(x) + s * (x @ down) @ up^T with (down, up) = (H, B) or (B, G), d_in x r and d_out x r:
    `factors` computes the pair, the layer's kind applies it like LoRA's B(A x), and the d_out x d_in update is
    never built. In eval mode without autograd the pair is cached per adapter (see `factors`). Parameters live in
    `neat_A[name]`, `neat_B[name]`, `neat_encoders[name]`, `neat_decoders[name]`, mirroring peft's PEANuT; the
    containers come from tensors.CONTAINERS, the one list of an adapter's tensors.
    """

    def __init__(self, base_layer: nn.Module, name: str = "?"):
        super().__init__()
        self.kind = check_supported(name, base_layer)
        check_wrappable(name, base_layer)  # NEAT goes in before FSDP2 shards the model, never after
        self.kind.prepare(base_layer)
        self.base_layer = base_layer
        self.training = base_layer.training  # wrapping a model in eval mode keeps it in eval mode
        self.layer_name = name
        self.d_out, self.d_in = self.kind.shape(base_layer)
        for container in CONTAINERS:  # neat_A, neat_B, neat_encoders, neat_decoders
            setattr(self, f"neat_{container}", nn.ModuleDict())
        self.neat_dropout = nn.ModuleDict()
        self.adapter_configs: dict[str, NeatConfig] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._snapshot = None  # the base weight as it was before the first merge (kinds.LayerKind.snapshot)
        self._cache: dict[str, CachedFactors] = {}  # adapter name -> its (down, up) in eval mode, see `factors`
        self._last_call_mixed = False  # the last forward had adapter_names: see _check_not_a_routing_lost_rerun

    # Models read `.weight` / `.bias` of their layers directly (T5 casts to `wo.weight.dtype`, HF ties
    # embeddings): answer with the base layer's, as peft's tuner layers do.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    def base_weight(self) -> torch.Tensor:
        """W0 in nn.Linear layout, as the base layer computes with it now."""
        return self.kind.weight(self.base_layer)

    # --- adapters --------------------------------------------------------------------------------------
    def tensor_specs(self, config: NeatConfig) -> list[AdapterTensor]:
        return adapter_tensors(config.r, config.depth, config.axis, self.d_out, self.d_in)

    def _stores(self) -> list[nn.ModuleDict]:
        """Every per-adapter container: the tensors' (tensors.CONTAINERS) and the dropout."""
        return [*(getattr(self, f"neat_{container}") for container in CONTAINERS), self.neat_dropout]

    def add_adapter(self, adapter_name: str, config: NeatConfig) -> None:
        weight = self.kind.stored_weights(self.base_layer, self.d_out, self.d_in)[0][1]  # hqq has no .weight
        dtype = weight.dtype if weight.is_floating_point() else None
        # Adapter weights are kept in fp32 even on a half-precision base (peft's autocast_adapter_dtype).
        factory = {"device": weight.device, "dtype": torch.float32 if dtype in (torch.float16, torch.bfloat16, None)
                   else dtype}
        modules: dict[str, list[nn.Module]] = {container: [] for container in CONTAINERS}
        for spec in self.tensor_specs(config):
            rows, cols = spec.shape
            modules[spec.container].append(nn.Linear(cols, rows, bias=False, **factory))
        for container, layers in modules.items():  # A and B: one nn.Linear; encoders, decoders: a list (or none)
            store = getattr(self, f"neat_{container}")
            store[adapter_name] = nn.ModuleList(layers) if container in ("encoders", "decoders") else layers[0]
        self.neat_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for store in self._stores():
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
        for store in self._stores():
            del store[adapter_name]
        del self.adapter_configs[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        self.clear_cache()

    def adapter_tensor_items(self, adapter_name: str) -> list[tuple[AdapterTensor, nn.Parameter]]:
        """(spec, parameter) of each of the adapter's tensors, in tensors.py's order."""
        items = []
        for spec in self.tensor_specs(self.adapter_configs[adapter_name]):
            module = getattr(self, f"neat_{spec.container}")[adapter_name]
            items.append((spec, (module if spec.index is None else module[spec.index]).weight))
        return items

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [param for _, param in self.adapter_tensor_items(adapter_name)]

    # --- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, adapter_names: Optional[list[str]] = None, **kwargs) -> torch.Tensor:
        """y = base_layer(x) + the sum of the active adapters' s * (x @ down) @ up^T (see the class docstring).

        adapter_names: one adapter name per sample (BASE_ONLY for none), handed in per call by
        `per_sample_adapters` (refused while anything is merged: check_mixed_batch). Disabled adapters add
        nothing; a merged adapter is in the weight already, so after a partial merge the active adapters that are
        not merged are still added here (peft drops them; that is a silently wrong output).
        """
        self._check_not_a_routing_lost_rerun(adapter_names)
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if adapter_names is not None:
            return self._mixed_batch_forward(x, result, adapter_names)
        for name in self.active_adapters:
            # an adapter of the model may skip this layer
            if name in self.adapter_configs and name not in self.merged_adapters:
                result = result + self.adapter_output(name, x).to(result.dtype)
        return result

    def _check_not_a_routing_lost_rerun(self, adapter_names: Optional[list[str]]) -> None:
        """Refuse activation checkpointing's rerun of a mixed batch, which would route every sample wrongly.

        The names come from hooks that live for one call (per_sample_adapters); torch.utils.checkpoint reruns the
        block during backward, after they are gone. A forward without names that runs inside backward right after a
        forward with names is that rerun: without this, wrong gradients (use_reentrant=True) or torch's opaque
        CheckpointError (use_reentrant=False).
        """
        if adapter_names is not None:
            self._last_call_mixed = True
        elif self._last_call_mixed:
            if torch._C._current_graph_task_id() != -1:  # -1: not inside a backward pass
                raise ValueError(
                    f"Layer {self.layer_name!r} is being recomputed by activation checkpointing (torch.utils."
                    "checkpoint) for a batch that was run with `adapter_names`: the per-sample routing does not "
                    "survive the recomputation, so the gradients would be wrong. Don't checkpoint mixed-adapter "
                    "batches: run them without checkpointing, or under torch.no_grad() for inference, or train "
                    "each adapter on its own batches.")
            self._last_call_mixed = False

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """s * (x @ down) @ up^T for one adapter, in the base layer's geometry (kinds/dense.py); x: (..., d_in)."""
        cfg = self.adapter_configs[adapter_name]
        if self.kind.reads_ids and cfg.axis == "out" and (self.training or torch.is_grad_enabled()):
            # The network is row-wise: in training run it on the looked-up tokens only, never the whole vocabulary.
            return self._looked_up_rows_output(adapter_name, x)
        down, up = self.factors(adapter_name)
        if not self.kind.reads_ids:
            x = x.to(down.dtype)
            if self.training:  # (dropout modules follow the layer's mode: in eval they are the identity)
                x = self.neat_dropout[adapter_name](x)
        return self.kind.update(self.base_layer, x, down, up, cfg.scaling)

    def factors(self, adapter_name: str, W0: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up), d_in x r and d_out x r, with dW = s * up @ down^T, from W0 (default: the pristine base weight,
        which is the current one unless other adapters are merged into it).

        In eval mode without autograd the pair is computed once per adapter and reused (unmerged inference at
        LoRA's cost) while nothing H depends on changed (`CachedFactors`). Under torch.compile the cache is
        bypassed (data pointers break graphs): the graph recomputes H, an extra ~r/N of the frozen layer's cost for
        N tokens.
        """
        cached = W0 is None and not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())
        if cached:
            hit = self._cache.get(adapter_name)
            tensors = self._h_inputs(adapter_name)
            if hit is not None and hit.valid(tensors):
                return hit.down, hit.up
        self.require_whole_weights(adapter_name)  # H reads all of W0: a shard would give wrong numbers, not an error
        cfg = self.adapter_configs[adapter_name]
        adapter = (self.neat_A[adapter_name].weight, self.neat_B[adapter_name].weight,
                   [m.weight for m in self.neat_encoders[adapter_name]],
                   [m.weight for m in self.neat_decoders[adapter_name]],
                   get_activation(cfg.act_fn), cfg.axis, cfg.normalize_weight)
        if W0 is None and self.kind.recompute_weight and torch.is_grad_enabled():
            # Keep the (small) stored weight for backward and dequantize again there, not the fp32 W0.
            return torch.utils.checkpoint.checkpoint(lambda: low_rank_factors(self.pristine_weight(), *adapter),
                                                     use_reentrant=False)
        down, up = low_rank_factors(self.pristine_weight() if W0 is None else W0, *adapter)
        if cached:
            self._cache[adapter_name] = CachedFactors(tensors, down, up)
        return down, up

    def _h_inputs(self, adapter_name: str) -> list[torch.Tensor]:
        """Every tensor H is computed from: W0's storage, then the adapter's weights in tensors.CONTAINERS' order.

        Read through the modules' own dicts rather than nn.Module.__getattr__: a cached forward (every decoding
        step) calls this to check its fingerprint, and attribute lookups on modules are Python calls.
        """
        modules = self._modules
        tensors = [t for _, t, _ in self.kind.stored_weights(modules["base_layer"], self.d_out, self.d_in)]
        for container in CONTAINERS:
            module = modules[f"neat_{container}"]._modules[adapter_name]
            for linear in (module._modules.values() if isinstance(module, nn.ModuleList) else (module,)):
                tensors.append(linear._parameters["weight"])
        return tensors

    def require_whole_weights(self, adapter_name: str) -> None:
        """Raise a ShardingError if W0 or this adapter's weights are sharded/partitioned right now: H needs all of
        W0, and a fragment would give wrong numbers rather than an error (see shards.py)."""
        adapter = [(spec.module_key(adapter_name), param, spec.shape)
                   for spec, param in self.adapter_tensor_items(adapter_name)]
        require_whole(self.layer_name, self.kind.stored_weights(self.base_layer, self.d_out, self.d_in) + adapter)

    def clear_cache(self) -> None:
        self._cache.clear()

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def __getstate__(self):
        # H is derived data (and its fingerprint holds weak references, which cannot be pickled): copies start empty.
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def _apply(self, fn, *args, **kwargs):
        # .to()/.half()/.float() swap weights via `param.data = ...`, which keeps the version counter: the
        # new storage may land at the old address, so drop H rather than trust the key.
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _looked_up_rows_output(self, adapter_name: str, ids: torch.Tensor) -> torch.Tensor:
        cfg = self.adapter_configs[adapter_name]
        self.require_whole_weights(adapter_name)
        unique_ids, inverse = torch.unique(ids, return_inverse=True)
        A = self.neat_A[adapter_name].weight
        table = self.base_layer.weight if self._snapshot is None else \
            self.kind.to_stored(self.base_layer, self.pristine_weight())  # H reads W0, not a merged weight
        rows = table[unique_ids].to(A.dtype)
        if cfg.normalize_weight:  # the same constant as for the whole matrix
            rows = rows / rms(table.to(A.dtype))
        h = weight_network(
            rows, A,
            [m.weight for m in self.neat_encoders[adapter_name]],
            [m.weight for m in self.neat_decoders[adapter_name]],
            get_activation(cfg.act_fn),
        )
        return torch.nn.functional.linear(h * cfg.scaling, self.neat_B[adapter_name].weight)[inverse]

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor, names: list[str]) -> torch.Tensor:
        if self.merged_adapters:  # a merged adapter is in every sample's weight: no per-sample choice is left
            raise ValueError(f"Cannot pass `adapter_names` to layer {self.layer_name!r}: adapters "
                             f"{self.merged_adapters} are merged; call unmerge_adapter() first.")
        if len(names) != x.shape[0]:
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(names)} and {x.shape[0]} respectively.")
        result = result.clone()
        for name, rows in _rows_by_name(names, x.device):
            if name != BASE_ONLY and name in self.adapter_configs:
                result[rows] = result[rows] + self.adapter_output(name, x[rows]).to(result.dtype)
        return result

    # --- the materialised update (merging, export) -----------------------------------------------------
    def pristine_weight(self) -> torch.Tensor:
        """W0 in linear layout as it was before any merge (merged weights hold adapter updates)."""
        if self._snapshot is None:
            return self.base_weight()
        return self.kind.snapshot_weight(self.base_layer, self._snapshot)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The materialised update in the base layer's stored layout, computed from the pristine W0."""
        down, up = self.factors(adapter_name, self.pristine_weight())
        return self.kind.to_stored(self.base_layer, delta_weight(down, up, self.adapter_configs[adapter_name].scaling))

    def lora_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """peft LoRA tensors (keys relative to this layer) computing exactly this adapter's update:
        dW = s * up @ down^T = lora_B @ lora_A with lora_A = down^T, lora_B = s * up (LoRA scaling 1)."""
        problem = self.kind.lora_problem(self.base_layer)
        if problem is not None:
            raise ValueError(f"Cannot write layer {self.layer_name!r} as a LoRA: {problem}.")
        with torch.no_grad():
            down, up = self.factors(adapter_name, self.pristine_weight())
            return self.kind.lora_tensors(self.base_layer, down, up, self.adapter_configs[adapter_name].scaling)

    # --- merging ---------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Add the adapters' updates to the base weight. Every update is computed from the pristine W0, and the
        sum is rounded (or requantized) once, whatever the number of adapters."""
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.adapter_configs and n not in self.merged_adapters]
        if not names:
            return
        for name in [*self.merged_adapters, *names]:
            self.require_whole_weights(name)  # before touching anything, whatever the layer kind
        with torch.no_grad():
            snapshot = self._snapshot if self._snapshot is not None else self.kind.snapshot(self.base_layer)
            W0 = self.kind.snapshot_weight(self.base_layer, snapshot)
            total = W0.to(torch.promote_types(W0.dtype, torch.float32))
            for name in [*self.merged_adapters, *names]:
                down, up = self.factors(name, W0)
                total = total + delta_weight(down, up, self.adapter_configs[name].scaling).to(total.dtype)
            if safe_merge and not torch.isfinite(total.to(self.kind.weight_dtype(self.base_layer))).all():
                raise ValueError(
                    f"Merging adapter(s) {names} would put NaN/inf into the weights; nothing was merged. "
                    "The adapter is broken (check training for divergence)."
                )
            self.kind.assign_weight(self.base_layer, total)
        self._snapshot = snapshot
        self.merged_adapters.extend(names)
        self.clear_cache()

    def unmerge(self) -> None:
        """Restore the pristine base weight exactly (the kept original, not a subtraction)."""
        if self._snapshot is None:
            return
        self.kind.restore(self.base_layer, self._snapshot)
        self._snapshot = None
        self.merged_adapters.clear()
        self.clear_cache()

    @contextlib.contextmanager
    def merges_taken_out(self) -> Iterator[None]:
        """Inside: the pristine weight, nothing merged. After: the merged weight as it was, bit for bit (merging
        again would recompute it, which rounds differently once the model was cast, e.g. by .half())."""
        if self._snapshot is None:
            yield
            return
        merged_weight, snapshot, names = self.kind.snapshot(self.base_layer), self._snapshot, list(self.merged_adapters)
        self.unmerge()
        try:
            yield
        finally:
            self.kind.restore(self.base_layer, merged_weight)
            self._snapshot, self.merged_adapters[:] = snapshot, names
            self.clear_cache()

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={c.r}, depth={c.depth}, axis={c.axis}" for n, c in self.adapter_configs.items())
        return f"kind={self.kind.name}, d_in={self.d_in}, d_out={self.d_out}, adapters=[{adapters}]"


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

    def add_adapter(self, adapter_name: str) -> None:
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

    def forward(self, x, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        if adapter_names is None or self.disabled:
            return self.active_module()(x, *args, **kwargs)
        outputs = [(rows, (self.copies[name] if name in self.copies else self.original_module)(x[rows], *args,
                                                                                                 **kwargs))
                   for name, rows in _rows_by_name(adapter_names, x.device)]
        first = outputs[0][1]
        result = first.new_empty((x.shape[0], *first.shape[1:]))
        for rows, out in outputs:
            result[rows] = out
        return result


def _rows_by_name(names: list[str], device) -> Iterator[tuple[str, torch.Tensor]]:
    """(adapter name, indices of its samples) for each distinct name of a mixed batch, in first-seen order."""
    for name in dict.fromkeys(names):
        yield name, torch.tensor([i for i, n in enumerate(names) if n == name], device=device)


def check_mixed_batch(adapter_names: list[str], known: Iterable[str], layers: list[NeatLayer], training: bool) -> None:
    """The rules for one-adapter-per-sample batches, shared by NeatModel and the peft plugin (peft's rules).

    The names reach the layers through forward pre-hooks that live for one call. Activation checkpointing re-runs a
    block's forward during backward, after the hooks are gone, so a checkpointed mixed batch would be recomputed
    without its routing (silently wrong gradients, or torch's CheckpointError). transformers checkpoints only in
    training mode, hence mixed batches are for inference and refused in training mode, as peft does. Don't wrap an
    eval-mode mixed batch in torch.utils.checkpoint by hand: the layers refuse the rerun in backward
    (NeatLayer._check_not_a_routing_lost_rerun).
    """
    unknown = sorted(set(adapter_names) - set(known) - {BASE_ONLY})
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. adapter_names may "
                         f"hold {sorted(known)} and {BASE_ONLY!r} (the base model alone).")
    if training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode: per-sample adapters are for "
                         "inference. Call model.eval() first, or train each adapter on its own batches.")
    if any(layer.merged for layer in layers):
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
                         "first.")


@contextlib.contextmanager
def per_sample_adapters(modules: Iterable[nn.Module], adapter_names: list[str],
                        encoder_modules: Iterable[nn.Module] = (), num_beams: Optional[int] = None):
    """Hand `adapter_names` to every module's forward for the duration of one call (forward pre-hooks).

    generate() with num_beams > 1 repeats every input num_beams times, so the names are repeated too, except in
    `encoder_modules` (an encoder-decoder's encoder runs once per input; its hooks run later and win).
    """
    per_sample = list(adapter_names)
    if isinstance(num_beams, int) and num_beams > 1:
        per_sample = [n for n in adapter_names for _ in range(num_beams)]

    def inject(names):
        def hook(module, args, kwargs):
            kwargs["adapter_names"] = names
            return args, kwargs
        return hook

    handles = [m.register_forward_pre_hook(inject(per_sample), with_kwargs=True) for m in modules]
    if per_sample != list(adapter_names):
        handles += [m.register_forward_pre_hook(inject(list(adapter_names)), with_kwargs=True)
                    for m in encoder_modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
