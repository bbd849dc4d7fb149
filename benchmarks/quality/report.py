"""Tables and plot of the quality benchmark, generated from its JSON (nothing here is typed by hand).

    python benchmarks/quality/report.py benchmarks/quality/results/quality.json [--out DIR]

writes DIR/quality.md (mean ± sample std over seeds, per task) and DIR/quality.png (test accuracy against
trainable parameters, log x, one point per method with ± std error bars).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def final_runs(data: dict[str, Any], task: str) -> dict[str, list[dict[str, Any]]]:
    """method -> its successful runs at the chosen learning rate, one per seed (seed order)."""
    entry = data["tasks"][task]
    seeds = entry["settings"]["seeds"]
    out: dict[str, list[dict[str, Any]]] = {}
    for method in entry["methods"]:
        lr = entry.get("chosen_lr", {}).get(method)
        runs = [r for r in data["runs"] if r["task"] == task and r["method"] == method and r.get("lr") == lr
                and r["status"] == "ok" and r["seed"] < seeds]
        out[method] = sorted(runs, key=lambda r: r["seed"])
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); nan for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "–"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def summarize(data: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """One row per method: parameters, learning rate, seeds, validation/test metrics over seeds, time, memory."""
    entry = data["tasks"][task]
    rows = []
    for method, runs in final_runs(data, task).items():
        lr = entry.get("chosen_lr", {}).get(method)
        # Runs at the chosen rate that did not give a result (failed: e.g. a non-finite loss; skipped: time limit).
        at_lr = [r for r in data["runs"] if r["task"] == task and r["method"] == method and r.get("lr") == lr
                 and r["seed"] < entry["settings"]["seeds"]]
        failed = [r for r in at_lr if r["status"] == "failed"]
        skipped = [r for r in at_lr if r["status"] == "skipped"]
        rows.append({
            "task": task, "method": method, "label": entry["method_labels"].get(method, method),
            "family": entry["families"].get(method), "lr": entry.get("chosen_lr", {}).get(method),
            "seeds": [r["seed"] for r in runs], "n": len(runs),
            "trainable_params": runs[0]["trainable_params"] if runs else None,
            "val_accuracy": [r["validation"]["accuracy"] for r in runs],
            "test_accuracy": [r["test"]["accuracy"] for r in runs],
            "test_macro_f1": [r["test"]["macro_f1"] for r in runs],
            "train_seconds": [r["train_seconds"] for r in runs],
            "peak_rss_mb": [r["peak_rss_mb"] for r in runs],
            "final_train_loss": [r["train_loss"][-1]["loss"] for r in runs if r.get("train_loss")],
            "mean_train_loss": [statistics.fmean(x["loss"] for x in r["train_loss"]) for r in runs
                                if r.get("train_loss")],
            "failed": len(failed), "skipped": len(skipped),
        })
    return rows


def majority(data: dict[str, Any], task: str) -> Optional[dict[str, Any]]:
    runs = [r for r in data["runs"] if r["task"] == task and r["status"] == "ok"]
    if not runs:
        return None
    by_seed: dict[int, dict[str, Any]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], r["majority_baseline"])
    return {"accuracy": [b["accuracy"] for b in by_seed.values()], "macro_f1": [b["macro_f1"] for b in by_seed.values()],
            "label": sorted({b["label"] for b in by_seed.values()})}


def tuning_table(data: dict[str, Any], task: str) -> str:
    entry = data["tasks"][task]
    grid = entry["settings"]["grid"]
    tuned = list(dict.fromkeys(entry.get("tuned_by", {m: m for m in entry["methods"]}).values()))
    lines = ["| tuned method | " + " | ".join(f"lr {g:g}" for g in grid) + " | chosen |",
             "|---|" + "---:|" * len(grid) + "---:|"]
    for method in tuned:
        cells = []
        for lr in grid:
            hit = [r for r in data["runs"] if r["task"] == task and r["method"] == method and r.get("lr") == lr
                   and r["seed"] == 0]
            if not hit:
                cells.append("–")
            elif hit[0]["status"] != "ok":
                cells.append(hit[0]["status"])
            else:
                cells.append(f"{100 * hit[0]['validation']['accuracy']:.1f}")
        chosen = entry.get("chosen_lr", {}).get(method)
        shown = f"{chosen:g}" if chosen is not None else "–"
        lines.append(f"| {entry['method_labels'].get(method, method)} | " + " | ".join(cells) + f" | {shown} |")
    return "\n".join(lines)


def task_table(data: dict[str, Any], task: str) -> str:
    rows = summarize(data, task)
    head = ("| method | trainable params | lr | seeds | val acc % | test acc % | test macro-F1 % | train s | "
            "peak RSS MB |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        params = f"{row['trainable_params']:,}" if row["trainable_params"] else "–"
        lr = f"{row['lr']:g}" if row["lr"] is not None else "–"
        note = ""
        if row["failed"] or row["skipped"]:
            note = f" ({row['failed']} failed, {row['skipped']} skipped)"
        t, _ = mean_std(row["train_seconds"])
        mem, _ = mean_std(row["peak_rss_mb"])
        lines.append(f"| {row['label']}{note} | {params} | {lr} | {row['n']} | {fmt_ms(row['val_accuracy'])} | "
                     f"{fmt_ms(row['test_accuracy'])} | {fmt_ms(row['test_macro_f1'])} | "
                     f"{'–' if math.isnan(t) else f'{t:.0f}'} | {'–' if math.isnan(mem) else f'{mem:.0f}'} |")
    base = majority(data, task)
    if base:
        lines.append(f"| majority class ({', '.join(base['label'])}) | 0 | – | {len(base['accuracy'])} | – | "
                     f"{fmt_ms(base['accuracy'])} | {fmt_ms(base['macro_f1'])} | – | – |")
    return "\n".join(lines)


def settings_line(data: dict[str, Any], task: str) -> str:
    s = data["tasks"][task]["settings"]
    used = next((r.get("data_used") for r in data["runs"] if r["task"] == task and r["status"] == "ok"), None) or {
        "train": s["train_examples"], "validation": s["validation_examples"], "test": s["test_examples"]}
    return (f"{used['train']} training examples ({s['steps']} steps of batch {s['batch_size']}), "
            f"{used['validation']} validation, {used['test']} test examples"
            + (f" (the whole split: smaller than the caps of {s['validation_examples']}/{s['test_examples']})"
               if used["test"] < s["test_examples"] or used["validation"] < s["validation_examples"] else "")
            + f", max_length {s['max_length']}, "
            f"learning-rate grid {', '.join(f'{g:g}' for g in s['grid'])}, {s['seeds']} seed(s)")


def markdown(data: dict[str, Any]) -> str:
    parts = []
    for task, entry in data["tasks"].items():
        parts.append(f"### {task}: {entry['description']}\n")
        parts.append(f"{settings_line(data, task)}. Data: {entry['source'].rstrip('.')}.\n")
        parts.append(task_table(data, task) + "\n")
        if entry.get("lr_from"):
            parts.append(f"Learning rates: not tuned on this task; those chosen on {entry['lr_from']} are used.\n")
        else:
            parts.append("Learning-rate tuning (seed 0, validation accuracy %):\n")
            parts.append(tuning_table(data, task) + "\n")
    return "\n".join(parts)


def plot(data: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(data["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in summarize(data, task) if r["n"] and r["trainable_params"]]
        seen: dict[int, int] = {}
        for i, row in enumerate(rows):
            m, s = mean_std(row["test_accuracy"])
            # Methods with (nearly) the same parameter count are spread a little along x so their bars stay visible.
            bucket = round(math.log10(row["trainable_params"]) * 20)
            shift = 1.06 ** seen.get(bucket, 0)
            seen[bucket] = seen.get(bucket, 0) + 1
            marker = {"lora": "s", "full": "D", "head-only": "^"}.get(row["family"], "o")
            ax.errorbar(row["trainable_params"] * shift, 100 * m, yerr=100 * s, fmt=marker, capsize=3,
                        label=f"{row['label']} (n={row['n']})", color=f"C{i % 10}")
        base = majority(data, task)
        if base:
            ax.axhline(100 * mean_std(base["accuracy"])[0], color="grey", ls="--", lw=1, label="majority class")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale; includes the classifier head; equal counts spread slightly)")
        ax.set_ylabel("test accuracy % (mean ± std over seeds)")
        ax.set_title(task)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(json_path: str | Path, out: str | Path) -> tuple[Path, Path]:
    data = load(json_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "quality.md", out / "quality.png"
    md.write_text("# Quality benchmark\n\n" + markdown(data), encoding="utf-8")
    plot(data, png)
    return md, png


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="quality.json written by run.py")
    p.add_argument("--out", help="folder for quality.md and quality.png (default: the JSON's folder)")
    args = p.parse_args(argv)
    md, png = write_report(args.json, args.out or Path(args.json).parent)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
