"""NEAT as a Hugging Face peft method: `get_peft_model(model, NeatConfig(...))`, TRL's `peft_config=NeatConfig(...)`.

Imported lazily by neat_peft (never by `import neat_peft` itself): where peft is importable, the first
`NeatConfig(...)` builds this module's `NeatPeftConfig` and registers NEAT, and a process that imported neat_peft
registers it right after peft is imported (neat_peft/__init__.py). `register_with_peft()` does it explicitly:

    >>> import neat_peft
    >>> NeatPeftConfig = neat_peft.register_with_peft()   # imports peft, registers peft_type "NEAT"
    >>> model = peft.get_peft_model(base, neat_peft.NeatConfig(r=8, target_modules=["query", "value"]))

after which every peft entry point knows NEAT: get_peft_model, PeftModel.from_pretrained / load_adapter /
save_pretrained, merge_and_unload, add/set/delete/disable adapter, mixed-adapter batches (adapter_names=...),
and `peft.convert_to_lora` (exact at rank r for nn.Linear / Conv1D targets; `convert_to_lora_exact` covers all four
layer types without an SVD).

How it fits peft (peft's extension points are internal, so this module is thin and guarded):
- `PeftType` is a closed enum; `register_with_peft` adds a `NEAT` member at run time, then calls peft's own
  `register_peft_method`. Both steps are undone if either fails, and nothing is patched unless the installed peft is
  in the tested range (`TESTED_PEFT`) and has every feature used here.
- `NeatPeftConfig` is a `peft.PeftConfig` and a `neat_peft.NeatConfig` at once (same fields, same validation).
- `NeatPeftLayer` is the core's `NeatLayer` (the one implementation of the math: factored forward, eval cache,
  dropout, both axes, Linear / Conv1D / Embedding / Conv2d, merging from the pristine W0) that also satisfies peft's
  `BaseTunerLayer` contract (adapter containers `neat_A`, `neat_B`, `neat_encoders`, `neat_decoders`, prefix "neat_").
- Files are the core's NEAT files (peft_type "NEAT", keys `...neat_A.weight`, `...neat_encoders.<i>.weight`), so a
  directory written through peft loads in `NeatModel.from_pretrained` and vice versa; transformers' `load_adapter`
  reads them too once the plugin is registered. Adapters the core writes as peft_type "PEANUT" load in peft's own
  PEANuT without the plugin.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ._version import __version__
from .config import PEFT_REGISTRATION, NeatConfig
from .formats import rename_key_prefix
from .layers import NeatLayer, check_mixed_batch, check_supported, per_sample_adapters
from .model import lora_export
from .quantized import prepare_model
from .targets import DEFAULT_TARGET_MODULES, is_excluded, is_target
from .tensors import CONTAINERS

TESTED_PEFT = ">=0.21,<0.22"
_TESTED_MINOR = (0, 21)
PEFT_TYPE_NAME = "NEAT"
PREFIX = "neat_"
_INSTALL_HINT = f"pip install 'peft{TESTED_PEFT}'  (or: pip install 'neat-peft[peft]')"


class IncompatiblePeftError(RuntimeError):
    """The installed peft is outside the tested range or lacks a feature the plugin needs; peft was not modified."""


try:
    import peft
except ImportError as e:
    if e.name == "peft":
        raise ImportError(f"NEAT's peft plugin needs peft, which is not installed. Install it with: {_INSTALL_HINT}") \
            from None
    raise ImportError(f"peft is installed but failed to import ({e}); NEAT's peft plugin needs a working peft.") from e

_PEFT_VERSION = getattr(peft, "__version__", "unknown")

try:
    import peft.mapping as _peft_mapping
    from peft.config import PeftConfig
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_adapters_to_merge
    from peft.utils import AuxiliaryTrainingWrapper, PeftType, register_peft_method
except ImportError as e:  # an internal that moved: refuse before defining anything that patches peft
    raise IncompatiblePeftError(
        f"NEAT's peft plugin is tested with peft{TESTED_PEFT}, but the installed peft {_PEFT_VERSION} lacks "
        f"{e.name or e}. Install a tested version: {_INSTALL_HINT}. peft was not modified."
    ) from None


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class NeatPeftConfig(PeftConfig, NeatConfig):
    """peft configuration of a NEAT adapter: every field of `neat_peft.NeatConfig` (r, depth, act_fn, scaling, axis,
    dropout, normalize_weight, target_modules, exclude_modules, layers_to_transform, layers_pattern,
    modules_to_save, init_weights) plus peft's bookkeeping fields. `neat_peft.NeatConfig(...)` builds one wherever
    peft is importable (so `isinstance(config, peft.PeftConfig)` holds for TRL and transformers); this name is kept
    for code that used it. Creating one registers NEAT with peft (see `register_with_peft`), so a NEAT config never
    exists for a peft that does not know the type.

    `normalize_weight=True` divides W0 by its root-mean-square before NEAT's network: A's gradient is
    proportional to |W0|, so layers with small weights (e.g. GPT-2's std-0.02 init) train A slowly otherwise.
    """

    neat_peft: Optional[dict] = field(
        default=None, repr=False,
        metadata={"help": "Written by neat-peft ({'version': ...}); marks files that need neat-peft to load."},
    )

    def __post_init__(self):
        register_with_peft()
        NeatConfig.__post_init__(self)  # first: its field checks name the field (peft's task_type check would not)
        PeftConfig.__post_init__(self)
        self.peft_type = PeftType[PEFT_TYPE_NAME]

    def to_dict(self) -> dict[str, Any]:
        # The core's save (NeatModel.save_pretrained) reads this dict too and adds its own marker only to NEAT-format
        # files: a PEANUT file must not carry one (plain peft would warn about the unknown key).
        data = PeftConfig.to_dict(self)
        if data.get("neat_peft") is None:
            del data["neat_peft"]
        return data

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """peft's save (PeftModel.save_pretrained): the file is peft_type "NEAT", marked as neat-peft's."""
        marked = copy.copy(self)
        marked.neat_peft = {**(self.neat_peft or {}), "version": __version__}
        PeftConfig.save_pretrained(marked, save_directory, **kwargs)


def as_peft_config(config: NeatConfig) -> "NeatPeftConfig":
    """peft's view of a core NeatConfig (the same fields): what the tuner keeps, saves and compares."""
    if isinstance(config, NeatPeftConfig):
        return config
    if not isinstance(config, NeatConfig):
        raise TypeError(f"NEAT's peft tuner needs a neat_peft.NeatConfig, got {type(config).__name__}.")
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(NeatConfig)}
    peft_config = NeatPeftConfig(**fields)
    for name in ("revision", "base_model_name_or_path"):  # peft's get_peft_model sets these on the config it got
        if getattr(config, name, None) is not None:
            setattr(peft_config, name, getattr(config, name))
    return peft_config


# ---------------------------------------------------------------------------------------------------------------
# Layer: the core's NeatLayer under peft's BaseTunerLayer contract
# ---------------------------------------------------------------------------------------------------------------
class NeatPeftLayer(NeatLayer, BaseTunerLayer):
    """A `neat_peft.NeatLayer` that peft manages. All computation is the core's; this class only maps names:

    core                          peft
    active_adapters (list)        _active_adapter / set_adapter(names, inference_mode)
    disabled                      _disable_adapters / enable_adapters(enabled)
    merge(names, safe_merge)      merge(safe_merge, adapter_names), with peft's already-merged warnings
    """

    adapter_layer_names = tuple(f"neat_{container}" for container in CONTAINERS)
    other_param_names = ("neat_dropout", "adapter_configs")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NeatPeftConfig, name: str = "?"):
        NeatLayer.__init__(self, base_layer, name)
        if isinstance(base_layer, nn.Conv2d):
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        else:  # linear layout: an embedding maps num_embeddings one-hot inputs to embedding_dim outputs
            self.in_features, self.out_features = self.d_in, self.d_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # The core reads and writes these two names; peft keeps the state under its own names.
    @property
    def active_adapters(self) -> list[str]:
        active = self._active_adapter
        return [active] if isinstance(active, str) else list(active)

    @active_adapters.setter
    def active_adapters(self, names) -> None:
        self._active_adapter = [names] if isinstance(names, str) else list(names)

    @property
    def disabled(self) -> bool:
        return self._disable_adapters

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._disable_adapters = bool(value)

    def update_layer(self, adapter_name: str, config: NeatPeftConfig) -> None:
        self.add_adapter(adapter_name, config)  # the core's: creates and initialises neat_A/B/encoders/decoders
        # peft's contract: adapter weights take the base layer's device and dtype here; peft's own
        # autocast_adapter_dtype step then upcasts fp16/bf16 adapters to fp32 (the default).
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        BaseTunerLayer.set_adapter(self, adapter_names, inference_mode=inference_mode)
        self.clear_cache()

    def delete_adapter(self, adapter_name: str) -> None:
        BaseTunerLayer.delete_adapter(self, adapter_name)  # also drops neat_dropout / adapter_configs entries
        self.clear_cache()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = check_adapters_to_merge(self, adapter_names)
        names = [n for n in names if n in self.adapter_configs]
        if not names:
            return
        try:
            NeatLayer.merge(self, names, safe_merge=safe_merge)
        except ValueError as e:
            if not safe_merge:
                raise
            # the core refused a non-finite merge and changed nothing; say it in peft's words as well
            raise ValueError(f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be "
                             f"broken. {e}") from None

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        NeatLayer.unmerge(self)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # peft's convert_to_lora SVDs get_delta_weight as a 2-D matrix and writes lora_A/lora_B.weight: right for
        # Linear-like layers only. convert_to_lora_exact handles all four kinds.
        return self.kind.dense

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if self.disable_adapters and self.merged:  # peft's rule: disabling adapters takes merged ones out
            self.unmerge()
        return NeatLayer.forward(self, x, *args, **kwargs)

    def __repr__(self) -> str:
        return "neat." + super().__repr__()


# ---------------------------------------------------------------------------------------------------------------
# Tuner
# ---------------------------------------------------------------------------------------------------------------
class NeatPeftModel(BaseTuner):
    """peft tuner that puts `NeatPeftLayer`s into a model (https://arxiv.org/abs/2410.01870)."""

    prefix: str = PREFIX
    tuner_layer_cls = NeatPeftLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def __init__(self, model, peft_config, adapter_name, **kwargs):
        # get_peft_model(model, NeatConfig(...)): peft hands the core's config over; keep peft's own class inside.
        if isinstance(peft_config, dict):
            peft_config = {name: as_peft_config(c) for name, c in peft_config.items()}
        else:
            peft_config = as_peft_config(peft_config)
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def inject_adapter(self, model, adapter_name, *args, state_dict=None, **kwargs):
        config = self.peft_config[adapter_name] = as_peft_config(self.peft_config[adapter_name])
        # peft replaces matched modules one by one and would stop half-way at an unsupported one; check all first
        # so that a bad target_modules leaves the model as it was.
        if state_dict is None and config.target_modules is not None:
            adapted = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
            for key, module in model.named_modules():
                if key and not isinstance(module, NeatPeftLayer) \
                        and not any(key.startswith(f"{name}.") for name in adapted) \
                        and self._check_target_module_exists(config, key):
                    check_supported(key, module)
        result = super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)
        prepare_model(model)  # quantized bases: see quantized.py
        return result

    def delete_adapter(self, adapter_name: str) -> None:
        was_active = adapter_name in self.active_adapters
        super().delete_adapter(adapter_name)
        if was_active and self.peft_config:
            # peft lets every layer pick its next adapter among those it holds and the model take the first layer's
            # pick (peft's LoRA alike): layers without it went on computing another adapter, and a first layer left
            # with none made PeftModel keep the deleted name (KeyError at the next forward). One pick for all: the
            # first layer's, else the first adapter left.
            self.active_adapter = self.active_adapters or [next(iter(self.peft_config))]
            for module in self.model.modules():
                if isinstance(module, NeatPeftLayer):
                    module.set_adapter(self.active_adapters)

    @staticmethod
    def _check_target_module_exists(peft_config, key):
        # The core's matcher (peft's rules, targets.py), so a config selects the same modules in both front-ends.
        targets = peft_config.target_modules
        if isinstance(targets, set):
            targets = sorted(targets)
        if is_excluded(key, peft_config):
            return _ExcludedModule()
        return is_target(key, peft_config, targets)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key=None,
                            **optional_kwargs):
        if isinstance(target, NeatPeftLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = NeatPeftLayer(target, adapter_name, peft_config, name=current_key or target_name)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Encoders/decoders are ModuleDict[adapter] -> ModuleList, so the adapter name is not second to last:
        # '...neat_encoders.<adapter>.0.weight'. peft derives loading from this same function, so it is symmetric.
        for container in ("neat_encoders", "neat_decoders"):
            marker = f".{container}.{adapter_name}."
            if marker in key:
                return key.replace(marker, f".{container}.")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # NEAT files name tensors '.neat_A.weight'; neat-peft 0.1.0 before the plugin wrote '.peanut_A.weight'.
        state_dict = rename_key_prefix(state_dict, "peanut_", "neat_")
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Mixed-adapter batches: hand `adapter_names` (one name per sample, '__base__' = no adapter) to every NEAT
        layer and modules_to_save wrapper for one forward/generate call, under the core's rules."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        layers = [m for m in self.model.modules() if isinstance(m, NeatPeftLayer)]
        known = {name for layer in layers for name in layer.adapter_configs}
        check_mixed_batch(list(adapter_names), known, layers, self.training)
        modules = [m for m in self.model.modules() if isinstance(m, (NeatPeftLayer, AuxiliaryTrainingWrapper))]
        encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        encoder_modules = [] if encoder is None or encoder is self.model else \
            [m for m in encoder.modules() if isinstance(m, (NeatPeftLayer, AuxiliaryTrainingWrapper))]
        with per_sample_adapters(modules, list(adapter_names), encoder_modules, kwargs.get("num_beams")):
            yield


# ---------------------------------------------------------------------------------------------------------------
# Exact LoRA conversion (all four layer kinds, no SVD)
# ---------------------------------------------------------------------------------------------------------------
def convert_to_lora_exact(model: nn.Module, adapter_name: str = "default"):
    """(LoraConfig, state_dict) of the LoRA that computes exactly this NEAT adapter, in the format of
    `peft.convert_to_lora`: load with `get_peft_model(base, config)` + `set_peft_model_state_dict(model, sd)`.

    NEAT's update is dW = s * up @ down^T, so lora_A = down^T, lora_B = s * up with lora_alpha = r (scaling 1)
    is the same function, for nn.Linear, Conv1D, nn.Embedding and nn.Conv2d targets.
    """
    from peft import LoraConfig

    config = getattr(model, "peft_config", {}).get(adapter_name)
    if not isinstance(config, NeatPeftConfig):
        raise ValueError(f"{type(model).__name__} has no NEAT adapter named {adapter_name!r}; adapters: "
                         f"{list(getattr(model, 'peft_config', {}))}.")
    prefix = "base_model.model."  # named as in the user's model, keyed as peft's state dicts are
    layers = [(name.removeprefix(prefix), m) for name, m in model.named_modules() if isinstance(m, NeatPeftLayer)]
    lora, fan_in_fan_out = lora_export(layers, adapter_name)
    state_dict = {f"{prefix}{key}": tensor for key, tensor in lora.items()}
    targets = {name for name, m in layers if adapter_name in m.adapter_configs}
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "modules_to_save") \
                and adapter_name in module.modules_to_save:
            for pname, param in module.modules_to_save[adapter_name].state_dict().items():
                state_dict[f"{name}.{pname}"] = param.detach().clone()
    lora_config = LoraConfig(
        r=config.r, lora_alpha=config.r, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
        modules_to_save=config.modules_to_save, base_model_name_or_path=config.base_model_name_or_path,
        task_type=config.task_type,
    )
    return lora_config, state_dict


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------
_LOCK = threading.Lock()


def _registered_config() -> Optional[type]:
    if PEFT_TYPE_NAME not in PeftType.__members__:
        return None
    return _peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType[PEFT_TYPE_NAME])


def is_registered() -> bool:
    """True once this plugin's NEAT type is registered with peft in this process."""
    return _registered_config() is NeatPeftConfig


def _version_problem() -> Optional[str]:
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(_PEFT_VERSION).release
    except InvalidVersion:
        return f"peft reports an unparsable version {_PEFT_VERSION!r}"
    if tuple(release[:2]) != _TESTED_MINOR:  # a dev build of 0.22 sorts below 0.22: compare the release numbers
        return f"peft {_PEFT_VERSION} is installed"
    return None


def _feature_problems() -> list[str]:
    """Everything registration and the classes above rely on, checked before anything is changed."""
    missing = [f"PeftType.{name}" for name in ("_member_map_", "_member_names_", "_value2member_map_")
               if not isinstance(getattr(PeftType, name, None), (dict, list))]
    if not issubclass(PeftType, str):
        missing.append("PeftType as a str enum")
    params = inspect.signature(register_peft_method).parameters
    missing += [f"register_peft_method(..., {name}=...)"
                for name in ("name", "config_cls", "model_cls", "prefix", "is_mixed_compatible") if name not in params]
    missing += [f"peft.mapping.{name}"
                for name in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")
                if not isinstance(getattr(_peft_mapping, name, None), dict)]
    for owner, names in (
        (BaseTuner, ("_create_and_replace", "_replace_module", "inject_adapter", "_remove_adapter_name_from_key",
                     "_remap_adapter_state_dict_for_load", "_get_adapter_state_dict")),
        (BaseTunerLayer, ("set_adapter", "enable_adapters", "delete_adapter", "_move_adapter_to_device_of_base_layer",
                          "supports_lora_conversion", "_disable_adapters", "_active_adapter")),
    ):
        missing += [f"{owner.__name__}.{n}" for n in names if not hasattr(owner, n)]
    if missing:
        return [f"it lacks {', '.join(missing)}"]
    problems = []
    taken = _registered_config()
    if taken is not None and taken is not NeatPeftConfig:
        problems.append(f"its peft type {PEFT_TYPE_NAME!r} is taken by {taken.__module__}.{taken.__qualname__}")
    owners = [str(getattr(t, "value", t)) for t, p in _peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items()
              if p == PREFIX and str(getattr(t, "value", t)) != PEFT_TYPE_NAME]
    if owners:
        problems.append(f"the adapter prefix {PREFIX!r} is taken by {', '.join(owners)}")
    return problems


def _add_enum_member():
    """Add NEAT to peft's closed PeftType enum the way Enum itself stores members; return it (None if present)."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return None
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)  # EnumType.__setattr__ forbids new members
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    if not (PeftType(PEFT_TYPE_NAME) is member and PeftType[PEFT_TYPE_NAME] is member and member in list(PeftType)
            and member == PEFT_TYPE_NAME):
        _remove_enum_member(member)
        raise IncompatiblePeftError(
            f"Could not add {PEFT_TYPE_NAME!r} to peft's PeftType enum on this Python/peft ({_PEFT_VERSION}); "
            "peft was not modified."
        )
    return member


def _remove_enum_member(member) -> None:
    PeftType._member_map_.pop(PEFT_TYPE_NAME, None)
    if PEFT_TYPE_NAME in PeftType._member_names_:
        PeftType._member_names_.remove(PEFT_TYPE_NAME)
    PeftType._value2member_map_.pop(PEFT_TYPE_NAME, None)
    if PeftType.__dict__.get(PEFT_TYPE_NAME) is member:
        type.__delattr__(PeftType, PEFT_TYPE_NAME)


def _unregister(member) -> None:
    """Undo a registration: this plugin's entries in peft's mappings, then the enum member (if this call added it)."""
    PEFT_REGISTRATION["peft_type"] = None
    ours = (NeatPeftConfig, NeatPeftModel, PREFIX)
    for name in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING",
                 "PEFT_TYPE_TO_MIXED_MODEL_MAPPING"):
        mapping = getattr(_peft_mapping, name, None)
        if isinstance(mapping, dict) and mapping.get(PEFT_TYPE_NAME) in ours:
            del mapping[PEFT_TYPE_NAME]
    if member is not None:
        _remove_enum_member(member)


def register_with_peft(*, allow_untested_peft: bool = False) -> type[NeatPeftConfig]:
    """Register NEAT with peft as peft_type "NEAT" and return `NeatPeftConfig`. Calling it again is a no-op.

    Refuses (IncompatiblePeftError, peft untouched) on a peft outside `TESTED_PEFT` unless
    `allow_untested_peft=True`, and always when a needed peft feature is missing.
    """
    with _LOCK:
        if is_registered():
            return NeatPeftConfig
        problems = _feature_problems()
        version_problem = _version_problem()
        if version_problem and not allow_untested_peft:
            problems.insert(0, version_problem)
        if problems:
            raise IncompatiblePeftError(
                f"NEAT's peft plugin is tested with peft{TESTED_PEFT}; cannot register with this peft: "
                f"{'; '.join(problems)}. Install a tested version: {_INSTALL_HINT}"
                + (" (or call register_with_peft(allow_untested_peft=True) to try this one)"
                   if problems == [version_problem] else "")
                + ". peft was not modified."
            )
        if version_problem:
            warnings.warn(f"NEAT's peft plugin is tested with peft{TESTED_PEFT}, not {_PEFT_VERSION}; "
                          "registering anyway (allow_untested_peft=True).", stacklevel=2)
        member = _add_enum_member()
        try:
            register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=NeatPeftConfig, model_cls=NeatPeftModel,
                                 prefix=PREFIX, is_mixed_compatible=False)
        except Exception:
            _unregister(member)
            raise
        PEFT_REGISTRATION["peft_type"] = PeftType[PEFT_TYPE_NAME]  # the core's NeatConfig now answers peft
        return NeatPeftConfig


__all__ = [
    "TESTED_PEFT",
    "IncompatiblePeftError",
    "NeatPeftConfig",
    "NeatPeftLayer",
    "NeatPeftModel",
    "convert_to_lora_exact",
    "is_registered",
    "register_with_peft",
]
