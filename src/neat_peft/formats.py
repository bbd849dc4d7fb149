"""Adapter files: peft's PEANuT format (read and written), NEAT's superset of it, and LoRA export.

A directory holds `adapter_config.json` and `adapter_model.safetensors`, exactly as peft writes them.
Keys are `base_model.model.<module path>.peanut_A.weight` (r x m), `.peanut_B.weight`, and
`.peanut_encoders.<i>.weight` / `.peanut_decoders.<i>.weight`; a module trained in full is stored
under its own path. An adapter peft's PEANuT computes identically (axis "out", no dropout, no
normalising, nn.Linear targets only) is written with peft_type "PEANUT" and loads in peft; any other
is written with peft_type "NEAT", which a peft without neat-peft's plugin refuses rather than
silently computing something else. As in every peft method, a type's keys carry its own prefix: NEAT
files name the same tensors `.neat_A.weight`, `.neat_B.weight`, `.neat_encoders.<i>.weight`, ...
(peft's plugin and transformers' `load_adapter` find adapter tensors by that prefix). Both namings are read.

Loads read safetensors only (never pickle); saves write to a temporary file and rename it into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import PEANUT_IMPLIED
from .tensors import CONTAINERS, FILE_PREFIX

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
READABLE_TYPES = ("PEANUT", "NEAT")


def rename_key_prefix(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """Rename the adapter containers in file keys, e.g. old='peanut_', new='neat_':
    '...q.peanut_A.weight' -> '...q.neat_A.weight'. Other keys (modules_to_save) are kept as they are."""
    renamed = {}
    for key, value in tensors.items():
        for container in CONTAINERS:
            head, sep, tail = key.rpartition(f".{old}{container}.")
            if sep:
                key = f"{head}.{new}{container}.{tail}"
                break
        renamed[key] = value
    return renamed


def module_to_save_key(path: str, param_name: str) -> str:
    return f"{FILE_PREFIX}{path}.{param_name}"


def config_to_json(config_dict: dict[str, Any], peft_compatible: bool, version: str) -> dict[str, Any]:
    data = dict(config_dict)
    if peft_compatible:
        data["peft_type"] = "PEANUT"
        for name in PEANUT_IMPLIED:  # peft would warn about fields it lacks; their values are implied
            data.pop(name, None)
    else:
        data["peft_type"] = "NEAT"
        data["neat_peft"] = {"version": version}  # the marker: which library reads this type
    return data


def atomic_write(path: Path, write) -> None:
    """Call write(tmp) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_adapter(directory: str | os.PathLike, config_json: dict[str, Any], tensors: dict[str, torch.Tensor],
                  weights_name: str = WEIGHTS_NAME) -> None:
    """Write weights then config, each atomically (a reader never sees a half-written file)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"Cannot save the adapter into {str(directory)!r}: it is a file, not a directory.")
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(directory / weights_name, lambda tmp: save_file(contiguous, tmp, metadata={"format": "pt"}))
    text = json.dumps(config_json, indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return sorted(value)
    raise TypeError(f"Cannot write {type(value).__name__} to adapter_config.json")


def read_config(directory: str | os.PathLike, readable_types: Iterable[str] = READABLE_TYPES) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {str(directory)!r} does not exist.")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: {str(directory)!r} is not an adapter directory "
                                "(it needs adapter_config.json and adapter_model.safetensors).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}).") from None
    peft_type = data.get("peft_type")
    if peft_type not in readable_types:
        hint = (" It is a LoRA adapter: load it with peft.PeftModel.from_pretrained." if peft_type == "LORA" else "")
        raise ValueError(f"{str(path)!r} describes a {peft_type!r} adapter, not NEAT/PEANuT "
                         f"(expected peft_type in {list(readable_types)}).{hint}")
    return data


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = [p.name for p in directory.glob("*.bin")]
        extra = (f" Found {pickled}: pickle files are never loaded (they can run code); re-save the adapter "
                 "with safetensors." if pickled else "")
        raise FileNotFoundError(f"{str(path)!r} is missing.{extra}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def lora_config_json(neat_config: dict[str, Any], r: int, target_names: list[str],
                     fan_in_fan_out: bool) -> dict[str, Any]:
    """A peft LoRA config whose adapter computes lora_B @ lora_A exactly (lora_alpha = r: scaling 1)."""
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted(target_names),  # full module names: peft matches exactly these
        "modules_to_save": neat_config.get("modules_to_save"),
        "task_type": neat_config.get("task_type"),
        "base_model_name_or_path": neat_config.get("base_model_name_or_path"),
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
