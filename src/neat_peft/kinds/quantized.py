"""Quantized frozen bases: one declarative layer kind per quantization backend.

NEAT's network reads the frozen weight itself, H = act(W0^T A^T), so on a quantized layer it must read exactly
the dequantized W0 the base layer computes with -- never the packed storage or the raw integer codes. Each backend
declares its module type and the attributes holding its storage, and answers dequantize / requantize / signature:

  backend (layer type)                  storage       W0 = dequantize(...)                  requantize (merge)
  bitsandbytes Linear4bit (nf4/fp4)     weight        dequantize_4bit(weight, quant_state)  new Params4bit, same
                                                                                            settings and storage
  bitsandbytes Linear8bitLt             weight + SCB  int8_vectorwise_dequant(codes, SCB)   new Int8Params
  torchao Int8Tensor (weight-only)      weight        weight.dequantize()                   Int8Tensor.from_hp
  hqq HQQLinear                         W_q, meta     module.dequantize()                   a fresh HQQLinear
  optimum-quanto QLinear                weight        qweight.dequantize()                  float weight, freeze()

Merging dequantizes, adds dW and requantizes with the layer's own settings (the merged layer then carries the
requantization error, like peft's LoRA merge). Unmerging puts the original storage objects back (kept, never
re-quantized), so it is exact. The adapter math is the plain linear one (LinearKind.update). `recompute_weight`:
the engine computes H under non-reentrant checkpointing, so autograd keeps the packed weight for A's backward
instead of the d_out x d_in fp32 W0.

No backend is imported here: a layer is recognised by type only if its package is already loaded (a model
quantized with it has imported it).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from .dense import LinearKind


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
    """A linear layer whose frozen weight is stored quantized. A backend declares where the storage lives
    (`storage_attrs`) and answers three questions: `dequantize` (W0 as the layer computes with it), `assign_weight`
    (requantize W with the layer's own settings) and `signature`. Snapshot, restore and reading a snapshot's W0
    are the same for all: the storage objects are kept (a merge replaces them, never mutates them) and put back."""

    peanut_compatible = False  # peft's PEANuT feeds the stored (packed/integer) weight to its network
    recompute_weight = True
    storage_attrs: tuple[str, ...] = ("weight",)  # the module attributes holding the quantized storage

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

    # --- what each backend answers -------------------------------------------------------------------------
    def dequantize(self, module) -> torch.Tensor:
        """W0 (d_out x d_in) exactly as the layer's forward computes with it."""
        raise NotImplementedError

    def assign_weight(self, module, W: torch.Tensor) -> None:
        raise NotImplementedError

    def signature(self, module) -> str:
        """What determines the dequantized W0 besides the original weights (backend, type, block size, dtype)."""
        raise NotImplementedError

    # --- the same for every backend ------------------------------------------------------------------------
    def weight(self, module) -> torch.Tensor:
        return self.dequantize(module)

    def snapshot(self, module):
        return tuple(getattr(module, attr) for attr in self.storage_attrs)

    def restore(self, module, snapshot) -> None:
        for attr, value in zip(self.storage_attrs, snapshot):
            setattr(module, attr, value)

    def snapshot_weight(self, module, snapshot) -> torch.Tensor:
        current = self.snapshot(module)
        self.restore(module, snapshot)
        try:
            return self.dequantize(module)
        finally:
            self.restore(module, current)

    def lora_problem(self, module) -> Optional[str]:
        return None  # peft's LoRA wraps each of these backends and adds the exact factored update


# --- bitsandbytes ----------------------------------------------------------------------------------------------
class Bnb4bitKind(QuantizedLinearKind):
    """bitsandbytes Linear4bit: nf4 or fp4 codes in blocks of `blocksize`, absmax per block (itself quantized
    with double quant). The base forward computes with dequantize_4bit(...) cast to the compute dtype."""

    name = "bnb-4bit"
    prepares_whole_model = True  # see prepare

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
        if getattr(module.weight, "quant_state", None) is None:
            return  # not quantized yet (a layer NEAT does not adapt): nothing bitsandbytes could repack
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

    def restore(self, module, snapshot) -> None:
        super().restore(module, snapshot)  # the Params4bit object with its quant_state
        if hasattr(module, "quant_state"):
            module.quant_state = module.weight.quant_state

    def dequantize(self, module) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        weight = module.weight
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(self._compute_dtype(module, weight.quant_state))

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
        return module.weight, self._scb(module)  # the scales move into module.state at the first forward

    def restore(self, module, snapshot) -> None:
        weight, scb = snapshot
        weight.CB, weight.SCB = weight.data, scb
        module.weight = weight
        module.state.reset_grads()  # the next forward reads CB/SCB from the weight again

    def dequantize(self, module) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(module.weight.data, self._scb(module).to(module.weight.device))

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

    def dequantize(self, module) -> torch.Tensor:
        return module.weight.dequantize()

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
    storage_attrs = ("W_q", "meta")  # quantize() builds new ones; these objects stay as they are

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

    def dequantize(self, module) -> torch.Tensor:
        return module.dequantize()

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

    def dequantize(self, module) -> torch.Tensor:
        return module.qweight.dequantize()  # frozen: the stored QTensor; else the float weight quantized on the fly

    def assign_weight(self, module, W: torch.Tensor) -> None:
        old = module.weight
        frozen = isinstance(old, _backend_class("optimum.quanto", "QTensor"))
        module.weight = nn.Parameter(W.detach().to(old.device, old.dtype), requires_grad=False)
        if frozen:
            module.freeze()  # quantizes with the module's own qtype, group size and optimizer
            module.weight.requires_grad_(False)




SUPPORTED_QUANTIZATION = (
    "bitsandbytes Linear4bit (nf4/fp4, double quant) and Linear8bitLt, torchao Int8WeightOnlyConfig (Int8Tensor "
    "weights), hqq HQQLinear, optimum-quanto QLinear with float activations"
)


QUANTIZED_KINDS = [Bnb4bitKind(), Bnb8bitKind(), TorchaoInt8Kind(), HqqKind(), QuantoKind()]


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
