"""QLoRA-style NEAT: training-step time and peak memory of NEAT against peft's LoRA on the SAME quantized base,
and of NEAT on the quantized base against NEAT on the fp32 base, measured side by side in ONE process.

    nice -n 19 python -m benchmarks.quantized                      # hidden 512 and 1024, CPU (docs/quantized.md)
    python -m benchmarks.quantized --quick                         # tiny, a few seconds
    python -m benchmarks.quantized --device cuda --sizes 1024 2048 4096 --backends nf4 int8   # GPU_SCRIPT.sh

Model: a random Llama-shaped causal LM (transformers LlamaForCausalLM: hidden d, intermediate ~8d/3, d/64
heads, `--layers` blocks, a 512-token vocabulary so the float embedding and head stay small), saved once and
loaded once per method, quantized by the backend's usual path: bitsandbytes through transformers'
BitsAndBytesConfig (nf4 with fp32 compute, or LLM.int8), torchao Int8WeightOnlyConfig through TorchAoConfig,
quanto int8 through QuantoConfig, hqq 4-bit (group 64) by replacing the blocks' nn.Linear with HQQLinear.
Adapters, r = 8, no dropout, on q+v ("qv") or on all seven linears of each block ("all"):
  lora   peft LoraConfig(r=8, lora_alpha=8)      neat   neat_peft NeatConfig(r=8)
Training step = zero_grad + forward + causal-LM loss + backward + AdamW step, batch `--batch` x `--seq`.
Tokens per step default to 4 x 256: NEAT's extra work per adapted layer and step is fixed (dequantize W0 and
the r x d_out x d_in products of H, again in backward, where H is recomputed instead of keeping the fp32 W0),
while the base layer's cost grows with the tokens, so the time ratio falls towards 1 as batches grow.
Times: median over `--repeats` rounds after `--warmup`; in every round each method of one (size, targets)
group runs once, the order rotating, so load on the shared machine hits all alike.
Peak memory: CPU -- the PyTorch allocator's running total during one step (benchmarks/speed.py's
allocator_peak_bytes); CUDA -- torch.cuda.max_memory_allocated over the step. "step" = what the step allocates
on top of what is resident; "total" = step + resident (parameters, buffers, optimizer state; the quantized
storage counts at its packed size).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.machine import machine_info, versions
from benchmarks.speed_measure import allocator_peak_bytes, round_robin

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"qv": ["q_proj", "v_proj"], "all": ALL_LINEAR}
BACKENDS = ["nf4", "int8", "torchao-int8", "hqq4", "quanto-int8"]
RANK = 8
TIME_TARGET = 1.10  # NEAT/LoRA on the same quantized base (issue 11)
MEMORY_TARGET = 1.10


def log(*args):
    print(*args, flush=True)


def save_llama(d: int, layers: int, directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=d, intermediate_size=64 * math.ceil(8 * d / 3 / 64), num_hidden_layers=layers,
                         num_attention_heads=d // 64, num_key_value_heads=d // 64, vocab_size=512,
                         max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(directory)


def load(backend: str, directory: Path, device: str, compute_dtype: torch.dtype = torch.float32,
         dtype: torch.dtype = torch.float32):
    """The saved Llama, quantized with `backend` ('fp32': not quantized), on `device`, in train mode; the layers
    left unquantized (embeddings, norms, head) in `dtype`."""
    from transformers import LlamaForCausalLM

    kwargs = {"dtype": dtype, "device_map": device}
    if backend in ("nf4", "int8"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
            if backend == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    elif backend == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        kwargs["quantization_config"] = TorchAoConfig(Int8WeightOnlyConfig())
    elif backend == "quanto-int8":
        from transformers import QuantoConfig

        kwargs["quantization_config"] = QuantoConfig(weights="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(directory, **kwargs)
        if backend == "hqq4":
            from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

            for path, module in list(model.model.layers.named_modules()):
                if isinstance(module, torch.nn.Linear):
                    parent, _, child = path.rpartition(".")
                    setattr(model.model.layers.get_submodule(parent), child, HQQLinear(
                        module, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32,
                        device=device))
    for module in model.modules():  # bnb's CPU eval-time repacking (issue #2078): off for LoRA as for NEAT
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.train()


def _plain_tensors(value):
    """The plain tensors holding `value`'s data: tensor subclasses (torchao, quanto) are unwrapped through
    __tensor_flatten__, bitsandbytes' quant_state and hqq's meta dict are walked."""
    if isinstance(value, torch.Tensor):
        if hasattr(value, "__tensor_flatten__") and type(value).__name__ not in ("Parameter", "Tensor"):
            names, _ = value.__tensor_flatten__()
            for name in names:
                yield from _plain_tensors(getattr(value, name))
        else:
            yield value
            for attr in ("quant_state", "SCB"):  # bitsandbytes keeps scales beside the codes
                yield from _plain_tensors(getattr(value, attr, None))
    elif isinstance(value, dict):
        for v in value.values():
            yield from _plain_tensors(v)
    elif type(value).__name__ == "QuantState":
        for attr in ("absmax", "code", "offset", "state2"):
            yield from _plain_tensors(getattr(value, attr, None))


def resident_bytes(model, optimizer) -> int:
    """Bytes of parameters, buffers, quantization scales and optimizer state, each storage counted once."""
    values = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        values += [getattr(module, "meta", None), getattr(getattr(module, "state", None), "SCB", None)]
    for state in optimizer.state.values():
        values += list(state.values())
    seen, total = set(), 0
    for value in values:
        for t in _plain_tensors(value):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def adapt(method: str, model, targets: list[str]):
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, lora_dropout=0.0))
    from neat_peft import NeatConfig, get_neat_model

    return get_neat_model(model, NeatConfig(r=RANK, target_modules=targets))


def make_step(model, batch: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()

    step()  # optimizer state allocated before anything is measured
    return step, optimizer


def step_memory(step, model, optimizer, device: str) -> tuple[float, float]:
    """(step peak MB, total peak MB) of one training step."""
    resident = resident_bytes(model, optimizer)
    if device == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = allocator_peak_bytes(step)
    return peak / 2**20, (peak + resident) / 2**20


def bench_group(d: int, targets_name: str, backends: list[str], directory: Path, args) -> list[dict]:
    targets = TARGETS[targets_name]
    batch = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    steps, memory = {}, {}
    for backend in ["fp32", *backends]:
        for method in (["neat"] if backend == "fp32" else ["lora", "neat"]):
            name = f"{method}:{backend}"
            model = adapt(method, load(backend, directory, args.device, getattr(torch, args.compute_dtype)), targets)
            step, optimizer = make_step(model, batch)
            memory[name] = step_memory(step, model, optimizer, args.device)
            steps[name] = step
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    timed = {name: (lambda fn=fn: (fn(), sync())) for name, fn in steps.items()}
    wall, cpu = round_robin(timed, args.warmup, args.repeats)
    ms = {name: 1000 * statistics.median(t) for name, t in wall.items()}
    cpu_ms = {name: 1000 * statistics.median(t) for name, t in cpu.items()}
    rows = []
    for backend in backends:
        neat, lora = f"neat:{backend}", f"lora:{backend}"
        paired = [a / b for a, b in zip(wall[neat], wall[lora])]
        rows.append({
            "d": d, "targets": targets_name, "backend": backend,
            "neat_ms": ms[neat], "lora_ms": ms[lora], "time_ratio": ms[neat] / ms[lora],
            "time_ratio_spread": [min(paired), max(paired)],
            "cpu_time_ratio": cpu_ms[neat] / cpu_ms[lora],
            "neat_step_mb": memory[neat][0], "lora_step_mb": memory[lora][0],
            "neat_total_mb": memory[neat][1], "lora_total_mb": memory[lora][1],
            "step_mem_ratio": memory[neat][0] / memory[lora][0],
            "total_mem_ratio": memory[neat][1] / memory[lora][1],
            "fp32_neat_ms": ms["neat:fp32"], "fp32_neat_step_mb": memory["neat:fp32"][0],
            "fp32_neat_total_mb": memory["neat:fp32"][1],
            "vs_fp32_total_ratio": memory[neat][1] / memory["neat:fp32"][1],
        })
    del steps, timed
    gc.collect()
    return rows


def requantization_errors(d: int, backends: list[str], directory: Path, args) -> list[dict]:
    """Per backend, on layer 0's q_proj of the saved model: the error of the dequantized W0 against the float
    weights, and what merging a NEAT update into the quantized storage (requantizing W0 + dW) does to it.

    The NEAT adapter has random B scaled so that |dW| = 2% of |W0| (Frobenius), a typical fine-tuning update.
    Errors: max |.| / max |W| and Frobenius |.| / |W| for W0; for the merge, |W_merged - (W0 + dW)| / |dW|
    (the share of the update the requantized layer gets wrong; the dequantize-merge has none of it).
    """
    from transformers import LlamaForCausalLM

    from neat_peft import NeatConfig, get_neat_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).model.layers[0].self_attn.q_proj.weight
    W = W.detach().to(args.device)
    rows = []
    for backend in backends:
        torch.manual_seed(0)
        model = get_neat_model(load(backend, directory, args.device), NeatConfig(r=RANK, target_modules=["q_proj"],
                                                                                   init_weights=False))
        layer = model.base_model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            W0 = layer.base_weight().float()
            dW = layer.get_delta_weight("default").float()
            layer.neat_B["default"].weight.mul_(0.02 * W0.norm() / dW.norm())
            dW = layer.get_delta_weight("default").float()
            layer.merge()
            merged = layer.kind.weight(layer.base_layer).float()
        rows.append({"d": d, "backend": backend, "w0_max_err": ((W0 - W).abs().max() / W.abs().max()).item(),
                     "w0_fro_err": ((W0 - W).norm() / W.norm()).item(),
                     "merge_err_of_update": ((merged - (W0 + dW)).norm() / dW.norm()).item()})
    return rows


def render_errors(rows: list[dict]) -> str:
    lines = ["| d | backend | W0 error, max / max W | W0 error, Frobenius | merged-update error ‖W_merged − W0 − dW‖ / ‖dW‖ |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['d']} | {r['backend']} | {r['w0_max_err']:.4f} | {r['w0_fro_err']:.4f} | "
                     f"{r['merge_err_of_update']:.3f} |")
    return "\n".join(lines)


def verdict(value: float, threshold: float) -> str:
    return "PASS" if value <= threshold else "MISS"


def render(rows: list[dict], info: dict, command: str) -> str:
    lines = [f"command: {command}", f"machine: {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch "
             f"threads), device {info['device']}, torch {info['torch']}, transformers {info['transformers']}, peft "
             f"{info['peft']}; {info['batch']}x{info['seq']} tokens, {info['layers']} blocks, r = {RANK}, nf4 compute "
             f"{info['nf4_compute_dtype']}, recompute_weight {info['recompute_weight']}", "",
             "| d | targets | backend | NEAT ms | LoRA ms | time NEAT/LoRA | CPU time NEAT/LoRA | step MB NEAT / LoRA | step NEAT/LoRA | "
             "total MB NEAT / LoRA | total NEAT/LoRA | total MB NEAT fp32 | total NEAT q/fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['targets']} | {r['backend']} | {r['neat_ms']:.0f} | {r['lora_ms']:.0f} | "
            f"{r['time_ratio']:.3f} {verdict(r['time_ratio'], TIME_TARGET)} "
            f"({r['time_ratio_spread'][0]:.2f}-{r['time_ratio_spread'][1]:.2f}) | {r['cpu_time_ratio']:.3f} | "
            f"{r['neat_step_mb']:.1f} / {r['lora_step_mb']:.1f} | {r['step_mem_ratio']:.3f} "
            f"{verdict(r['step_mem_ratio'], MEMORY_TARGET)} | {r['neat_total_mb']:.1f} / {r['lora_total_mb']:.1f} | "
            f"{r['total_mem_ratio']:.3f} {verdict(r['total_mem_ratio'], MEMORY_TARGET)} | "
            f"{r['fp32_neat_total_mb']:.1f} | {r['vs_fp32_total_ratio']:.3f} |")
    lines.append("")
    lines.append(f"Targets (issue 11): time and peak memory NEAT/LoRA <= {TIME_TARGET} on the same quantized base "
                 "(PASS/MISS; in brackets the spread of the per-round wall-time ratios; CPU time = this process's CPU "
                 "seconds, a second opinion on a shared machine); quantized NEAT's total peak well "
                 "below fp32 NEAT's (last column).")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--targets", nargs="+", default=["qv", "all"], choices=list(TARGETS))
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="nf4's compute dtype (QLoRA uses bfloat16 on GPUs)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared, loaded machine, OpenMP threads waiting for a "
                             "descheduled sibling make every parallel op slow at random)")
    parser.add_argument("--quick", action="store_true", help="hidden 128, 1 block, 1 x 32 tokens, 2 rounds")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-recompute", action="store_true",
                        help="NEAT keeps the dequantized W0 for backward (recompute_weight off): what recomputing saves")
    parser.add_argument("--errors", action="store_true",
                        help="only measure dequantization and merge (requantization) errors per backend")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.layers, args.batch, args.seq, args.repeats = [128], 1, 1, 32, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.no_recompute:
        from neat_peft.quantized import QuantizedLinearKind

        QuantizedLinearKind.recompute_weight = False
    command = "python -m benchmarks.quantized " + " ".join(sys.argv[1:] if argv is None else argv)
    info = {**machine_info(), **versions(), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "nf4_compute_dtype": args.compute_dtype, "recompute_weight": not args.no_recompute,
            "batch": args.batch, "seq": args.seq, "layers": args.layers}
    rows = []
    if args.errors:
        for d in args.sizes:
            with tempfile.TemporaryDirectory() as tmp:
                save_llama(d, 1, Path(tmp))
                rows += requantization_errors(d, args.backends, Path(tmp), args)
        print(f"command: {command}\n\n{render_errors(rows)}")
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "command": command, "errors": rows}, indent=1))
        return
    for d in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            save_llama(d, args.layers, Path(tmp))
            for targets in args.targets:
                start = time.perf_counter()
                group = bench_group(d, targets, args.backends, Path(tmp), args)
                rows += group
                log(f"d={d} {targets}: {time.perf_counter() - start:.0f} s")
                for r in group:
                    log(f"  {r['backend']:13s} time {r['time_ratio']:.3f} (CPU {r['cpu_time_ratio']:.3f})  step mem {r['step_mem_ratio']:.3f}  "
                        f"total mem {r['total_mem_ratio']:.3f}  q/fp32 {r['vs_fp32_total_ratio']:.3f}")
    info["loadavg_end"] = list(os.getloadavg())
    print(render(rows, info, command))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "command": command, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
