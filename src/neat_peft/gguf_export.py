"""A NEAT adapter as a GGUF LoRA adapter for llama.cpp (and Ollama's ADAPTER), through the `gguf` package.

Since NEAT's update has rank <= r, it is exactly a LoRA (`NeatModel.export_lora`): per adapted nn.Linear,

    dW = lora_B @ lora_A      lora_A: r x d_in,  lora_B: d_out x r      (d_out x d_in, nn.Linear layout)

llama.cpp adds `(alpha / r) * lora_b @ (lora_a @ x)` to each matching base tensor. This module writes the file
llama.cpp's own `convert_lora_to_gguf.py` writes for a peft LoRA:

- metadata `general.architecture` (the base's, e.g. "llama"), `general.type = "adapter"`, `adapter.type = "lora"`,
  `adapter.lora.alpha` (written as r, so llama.cpp's scale alpha / r is 1: any LoRA scaling is folded into B);
- per layer, tensors `<GGUF base name>.lora_a` (r x d_in) and `.lora_b` (d_out x r), float32, with the GGUF base
  name from `gguf.get_tensor_name_map` (e.g. model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight).

llama's HF -> GGUF conversion reorders the rows of q_proj and k_proj per attention head (GGUF's RoPE rotates
adjacent pairs, HF's rotates the two halves): within each head of size 2h, GGUF row 2i + j is HF row j*h + i
(j in {0, 1}). dW's rows follow W0's, so lora_b's rows are reordered the same way; lora_a is untouched.

Only what this reproduces is accepted: llama-architecture bases (`config.model_type == "llama"`, e.g. SmolLM2,
Llama 2/3, TinyLlama) and nn.Linear adapters on modules the name map knows. Embedding and Conv2d adapters, fully
trained modules (modules_to_save), an lm_head tied to the embeddings, other architectures (whose conversion
splits, fuses or reorders tensors otherwise) are refused before anything is written, naming what is unsupported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import torch

from .formats import WEIGHTS_NAME, atomic_write, read_adapter
from .model import lora_export
from .tensors import FILE_PREFIX

if TYPE_CHECKING:
    from .model import NeatModel

SUPPORTED_MODEL_TYPES = ("llama",)  # whose HF -> GGUF conversion is the name map plus the q/k row order below
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("Writing a GGUF adapter needs the `gguf` package: pip install gguf "
                          "(or pip install 'neat-peft[llm]').") from None
    return gguf


def _config_dict(config: Any) -> dict[str, Any]:
    """The base model's config as a dict: a transformers PretrainedConfig, a dict, or a config.json (or folder)."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"Base model config {str(path)!r} does not exist; give the base model's folder (with "
                                "config.json), its config.json, or its transformers config.")
    return json.loads(path.read_text())


def llama_gguf_row_order(d_out: int, n_head: int) -> torch.Tensor:
    """Index vector `order` (length d_out) with W_gguf = W_hf[order] for llama's q_proj (n_head = attention heads)
    and k_proj (n_head = key/value heads): per head of 2h rows, GGUF row 2i + j holds HF row j*h + i."""
    if d_out % (2 * n_head):
        raise ValueError(f"{d_out} rows do not split into {n_head} heads of an even size.")
    h = d_out // n_head // 2
    return torch.arange(d_out).reshape(n_head, 2, h).transpose(1, 2).reshape(-1)


def _check_architecture(config: dict[str, Any]) -> None:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"GGUF export supports llama-architecture models (model_type {list(SUPPORTED_MODEL_TYPES)}); this base "
            f"model is {model_type!r} ({config.get('architectures')}), whose HF -> GGUF conversion this exporter does "
            "not reproduce. Nothing was written. Use the peft LoRA (export_lora) or merge the adapter "
            "(merge_and_unload) and convert the merged model with llama.cpp's convert_hf_to_gguf.py.")
    for key in ("num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"The base model config has no integer {key!r}; give the model's own config.json.")


def gguf_lora_tensors(lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]], config: Any,
                      ) -> tuple[dict[str, torch.Tensor], int, str]:
    """GGUF adapter tensors from LoRA factors, checked; returns ({GGUF name: float32 tensor}, r, GGUF architecture).

    Args:
        lora: module path in the base model (e.g. "model.layers.0.self_attn.q_proj") -> (lora_A (r x d_in),
            lora_B (d_out x r)) with dW = lora_B @ lora_A (any scaling already in lora_B).
        config: the base model's config (see `export_gguf_lora`).
    """
    gguf = _import_gguf()
    config = _config_dict(config)
    _check_architecture(config)
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[config["model_type"]]
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_kv_head = config.get("num_key_value_heads") or n_head
    tied = config.get("tie_word_embeddings", False)
    if not lora:
        raise ValueError("The adapter has no LoRA tensors to write.")
    ranks = {int(a.shape[0]) for a, _ in lora.values()}
    if len(ranks) > 1:  # one alpha per file: llama.cpp's scale alpha / r is 1 only if every r is the same
        raise ValueError(f"The adapter's layers have different ranks {sorted(ranks)}; a GGUF LoRA file has one alpha, "
                         "so this exporter needs one rank.")
    unmapped = sorted(p for p in lora if name_map.get_name(p) is None)
    if tied and "lm_head" in lora:
        unmapped.append("lm_head (tied to the embeddings: the GGUF base has no separate output tensor)")
    if unmapped:
        raise ValueError(f"No GGUF tensor for the adapted modules {unmapped} in gguf's {config['model_type']!r} name "
                         "map; GGUF export supports adapters on the model's linear layers only. Nothing was written.")
    out = {}
    for path, (lora_A, lora_B) in lora.items():
        lora_A, lora_B = lora_A.detach().float().cpu(), lora_B.detach().float().cpu()
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
            raise ValueError(f"{path}: lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} are not the "
                             "factors of one linear layer's update.")
        if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
            raise ValueError(f"{path}: the adapter has non-finite values; nothing was written.")
        base = name_map.get_name(path) + ".weight"
        if path.endswith(".q_proj"):
            lora_B = lora_B[llama_gguf_row_order(lora_B.shape[0], n_head)]
        elif path.endswith(".k_proj"):
            lora_B = lora_B[llama_gguf_row_order(lora_B.shape[0], n_kv_head)]
        out[base + ".lora_a"], out[base + ".lora_b"] = lora_A.contiguous(), lora_B.contiguous()
    return out, ranks.pop(), gguf.MODEL_ARCH_NAMES[arch]


def _split_lora_keys(tensors: Mapping[str, torch.Tensor], where: str
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'<module path>.lora_A.weight': ..., '.lora_B.weight': ...} as {module path: (lora_A, lora_B)}; any other
    tensor (embedding or Conv2d LoRA, modules_to_save) is refused, naming a few."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in tensors.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or value.dim() != 2:
            other.append(key)
            continue
        factors.setdefault(key[:-len(suffix)], {})[suffix.split(".")[1]] = value
    if other:
        raise ValueError(f"GGUF LoRA adapters hold linear-layer updates only; {where} also has {len(other)} other "
                         f"tensors (embedding or Conv2d LoRA, modules_to_save), e.g. {sorted(other)[:3]}. Nothing "
                         "was written. Merge the adapter instead (merge_and_unload) and convert the merged model "
                         "with llama.cpp's convert_hf_to_gguf.py.")
    incomplete = sorted(p for p, f in factors.items() if set(f) != {"lora_A", "lora_B"})
    if incomplete:
        raise ValueError(f"{where} lacks lora_A or lora_B for {incomplete[:3]}.")
    return {p: (f["lora_A"], f["lora_B"]) for p, f in factors.items()}


def _lora_from_model(model: "NeatModel", adapter_name: Optional[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ValueError(f"No adapter named {name!r}; adapters: {list(model.peft_config)}.")
    other = [f"{path} ({layer.kind.name})" for path, layer in model.neat_layers()
             if name in layer.adapter_configs and layer.kind.name != "linear"]
    other += [f"{path} (modules_to_save)" for path, saved in model._saved_modules() if name in saved.copies]
    if other:
        raise ValueError(f"GGUF LoRA adapters hold linear-layer updates only; adapter {name!r} also adapts {other}. "
                         "Nothing was written. Merge the adapter instead (merge_and_unload) and convert the merged "
                         "model with llama.cpp's convert_hf_to_gguf.py.")
    tensors, _ = lora_export(list(model.neat_layers()), name)
    return _split_lora_keys(tensors, f"adapter {name!r}")


def _lora_from_dir(directory: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """A peft LoRA directory (export_lora's, or peft's own) as ({module path: (lora_A, scaling * lora_B)}, its
    config)."""
    data, tensors = read_adapter(directory, readable_types=("LORA",))
    where = repr(str(directory / WEIGHTS_NAME))
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern") if data.get(k)]
    if unsupported:
        raise ValueError(f"{where}: its config sets {unsupported}, which GGUF LoRA adapters cannot express.")
    r, alpha = data["r"], data["lora_alpha"]
    scaling = alpha / r ** 0.5 if data.get("use_rslora") else alpha / r
    outside = sorted(k for k in tensors if not k.startswith(FILE_PREFIX))
    if outside:
        raise ValueError(f"{where} has tensors outside {FILE_PREFIX!r}, e.g. {outside[:3]}: not a peft LoRA file.")
    lora = _split_lora_keys({k[len(FILE_PREFIX):]: v for k, v in tensors.items()}, where)
    return {p: (a, scaling * b.float()) for p, (a, b) in lora.items()}, data


def export_gguf_lora(source: Union["NeatModel", str, os.PathLike], out_file: Union[str, os.PathLike],
                     config: Any = None, adapter_name: Optional[str] = None) -> Path:
    """Write a GGUF LoRA adapter (llama.cpp `--lora`, Ollama `ADAPTER`) computing exactly the NEAT update.

    Args:
        source: a NeatModel (its adapter `adapter_name`, default the active one) or a directory written by
            `NeatModel.export_lora` / `neat-peft export-lora` (a peft LoRA adapter).
        out_file: the .gguf file to write; refused if it exists and is not empty.
        config: the base model's config: a transformers config, a dict, a config.json or the model's folder.
            Default: the NeatModel's `config`; for a directory, `base_model_name_or_path` of its
            adapter_config.json when that is a local folder.

    Everything is checked before the file is written (atomically: a temporary file renamed into place).
    Returns the path written.
    """
    gguf = _import_gguf()
    out_file = Path(out_file)
    if out_file.exists() and (out_file.is_dir() or out_file.stat().st_size > 0):
        raise FileExistsError(f"{str(out_file)!r} already exists and is not empty. Nothing was written. Give a new "
                              "file name for the GGUF adapter.")
    if not out_file.parent.is_dir():
        raise FileNotFoundError(f"The folder of {str(out_file)!r} does not exist.")
    if isinstance(source, (str, os.PathLike)):
        directory = Path(source)
        lora, data = _lora_from_dir(directory)
        if config is None:
            base = data.get("base_model_name_or_path")
            if not base or not (Path(base) / "config.json").is_file():
                raise ValueError(f"Give the base model's config (config=...): {str(directory)!r} names the base "
                                 f"{base!r}, which is not a local folder with config.json.")
            config = base
    else:
        lora = _lora_from_model(source, adapter_name)
        if config is None:
            config = getattr(source.base_model, "config", None)
            if config is None:
                raise ValueError("The model has no transformers `config`; pass the base model's config (config=...).")
    tensors, r, arch_name = gguf_lora_tensors(lora, config)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(r))  # scale alpha / r = 1: scaling is in lora_b
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(out_file, write)
    return out_file
