"""`NeatModel`: puts NEAT adapters into any PyTorch model and manages them (peft's API, peft's files)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

from ._version import __version__
from .config import NeatConfig
from .formats import (
    WEIGHTS_NAME,
    check_adapter_name,
    config_to_json,
    lora_config_json,
    module_to_save_key,
    read_adapter,
    rename_key_prefix,
    validate_adapter_tensors,
    write_adapter,
)
from .kinds import check_supported
from .layers import BASE_ONLY, ModulesToSave, NeatLayer, check_mixed_batch, per_sample_adapters
from .quantized import (
    QuantizedLinearKind,
    dequantize_model,
    merged_float_linear,
    prepare_model,
    quantization_signatures,
    signature_mismatch,
)
from .shards import check_wrappable, gather_full
from .shards import is_main_process as _is_main_process
from .targets import find_modules_to_save, find_targets
from .tensors import FILE_PREFIX, AdapterTensor, adapter_tensors

DEFAULT_ADAPTER = "default"


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def linear_layout_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a layer's W0 in nn.Linear layout (also for a DeepSpeed ZeRO-3 partitioned weight)."""
    if isinstance(module, NeatLayer):
        return module.d_out, module.d_in
    return check_supported("?", module).shape(module)


def tensor_specs(module: nn.Module, config: NeatConfig) -> tuple[AdapterTensor, ...]:
    """The tensors NEAT adds to `module` under `config` (tensors.py)."""
    return adapter_tensors(config.r, config.depth, config.axis, *linear_layout_shape(module))


def computed_by_peanut(config: NeatConfig, layers: list[NeatLayer]) -> bool:
    """True when peft 0.21's PEANuT computes exactly this adapter on these layers, so it is saved in peft's
    PEANUT format: the config uses only what PEANuT knows, and every layer is a kind PEANuT has."""
    return config.peft_compatible and all(layer.kind.peanut_compatible for layer in layers)


def lora_export(layers: list[tuple[str, NeatLayer]], adapter_name: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The LoRA computing exactly this adapter: ({'<path>.<lora key>': tensor}, fan_in_fan_out).

    The one exporter behind `NeatModel.export_lora` and the plugin's `convert_to_lora_exact`. Every layer is checked
    before anything is computed, so a refusal names all layers peft's LoRA cannot reproduce.
    """
    chosen = [(path, layer) for path, layer in layers if adapter_name in layer.adapter_configs]
    problems = [f"{path!r} ({problem})" for path, layer in chosen
                if (problem := layer.kind.lora_problem(layer.base_layer)) is not None]
    if problems:
        raise ValueError(f"Cannot export adapter {adapter_name!r} as LoRA: for {', '.join(problems)} peft's LoRA "
                         "would compute something else. Keep it as a NEAT adapter (save_pretrained) or merge it "
                         "(merge_and_unload).")
    tensors = {f"{path}.{key}": tensor for path, layer in chosen for key, tensor in layer.lora_tensors(adapter_name).items()}
    return tensors, any(layer.kind.lora_fan_in_fan_out for _, layer in chosen)


def count_adapter_parameters(model: nn.Module, config: NeatConfig) -> int:
    """Trainable NEAT parameters `config` would add to `model` (modules_to_save not counted)."""
    return sum(torch.Size(spec.shape).numel() for _, m in find_targets(model, config) for spec in tensor_specs(m, config))


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

    # transformers' Trainer refuses to fine-tune a quantized model (QLoRA) unless it is a peft PeftModel or says
    # adapters are attached (trainer_utils.validate_quantization_for_training reads this flag): NEAT's are.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: NeatConfig, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        _check_wrappable_model(model)
        self.base_model = model
        self.peft_config: dict[str, NeatConfig] = {}
        self.active_adapters: list[str] = []
        self._unloaded = False
        self.add_adapter(adapter_name, config)
        prepare_model(model)  # quantized bases: see quantized.py and kinds/quantized.py
        self.set_adapter(adapter_name)
        if _checkpointing_enabled(model):  # enabled before wrapping
            self._enable_input_require_grads()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def _check_live(self) -> None:
        if self._unloaded:
            raise RuntimeError("This NeatModel was unloaded (merge_and_unload() or unload()): its adapters are gone "
                               "from the model. Use the model those calls returned, or wrap it again with "
                               "get_neat_model / NeatModel.from_pretrained.")

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
        self._check_live()
        if not isinstance(config, NeatConfig):
            raise TypeError(f"config must be a NeatConfig, got {type(config).__name__}.")
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; pick another name or delete it.")
        check_adapter_name(adapter_name, reserved=(BASE_ONLY,))
        targets = find_targets(self.base_model, config)  # raises before anything changes
        saves = find_modules_to_save(self.base_model, config.modules_to_save)
        for path, module in targets:
            if not isinstance(module, NeatLayer):
                check_wrappable(path, module)  # already sharded by FSDP2: raise before anything changes
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
        """Make these adapters active (their outputs are summed); only active adapters are trainable.

        As in peft, merged adapters are unmerged first (with a warning): the weights then hold W0 again.
        """
        self._check_live()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self.peft_config]
        if missing or not names:
            raise ValueError(f"No adapter named {missing}; adapters: {list(self.peft_config)}.")
        merged = sorted({n for _, layer in self.neat_layers() for n in layer.merged_adapters})
        if merged and merged != sorted(names):
            warnings.warn(f"Adapters {merged} are merged; unmerging them before activating {names}.", stacklevel=2)
            self.unmerge_adapter()
        self.active_adapters = names
        for _, module in [*self.neat_layers(), *self._saved_modules()]:
            module.active_adapters = list(names)
            if isinstance(module, NeatLayer):
                module.clear_cache()
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_live()
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
        if adapter_name not in self.active_adapters:  # the active set is unchanged: keep it, and keep any merges
            return
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
        """Run the base model alone inside this block (merged adapters are taken out, and put back bit for bit)."""
        self._check_live()
        modules = [m for _, m in [*self.neat_layers(), *self._saved_modules()]]
        with contextlib.ExitStack() as merges:
            for _, layer in self.neat_layers():
                merges.enter_context(layer.merges_taken_out())
            for m in modules:
                m.disabled = True
            try:
                yield
            finally:
                for m in modules:
                    m.disabled = False

    # --- gradient checkpointing (transformers models) -------------------------------------------------
    def gradient_checkpointing_enable(self, *args, **kwargs):
        """transformers' gradient_checkpointing_enable on the base model, plus input embeddings whose output
        requires grad. Reentrant checkpointing gives no gradient to the parameters inside a block whose inputs
        need none, and with frozen embeddings they don't: without this the adapters would silently not train."""
        result = self.base_model.gradient_checkpointing_enable(*args, **kwargs)
        self._enable_input_require_grads()
        return result

    def activation_checkpointing_enable(self, *args, **kwargs):
        """transformers >= 5's name of gradient_checkpointing_enable; the same input-grad fix applies."""
        result = self.base_model.activation_checkpointing_enable(*args, **kwargs)
        self._enable_input_require_grads()
        return result

    def _enable_input_require_grads(self) -> None:
        base = self.base_model
        already = getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None)
        if hasattr(base, "enable_input_require_grads") and not already:
            base.enable_input_require_grads()

    # --- running ---------------------------------------------------------------------------------------
    def _routing(self, adapter_names: Optional[list[str]], num_beams: Optional[int] = None):
        """The per-call context that hands one adapter name per sample to every layer (layers.per_sample_adapters)."""
        if adapter_names is None:
            return contextlib.nullcontext()
        layers = [layer for _, layer in self.neat_layers()]
        check_mixed_batch(list(adapter_names), self.peft_config, layers, self.training)
        modules = [*layers, *(m for _, m in self._saved_modules())]
        get_encoder = getattr(self.base_model, "get_encoder", None)
        encoder = get_encoder() if callable(get_encoder) else None
        encoder_modules = [] if encoder is None or encoder is self.base_model else \
            [m for m in encoder.modules() if m in set(modules)]
        return per_sample_adapters(modules, list(adapter_names), encoder_modules, num_beams)

    def forward(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        self._check_live()
        with self._routing(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        self._check_live()
        with self._routing(adapter_names, kwargs.get("num_beams")):
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
        self._check_live()
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
        self._check_live()
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
        self._unloaded = True
        return self.base_model

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
                         dequantize: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """The base model with the adapters merged in and every NEAT layer removed (this NeatModel is then spent).

        On a quantized base, merging requantizes W0 + dW, which loses about as much as a small update holds
        (docs/quantized.md). dequantize=True instead makes every quantized layer a full-precision nn.Linear (dtype:
        default float32) holding the pristine dequantized W0 plus the adapters' dW, never requantized, and drops the
        model's quantization marks: the usual way to ship a QLoRA result.
        """
        if not dequantize:
            return self._unload(True, safe_merge, adapter_names)
        self._check_live()
        quantized = [(path, layer) for path, layer in self.neat_layers() if isinstance(layer.kind, QuantizedLinearKind)]
        merged = [(path, layer, merged_float_linear(layer, adapter_names, dtype, safe_merge))
                  for path, layer in quantized]  # computed before anything changes: a refusal leaves the model
        for path, _, linear in merged:
            _set_submodule(self.base_model, path, linear)
        try:
            model = self._unload(True, safe_merge, adapter_names)
        except Exception:
            for path, layer, _ in merged:
                _set_submodule(self.base_model, path, layer)
            raise
        return dequantize_model(model, dtype)

    def unload(self) -> nn.Module:
        """The base model as it was, without adapters (this NeatModel is then spent)."""
        return self._unload(False)

    # --- files -----------------------------------------------------------------------------------------
    def _adapter_tensors(self, adapter_name: str) -> tuple[dict[str, torch.Tensor], list[str], list[NeatLayer]]:
        """(file key -> tensor, adapted module paths, their layers) of one adapter, modules_to_save included."""
        tensors, paths, layers = {}, [], []
        for path, layer in self.neat_layers():
            if adapter_name not in layer.adapter_configs:
                continue
            for spec, param in layer.adapter_tensor_items(adapter_name):
                tensors[spec.file_key(path)] = param
            paths.append(path)
            layers.append(layer)
        for path, saved in self._saved_modules():
            if adapter_name in saved.copies:
                for pname, value in saved.copies[adapter_name].state_dict().items():
                    tensors[module_to_save_key(path, pname)] = value
        return tensors, paths, layers

    def save_pretrained(self, save_directory: Union[str, os.PathLike],
                        selected_adapters: Optional[list[str]] = None, is_main_process: Optional[bool] = None) -> None:
        """Write each adapter as peft does: 'default' in save_directory, others in save_directory/<name>.

        In a torch.distributed job only rank 0 writes (is_main_process overrides that). Under FSDP2 the sharded
        adapter tensors are gathered first, a collective: call save_pretrained on every rank.
        """
        self._check_live()
        if is_main_process is None:
            is_main_process = _is_main_process()
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"No adapter named {unknown}; adapters: {list(self.peft_config)}.")
        for name in names:
            config = self.peft_config[name]
            tensors, paths, layers = self._adapter_tensors(name)
            tensors = {key: gather_full(t, key) for key, t in tensors.items()}
            if not is_main_process:
                continue
            data = config.to_dict()
            data["target_modules"] = sorted(paths)  # the exact modules, so any loader adapts the same ones
            data["inference_mode"] = True
            peanut = computed_by_peanut(config, layers)
            if not peanut:  # a NEAT file: its keys carry NEAT's prefix, as every peft type's do
                tensors = rename_key_prefix(tensors, "peanut_", "neat_")
            data = config_to_json(data, peanut, __version__)
            quantized = quantization_signatures(zip(paths, layers))
            if quantized:  # a NEAT file (PEANuT can't run quantized bases): loads compare it, see _read_checked
                data["neat_peft"]["base_quantization"] = quantized
            directory = Path(save_directory) if name == DEFAULT_ADAPTER else Path(save_directory) / name
            write_adapter(directory, data, tensors)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike],
                        adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False,
                        allow_nonfinite: bool = False) -> "NeatModel":
        """Load an adapter saved by neat-peft or by peft's PEANuT. Errors leave `model` unchanged.

        The config and tensors are validated before anything changes (formats.read_adapter and
        validate_adapter_tensors): one save's pair, the expected keys and shapes, floating point, finite values
        (allow_nonfinite=True loads NaN/inf weights anyway).
        """
        _check_wrappable_model(model)
        config, tensors = _read_checked(model, model_id, is_trainable, allow_nonfinite)
        neat = cls(model, config, adapter_name)
        neat._load_tensors(adapter_name, tensors)
        if not is_trainable:
            neat.eval()
        return neat

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False,
                     allow_nonfinite: bool = False) -> None:
        """Load another adapter into this model (not made active). Errors leave the model unchanged."""
        self._check_live()
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; pick another name or delete it.")
        check_adapter_name(adapter_name, reserved=(BASE_ONLY,))
        config, tensors = _read_checked(self.base_model, model_id, is_trainable, allow_nonfinite)
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
        self._check_live()
        name = adapter_name or self.active_adapter
        if name not in self.peft_config:
            raise ValueError(f"No adapter named {name!r}; adapters: {list(self.peft_config)}.")
        config = self.peft_config[name]
        layers = list(self.neat_layers())
        lora, fan_in_fan_out = lora_export(layers, name)
        tensors = {f"{FILE_PREFIX}{key}": tensor for key, tensor in lora.items()}
        for path, saved in self._saved_modules():
            if name in saved.copies:
                for pname, value in saved.copies[name].state_dict().items():
                    tensors[module_to_save_key(path, pname)] = value
        paths = [path for path, layer in layers if name in layer.adapter_configs]
        write_adapter(save_directory, lora_config_json(config.to_dict(), config.r, paths, fan_in_fan_out), tensors)


def _read_checked(model: nn.Module, model_id, is_trainable: bool,
                  allow_nonfinite: bool = False) -> tuple[NeatConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory and check it fits `model` (targets, keys, shapes, dtypes, values). Changes nothing."""
    data, raw = read_adapter(model_id)
    try:
        config = NeatConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{str(Path(model_id) / 'adapter_config.json')!r}: {e}") from None
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    try:
        targets = find_targets(model, config)
        saves = find_modules_to_save(model, config.modules_to_save)
    except ValueError as e:
        raise ValueError(f"The adapter in {str(model_id)!r} does not fit this model: {e}") from None
    expected: dict[str, tuple[int, ...]] = {}
    non_float: dict[str, torch.dtype] = {}
    for path, module in targets:
        for spec in tensor_specs(module, config):
            expected[spec.file_key(path)] = spec.shape
    for path, module in saves:
        original = module.original_module if isinstance(module, ModulesToSave) else module
        for pname, value in original.state_dict().items():
            key = module_to_save_key(path, pname)
            expected[key] = tuple(value.shape)
            if not value.is_floating_point():  # e.g. a BatchNorm's num_batches_tracked
                non_float[key] = value.dtype
    tensors = validate_adapter_tensors(raw, expected, Path(model_id) / WEIGHTS_NAME, non_float, allow_nonfinite)
    saved = (data.get("neat_peft") or {}).get("base_quantization", {}) if isinstance(data.get("neat_peft"), dict) else {}
    if not (isinstance(saved, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in saved.items())):
        raise ValueError(f"{str(Path(model_id) / 'adapter_config.json')!r}: neat_peft.base_quantization must map module "
                         f"paths to strings, got {saved!r}. Save the adapter again from its model.")
    mismatch = signature_mismatch(saved, targets)
    if mismatch:
        warnings.warn(f"{str(model_id)!r}: {mismatch}", stacklevel=3)
    return config, tensors


def _check_wrappable_model(model: nn.Module) -> None:
    """Refuse, before anything changes, models that wrapping would silently break (peft warns; we raise)."""
    if isinstance(model, NeatModel):
        raise TypeError("This model is a NeatModel already: add more adapters with its add_adapter() / "
                        "load_adapter(), or wrap its base_model after unload().")
    adapted = [name for name, m in model.named_modules() if isinstance(m, NeatLayer)]
    if adapted:
        raise ValueError(
            f"This model already holds NEAT layers ({adapted[:3]}{' ...' if len(adapted) > 3 else ''}) from "
            "another NeatModel; wrapping it again would change that model too. Use the existing NeatModel's "
            "add_adapter() / load_adapter(), or call its unload() first (or wrap a fresh copy of the base model)."
        )
    lazy = [name for name, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(f"The model has uninitialized (lazy) parameters, e.g. {lazy[:3]}: run one forward pass to "
                         "initialise them before adding NEAT adapters.")


def _checkpointing_enabled(model: nn.Module) -> bool:
    # transformers >= 5 renamed is_gradient_checkpointing (which now warns) to is_activation_checkpointing.
    flag = getattr(type(model), "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(type(model), "is_gradient_checkpointing", None)
    return bool(flag.__get__(model)) if isinstance(flag, property) else False


def get_neat_model(model: nn.Module, config: NeatConfig, adapter_name: str = DEFAULT_ADAPTER) -> NeatModel:
    """Wrap `model` with a NEAT adapter; only adapter (and modules_to_save) parameters stay trainable."""
    return NeatModel(model, config, adapter_name)
