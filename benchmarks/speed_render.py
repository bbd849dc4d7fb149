"""Speed benchmark, rendering: the console summary and the Markdown page, both from the run's JSON report."""

from __future__ import annotations

from benchmarks.speed_measure import COMPARE, INFER_METHODS, RANK


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
        f"{fmt_load(mi['load_average'])}, at end {fmt_load(mi.get('load_average_end'))}",
        f"- Versions: python {mi['python']}, " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
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

