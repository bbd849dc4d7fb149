"""Speed benchmark, measuring: the models, the timed rounds, the allocator's peak, FLOP counts, the profile.

See speed.py (the entry point) for what is measured and how; targets in speed_targets.py, pages in speed_render.py.
"""

from __future__ import annotations

import copy
import gc
import statistics
import sys
import time
from pathlib import Path

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
    """W0 + dW written out in float64: dW^T = s * relu(W0^T A^T) B^T (axis 'out', depth 0, relu); W0 as the base
    layer computes with it (dequantized on a quantized base)."""
    W0 = layer.base_weight().detach().double()
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


