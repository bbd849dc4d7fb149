"""Speed and memory of NEAT against peft's LoRA and peft's PEANuT, measured side by side in ONE process.

    python benchmarks/speed.py                       # d = 384, 768, 2048 (about 10 minutes on 2 CPU cores)
    python benchmarks/speed.py --quick               # tiny sizes, a few seconds (what the tests run)
    python benchmarks/speed.py --json out.json --markdown docs/speed.md
    python benchmarks/speed.py --from-json out.json --markdown docs/speed.md   # regenerate the page only

Every method runs on the same randomly initialised BERT-shaped encoder (transformers BertModel: hidden d,
intermediate 4d, d/64 heads), the same batch and the same classification head; the frozen weights are one
set of tensors shared by all methods. Adapters: q + v ("query", "value"), r = 8, no dropout.

Training step = zero_grad + forward + cross-entropy + backward + AdamW step. Methods:
  floor   no adapter; only the head and the biases of the q and v layers train, so backward runs through
          the same layers as with q/v adapters (what any adapter must pay at least)
  lora    peft LoraConfig(r=8, lora_alpha=8)          peanut  peft PeanutConfig(r=8)
  neat    neat_peft NeatConfig(r=8)
Times: median over `repeats` rounds after `warmup` rounds; in every round each method runs once, and the
order rotates from round to round, so machine noise (a shared machine) hits all methods alike. Ratios are
ratios of the medians; the spread of the per-round ratios is printed as a noise gauge.

Peak memory (CPU): PyTorch's CPU allocator reports every allocation and free to the profiler when
`profile_memory=True`; we run one training step under it (after warm-up, grads freed, optimizer state
already allocated) and take the maximum of the allocator's running total: "step" = the peak of what the
step allocates on top of what is resident (activations, gradients, temporaries such as PEANuT's dW).
"total" adds the resident tensors (parameters, buffers, optimizer state; each storage counted once).
Allocations made by BLAS/oneDNN outside PyTorch's allocator are not seen (the same for every method).

Inference (eval, no_grad, batch 1 and 32): base model, LoRA and PEANuT unmerged, NEAT unmerged with its
eval cache of H, NEAT unmerged with the cache cleared before each call (what the cache saves), and NEAT
merged (merge_and_unload) against the base model. Before inference NEAT's B is set to random values so the
update is far from zero, and the script checks that merged weights equal W0 + dW (dW from the formula,
in float64) and that merged outputs equal the unmerged ones.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

TARGET_MODULES = ["query", "value"]
RANK = 8
TRAIN_METHODS = ["floor", "lora", "peanut", "neat"]
COMPARE = "neat_compare"  # NEAT from another copy of the package (--compare-src), e.g. before a change
_compare_package = None
INFER_METHODS = ["base", "lora", "peanut", "neat", "neat_nocache", "neat_merged"]
NOCACHE_MAX_BATCH = 1  # what the cache saves is visible at small batches only; skip that model above this

# Targets from issues 2 and 5. (name, numerator, denominator, comparison, threshold, applies to d or None = all)
TRAIN_TARGETS = [
    ("train time NEAT/LoRA", "neat", "lora", "<=", 1.03, None),
    ("PEANuT/NEAT train time", "peanut", "neat", ">=", 1.10, 768),
    ("PEANuT/NEAT train time", "peanut", "neat", ">=", 1.40, 2048),
]
MEMORY_TARGET = ("peak memory NEAT/LoRA (step)", 1.05)
INFER_TARGET = ("cached unmerged inference NEAT/LoRA, batch 1", 1.05)
MERGED_TIME_TARGET = 1.05  # merged NEAT is a plain base model: its time ratio to the base is 1 up to noise
OUTPUT_ATOL = 1e-4  # merged vs unmerged outputs (fp32, LayerNorm-scale activations)


# --- sizes -------------------------------------------------------------------------------------------------
def plan_for(d: int, args) -> dict:
    """Model and batch sizes for width d. Wide models get fewer layers and shorter inference inputs by
    default so that the whole run fits in about 10 minutes on 2 CPU cores (ratios do not depend on the
    number of identical layers)."""
    quick = args.quick
    plan = {
        "d": d,
        "layers": args.layers if args.layers else (2 if quick else 4),
        "heads": max(1, d // 64),
        "intermediate": 4 * d,
        "vocab": 1000 if quick else 30522,
        "batch": args.batch if args.batch else (2 if quick else 8),
        "seq": args.seq if args.seq else (16 if quick else 128),
        "infer_batches": [1, 4] if quick else [1, 32],
        "infer_seq": args.seq if args.seq else (16 if quick else 128),
        "reduced": [],
    }
    if d >= 1536 and not quick and not args.no_reduce:
        if not args.layers:
            plan["layers"] = 2
            plan["reduced"].append("2 layers instead of 4")
        if not args.seq:
            plan["infer_seq"] = 32
            plan["reduced"].append("inference sequence 32 instead of 128")
    return plan


# --- models ------------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """Encoder + a linear head on the first token (the head trains in every method)."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[:, 0])


def make_base(plan: dict, seed: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=plan["vocab"], hidden_size=plan["d"], num_hidden_layers=plan["layers"],
        num_attention_heads=plan["heads"], intermediate_size=plan["intermediate"],
        max_position_embeddings=max(512, plan["seq"]),
    )
    model = BertModel(config)
    model.requires_grad_(False)
    return model


def shared_clone(base: nn.Module) -> nn.Module:
    """A copy of `base` whose parameters and buffers ARE base's tensors (frozen weights stored once)."""
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


def build_train_model(method: str, base: nn.Module, head: nn.Linear, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    encoder = shared_clone(base)
    if method == "floor":
        # Train the biases of the target layers (own copies, not the shared tensors): backward then runs through
        # exactly the part of the network that q/v adapters need, at no extra matmul cost.
        for name, module in encoder.named_modules():
            if name.rsplit(".", 1)[-1] in TARGET_MODULES:
                module.bias = nn.Parameter(module.bias.detach().clone())
    elif method in ("lora", "peanut"):
        from peft import LoraConfig, PeanutConfig, get_peft_model

        config = (LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGET_MODULES)
                  if method == "lora" else PeanutConfig(r=RANK, target_modules=TARGET_MODULES))
        encoder = get_peft_model(encoder, config)
    elif method == "neat":
        from neat_peft import NeatConfig, get_neat_model

        encoder = get_neat_model(encoder, NeatConfig(r=RANK, target_modules=TARGET_MODULES))
    elif method == COMPARE:
        package = _compare_package
        encoder = package.get_neat_model(encoder, package.NeatConfig(r=RANK, target_modules=TARGET_MODULES))
    else:
        raise ValueError(f"unknown method {method!r}")
    model = Classifier(encoder, copy.deepcopy(head))
    model.train()
    return model


def load_compare_package(src_dir: Path):
    """Import the neat_peft package under `src_dir` as a second, separate package (module `neat_peft_compare`)."""
    import importlib.util

    global _compare_package
    path = Path(src_dir) / "neat_peft"
    if not (path / "__init__.py").is_file():
        raise SystemExit(f"--compare-src {src_dir}: no neat_peft/__init__.py there (give a directory like src/)")
    spec = importlib.util.spec_from_file_location("neat_peft_compare", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["neat_peft_compare"] = module
    spec.loader.exec_module(module)
    _compare_package = module
    return module


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(plan: dict, batch: int, seq: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, plan["vocab"], (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }


# --- measuring ---------------------------------------------------------------------------------------------
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, labels: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(**batch), labels)
    loss.backward()
    optimizer.step()


def round_robin(fns: dict, warmup: int, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each fn: `warmup` + `repeats` rounds, each fn once per round,
    the order rotating. (CPU time leaves out the time other processes held the cores: a second opinion on
    a busy machine.)"""
    names = list(fns)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for i in range(warmup + repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if i >= warmup:
                wall[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
    return wall, cpu


def allocator_peak_bytes(fn) -> int:
    """Peak of PyTorch's CPU allocator total while `fn` runs, counting only what `fn` allocates.

    The profiler's memory events carry the allocator's running total; blocks allocated before profiling
    started are reported with size 0 when freed, so the total is what was allocated inside `fn`.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            peak = max(peak, event.extra_fields.total_allocated)
        stack.extend(event.children)
    return int(peak)


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, buffers and optimizer state, each storage counted once."""
    tensors = [*model.parameters(), *model.buffers()]
    for state in optimizer.state.values():
        tensors += [t for t in state.values() if torch.is_tensor(t)]
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def summary(seconds: list[float], cpu_seconds: list[float]) -> dict:
    ms = [1000 * s for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "all_ms": ms,
            "cpu_median_ms": 1000 * statistics.median(cpu_seconds)}


def paired_ratios(times: dict, num: str, den: str) -> list[float]:
    # Round i of `num` and round i of `den` ran back to back: their ratio cancels slow drifts of the machine.
    return [a / b for a, b in zip(times[num], times[den])]


def ratio_entry(times: dict, cpu: dict, num: str, den: str) -> dict:
    per_round = paired_ratios(times, num, den)
    return {
        "ratio": statistics.median(times[num]) / statistics.median(times[den]),
        "per_round_min": min(per_round),
        "per_round_max": max(per_round),
        "cpu_ratio": statistics.median(cpu[num]) / statistics.median(cpu[den]),
    }


def check(value: float, op: str, threshold: float) -> str:
    ok = value <= threshold if op == "<=" else value >= threshold
    return "PASS" if ok else "MISS"


# --- the benchmark for one width ---------------------------------------------------------------------------
def bench_train(plan: dict, base: nn.Module, head: nn.Linear, args, log) -> tuple[dict, dict]:
    methods = TRAIN_METHODS + ([COMPARE] if _compare_package else [])
    models, optimizers = {}, {}
    for method in methods:
        models[method] = build_train_model(method, base, head, args.seed + 1)
        optimizers[method] = torch.optim.AdamW(trainable_parameters(models[method]), lr=1e-4)
    batch = make_batch(plan, plan["batch"], plan["seq"], args.seed + 2)
    labels = torch.randint(0, 2, (plan["batch"],), generator=torch.Generator().manual_seed(args.seed + 3))
    fns = {m: (lambda m=m: train_step(models[m], optimizers[m], batch, labels)) for m in methods}
    log(f"  training: {args.warmup} warm-up + {args.repeats} rounds x {len(fns)} methods")
    times, cpu = round_robin(fns, args.warmup, args.repeats)

    memory = {}
    for method in methods:
        optimizers[method].zero_grad(set_to_none=True)
        step_bytes = allocator_peak_bytes(fns[method])
        optimizers[method].zero_grad(set_to_none=True)
        resident = resident_bytes(models[method], optimizers[method])
        memory[method] = {"step_peak_mb": step_bytes / 2**20, "resident_mb": resident / 2**20,
                          "total_peak_mb": (step_bytes + resident) / 2**20}

    result = {
        "matmul_flops": matmul_flops(plan),
        "trainable_params": {m: sum(p.numel() for p in trainable_parameters(models[m])) for m in methods},
        "time": {m: summary(times[m], cpu[m]) for m in methods},
        "memory": memory,
        "ratios": {
            "neat/lora": ratio_entry(times, cpu, "neat", "lora"),
            "peanut/neat": ratio_entry(times, cpu, "peanut", "neat"),
            "peanut/lora": ratio_entry(times, cpu, "peanut", "lora"),
            "neat/floor": ratio_entry(times, cpu, "neat", "floor"),
            "lora/floor": ratio_entry(times, cpu, "lora", "floor"),
            **({f"neat/{COMPARE}": ratio_entry(times, cpu, "neat", COMPARE)} if COMPARE in times else {}),
        },
        "memory_ratios": {
            f"{a}/{b} ({kind})": memory[a][f"{kind}_peak_mb"] / memory[b][f"{kind}_peak_mb"]
            for a, b in [("neat", "lora"), ("peanut", "neat"), ("neat", "floor"), ("lora", "floor"), ("neat", COMPARE)]
            for kind in ("step", "total") if b in memory
        },
    }
    trained = {m: models[m].encoder for m in ("lora", "peanut", "neat")}
    return result, trained


def neat_layers(model: nn.Module):
    from neat_peft import NeatLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, NeatLayer)]


def reference_merged_weight(layer) -> torch.Tensor:
    """W0 + dW written out in float64: dW^T = s * relu(W0^T A^T) B^T (axis 'out', depth 0, relu)."""
    W0 = layer.base_layer.weight.detach().double()
    A = layer.neat_A["default"].weight.detach().double()
    B = layer.neat_B["default"].weight.detach().double()
    s = layer.adapter_configs["default"].scaling
    return W0 + s * (torch.relu(W0.t() @ A.t()) @ B.t()).t()


def bench_infer(plan: dict, base: nn.Module, trained: dict, args, log) -> dict:
    neat = trained["neat"]
    with torch.no_grad():  # a clearly non-zero update, so the merge checks below mean something
        g = torch.Generator().manual_seed(args.seed + 4)
        for _, layer in neat_layers(neat):
            B = layer.neat_B["default"].weight
            B.copy_(0.02 * torch.randn(B.shape, generator=g))
    merged = copy.deepcopy(neat).merge_and_unload()
    models = {"base": base, "lora": trained["lora"], "peanut": trained["peanut"], "neat": neat,
              "neat_nocache": neat, "neat_merged": merged}
    for m in models.values():
        m.eval()

    def run(name, batch):
        model = models[name]
        if name == "neat_nocache":
            for _, layer in neat_layers(model):
                layer.clear_cache()
        with torch.no_grad():
            return model(**batch).last_hidden_state

    result = {"batches": {}}
    for batch_size in plan["infer_batches"]:
        batch = make_batch(plan, batch_size, plan["infer_seq"], args.seed + 5 + batch_size)
        methods = [m for m in INFER_METHODS if m != "neat_nocache" or batch_size <= NOCACHE_MAX_BATCH]
        fns = {m: (lambda m=m: run(m, batch)) for m in methods}
        log(f"  inference batch {batch_size}: {args.infer_warmup} warm-up + {args.repeats} rounds x {len(fns)} models")
        times, cpu = round_robin(fns, args.infer_warmup, args.repeats)
        unmerged, merged_out, base_out = run("neat", batch), run("neat_merged", batch), run("base", batch)
        pairs = [("neat", "lora"), ("peanut", "neat"), ("lora", "base"), ("neat", "base"), ("neat_merged", "base"),
                 ("neat_nocache", "neat")]
        result["batches"][str(batch_size)] = {
            "time": {m: summary(times[m], cpu[m]) for m in methods},
            "ratios": {f"{a}/{b}": ratio_entry(times, cpu, a, b) for a, b in pairs if a in times},
            "merged_vs_unmerged_max_abs_diff": (merged_out - unmerged).abs().max().item(),
            "unmerged_vs_base_max_abs_diff": (unmerged - base_out).abs().max().item(),
        }
    layers = neat_layers(neat)
    weight_diffs = [
        (merged.get_submodule(name).weight.double() - reference_merged_weight(layer)).abs().max().item()
        for name, layer in layers
    ]
    result["merge"] = {
        "merged_weight_vs_formula_max_abs_diff": max(weight_diffs),
        "merged_is_plain_base": not neat_layers(merged)
        and type(merged) is type(base) and list(merged.state_dict()) == list(base.state_dict()),
        "cache_filled": all(layer._cache for _, layer in layers),
    }
    return result


def matmul_flops(plan: dict) -> dict:
    """Matmul FLOPs of one training step per method, by counting (elementwise ops, embedding, head left out).

    Per layer with N tokens, sequence S, width d, intermediate i: frozen linears 2N(4d^2 + 2di) forward and
    the same again for the input gradient (backward must reach layer 0; no weight gradients); attention
    4NSd forward, twice that backward. Per adapted layer (q, v): LoRA and NEAT 4Nrd forward, 8Nrd backward,
    NEAT also H = act(A W0) 2d^2 r forward, 2d^2 r for A's gradient; PEANuT 2d^2 r to build dW, 2Nd^2 for
    x dW^T, 4Nd^2 backward (input gradient and dW's gradient) and 4d^2 r for A's and B's gradients.
    """
    d, r, S, i = plan["d"], RANK, plan["seq"], plan["intermediate"]
    N = plan["batch"] * S
    frozen = 2 * (2 * N * (4 * d * d + 2 * d * i)) + 3 * (4 * N * S * d)
    lora = 12 * N * r * d
    per_layer = {
        "floor": frozen,
        "lora": frozen + 2 * lora,
        "neat": frozen + 2 * (lora + 4 * d * d * r),
        "peanut": frozen + 2 * (6 * N * d * d + 6 * d * d * r),
    }
    return {m: plan["layers"] * f for m, f in per_layer.items()}


class _OneLayer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.query = nn.Linear(d, d)

    def forward(self, x):
        return self.query(x)


def profile_adapted_layer(plan: dict, seed: int, iterations: int = 5, top: int = 8) -> dict:
    """torch.profiler on one adapted d x d layer (forward + backward, N = batch x seq tokens) per method:
    the ops that take the most self CPU time, per iteration. For finding why a ratio misses its target."""
    from torch.profiler import ProfilerActivity, profile

    d = plan["d"]
    torch.manual_seed(seed)
    base = _OneLayer(d).requires_grad_(False)
    x = torch.randn(plan["batch"], plan["seq"], d, requires_grad=True)
    grad = torch.randn(plan["batch"], plan["seq"], d)
    out = {}
    for method in ("lora", "peanut", "neat"):
        model = build_train_model(method, base, nn.Linear(1, 1), seed).encoder
        step = lambda: model(x).backward(grad)  # noqa: E731
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(iterations):
                step()
        rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:top]
        out[method] = [{"op": e.key, "shapes": str(e.input_shapes), "calls_per_iter": e.count / iterations,
                        "self_ms_per_iter": e.self_cpu_time_total / 1000 / iterations} for e in rows]
        out[method + "_total_ms_per_iter"] = sum(
            e.self_cpu_time_total for e in prof.key_averages()) / 1000 / iterations
    return out


def evaluate_targets(d: int, train: dict, infer: Optional[dict], clock: str = "wall") -> list[dict]:
    """PASS/MISS per target. Time ratios are judged on `clock`: "wall" (ratio of wall-time medians) or "cpu"
    (ratio of process CPU-time medians, for a machine shared with other jobs); each row keeps both."""
    key = "ratio" if clock == "wall" else "cpu_ratio"

    def time_row(target: str, entry: dict, op: str, threshold: float, **extra) -> dict:
        return {"target": target, "value": entry[key], "status": check(entry[key], op, threshold),
                "wall_ratio": entry["ratio"], "cpu_ratio": entry["cpu_ratio"], "clock": clock, **extra}

    rows = []
    flops = train["matmul_flops"]
    for name, num, den, op, threshold, only_d in TRAIN_TARGETS:
        if only_d is None or only_d == d:
            rows.append(time_row(f"{name} {op} {threshold}", train["ratios"][f"{num}/{den}"], op, threshold,
                                 matmul_flop_ratio=flops[num] / flops[den]))
    name, threshold = MEMORY_TARGET
    value = train["memory_ratios"]["neat/lora (step)"]
    rows.append({"target": f"{name} <= {threshold}", "value": value, "status": check(value, "<=", threshold)})
    if infer is None:
        return rows
    name, threshold = INFER_TARGET
    rows.append(time_row(f"{name} <= {threshold}", infer["batches"]["1"]["ratios"]["neat/lora"], "<=", threshold))
    merge = infer["merge"]
    worst_out = max(b["merged_vs_unmerged_max_abs_diff"] for b in infer["batches"].values())
    equal = merge["merged_is_plain_base"] and worst_out <= OUTPUT_ATOL and \
        merge["merged_weight_vs_formula_max_abs_diff"] <= 1e-5
    rows.append({"target": f"merged NEAT = base model + dW (outputs within {OUTPUT_ATOL}, plain base modules)",
                 "value": worst_out, "status": "PASS" if equal else "MISS"})
    for bs, b in infer["batches"].items():
        rows.append(time_row(f"merged NEAT/base inference time, batch {bs} <= {MERGED_TIME_TARGET}",
                             b["ratios"]["neat_merged/base"], "<=", MERGED_TIME_TARGET))
    return rows


# --- reporting ---------------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import peft
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def target_notes(row: dict) -> str:
    notes = []
    if "clock" in row:
        other = "cpu" if row["clock"] == "wall" else "wall"
        notes.append(f"{row['clock']} time; {other} time {row[other + '_ratio']:.3f}")
    if "matmul_flop_ratio" in row:
        notes.append(f"matmul FLOP count predicts {row['matmul_flop_ratio']:.3f}")
    return f"  ({'; '.join(notes)})" if notes else ""


def fmt_load(load) -> str:
    return "n/a" if not load else ", ".join(f"{x:.1f}" for x in load)


def fmt_ratio(entry: dict) -> str:
    return (f"{entry['ratio']:.3f} ({entry['per_round_min']:.2f}-{entry['per_round_max']:.2f}; "
            f"cpu {entry['cpu_ratio']:.3f})")


def render_text(report: dict) -> str:
    lines = []
    if report["settings"].get("quick"):
        lines.append("quick mode: tiny sizes to check that everything runs; its PASS/MISS marks mean nothing")
    for res in report["results"]:
        p = res["plan"]
        tr, inf = res["train"], res["infer"]
        lines.append(f"\n=== d={p['d']}: {p['layers']} layers, {p['heads']} heads, train batch {p['batch']}x{p['seq']}, "
                     f"inference seq {p['infer_seq']}" + (f"  [reduced: {'; '.join(p['reduced'])}]" if p["reduced"] else ""))
        lines.append("training step        median ms   (min-max)          step peak MB   total peak MB   trainable")
        for m in tr["time"]:
            t, mem = tr["time"][m], tr["memory"][m]
            lines.append(f"  {m:<12} {t['median_ms']:>12.1f}   ({t['min_ms']:.1f}-{t['max_ms']:.1f}){'':<6}"
                         f"{mem['step_peak_mb']:>12.1f} {mem['total_peak_mb']:>15.1f} {tr['trainable_params'][m]:>11,d}")
        lines.append("  time ratios (ratio of medians; per-round range; ratio of CPU-time medians): " +
                     ", ".join(f"{k} {fmt_ratio(v)}" for k, v in tr["ratios"].items()))
        lines.append("  memory ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in tr["memory_ratios"].items()))
        for bs, b in (inf["batches"].items() if inf else []):
            lines.append(f"inference batch {bs}: " + ", ".join(
                f"{m} {t['median_ms']:.1f} ms" for m, t in b["time"].items()))
            lines.append("  ratios: " + ", ".join(f"{k} {fmt_ratio(v)}" for k, v in b["ratios"].items()))
            lines.append(f"  merged vs unmerged max |diff| {b['merged_vs_unmerged_max_abs_diff']:.2e}; "
                         f"unmerged vs base {b['unmerged_vs_base_max_abs_diff']:.2e}")
        if inf:
            mg = inf["merge"]
            lines.append(f"merge: weights vs W0+dW formula max |diff| {mg['merged_weight_vs_formula_max_abs_diff']:.2e}, "
                         f"plain base model {mg['merged_is_plain_base']}, NEAT eval cache filled {mg['cache_filled']}")
        if "layer_profile" in res:
            lp = res["layer_profile"]
            lines.append(f"profile of one adapted {p['d']}x{p['d']} layer, forward+backward, ms per iteration:")
            for method in ("lora", "peanut", "neat"):
                lines.append(f"  {method} (self CPU total {lp[method + '_total_ms_per_iter']:.2f} ms): " + "; ".join(
                    f"{row['op']} {row['shapes']} {row['self_ms_per_iter']:.2f}" for row in lp[method]))
        lines.append("targets:")
        for row in res["targets"]:
            lines.append(f"  [{row['status']}] {row['target']}: {row['value']:.4g}" + target_notes(row))
    return "\n".join(lines)


def render_markdown_inference(inf: dict) -> list[str]:
    out = []
    out.append("| inference (eval, no_grad) | " + " | ".join(INFER_METHODS) + " |")
    out.append("|---|" + "---:|" * len(INFER_METHODS))
    for bs, b in inf["batches"].items():
        out.append(f"| batch {bs}, ms | " + " | ".join(
            f"{b['time'][m]['median_ms']:.1f}" if m in b["time"] else "" for m in INFER_METHODS) + " |")
    out.append("")
    out.append("| inference ratio | " + " | ".join(f"batch {bs}" for bs in inf["batches"]) + " |")
    out.append("|---|" + "---:|" * len(inf["batches"]))
    keys = dict.fromkeys(k for b in inf["batches"].values() for k in b["ratios"])
    for key in keys:
        out.append(f"| {key} | " + " | ".join(
            fmt_ratio(b["ratios"][key]) if key in b["ratios"] else "" for b in inf["batches"].values()) + " |")
    out.append("")
    mg = inf["merge"]
    out.append(f"Merge check: merged weights vs W0 + dW (formula, float64) max |diff| "
               f"{mg['merged_weight_vs_formula_max_abs_diff']:.2e}; merged vs unmerged outputs max |diff| "
               + ", ".join(f"{b['merged_vs_unmerged_max_abs_diff']:.2e} (batch {bs})" for bs, b in inf["batches"].items())
               + f"; merged model is a plain base model: {mg['merged_is_plain_base']}; "
               f"NEAT eval cache filled: {mg['cache_filled']}.")
    out.append("")
    return out


def render_markdown(report: dict) -> str:
    mi, st = report["machine"], report["settings"]
    clock = st.get("clock", "wall")
    out = [
        "# Speed and memory: NEAT vs peft LoRA vs peft PEANuT",
        "",
        "Generated by `benchmarks/speed.py` from its JSON output (`--markdown`); every figure below was measured "
        "by the run(s) named here.",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']} (run took {report['wall_s']:.0f} s)",
        f"- Machine: {mi['cpu']}, {mi['cores']} cores, {mi['torch_threads']} torch threads, "
        f"CUDA {'yes' if mi['cuda'] else 'no'}; load average (1, 5, 15 min) at start "
        f"{fmt_load(mi['loadavg_start'])}, at end {fmt_load(mi.get('loadavg_end'))}",
        f"- Versions: python {mi['python']}, torch {mi['torch']}, peft {mi['peft']}, transformers {mi['transformers']}",
        f"- Setup: random BERT-shaped encoder (transformers BertModel), q+v adapters, r={RANK}, no dropout; a linear "
        "head on the first token; AdamW. *floor*: no adapter; only the head and the biases of the q and v layers "
        "train, so backward runs through the same layers as with q/v adapters (without the bias, backward "
        "would stop at the head; making the embedding output require grad instead would add layer 0's input "
        "gradient, which no adapter needs).",
        f"- Times: medians of {st['repeats']} rounds after {st['warmup']} warm-up rounds (inference: "
        f"{st.get('infer_warmup', st['warmup'])}); in each round every method runs once, in an order that rotates. "
        "Ratios are ratios of medians; in brackets the range of per-round ratios (a noise gauge) and, after `cpu`, "
        "the ratio of process CPU-time medians (blind to time the cores spent on other jobs; with several threads "
        f"it includes their spin-waiting). PASS/MISS on time targets uses the **{clock}-time** ratio.",
        "- Peak memory: the CPU allocator's running total during one training step, as reported to "
        "`torch.profiler` (`profile_memory=True`); *step* = allocated by the step on top of what is resident "
        "(activations, gradients, temporaries), *total* = step + parameters, buffers and optimizer state. "
        "Memory that BLAS/oneDNN allocate outside PyTorch's allocator is not seen.",
        "- *matmul FLOP count predicts*: the ratio of the matmul FLOPs of one training step (see `matmul_flops` in "
        "the script). PEANuT adds x·dWᵀ and its two gradients (6·N·d² per adapted layer) to a layer whose frozen "
        "part costs 48·N·d² plus attention, so PEANuT/NEAT cannot exceed about 1 + 12·d²/(48·d²) = 1.25 for "
        "q+v adapters on a BERT layer when compute bound, at any width.",
        "- The machine may have been shared with other jobs: compare ratios, not absolute times.",
        "",
    ]
    if st.get("compare_src"):
        label = st.get("compare_label") or "another version of neat_peft"
        out.insert(-2, f"- `{COMPARE}`: NEAT from the package under `{st['compare_src']}` ({label}), trained in "
                       "the same rounds as the others.")
    if st.get("quick"):
        out[2:2] = ["**Quick mode: tiny sizes to check that everything runs; its PASS/MISS marks mean nothing.**", ""]
    out += ["## Targets", "", "| d | target | value | status |", "|---:|---|---:|---|"]
    for res in report["results"]:
        for row in res["targets"]:
            out.append(f"| {res['plan']['d']} | {row['target']} | {row['value']:.4g} | {row['status']} |")
    out.append("")
    for res in report["results"]:
        p, tr, inf = res["plan"], res["train"], res["infer"]
        out.append(f"## d = {p['d']}")
        out.append("")
        out.append(f"{p['layers']} layers, {p['heads']} heads, intermediate {p['intermediate']}, training batch "
                   f"{p['batch']}x{p['seq']} tokens, inference sequence {p['infer_seq']}."
                   + (f" Reduced to fit the time budget: {'; '.join(p['reduced'])}." if p["reduced"] else ""))
        out.append("")
        out.append("| training step | median ms | min-max ms | step peak MB | total peak MB | trainable params |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for m in tr["time"]:
            t, mem = tr["time"][m], tr["memory"][m]
            out.append(f"| {m} | {t['median_ms']:.1f} | {t['min_ms']:.1f}-{t['max_ms']:.1f} | "
                       f"{mem['step_peak_mb']:.1f} | {mem['total_peak_mb']:.1f} | {tr['trainable_params'][m]:,d} |")
        out.append("")
        out.append("| training ratio | time | memory (step) | memory (total) |")
        out.append("|---|---:|---:|---:|")
        for key in tr["ratios"]:
            mem_step = tr["memory_ratios"].get(f"{key} (step)")
            mem_total = tr["memory_ratios"].get(f"{key} (total)")
            out.append(f"| {key} | {fmt_ratio(tr['ratios'][key])} | "
                       f"{'' if mem_step is None else f'{mem_step:.3f}'} | "
                       f"{'' if mem_total is None else f'{mem_total:.3f}'} |")
        out.append("")
        if inf:
            out += render_markdown_inference(inf)
        if "layer_profile" in res:
            lp = res["layer_profile"]
            out.append(f"torch.profiler on one adapted {p['d']}x{p['d']} layer, forward + backward on "
                       f"{p['batch']}x{p['seq']} tokens (1 layer, not the model): the costliest ops, ms per iteration.")
            out.append("")
            out.append("| method | self CPU total ms | costliest ops (input shapes: ms) |")
            out.append("|---|---:|---|")
            for method in ("lora", "peanut", "neat"):
                ops = "; ".join(f"{row['op']} {row['shapes']}: {row['self_ms_per_iter']:.2f}" for row in lp[method][:5])
                out.append(f"| {method} | {lp[method + '_total_ms_per_iter']:.2f} | {ops} |")
            out.append("")
        out.append("| target | value | status | wall-time ratio | CPU-time ratio | matmul FLOP count predicts |")
        out.append("|---|---:|---|---:|---:|---:|")
        for row in res["targets"]:
            cells = [f"{row[k]:.3f}" if k in row else "" for k in ("wall_ratio", "cpu_ratio", "matmul_flop_ratio")]
            out.append(f"| {row['target']} | {row['value']:.4g} | {row['status']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def run(args) -> dict:
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    report = {
        "command": "python benchmarks/speed.py " + shlex.join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "settings": {"clock": args.clock, "train_only": args.train_only, "compare_src": str(args.compare_src) if args.compare_src else None,
                     "compare_label": args.compare_label, "warmup": args.warmup, "infer_warmup": args.infer_warmup, "repeats": args.repeats, "seed": args.seed, "rank": RANK, "quick": args.quick,
                     "targets": TARGET_MODULES},
        "results": [],
    }
    for d in args.d:
        plan = plan_for(d, args)
        log(f"d={d}: {plan}")
        base = make_base(plan, args.seed)
        torch.manual_seed(args.seed + 6)
        head = nn.Linear(d, 2)
        train, trained = bench_train(plan, base, head, args, log)
        infer = None if args.train_only else bench_infer(plan, base, trained, args, log)
        entry = {"plan": plan, "train": train, "infer": infer, "targets": evaluate_targets(d, train, infer, args.clock)}
        if args.profile:
            log("  profiling one adapted layer")
            entry["layer_profile"] = profile_adapted_layer(plan, args.seed)
        report["results"].append(entry)
        del base, trained
        gc.collect()
    report["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["wall_s"] = time.perf_counter() - start
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (d=64,128; 2 layers; batch 2x16)")
    parser.add_argument("--d", type=int, nargs="+", help="hidden sizes (default 384 768 2048; quick: 64 128)")
    parser.add_argument("--layers", type=int, help="encoder layers (default 4; 2 for d >= 1536)")
    parser.add_argument("--batch", type=int, help="training batch size (default 8)")
    parser.add_argument("--seq", type=int, help="sequence length (default 128; inference 32 for d >= 1536)")
    parser.add_argument("--no-reduce", action="store_true", help="no size reduction for wide models")
    parser.add_argument("--warmup", type=int, default=2, help="training warm-up rounds (default 2)")
    parser.add_argument("--infer-warmup", type=int, default=1, help="inference warm-up rounds (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, at least 5 (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--profile", action="store_true",
                        help="also run torch.profiler on one adapted layer per method and list its costliest ops")
    parser.add_argument("--compare-src", type=Path,
                        help=f"also train NEAT from the neat_peft package under this directory (method {COMPARE!r}), "
                             "interleaved with the others: the effect of a change to the package, measured side by side")
    parser.add_argument("--compare-label", default="", help="what --compare-src holds, for the report")
    parser.add_argument("--train-only", action="store_true", help="skip the inference measurements")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="which time the PASS/MISS marks use: wall (default) or process CPU time (a shared "
                             "machine; use with --threads 1); both are always reported")
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--markdown", type=Path, help="write a Markdown report generated from the results here")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="do not measure: render --markdown from these JSON files (the first is the main run, "
                             "the others are appended as further runs)")
    args = parser.parse_args(argv)
    if args.d is None:
        args.d = [64, 128] if args.quick else [384, 768, 2048]
    if any(d <= 0 or d % 64 for d in args.d):
        parser.error(f"--d values must be positive multiples of 64 (heads of width 64), got {args.d}")
    if args.repeats < 5 and not args.quick:
        parser.error("--repeats must be at least 5 (medians of fewer are too noisy); --quick allows fewer")
    if args.repeats < 1 or args.warmup < 0 or args.infer_warmup < 1:
        parser.error("--repeats must be >= 1, --warmup >= 0 and --infer-warmup >= 1 (it fills NEAT's cache)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_src and not args.from_json:
        load_compare_package(args.compare_src)
    if args.from_json:
        if not args.markdown:
            raise SystemExit("--from-json needs --markdown PATH (the page to write)")
        reports = [json.loads(path.read_text()) for path in args.from_json]
    else:
        reports = [run(args)]
        print(render_text(reports[0]))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(reports[0], indent=1))
    if args.markdown:
        pages = [render_markdown(reports[0])]
        if args.from_json:
            pages[0] = pages[0].replace("- Command:", f"- Data: {', '.join(f'`{p}`' for p in args.from_json)} "
                                        "(regenerate this page with `--from-json` and these files)\n- Command:", 1)
        for i, report in enumerate(reports[1:], start=2):
            # A further run: its headings one level down, under a heading of its own.
            body = render_markdown(report).split("\n", 1)[1]
            body = "\n".join("#" + line if line.startswith("#") else line for line in body.splitlines())
            pages.append(f"## Run {i}: `{report['command']}`\n{body}")
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n\n".join(pages) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
