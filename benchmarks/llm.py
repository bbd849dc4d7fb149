"""NEAT vs peft LoRA vs peft PEANuT on random decoder LLMs in real Llama shapes: train-step tokens/s and peak
memory measured side by side in ONE process, bf16 and nf4 bases, and correctness checks on the same device.

    bash GPU_SCRIPT.sh                                                      # the GPU plan below, one H100/H200
    python -m benchmarks.llm --device cpu --tiny --json /tmp/llm.json       # seconds; the test suite runs it
    nice -n 0 python -m benchmarks.llm --device cpu --shapes llama-3.2-1b --precisions nf4 --methods lora neat \\
        --targets all --ranks 8 --batch 1 --seq 256 --warmup 1 --repeats 4 --rss --rss-repeats 1 --threads 2 \\
        --no-checks                                                         # docs/quantized.md

Models: transformers LlamaForCausalLM with the real hidden size, intermediate size, attention and key-value heads
and vocabulary of Llama-3.2-1B, Llama-3.2-3B and Llama-3-8B (tied embeddings for the first two), random weights
(nothing is downloaded), `--layers` blocks instead of all of them (per-shape defaults fit the GPU plan in about
4 minutes). Built in bf16 on the device; the nf4 base is the same weights saved (safetensors) and loaded through
transformers' BitsAndBytesConfig (nf4, compute dtype bf16 on CUDA, fp32 on CPU), as a QLoRA user loads one.
Adapters on q+v ("qv") or on the seven linears of each block ("all"), no dropout, rank `--ranks`:
  lora    peft LoraConfig(r, lora_alpha=r)     peanut  peft PeanutConfig(r)     neat  neat_peft NeatConfig(r)
PEANuT runs on the bf16 base only: peft 0.21.2's PEANuT builds its adapters from bitsandbytes' packed 4-bit
storage (docs/quantized.md). All methods of one group share the frozen weights (one copy in memory).
Training step = zero_grad + forward + causal-LM loss + backward + AdamW step on `--batch` x `--seq` random tokens.
Times: `--warmup` rounds, then `--repeats` rounds; in every round each method of the group runs once, the order
rotating (benchmarks/speed_measure.round_robin), CUDA synchronised around each step. tokens/s from the median
step; ratios of medians, of minima, and the spread of the per-round ratios.
Peak memory: one step after the optimizer state exists (benchmarks/quantized.step_memory): CUDA --
torch.cuda.max_memory_allocated, its peak reset before the step; CPU -- the PyTorch allocator's running total.
"total" = the step's peak on top of what was allocated + resident tensors (parameters, buffers, optimizer state,
quantized storage at its packed size). `--rss` (CPU) also runs each method's step in a fresh process and reads
the peak resident set size of that step (/proc/self/status VmHWM, reset through /proc/self/clear_refs), which
sees every allocation, BLAS's and bitsandbytes' too.
Correctness (per shape; bf16 and nf4): NEAT's layer output against y = W0 x + s B relu(W0^T A^T)^T x computed in
float64 from the layer's own W0 (dequantized for nf4), A and B (B random, so the update is large); merge then
unmerge restores every base weight bit for bit, and the merged model's outputs match the unmerged one's; the
adapter exported as a peft LoRA and loaded with peft.PeftModel gives NEAT's outputs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.machine import machine_info, versions
from benchmarks.quantized import TARGETS, load, make_step, resident_bytes, step_memory
from benchmarks.speed_measure import reference_merged_weight, round_robin, shared_clone
from neat_peft.cli.compare import load_average

ROOT = Path(__file__).resolve().parents[1]  # the children run as `python -m benchmarks.llm` from here

# Real shapes (the models' config.json); num_hidden_layers is the model's, `layers` what the GPU plan runs.
SHAPES = {
    "llama-3.2-1b": {"config": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
                     "num_hidden_layers": 16, "layers": 16},
    "llama-3.2-3b": {"config": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
                     "num_hidden_layers": 28, "layers": 8},
    "llama-3-8b": {"config": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                  num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
                   "num_hidden_layers": 32, "layers": 8},
    "tiny": {"config": dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=512, tie_word_embeddings=True), "num_hidden_layers": 2, "layers": 2},
}
GPU_SHAPES = ["llama-3-8b", "llama-3.2-3b", "llama-3.2-1b"]  # the target shape first: it is measured whatever happens
METHODS = ["lora", "peanut", "neat"]
TOKENS_TARGET = 0.98  # NEAT/LoRA tokens per second, at least
MEMORY_TARGET = 1.02  # NEAT/LoRA total peak memory, at most
PEANUT_TARGET = 1.3  # PEANuT/NEAT step time at the 8B shape, at least
PEANUT_TARGET_SHAPES = ("llama-3-8b", "tiny")  # tiny: so the CPU mode exercises the row
# Correctness tolerances, relative Frobenius errors. bf16 operands land between 1e-3 and 1e-2; a wrong formula
# (no relu, W0 instead of W0^T, a lost scaling) lands near 1.
LAYER_TOL = 2e-2
LOGITS_TOL = 5e-2  # whole model, as a share of what the adapter changes in the logits


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# --- models ------------------------------------------------------------------------------------------------
def build_base(shape: str, layers: int, device: str, seq: int):
    """A random bf16 LlamaForCausalLM in `shape`'s dimensions with `layers` blocks, frozen, on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape]["config"], num_hidden_layers=layers, max_position_embeddings=max(seq, 128))
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.requires_grad_(False).train()


def adapt(method: str, model, targets: list[str], r: int):
    if method == "neat":
        from neat_peft import NeatConfig, get_neat_model

        return get_neat_model(model, NeatConfig(r=r, target_modules=targets))
    from peft import LoraConfig, PeanutConfig, get_peft_model

    config = (LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets) if method == "lora"
              else PeanutConfig(r=r, target_modules=targets))
    return get_peft_model(model, config)


def token_batch(vocab: int, batch: int, seq: int, device: str, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


# --- one group: one base, targets and rank; every method interleaved ---------------------------------------
def bench_group(base, methods: list[str], targets: str, r: int, batch: torch.Tensor, args) -> dict:
    steps, memory = {}, {}
    for method in methods:
        model = adapt(method, shared_clone(base), TARGETS[targets], r)
        step, optimizer = make_step(model, batch)
        step_mb, total_mb = step_memory(step, model, optimizer, args.device)
        memory[method] = {"step_peak_mb": step_mb, "total_peak_mb": total_mb,
                          "resident_mb": resident_bytes(model, optimizer) / 2**20}
        steps[method] = step
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    timed = {name: (lambda fn=fn: (fn(), sync())) for name, fn in steps.items()}
    wall, cpu = round_robin(timed, args.warmup, args.repeats)
    tokens = batch.numel()
    times = {m: {"median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t), "all_ms": [1000 * x for x in t],
                 "tokens_per_s": tokens / statistics.median(t), "cpu_median_ms": 1000 * statistics.median(cpu[m])}
             for m, t in wall.items()}

    def time_ratio(num, den):  # num's step time over den's (= den's tokens/s over num's)
        per_round = [a / b for a, b in zip(wall[num], wall[den])]
        # cpu: of this process's CPU-time medians, a second opinion on a shared CPU (meaningless on CUDA)
        return {"median": statistics.median(wall[num]) / statistics.median(wall[den]),
                "min": min(wall[num]) / min(wall[den]), "per_round": [min(per_round), max(per_round)],
                "cpu": statistics.median(cpu[num]) / statistics.median(cpu[den])}

    ratios = {"lora/neat time (= NEAT/LoRA tokens/s)": time_ratio("lora", "neat"),
              "neat/lora total peak memory": memory["neat"]["total_peak_mb"] / memory["lora"]["total_peak_mb"],
              "neat/lora step peak memory": memory["neat"]["step_peak_mb"] / memory["lora"]["step_peak_mb"]}
    if "peanut" in wall:
        ratios["peanut/neat time"] = time_ratio("peanut", "neat")
        ratios["peanut/neat total peak memory"] = (memory["peanut"]["total_peak_mb"]
                                                   / memory["neat"]["total_peak_mb"])
    del steps, timed
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"targets": targets, "r": r, "tokens_per_step": tokens, "time": times, "memory": memory, "ratios": ratios}


def group_targets(shape: str, precision: str, group: dict) -> list[dict]:
    """The issue's GPU targets for one group, each PASS or MISS against its threshold."""
    ratios = group["ratios"]
    rows = [("NEAT/LoRA tokens/s", ratios["lora/neat time (= NEAT/LoRA tokens/s)"]["median"], ">=", TOKENS_TARGET),
            ("NEAT/LoRA peak memory", ratios["neat/lora total peak memory"], "<=", MEMORY_TARGET)]
    if "peanut/neat time" in ratios and shape in PEANUT_TARGET_SHAPES:
        rows.append(("PEANuT/NEAT time", ratios["peanut/neat time"]["median"], ">=", PEANUT_TARGET))
    out = []
    for name, value, op, threshold in rows:
        ok = value >= threshold if op == ">=" else value <= threshold
        out.append({"shape": shape, "precision": precision, "targets": group["targets"], "r": group["r"],
                    "target": f"{name} {op} {threshold}", "value": value, "status": "PASS" if ok else "MISS"})
    return out


# --- correctness -------------------------------------------------------------------------------------------
def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def randomize_neat_b(model, seed: int = 1) -> None:
    """B random, scaled so that |dW| = |W0| / 4 in every layer: a large update, so the checks see it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.neat_layers():
            B = layer.neat_B["default"].weight
            B.copy_(torch.randn(B.shape, generator=g).to(B))
            ref = reference_merged_weight(layer)
            W0 = layer.base_weight().double()
            B.mul_((0.25 * W0.norm() / (ref - W0).norm()).item())


def layer_checks(model, x_tokens: int, device: str) -> dict:
    """NEAT's output against the float64 formula, on the first block's q_proj and down_proj."""
    out = {}
    for name, layer in model.neat_layers():
        short = name.split(".")[-1]
        if ".layers.0." not in name or short in out:
            continue
        x = torch.randn(x_tokens, layer.d_in, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
        with torch.no_grad():
            y = layer(x)
            base = layer.base_layer(x)
        W0 = layer.base_weight().double()
        W = reference_merged_weight(layer)
        out[short] = {"output_rel_err": relative_error(y, x.double() @ W.t()),
                      "update_rel_err": relative_error(y - base, x.double() @ (W - W0).t())}
    return out


def model_checks(base, targets: list[str], r: int, device: str, seq: int) -> dict:
    """merge/unmerge exact and the exported LoRA's outputs, on the bf16 base."""
    from peft import PeftModel

    from neat_peft import NeatConfig, get_neat_model

    model = get_neat_model(shared_clone(base), NeatConfig(r=r, target_modules=targets)).eval()
    randomize_neat_b(model)
    ids = token_batch(base.config.vocab_size, 1, seq, device, seed=3)
    with torch.no_grad():
        base_logits = base.eval()(ids).logits.float()
        neat_logits = model(ids).logits.float()
        change = (neat_logits - base_logits).norm()
        pristine = {name: layer.base_weight().clone() for name, layer in model.neat_layers()}
        # float64 references for the first block only (all blocks' would take 14 GB at the 8B shape)
        references = {name: reference_merged_weight(layer) for name, layer in model.neat_layers()
                      if ".layers.0." in name}
        model.merge_adapter()
        merged_weight_err = max(relative_error(model.get_submodule(name).base_weight(), W)
                                for name, W in references.items())
        merged_logits = model(ids).logits.float()
        model.unmerge_adapter()
        unmerge_exact = all(torch.equal(layer.base_weight(), pristine[name]) for name, layer in model.neat_layers())
        with tempfile.TemporaryDirectory() as tmp:
            model.export_lora(tmp)
            lora = PeftModel.from_pretrained(shared_clone(base), tmp).eval()
            lora_logits = lora(ids).logits.float()
    base.train()
    result = {
        "layers": layer_checks(model, 64, device),
        "merged_weight_rel_err": merged_weight_err,
        "unmerge_restores_exactly": unmerge_exact,
        "adapter_change_of_logits_rel": (change / base_logits.norm()).item(),
        "merged_vs_unmerged_logits": ((merged_logits - neat_logits).norm() / change).item(),
        "exported_lora_vs_neat_logits": ((lora_logits - neat_logits).norm() / change).item(),
    }
    result["passed"] = (all(v < LAYER_TOL for c in result["layers"].values() for v in c.values())
                        and merged_weight_err < LAYER_TOL and unmerge_exact
                        and result["merged_vs_unmerged_logits"] < LOGITS_TOL
                        and result["exported_lora_vs_neat_logits"] < LOGITS_TOL)
    return result


def nf4_layer_checks(base, targets: list[str], r: int, device: str) -> dict:
    from neat_peft import NeatConfig, get_neat_model

    model = get_neat_model(shared_clone(base), NeatConfig(r=r, target_modules=targets))
    randomize_neat_b(model)
    result = {"layers": layer_checks(model, 64, device)}
    result["passed"] = all(v < LAYER_TOL for c in result["layers"].values() for v in c.values())
    return result


# --- peak RSS in a fresh process (CPU) ---------------------------------------------------------------------
def _proc_status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def rss_step_child(args) -> None:
    """In a fresh process: load, adapt, one step (optimizer state), then the peak RSS of one more step."""
    model = adapt(args.rss_child, load("nf4", args.model_dir, "cpu"),
                  TARGETS[args.targets[0]], args.ranks[0])
    step, _ = make_step(model, token_batch(model.config.vocab_size, args.batch, args.seq, "cpu"))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the step's growth shows
    before = _proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step()
    print(json.dumps({"method": args.rss_child, "rss_before_mb": before / 1024,
                      "step_peak_rss_mb": (_proc_status_kb("VmHWM") - before) / 1024,
                      "peak_rss_mb": _proc_status_kb("VmHWM") / 1024}))


def rss_steps(model_dir: Path, methods: list[str], args) -> list[dict]:
    """Each method's step peak RSS, each in its own fresh process, methods alternating."""
    rows = []
    for i in range(args.rss_repeats):
        for method in methods if i % 2 == 0 else methods[::-1]:
            cmd = [sys.executable, "-m", "benchmarks.llm", "--rss-child", method, "--model-dir", str(model_dir), "--device", "cpu",
                   "--targets", args.targets[0], "--ranks", str(args.ranks[0]),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            log(f"  rss {method}: step {rows[-1]['step_peak_rss_mb']:.0f} MB, peak {rows[-1]['peak_rss_mb']:.0f} MB")
    return rows


# --- the run -----------------------------------------------------------------------------------------------
def run(args) -> dict:
    device = args.device
    report = {"command": "python -m benchmarks.llm " + shlex.join(args.argv), "machine": machine_info(),
              "versions": versions(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "settings": {k: v for k, v in vars(args).items() if k not in ("argv", "json", "model_dir", "rss_child")},
              "shapes": [], "targets": []}
    if device == "cuda":
        import bitsandbytes
        report["versions"]["bitsandbytes"] = bitsandbytes.__version__
    start = time.perf_counter()
    for shape in args.shapes:
        layers = args.layers or SHAPES[shape]["layers"]
        entry = {"shape": shape, "config": SHAPES[shape]["config"], "layers": layers,
                 "full_layers": SHAPES[shape]["num_hidden_layers"], "groups": {}, "checks": {}}
        report["shapes"].append(entry)
        t0 = time.perf_counter()
        bf16 = build_base(shape, layers, device, args.seq)
        batch = token_batch(bf16.config.vocab_size, args.batch, args.seq, device)
        log(f"{shape}: {layers} of {entry['full_layers']} blocks, built in {time.perf_counter() - t0:.0f} s")
        with tempfile.TemporaryDirectory() as tmp:
            if "nf4" in args.precisions:
                bf16.save_pretrained(tmp)
                if "bf16" not in args.precisions:
                    bf16 = None
            for precision in args.precisions:
                base = bf16 if precision == "bf16" else load(
                    "nf4", Path(tmp), device, torch.bfloat16 if device == "cuda" else torch.float32,
                    dtype=torch.bfloat16 if device == "cuda" else torch.float32)
                if args.checks:
                    t0 = time.perf_counter()
                    entry["checks"][precision] = (model_checks(base, TARGETS["all"], 8, device, min(args.seq, 128))
                                                  if precision == "bf16" else nf4_layer_checks(base, TARGETS["all"], 8, device))
                    log(f"  {precision} checks: passed {entry['checks'][precision]['passed']} "
                        f"({time.perf_counter() - t0:.0f} s)")
                methods = [m for m in args.methods if precision == "bf16" or m != "peanut"]
                groups = entry["groups"].setdefault(precision, [])
                for targets in args.targets:
                    for r in args.ranks:
                        t0 = time.perf_counter()
                        group = bench_group(base, methods, targets, r, batch, args)
                        groups.append(group)
                        report["targets"] += group_targets(shape, precision, group)
                        log(f"  {precision} {targets} r={r} ({time.perf_counter() - t0:.0f} s): " + "  ".join(
                            f"{m} {t['tokens_per_s']:.0f} tok/s {group['memory'][m]['total_peak_mb']:.0f} MB"
                            for m, t in group["time"].items()))
                        if args.json:  # what is done survives a time limit
                            write_json(report, args.json)
                if args.rss:
                    entry["rss"] = rss_steps(Path(tmp), methods, args)
                del base
                gc.collect()
        del bf16
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    report["wall_s"] = time.perf_counter() - start
    report["machine"]["load_average_end"] = load_average()
    return report


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


def render(report: dict) -> str:
    lines = [f"command: {report['command']}", f"device: {report['device']}; versions: " + ", ".join(
        f"{k} {v}" for k, v in report["versions"].items() if v), ""]
    for entry in report["shapes"]:
        cfg = entry["config"]
        lines.append(f"== {entry['shape']}: hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
                     f"heads {cfg['num_attention_heads']}/{cfg['num_key_value_heads']}, vocab {cfg['vocab_size']}, "
                     f"{entry['layers']} of {entry['full_layers']} blocks")
        for precision, check in entry["checks"].items():
            layer = "; ".join(f"{n} out {c['output_rel_err']:.1e} update {c['update_rel_err']:.1e}"
                              for n, c in check["layers"].items())
            extra = "" if precision != "bf16" else (
                f"; merged W vs formula {check['merged_weight_rel_err']:.1e}, unmerge exact "
                f"{check['unmerge_restores_exactly']}, merged/unmerged logits {check['merged_vs_unmerged_logits']:.1e}, "
                f"exported LoRA/NEAT logits {check['exported_lora_vs_neat_logits']:.1e} (of the adapter's change)")
            lines.append(f"  checks {precision}: {'PASS' if check['passed'] else 'FAIL'} -- NEAT vs formula: {layer}{extra}")
        lines.append("  | precision | targets | r | tok/s lora / peanut / neat | NEAT/LoRA tok/s (min-based; rounds[; CPU time]) "
                     "| PEANuT/NEAT time | total peak MB lora / peanut / neat | NEAT/LoRA mem (step) |")
        for precision, groups in entry["groups"].items():
            for g in groups:
                t, m, q = g["time"], g["memory"], g["ratios"]
                tok = q["lora/neat time (= NEAT/LoRA tokens/s)"]
                pn = q.get("peanut/neat time")
                lines.append(
                    f"  | {precision} | {g['targets']} | {g['r']} | "
                    + " / ".join(f"{t[x]['tokens_per_s']:.{0 if t[x]['tokens_per_s'] >= 100 else 2}f}" if x in t else "-"
                               for x in METHODS)
                    + f" | {tok['median']:.3f} ({tok['min']:.3f}; {tok['per_round'][0]:.2f}-{tok['per_round'][1]:.2f}"
                    + (f"; cpu {tok['cpu']:.3f})" if report["device"] == "cpu" else ")")
                    + (f" | {pn['median']:.3f} ({pn['min']:.3f})" if pn else " | -")
                    + " | " + " / ".join(f"{m[x]['total_peak_mb']:.0f}" if x in m else "-" for x in METHODS)
                    + f" | {q['neat/lora total peak memory']:.3f} ({q['neat/lora step peak memory']:.3f}) |")
        for row in entry.get("rss", []):
            lines.append(f"  fresh-process step peak RSS, {row['method']}: {row['step_peak_rss_mb']:.0f} MB "
                         f"(process peak {row['peak_rss_mb']:.0f} MB)")
    lines += ["", "targets:"] + [f"  [{r['status']}] {r['shape']} {r['precision']} {r['targets']} r={r['r']}: "
                                 f"{r['target']}: {r['value']:.3f}" for r in report["targets"]]
    lines.append(f"wall time {report['wall_s']:.0f} s")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny shape, 2 x 16 tokens, 1 warm-up and 2 timed rounds: seconds on a CPU")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help=f"default {' '.join(GPU_SHAPES)}")
    parser.add_argument("--layers", type=int, help="blocks per model (default: per shape, see SHAPES)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--targets", nargs="+", default=["qv", "all"], choices=list(TARGETS))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs; a shared machine)")
    parser.add_argument("--no-checks", dest="checks", action="store_false", help="skip the correctness checks")
    parser.add_argument("--rss", action="store_true", help="CPU: also each method's step peak RSS in a fresh process")
    parser.add_argument("--rss-repeats", type=int, default=2, help="fresh processes per method with --rss")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rss-child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.tiny:
        args.shapes, args.batch, args.seq, args.warmup, args.repeats = ["tiny"], 2, 16, 1, 2
    args.shapes = args.shapes or GPU_SHAPES
    if "lora" not in args.methods or "neat" not in args.methods:
        parser.error("--methods must include lora and neat (the ratios are NEAT/LoRA)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu)")
    if args.rss and (args.device != "cpu" or args.precisions != ["nf4"]):
        parser.error("--rss measures CPU processes on the nf4 base: use it with --device cpu --precisions nf4")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(copying from a non-meta|Setting `pad_token_id`).*")
    if args.rss_child:
        rss_step_child(args)
        return 0
    report = run(args)
    print(render(report))
    if args.json:
        write_json(report, args.json)
    return 0 if all(c["passed"] for e in report["shapes"] for c in e["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
