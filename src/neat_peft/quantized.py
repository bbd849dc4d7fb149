"""Quantized frozen bases (the QLoRA workflow): one layer kind per quantization backend.

NEAT's network reads the frozen weight itself, H = act(W0^T A^T), so on a quantized layer it must read exactly
the dequantized W0 the base layer computes with -- never the packed storage or the raw integer codes. Each kind
below answers, for one backend:

  backend (layer type)                  W0 (d_out x d_in, linear layout)                      requantize (merge)
  bitsandbytes Linear4bit (nf4/fp4)     dequantize_4bit(weight.data, weight.quant_state)      new Params4bit, same
                                                                                              quant_type/blocksize/
                                                                                              double-quant/storage
  bitsandbytes Linear8bitLt             int8_vectorwise_dequant(codes, SCB)                   new Int8Params
  torchao Int8Tensor (weight-only)      weight.dequantize()                                   Int8Tensor.from_hp,
                                                                                              same block size/range
  hqq HQQLinear                         module.dequantize()                                   a fresh HQQLinear with
                                                                                              its quant_config
  optimum-quanto QLinear                qweight.dequantize()                                  float weight, freeze()

Merging dequantizes, adds dW and requantizes with the layer's own settings (the merged layer then carries the
requantization error, like peft's LoRA merge). Unmerging puts the original quantized storage objects back (they
are kept, never re-quantized), so it is exact.

The adapter math itself is the plain linear one (LinearKind.update): only how W0 is read and written differs.
`recompute_weight = True` on every kind: the engine computes H under non-reentrant checkpointing so that autograd
keeps the packed weight for A's backward instead of the d_out x d_in fp32 W0. `prepare_model` (called when
adapters go in) keeps bitsandbytes from repacking 4-bit weights in place on CPU; `merged_float_linear` and
`dequantize_model` give the full-precision model; `quantization_signatures` / `signature_mismatch` tell an
adapter's base quantization apart from another.

No backend is imported here: a layer is recognised by type only if its package is already loaded (a model
quantized with it has imported it).
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch
from torch import nn

from .functional import delta_weight
from .kinds import LinearKind


def _backend_class(module_name: str, class_name: str):
    """The class `module_name.class_name` if that module is already imported, else None (never imports)."""
    mod = sys.modules.get(module_name)
    return getattr(mod, class_name, None) if mod is not None else None


def _isinstance(obj, module_name: str, class_name: str) -> bool:
    cls = _backend_class(module_name, class_name)
    return cls is not None and isinstance(obj, cls)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class QuantizedLinearKind(LinearKind):
    """A linear layer whose frozen weight is stored quantized. Subclasses read and write W0 for one backend."""

    peanut_compatible = False  # peft's PEANuT feeds the stored (packed/integer) weight to its network
    recompute_weight = True

    def shape(self, module) -> tuple[int, int]:
        return module.out_features, module.in_features

    def storage(self, module) -> tuple[str, torch.Tensor]:
        """(name, plain tensor) of the packed codes: what the eval cache keys on (a merge replaces it, an unmerge
        puts the original back) and what is checked not to be a shard."""
        return "weight", module.weight

    def stored_weights(self, module, d_out: int, d_in: int) -> list[tuple[str, torch.Tensor, tuple]]:
        name, t = self.storage(module)
        return [(f"base_layer.{name}", t, tuple(t.shape))]

    def weight_dtype(self, module) -> torch.dtype:
        return self.weight(module).dtype

    def signature(self, module) -> str:
        """What determines the dequantized W0 besides the original weights (backend, type, block size, dtype)."""
        raise NotImplementedError

    def weight(self, module) -> torch.Tensor:
        return self.snapshot_weight(module, self.snapshot(module))

    def assign_weight(self, module, W: torch.Tensor) -> None:
        raise NotImplementedError

    def lora_problem(self, module) -> Optional[str]:
        return None  # peft's LoRA wraps each of these backends and adds the exact factored update


# --- bitsandbytes ----------------------------------------------------------------------------------------------
class Bnb4bitKind(QuantizedLinearKind):
    """bitsandbytes Linear4bit: nf4 or fp4 codes in blocks of `blocksize`, absmax per block (itself quantized
    with double quant). The base forward computes with dequantize_4bit(...) cast to the compute dtype."""

    name = "bnb-4bit"

    def matches(self, module) -> bool:
        return _isinstance(module, "bitsandbytes.nn", "Linear4bit")

    def check(self, path: str, module) -> None:
        weight = module.weight
        if getattr(weight, "quant_state", None) is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError(
                f"Cannot adapt {path!r} ({type(module).__name__}): its weight is not quantized yet (no quant_state). "
                "Move the model to its device first (bitsandbytes quantizes on .to(device)), or load it with "
                "transformers' BitsAndBytesConfig."
            )
        import bitsandbytes.functional as bnbf

        if getattr(weight.quant_state, "packing_format_for_cpu", False) and not hasattr(
            bnbf, "_convert_weight_packed_for_cpu_inverse"
        ):
            raise ValueError(
                f"Cannot adapt {path!r}: bitsandbytes repacked its 4-bit weight for its CPU inference kernel "
                "(an eval forward ran before NEAT wrapped it) and this bitsandbytes version cannot unpack it. "
                "Reload the model and wrap it before any eval/no-grad forward."
            )

    def prepare(self, module) -> None:
        """Keep the weight in bitsandbytes' standard layout for good.

        bitsandbytes >= 0.49 on a CPU with AVX512-BF16 repacks a Linear4bit weight *in place* at the first
        eval/no-grad forward (bnb issue #2078): afterwards dequantize_4bit reads garbage and the training kernel
        loses input gradients, so a train -> eval -> train run would silently differ from one that never
        evaluated. NEAT turns that repacking off on every Linear4bit of the model (`prepare_model`); a layer
        already repacked (an eval forward ran before wrapping) is unpacked with bitsandbytes' own inverse (its absmax was rounded to bf16
        by the repacking; W0 is then exactly what the unpacked layer computes with).
        """
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            import bitsandbytes.functional as bnbf

            if not hasattr(bnbf, "_convert_weight_packed_for_cpu_inverse"):
                return  # check() refuses such a layer as a target; one NEAT does not adapt stays as it is
            weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = weight.quant_state

    def _compute_dtype(self, module, state) -> torch.dtype:
        return module.compute_dtype if module.compute_dtype is not None else state.dtype

    def signature(self, module) -> str:
        w = module.weight
        state = w.quant_state
        return (f"bnb-{state.quant_type}(blocksize={state.blocksize}, double_quant={bool(w.compress_statistics)}, "
                f"dtype={_dtype_name(state.dtype)}, compute={_dtype_name(self._compute_dtype(module, state))})")

    def snapshot(self, module):
        return module.weight  # the Params4bit object with its quant_state; merging replaces it, never mutates it

    def restore(self, module, snapshot) -> None:
        module.weight = snapshot
        if hasattr(module, "quant_state"):
            module.quant_state = snapshot.quant_state

    def snapshot_weight(self, module, snapshot) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        W = bnbf.dequantize_4bit(snapshot.data, snapshot.quant_state)
        return W.to(self._compute_dtype(module, snapshot.quant_state))

    def assign_weight(self, module, W: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        device = old.device
        new = bnb.nn.Params4bit(
            W.detach().to("cpu", old.quant_state.dtype), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
            module=module,
        ).to(device)  # quantizes; also sets module.quant_state
        module.weight = new


class Bnb8bitKind(QuantizedLinearKind):
    """bitsandbytes Linear8bitLt (LLM.int8): int8 codes with one absmax scale (SCB) per output row.

    W0 = codes * SCB / 127. On CPU in training mode the base forward multiplies with W0 (MatMul8bitFp); in eval
    mode, and on GPUs always, it runs LLM.int8's int8 matmul, which also quantizes the activations. The adapter
    reads W0 either way.
    """

    name = "bnb-8bit"

    def matches(self, module) -> bool:
        return _isinstance(module, "bitsandbytes.nn", "Linear8bitLt")

    def check(self, path: str, module) -> None:
        if module.weight.dtype != torch.int8 or getattr(module.weight, "has_fp16_weights", False):
            raise ValueError(
                f"Cannot adapt {path!r} (Linear8bitLt): its weight is not int8-quantized (has_fp16_weights=True or "
                "not moved to its device yet). Load the model with BitsAndBytesConfig(load_in_8bit=True)."
            )
        if self._scb(module) is None:
            raise ValueError(f"Cannot adapt {path!r} (Linear8bitLt): it has no quantization scales (SCB).")

    @staticmethod
    def _scb(module):
        # A forward moves CB/SCB from the weight into module.state (init_8bit_state).
        scb = getattr(module.weight, "SCB", None)
        return scb if scb is not None else getattr(module.state, "SCB", None)

    def signature(self, module) -> str:
        return f"bnb-int8(threshold={getattr(module.state, 'threshold', 0.0)})"

    def weight_dtype(self, module) -> torch.dtype:
        return torch.float16  # Int8Params rounds to fp16 before quantizing

    def snapshot(self, module):
        return module.weight, self._scb(module)

    def restore(self, module, snapshot) -> None:
        weight, scb = snapshot
        weight.CB, weight.SCB = weight.data, scb
        module.weight = weight
        module.state.reset_grads()  # the next forward reads CB/SCB from the weight again

    def snapshot_weight(self, module, snapshot) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        weight, scb = snapshot
        return bnbf.int8_vectorwise_dequant(weight.data, scb.to(weight.device))

    def assign_weight(self, module, W: torch.Tensor) -> None:
        import bitsandbytes as bnb

        device = module.weight.device
        module.weight = bnb.nn.Int8Params(W.detach().to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
        module.state.reset_grads()


# --- torchao -----------------------------------------------------------------------------------------------------
def _torchao_int8_tensor():
    return _backend_class("torchao.quantization", "Int8Tensor")


class TorchaoInt8Kind(QuantizedLinearKind):
    """nn.Linear with a torchao Int8Tensor weight without activation quantization (Int8WeightOnlyConfig):
    int8 codes with a scale (and zero point) per block; the forward computes with weight.dequantize()."""

    name = "torchao-int8"

    def matches(self, module) -> bool:
        cls = _torchao_int8_tensor()
        return (isinstance(module, nn.Linear) and cls is not None and isinstance(module.weight, cls)
                and module.weight.act_quant_kwargs is None and module.weight.dim() == 2)

    def storage(self, module):
        return "weight.qdata", module.weight.qdata  # the Int8Tensor wrapper has no storage of its own

    def signature(self, module) -> str:
        w = module.weight
        return f"torchao-int8(block_size={list(w.block_size)}, dtype={_dtype_name(w.dtype)})"

    def snapshot(self, module):
        return module.weight

    def restore(self, module, snapshot) -> None:
        module.weight = snapshot

    def snapshot_weight(self, module, snapshot) -> torch.Tensor:
        return snapshot.dequantize()

    def assign_weight(self, module, W: torch.Tensor) -> None:
        from torchao.quantization.granularity import PerBlock
        from torchao.quantization.quant_primitives import MappingType

        old = module.weight
        asymmetric = old.zero_point is not None and bool((old.zero_point != 0).any())
        new = type(old).from_hp(
            W.detach().to(old.device, old.dtype), PerBlock(tuple(old.block_size)),
            mapping_type=MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC,
            reduce_range=bool(old.reduce_range),
        )
        module.weight = nn.Parameter(new, requires_grad=False)


# --- hqq -----------------------------------------------------------------------------------------------------------
class HqqKind(QuantizedLinearKind):
    """hqq HQQLinear (half-quadratic quantization, 1-8 bits, scale/zero per group). Not an nn.Linear: W_q holds
    the packed codes, meta the scales; dequantize() is exactly what its forward multiplies with."""

    name = "hqq"

    def matches(self, module) -> bool:
        return _isinstance(module, "hqq.core.quantize", "HQQLinear")

    def check(self, path: str, module) -> None:
        if not module.ready:
            raise ValueError(f"Cannot adapt {path!r} (HQQLinear): it is not quantized yet (ready=False).")

    def storage(self, module):
        return "W_q", module.W_q

    def signature(self, module) -> str:
        params = module.quant_config["weight_quant_params"]
        return (f"hqq(nbits={params['nbits']}, group_size={params['group_size']}, axis={params.get('axis')}, "
                f"compute={_dtype_name(module.compute_dtype)})")

    def snapshot(self, module):
        return module.W_q, module.meta  # quantize() builds new ones; these objects stay as they are

    def restore(self, module, snapshot) -> None:
        module.W_q, module.meta = snapshot

    def snapshot_weight(self, module, snapshot) -> torch.Tensor:
        current = module.W_q, module.meta
        module.W_q, module.meta = snapshot
        try:
            return module.dequantize()
        finally:
            module.W_q, module.meta = current

    def assign_weight(self, module, W: torch.Tensor) -> None:
        import copy

        from hqq.core.quantize import HQQLinear

        # Quantize into a fresh layer with this one's settings (quantize() cannot overwrite a registered W_q),
        # then take over its storage.
        config = copy.deepcopy(module.quant_config)
        fresh = HQQLinear(None, {**config, "offload_meta": module.offload_meta}, compute_dtype=module.compute_dtype,
                          device=module.device)
        fresh.quantize(W.detach().to(module.W_q.device, module.compute_dtype), **config)
        module.W_q, module.meta = fresh.W_q, fresh.meta


# --- optimum-quanto --------------------------------------------------------------------------------------------
class QuantoKind(QuantizedLinearKind):
    """optimum-quanto QLinear with quantized weights (int2/int4/int8/float8) and float activations. Frozen
    (what transformers' QuantoConfig leaves) it stores the QTensor; the forward computes with qweight."""

    name = "quanto"

    def matches(self, module) -> bool:
        return _isinstance(module, "optimum.quanto.nn", "QLinear")

    def check(self, path: str, module) -> None:
        if module.weight_qtype is None:
            raise ValueError(f"Cannot adapt {path!r} (quanto QLinear): its weights are not quantized (weights=None).")
        if module.activation_qtype is not None:
            raise ValueError(
                f"Cannot adapt {path!r} (quanto QLinear with activations={module.activation_qtype}): quantized "
                "activations are not supported. NEAT supports quanto QLinear with quantized weights and float "
                "activations (QuantoConfig(weights=...), activations=None)."
            )

    def storage(self, module):
        # A frozen QLinear's weight is a QTensor wrapping its codes (possibly packed in another wrapper).
        name, t = "weight", module.weight
        while type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            inner = t.__tensor_flatten__()[0][0]
            name, t = f"{name}.{inner}", getattr(t, inner)
        return name, t

    def signature(self, module) -> str:
        return (f"quanto({module.weight_qtype.name}, group_size={module.weight_group_size}, "
                f"dtype={_dtype_name(module.weight.dtype)})")

    def snapshot(self, module):
        return module.weight

    def restore(self, module, snapshot) -> None:
        module.weight = snapshot

    def snapshot_weight(self, module, snapshot) -> torch.Tensor:
        qtensor = _backend_class("optimum.quanto", "QTensor")
        if isinstance(snapshot, qtensor):
            return snapshot.dequantize()
        # Not frozen: the forward quantizes the float weight on the fly.
        current = module.weight
        module.weight = snapshot
        try:
            return module.qweight.dequantize()
        finally:
            module.weight = current

    def assign_weight(self, module, W: torch.Tensor) -> None:
        old = module.weight
        frozen = isinstance(old, _backend_class("optimum.quanto", "QTensor"))
        module.weight = nn.Parameter(W.detach().to(old.device, old.dtype), requires_grad=False)
        if frozen:
            module.freeze()  # quantizes with the module's own qtype, group size and optimizer
            module.weight.requires_grad_(False)


QUANTIZED_KINDS = [Bnb4bitKind(), Bnb8bitKind(), TorchaoInt8Kind(), HqqKind(), QuantoKind()]


def prepare_model(model: nn.Module) -> None:
    """Model-wide preparation, once adapters are in: bitsandbytes' CPU repacking off on EVERY Linear4bit.

    A repacked layer that NEAT does not adapt still breaks training: its repacked forward returns outputs with no
    gradient to the input, so every adapter before it would stop learning after an eval pass (Bnb4bitKind.prepare).
    """
    kind = QUANTIZED_KINDS[0]
    for module in model.modules():
        if kind.matches(module) and getattr(module.weight, "quant_state", None) is not None:
            kind.prepare(module)

SUPPORTED_QUANTIZATION = (
    "bitsandbytes Linear4bit (nf4/fp4, double quant) and Linear8bitLt, torchao Int8WeightOnlyConfig (Int8Tensor "
    "weights), hqq HQQLinear, optimum-quanto QLinear with float activations"
)


def quantized_kind(module) -> Optional[QuantizedLinearKind]:
    """The quantized kind that handles `module`, or None for a float (or unknown) layer."""
    return next((kind for kind in QUANTIZED_KINDS if kind.matches(module)), None)


def unsupported_quantization(module) -> Optional[str]:
    """Why `module` is a quantized layer NEAT cannot adapt (no kind of QUANTIZED_KINDS handles it), else None.

    Catches quantized layers that look like nn.Linear to the float kinds: torchao tensor-subclass weights other
    than weight-only Int8Tensor (e.g. Int8DynamicActivation*, whose outputs carry no gradient to the input), and
    any layer whose weight holds integer codes.
    """
    if quantized_kind(module) is not None:
        return None
    weight = getattr(module, "weight", None)
    torchao_tensor = _backend_class("torchao.utils", "TorchAOBaseTensor")
    if torchao_tensor is not None and isinstance(weight, torchao_tensor):
        detail = type(weight).__name__
        if getattr(weight, "act_quant_kwargs", None) is not None:
            detail += " with dynamic activation quantization (its outputs carry no gradient to the input)"
        return f"its weight is a torchao {detail}. NEAT supports {SUPPORTED_QUANTIZATION}."
    if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
        return (f"its weight holds {_dtype_name(weight.dtype)} codes of a quantization NEAT does not know. NEAT "
                f"supports {SUPPORTED_QUANTIZATION}.")
    return None


def quantization_signature(module) -> str:
    """A short string naming how `module`'s frozen weight is quantized ("none" for a float layer), e.g.
    "bnb-nf4(blocksize=64, double_quant=False, dtype=float32, compute=float32)"."""
    kind = quantized_kind(getattr(module, "base_layer", module))  # a NeatLayer answers for its base layer
    return "none" if kind is None else kind.signature(getattr(module, "base_layer", module))


def quantization_signatures(layers: Iterable[tuple[str, nn.Module]]) -> dict[str, str]:
    """{path: signature} of the quantized layers among (path, layer) pairs; float layers are left out.

    H = act(W0^T A^T) reads the dequantized W0, so an adapter trained on one quantization gives a different
    update on another (nf4 vs fp4 vs int8 vs float). Stored with the adapter at save time; `signature_mismatch`
    compares it at load time.
    """
    signatures = {path: quantization_signature(module) for path, module in layers}
    return {path: sig for path, sig in signatures.items() if sig != "none"}


def signature_mismatch(saved: dict[str, str], layers: Iterable[tuple[str, nn.Module]]) -> Optional[str]:
    """One warning text naming the layers whose quantization differs from `saved` (absent: "none"), else None."""
    now = {path: quantization_signature(module) for path, module in layers}
    differ = [(path, saved.get(path, "none"), sig) for path, sig in now.items() if saved.get(path, "none") != sig]
    if not differ:
        return None
    path, was, is_now = differ[0]
    return (f"{len(differ)} adapted layer(s) are quantized differently from the base the adapter was trained on, "
            f"e.g. {path!r}: trained on {was}, this base is {is_now}. NEAT's update reads the frozen weight, so the "
            "outputs will differ from the trained model's. Load the base with the quantization it was trained on.")


def float_linear(module, weight: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """A plain nn.Linear equal to the quantized `module` at full precision: y = x W^T + b.

    W (d_out x d_in) is `weight` when given -- e.g. the pristine dequantized W0 plus the merged adapters' dW,
    never requantized -- else the module's dequantized W0. dtype: the new layer's (default W's dtype). This is
    the dequantize-merge people ship a QLoRA result with (peft's merge_and_unload on a dequantized model).
    """
    kind = quantized_kind(module)
    if kind is None:
        raise ValueError(f"{type(module).__name__} is not a quantized layer NEAT knows ({SUPPORTED_QUANTIZATION}).")
    W = (kind.weight(module) if weight is None else weight).detach()
    dtype = W.dtype if dtype is None else dtype
    d_out, d_in = kind.shape(module)
    if tuple(W.shape) != (d_out, d_in):
        raise ValueError(f"weight has shape {tuple(W.shape)}, the layer is {d_out} x {d_in}.")
    bias = getattr(module, "bias", None)
    linear = nn.Linear(d_in, d_out, bias=bias is not None, device=W.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(W)
        if bias is not None:
            linear.bias.copy_(bias.detach())
    linear.requires_grad_(False)
    linear.train(module.training)
    return linear


def merged_float_linear(layer: nn.Module, adapter_names: Optional[list[str]] = None,
                        dtype: Optional[torch.dtype] = None, safe_merge: bool = False) -> nn.Linear:
    """A NeatLayer on a quantized base as one plain nn.Linear: W = W0 + sum of the adapters' dW, at full precision.

    W0 is the pristine dequantized weight (from the kept snapshot if adapters were merged into the quantized
    storage); each dW = s * up @ down^T is computed from it, and the sum is never requantized, so the result
    carries only the base's own quantization error. Adapters: the ones already merged plus `adapter_names`
    (default: the active ones). For `merge_and_unload(dequantize=True)`; see `dequantize_model` for the rest.
    safe_merge: raise (changing nothing) if W would hold NaN/inf in `dtype`.
    """
    requested = layer.active_adapters if adapter_names is None else adapter_names
    names = list(dict.fromkeys([*layer.merged_adapters, *(n for n in requested if n in layer.adapter_configs)]))
    with torch.no_grad():
        W0 = layer.pristine_weight()
        total = W0.to(torch.promote_types(W0.dtype, torch.float32))
        for name in names:
            down, up = layer.factors(name, W0)
            total = total + delta_weight(down, up, layer.adapter_configs[name].scaling).to(total.dtype)
    dtype = W0.dtype if dtype is None else dtype
    if safe_merge and not torch.isfinite(total.to(dtype)).all():
        raise ValueError(f"Merging adapter(s) {names} into {getattr(layer, 'layer_name', '?')!r} would put NaN/inf "
                         "into the weights; nothing was merged. The adapter is broken (check training for divergence).")
    return float_linear(layer.base_layer, total, dtype)


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every quantized layer NEAT knows by its `float_linear` (in place) and drop transformers'
    quantization marks, so `save_pretrained` writes a plain full-precision checkpoint. Returns the model."""
    for path, module in list(model.named_modules()):
        if path and quantized_kind(module) is not None:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, float_linear(module, dtype=dtype))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr, value in (("is_quantized", False), ("hf_quantizer", None), ("is_loaded_in_4bit", False),
                        ("is_loaded_in_8bit", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, value)
    return model
