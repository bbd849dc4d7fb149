"""`NeatModel`: puts NEAT adapters into any PyTorch model and manages them (peft's API, peft's files)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

from . import __version__
from .config import NeatConfig
from .formats import (
    config_to_json,
    layer_keys,
    lora_config_json,
    module_to_save_key,
    read_config,
    read_weights,
    rename_key_prefix,
    write_adapter,
)
from .layers import BASE_ONLY, ModulesToSave, NeatLayer, check_supported
from .targets import find_modules_to_save, find_targets

DEFAULT_ADAPTER = "default"


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def linear_layout_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a layer's W0 in nn.Linear layout."""
    if isinstance(module, NeatLayer):
        return module.d_out, module.d_in
    kind = check_supported("?", module)
    w = module.weight
    if kind == "linear":
        return w.shape[0], w.shape[1]
    if kind == "conv2d":
        return w.shape[0], w[0].numel()
    return w.shape[1], w.shape[0]


def adapter_tensor_shapes(module: nn.Module, config: NeatConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor (roles A, B, enc<i>, dec<i>) NEAT adds to `module` under `config`."""
    d_out, d_in = linear_layout_shape(module)
    width = d_out if config.axis == "out" else d_in
    shapes = {"A": (config.r, width), "B": (width, config.r)}
    for i in range(config.depth):
        shapes[f"enc{i}"] = shapes[f"dec{i}"] = (config.r, config.r)
    return shapes


def _layer_role_params(layer: NeatLayer, adapter_name: str) -> dict[str, nn.Parameter]:
    params = {"A": layer.neat_A[adapter_name].weight, "B": layer.neat_B[adapter_name].weight}
    for i, (enc, dec) in enumerate(zip(layer.neat_encoders[adapter_name], layer.neat_decoders[adapter_name])):
        params[f"enc{i}"], params[f"dec{i}"] = enc.weight, dec.weight
    return params


def count_adapter_parameters(model: nn.Module, config: NeatConfig) -> int:
    """Trainable NEAT parameters `config` would add to `model` (modules_to_save not counted)."""
    return sum(
        sum(torch.Size(s).numel() for s in adapter_tensor_shapes(m, config).values())
        for _, m in find_targets(model, config)
    )


def match_lora_budget(model: nn.Module, config: NeatConfig, lora_r: int) -> int:
    """The NEAT r whose parameter count on `config`'s targets comes closest to, without exceeding, that of
    LoRA with rank `lora_r` on the same targets (LoRA: r * (d_in + d_out) per layer)."""
    targets = find_targets(model, config)
    lora = sum(lora_r * sum(linear_layout_shape(m)) for _, m in targets)
    best = None
    r = 1
    while True:
        count = count_adapter_parameters(model, dataclasses.replace(config, r=r))
        if count > lora:
            break
        best, r = r, r + 1
    if best is None:
        raise ValueError(f"Even r=1 NEAT ({count_adapter_parameters(model, dataclasses.replace(config, r=1))} "
                         f"params) exceeds LoRA r={lora_r} ({lora} params) on these targets.")
    return best


class NeatModel(nn.Module):
    """A model with NEAT adapters. Calls, attributes and `generate` pass through to the wrapped model.

    >>> model = get_neat_model(base, NeatConfig(r=8, target_modules=["query", "value"]))
    >>> model.print_trainable_parameters()
    """

    def __init__(self, model: nn.Module, config: NeatConfig, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, NeatConfig] = {}
        self.active_adapters: list[str] = []
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # --- structure -------------------------------------------------------------------------------------
    def neat_layers(self) -> Iterator[tuple[str, NeatLayer]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, NeatLayer):
                yield name, module

    def _saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSave):
                yield name, module

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def add_adapter(self, adapter_name: str, config: NeatConfig) -> None:
        """Add an adapter (not made active). Errors leave the model unchanged."""
        if not isinstance(config, NeatConfig):
            raise TypeError(f"config must be a NeatConfig, got {type(config).__name__}.")
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; pick another name or delete it.")
        if not adapter_name or adapter_name == BASE_ONLY or "." in adapter_name:
            raise ValueError(f"{adapter_name!r} cannot name an adapter (empty, contains '.', or reserved).")
        targets = find_targets(self.base_model, config)  # raises before anything changes
        saves = find_modules_to_save(self.base_model, config.modules_to_save)
        for path, module in targets:
            layer = module if isinstance(module, NeatLayer) else NeatLayer(module, path)
            layer.add_adapter(adapter_name, config)
            if layer is not module:
                _set_submodule(self.base_model, path, layer)
        for path, module in saves:
            wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
            wrapper.add_adapter(adapter_name)
            if wrapper is not module:
                _set_submodule(self.base_model, path, wrapper)
        self.peft_config[adapter_name] = config
        self._update_trainable()

    def set_adapter(self, adapter_names: Union[str, list[str]]) -> None:
        """Make these adapters active (their outputs are summed); only active adapters are trainable."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self.peft_config]
        if missing or not names:
            raise ValueError(f"No adapter named {missing}; adapters: {list(self.peft_config)}.")
        self.active_adapters = names
        for _, module in [*self.neat_layers(), *self._saved_modules()]:
            module.active_adapters = list(names)
            if isinstance(module, NeatLayer):
                module.clear_cache()
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; adapters: {list(self.peft_config)}.")
        if len(self.peft_config) == 1:
            raise ValueError("Cannot delete the only adapter; use unload() to get the base model back.")
        for _, layer in self.neat_layers():
            if adapter_name in layer.merged_adapters:
                raise ValueError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() first.")
        for _, module in [*self.neat_layers(), *self._saved_modules()]:
            if adapter_name in getattr(module, "adapter_configs", getattr(module, "copies", {})):
                module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name] or [next(iter(self.peft_config))]
        self.set_adapter(remaining)

    def _update_trainable(self) -> None:
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for name in self.active_adapters:
            if self.peft_config[name].inference_mode:
                continue
            for _, layer in self.neat_layers():
                if name in layer.adapter_configs:
                    for p in layer.adapter_parameters(name):
                        p.requires_grad_(True)
            for _, saved in self._saved_modules():
                if name in saved.copies:
                    saved.copies[name].requires_grad_(True)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside this block (merged adapters are taken out and put back)."""
        merged = {path: list(layer.merged_adapters) for path, layer in self.neat_layers() if layer.merged}
        for path, layer in self.neat_layers():
            if path in merged:
                layer.unmerge()
        modules = [m for _, m in [*self.neat_layers(), *self._saved_modules()]]
        for m in modules:
            m.disabled = True
        try:
            yield
        finally:
            for m in modules:
                m.disabled = False
            for path, layer in self.neat_layers():
                if path in merged:
                    layer.merge(merged[path])

    # --- running ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _batch_adapters(self, adapter_names: Optional[list[str]]):
        if adapter_names is None:
            yield
            return
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ONLY})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; adapters: {list(self.peft_config)} "
                             f"(use {BASE_ONLY!r} for the base model).")
        if any(layer.merged for _, layer in self.neat_layers()):
            raise ValueError("A mixed-adapter batch needs unmerged adapters; call unmerge_adapter() first.")
        modules = [m for _, m in [*self.neat_layers(), *self._saved_modules()]]
        for m in modules:
            m.batch_adapter_names = list(adapter_names)
        try:
            yield
        finally:
            for m in modules:
                m.batch_adapter_names = None

    def forward(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        with self._batch_adapters(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        with self._batch_adapters(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def clear_cache(self) -> None:
        """Drop every cached H. Only needed after changing weights through `.data`, which autograd cannot see."""
        for _, layer in self.neat_layers():
            layer.clear_cache()

    # --- merging ---------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights. With safe_merge, non-finite results raise and nothing changes."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"No adapter named {unknown}; adapters: {list(self.peft_config)}.")
        done: list[tuple[NeatLayer, list[str]]] = []
        try:
            for _, layer in self.neat_layers():
                before = list(layer.merged_adapters)
                layer.merge(names, safe_merge=safe_merge)
                done.append((layer, before))
        except Exception:
            for layer, before in done:  # put back exactly what was there (merges are recomputed from W0)
                layer.unmerge()
                if before:  # merge([]) is a no-op; merge(None) would merge the active adapters
                    layer.merge(before)
            raise

    def unmerge_adapter(self) -> None:
        for _, layer in self.neat_layers():
            layer.unmerge()

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        else:
            self.unmerge_adapter()
        for path, layer in list(self.neat_layers()):
            _set_submodule(self.base_model, path, layer.base_layer)
        for path, saved in list(self._saved_modules()):
            _set_submodule(self.base_model, path, saved.active_module() if merge else saved.original_module)
        return self.base_model

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
        """The base model with the adapters merged in and every NEAT layer removed."""
        return self._unload(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """The base model as it was, without adapters."""
        return self._unload(False)

    # --- files -----------------------------------------------------------------------------------------
    def _adapter_tensors(self, adapter_name: str) -> tuple[dict[str, torch.Tensor], list[str], set[str]]:
        tensors, paths, kinds = {}, [], set()
        for path, layer in self.neat_layers():
            if adapter_name not in layer.adapter_configs:
                continue
            keys = layer_keys(path, self.peft_config[adapter_name].depth)
            for role, param in _layer_role_params(layer, adapter_name).items():
                tensors[keys[role]] = param
            paths.append(path)
            kinds.add(layer.kind)
        for path, saved in self._saved_modules():
            if adapter_name in saved.copies:
                for pname, value in saved.copies[adapter_name].state_dict().items():
                    tensors[module_to_save_key(path, pname)] = value
        return tensors, paths, kinds

    def save_pretrained(self, save_directory: Union[str, os.PathLike],
                        selected_adapters: Optional[list[str]] = None) -> None:
        """Write each adapter as peft does: 'default' in save_directory, others in save_directory/<name>."""
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"No adapter named {unknown}; adapters: {list(self.peft_config)}.")
        for name in names:
            config = self.peft_config[name]
            tensors, paths, kinds = self._adapter_tensors(name)
            data = config.to_dict()
            data["target_modules"] = sorted(paths)  # the exact modules, so any loader adapts the same ones
            data["inference_mode"] = True
            peft_compatible = config.peft_compatible and kinds == {"linear"}
            if not peft_compatible:  # a NEAT file: its keys carry NEAT's prefix, as every peft type's do
                tensors = rename_key_prefix(tensors, "peanut_", "neat_")
            directory = Path(save_directory) if name == DEFAULT_ADAPTER else Path(save_directory) / name
            write_adapter(directory, config_to_json(data, peft_compatible, __version__), tensors)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike],
                        adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> "NeatModel":
        """Load an adapter saved by neat-peft or by peft's PEANuT. Errors leave `model` unchanged."""
        config, tensors = _read_checked(model, model_id, is_trainable)
        neat = cls(model, config, adapter_name)
        neat._load_tensors(adapter_name, tensors)
        if not is_trainable:
            neat.eval()
        return neat

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False) -> None:
        """Load another adapter into this model (not made active). Errors leave the model unchanged."""
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; pick another name or delete it.")
        config, tensors = _read_checked(self.base_model, model_id, is_trainable)
        self.add_adapter(adapter_name, config)
        self._load_tensors(adapter_name, tensors)

    def _load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        own, _, _ = self._adapter_tensors(adapter_name)
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(tensors[key].to(target.dtype))
        self.clear_cache()

    def export_lora(self, save_directory: Union[str, os.PathLike], adapter_name: Optional[str] = None) -> None:
        """Write the adapter as a standard peft LoRA (exact: dW = s*up@down^T = lora_B @ lora_A, scaling 1)."""
        name = adapter_name or self.active_adapter
        if name not in self.peft_config:
            raise ValueError(f"No adapter named {name!r}; adapters: {list(self.peft_config)}.")
        config = self.peft_config[name]
        dilated = [path for path, layer in self.neat_layers() if name in layer.adapter_configs
                   and layer.kind == "conv2d" and tuple(layer.base_layer.dilation) != (1, 1)]
        if dilated:  # peft builds lora_A without the base conv's dilation: it would compute something else
            raise ValueError(
                f"Cannot export adapter {name!r} as LoRA: peft's LoRA Conv2d has no dilation, and {dilated} "
                "use dilation != 1. Keep it as a NEAT adapter (save_pretrained) or merge it (merge_and_unload)."
            )
        renormed = [path for path, layer in self.neat_layers() if name in layer.adapter_configs
                    and layer.kind == "embedding" and layer.base_layer.max_norm is not None]
        if renormed:  # peft's LoRA embedding renormalises lora_A's rows in place: not the same update
            raise ValueError(
                f"Cannot export adapter {name!r} as LoRA: the embeddings {renormed} have max_norm set, and peft's "
                "LoRA applies max_norm to its lora_A rows, which changes the update. Keep it as a NEAT adapter "
                "(save_pretrained) or merge it (merge_and_unload)."
            )
        tensors, paths, kinds = {}, [], set()
        with torch.no_grad():
            for path, layer in self.neat_layers():
                if name not in layer.adapter_configs:
                    continue
                for key, tensor in lora_tensors(layer, name).items():
                    tensors[f"base_model.model.{path}.{key}"] = tensor
                paths.append(path)
                kinds.add(layer.kind)
            for path, saved in self._saved_modules():
                if name in saved.copies:
                    for pname, value in saved.copies[name].state_dict().items():
                        tensors[module_to_save_key(path, pname)] = value
        write_adapter(save_directory,
                      lora_config_json(config.to_dict(), config.r, paths, "conv1d" in kinds), tensors)


def lora_tensors(layer: NeatLayer, adapter_name: str) -> dict[str, torch.Tensor]:
    """peft LoRA tensors (keys relative to the layer) computing exactly this adapter's update:
    dW = s * up @ down^T = lora_B @ lora_A with lora_A = down^T, lora_B = s * up (LoRA scaling 1)."""
    config = layer.adapter_configs[adapter_name]
    with torch.no_grad():
        down, up = layer.factors(adapter_name, layer.pristine_weight())
        lora_A, lora_B = down.t().contiguous(), (config.scaling * up).contiguous()
    if layer.kind == "embedding":
        return {"lora_embedding_A": lora_A, "lora_embedding_B": lora_B}
    if layer.kind == "conv2d":
        lora_A = lora_A.reshape(config.r, *layer.base_layer.weight.shape[1:])
        lora_B = lora_B[:, :, None, None]
    return {"lora_A.weight": lora_A, "lora_B.weight": lora_B}


def _read_checked(model: nn.Module, model_id, is_trainable: bool) -> tuple[NeatConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory and check it fits `model` (targets, keys, shapes). Changes nothing."""
    data = read_config(model_id)
    try:
        config = NeatConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{str(Path(model_id) / 'adapter_config.json')!r}: {e}") from None
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    tensors = rename_key_prefix(read_weights(model_id), "neat_", "peanut_")  # read either naming
    try:
        targets = find_targets(model, config)
        saves = find_modules_to_save(model, config.modules_to_save)
    except ValueError as e:
        raise ValueError(f"The adapter in {str(model_id)!r} does not fit this model: {e}") from None
    expected: dict[str, tuple[int, ...]] = {}
    for path, module in targets:
        keys = layer_keys(path, config.depth)
        for role, shape in adapter_tensor_shapes(module, config).items():
            expected[keys[role]] = shape
    for path, module in saves:
        original = module.original_module if isinstance(module, ModulesToSave) else module
        for pname, value in original.state_dict().items():
            expected[module_to_save_key(path, pname)] = tuple(value.shape)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)}, model needs {expected[k]}"
             for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors for modules this model lacks, e.g. {unexpected[:3]}")
        if wrong:
            problems.append(f"{len(wrong)} shape mismatches, e.g. {wrong[:3]}")
        raise ValueError(f"The adapter in {str(model_id)!r} does not fit this model ({'; '.join(problems)}). "
                         "Was it trained on a different base model?")
    return config, tensors


def get_neat_model(model: nn.Module, config: NeatConfig, adapter_name: str = DEFAULT_ADAPTER) -> NeatModel:
    """Wrap `model` with a NEAT adapter; only adapter (and modules_to_save) parameters stay trainable."""
    return NeatModel(model, config, adapter_name)
