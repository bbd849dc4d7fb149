"""docs/RESULTS.md from the study's compare folders: every figure in it is read from a file, none is typed.

    python -m benchmarks.quality.study render [--results benchmarks/quality/results] [--doc docs/RESULTS.md]

Each task of the study is one `neat-peft compare` folder, RESULTS/<task>/compare.json: its chosen cells, seeds,
paired differences, verdicts, pairing check, budget-check pairs and r sweeps come from compare's plan and report
(compare_plan.Plan, compare_report, compare_stats), and compare_report writes its own report.md and plots there
(sweep.png, curves.png and budget_check.png are the ones the document shows). This module adds what spans the
tasks: RESULTS/study.json (the study's protocol, the machine, its invocations and retired runs), RESULTS/pilot.json
(optional) and the small-norm measurement, and writes the document.
Cells without results are listed as pending: the document is valid at any point of the study.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from benchmarks.quality.protocol import Protocol
from neat_peft.cli import compare_report, compare_stats as stats
from neat_peft.cli.compare import DATA_FILE
from neat_peft.cli.compare_plan import Job, Plan
from neat_peft.cli.compare_report import cell_text

HERE = Path(__file__).resolve().parent

RESUME = "nice -n 19 python -m benchmarks.quality.study run --workers 2   # neat-peft compare per task"


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def fmt_ms(values: list[float]) -> str:
    """Mean ± sample std in percent; one value alone (no spread to show) as itself."""
    m, s = stats.mean_std(values)
    return "–" if math.isnan(m) else f"{100 * m:.1f}" if len(values) == 1 else f"{100 * m:.1f} ± {100 * s:.1f}"


def accuracies(record: dict[str, Any]) -> list[float]:
    return [c["accuracy"] for c in record["validation_curve"] if "accuracy" in c]


class View:
    """The study read through compare: per task its compare.json, plan (chosen cells, grids) and records; the
    study's protocol (labels, tasks, seeds) from study.json."""

    def __init__(self, study: dict[str, Any], tasks: dict[str, dict[str, Any]]):
        self.data, self.tasks = study, tasks
        self.proto = Protocol.from_snapshot(study["protocol"])
        self.plans = {t: Plan.from_data(d) for t, d in tasks.items()}
        self.records = {t: {r["key"]: r for r in d["runs"]} for t, d in tasks.items()}

    def chosen(self, task: str, method: str):
        return self.plans[task].choose(self.records[task], method)

    def grid(self, task: str, method: str):
        return self.plans[task].grid(self.records[task], method)

    def seed_runs(self, task: str, method: str) -> dict[int, dict[str, Any]]:
        """seed -> finished (or diverged) run at the method's chosen cell."""
        cell = self.chosen(task, method)
        if cell is None:
            return {}
        out = {}
        for seed in range(max(1, self.plans[task].seeds_of(method))):
            rec = self.records[task].get(Job(method, *cell, seed, "").key)
            if rec is not None:
                out[seed] = rec
        return out

    def test_acc(self, task: str, method: str) -> dict[int, float]:
        """seed -> test accuracy of the finished runs (a diverged seed has none; the main table counts them)."""
        return {s: r["test_value"] for s, r in self.seed_runs(task, method).items() if r["status"] == "ok"}

    def runs(self, task: str) -> list[dict[str, Any]]:
        """The task's runs at the study's budget (not its budget checks)."""
        return [r for r in self.tasks[task]["runs"] if r["phase"] != "check"]

    def majority(self, task: str) -> dict[int, float]:
        return {r["seed"]: r["baseline"]["accuracy"] for r in self.runs(task) if r["status"] == "ok"}

    def planned(self, task: str) -> list[Job]:
        """Every run of the study's plan of `task` (its budget checks are extra)."""
        return [j for j in self.plans[task].jobs(self.records[task], full=True) if j.phase != "check"]


def tuning_table(v: View, task: str) -> str:
    methods = [m for m in v.proto.methods_of(task).values() if not m.tuned_as]
    lines = []
    for m in methods:
        chosen = v.chosen(task, m.name)
        cells = []
        grid = v.grid(task, m.name)
        for lr, s in grid:
            rec = v.records[task].get(Job(m.name, lr, s, 0, "tune").key)
            text = ("pending" if rec is None else "diverged" if rec["status"] != "ok"
                    else pct(rec["validation"]))
            if chosen == (lr, s):
                text = f"**{text}**"
            cells.append(f"{cell_text(lr, s)}: {text}" + (" (added)" if (lr, s) not in m.grid else ""))
        rates = [lr for lr, _ in grid]
        edge = chosen is not None and len(set(rates)) > 1 and chosen[0] in (min(rates), max(rates))
        lines.append(f"| {m.label} | " + "; ".join(cells) + f" | {'–' if chosen is None else cell_text(*chosen)}"
                     + (" (at the grid's edge)" if edge else "") + " |")
    return "\n".join(["| method | validation accuracy % at seed 0, per cell (chosen in bold) | chosen |",
                      "|---|---|---|", *lines]) + (
        "\n\n'At the grid's edge': the best learning rate is the smallest or largest tried"
        + (f", even after {v.proto.edge_steps} rates added past the edge" if v.proto.edge_steps else "")
        + ", so a rate beyond it might have done better still."
        if "(at the grid's edge)" in "".join(lines) else "") + (
        "\n\n'(added)': a cell past the protocol's grid, tried because the best rate was at its edge."
        if "(added)" in "".join(lines) else "")


def main_table(v: View, task: str) -> str:
    lines = ["| method | trainable params | chosen cell | seeds done / planned | val acc % | test acc % | "
             "run wall min | peak RSS MB | CPU share | plateaued |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in v.proto.methods_of(task).values():
        if m.tuned_as:
            continue
        all_runs = list(v.seed_runs(task, m.name).values())
        runs = [r for r in all_runs if r["status"] == "ok"]
        diverged = len(all_runs) - len(runs)
        chosen = v.chosen(task, m.name)
        flat = [x for x in (stats.plateaued(accuracies(r), v.data["protocol"]["plateau_points"])
                            for r in runs) if x is not None]
        params = f"{runs[0]['trainable_params']:,}" if runs else "–"
        wall = stats.mean_std([r["wall_seconds"] / 60 for r in runs])[0]
        rss = stats.mean_std([r["peak_rss_mb"] for r in runs])[0]
        share = stats.mean_std([r["cpu_share"] for r in runs])[0]
        label = m.label + (f" ({diverged} seed(s) diverged, left out)" if diverged else "")
        lines.append(f"| {label} | {params} | {'pending' if chosen is None else cell_text(*chosen)} | "
                     f"{len(runs)} / {v.proto.seeds_of(task, m.name)} | "
                     f"{fmt_ms([r['validation'] for r in runs])} | "
                     f"{fmt_ms([r['test_value'] for r in runs])} | "
                     f"{'–' if math.isnan(wall) else f'{wall:.1f}'} | {'–' if math.isnan(rss) else f'{rss:.0f}'} | "
                     f"{'–' if math.isnan(share) else f'{share:.2f}'} | "
                     f"{f'{sum(flat)} of {len(flat)}' if flat else '–'} |")
    base = v.majority(task)
    if base:
        lines.append(f"| majority class | 0 | – | {len(base)} | – | {fmt_ms(list(base.values()))} | "
                     "– | – | – | – |")
    return "\n".join(lines)


def headroom_line(v: View, task: str) -> Optional[str]:
    """How much error the task leaves to tell methods apart: near the ceiling, no method can be far ahead."""
    means = {m.label: stats.mean_std(list(v.test_acc(task, m.name).values()))[0]
             for m in v.proto.methods_of(task).values() if not m.tuned_as and v.test_acc(task, m.name)}
    if not means:
        return None
    best = max(means, key=means.get)
    shown = pct(means[best])  # the error left is computed from the rounded figure, so the two add up to 100
    base = list(v.majority(task).values())
    done, total = task_status(v, task)
    so_far = "" if done == total else " so far"
    return (f"- Headroom: the best mean test accuracy{so_far}, {best}'s {shown}%, leaves "
            f"{100 - float(shown):.1f} points of error in which methods can differ"
            + (f" (majority class: {pct(stats.mean_std(base)[0])}%)." if base else "."))


def pair_lines(v: View, task: str) -> list[str]:
    """The task's tested pairs (compare_report.comparisons: the paired interval and status of compare_stats)."""
    out = []
    for c in compare_report.comparisons(v.tasks[task]):
        a, b = c["a"], c["b"]
        la, lb = v.proto.methods[a].label, v.proto.methods[b].label
        ta, tb = v.test_acc(task, a), v.test_acc(task, b)
        if max(v.proto.seeds_of(task, a), v.proto.seeds_of(task, b)) == 1:  # a row reduced to one seed
            shown = (f"{100 * (ta[0] - tb[0]):+.1f} points at seed 0 ({la} {pct(ta[0])}%, {lb} {pct(tb[0])}%)"
                     if 0 in ta and 0 in tb else "pending")
            out.append(f"- {la} − {lb} (test accuracy; one seed planned, so no interval and no verdict): {shown}.")
            continue
        out.append(f"- {la} − {lb} (test accuracy, paired by seed): {stats.verdict(c['result'], la, lb)}.")
    return out


def sweep_table(v: View, task: str) -> Optional[str]:
    """compare_report.sweeps (LoRA's and NEAT's r sweeps) as one table in percent, one row per r."""
    found = compare_report.sweeps(v.tasks[task])
    if not any(p["test"] is not None for pts in found.values() for p in pts):
        return None
    by_r = {fam: {p["r"]: p for p in found.get(fam, [])} for fam in ("lora", "neat")}
    rows = ["| r | LoRA trainable params | LoRA test acc % | NEAT trainable params | NEAT test acc % |",
            "|---:|---:|---:|---:|---:|"]
    for r in sorted({r for fam in by_r.values() for r in fam}):
        cells = []
        for fam in ("lora", "neat"):
            got = by_r[fam].get(r)
            cells += [f"{got['trainable']:,}", pct(got["test"])] if got and got["test"] is not None else ["–", "pending"]
        rows.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def check_pair_lines(v: View, task: str) -> list[str]:
    """compare_report.check_pairs in points: A − B at seed 0 at the study's budget and in the longer check."""
    return [f"- Budget check, {v.proto.methods[c['a']].label} − {v.proto.methods[c['b']].label} at seed 0 (test "
            f"accuracy): {100 * c['difference']:+.1f} points at {c['steps']} steps, {100 * c['check_difference']:+.1f} "
            f"at {c['check_steps']} steps (one seed each; the main table's spread over seeds is the yardstick)."
            for c in compare_report.check_pairs(v.tasks[task])]


def budget_check_section(v: View, task: str, path: Path, doc_dir: Path) -> list[str]:
    """Longer training of the chosen cells next to the study's own seed-0 runs (compare_report.budget_checks), and
    compare_report's plot of both curves at `path`: whether the fixed budget decided the comparison."""
    checks = compare_report.budget_checks(v.tasks[task])
    if not checks:
        return []
    points = v.data["protocol"]["plateau_points"]

    def flat(r):
        return {True: "yes", False: "no", None: "–"}[stats.plateaued(accuracies(r), points)]

    factors = sorted({r["factor"] for r, _ in checks})
    out = ["### Budget check: the chosen cells trained longer (seed 0)\n",
           "; ".join(f"`python benchmarks/quality/study.py check --task {task} --factor {f}`" for f in factors)
           + " (the study's earlier runner; compare's `--budget-check` trains on the same examples for longer "
           "instead): the same cells at seed 0 on that many times the training examples for the same epochs (so that "
           "many times the steps). Not part of the statistics above; it shows whether the fixed budget decided the "
           "comparison. The longer run draws its larger training subset with the same seed, so the two methods "
           "again share it.\n",
           "| method | cell | steps | val acc % | test acc % | plateaued | CPU-core-hours of the check |",
           "|---|---|---|---|---|---|---:|"]
    for r, b in checks:
        out.append(f"| {v.proto.methods[r['method']].label} | {cell_text(r['lr'], r['scaling'])} | "
                   f"{b['steps']} → {r['steps']} | {pct(b['validation'])} → "
                   f"{pct(r['validation'])} | {pct(b['test_value'])} → "
                   f"{pct(r['test_value'])} | {flat(b)} → {flat(r)} | {r['cpu_seconds'] / 3600:.2f} |")
    out.append("")
    out += check_pair_lines(v, task)
    out.append("")
    out.append(f"![{task}: budget check curves]({os.path.relpath(path, doc_dir)})\n")
    return out


def small_norm_section(small: dict[str, Any]) -> str:
    """The synthetic normalize_weight measurement (small_norm.py), independent of the study's runs."""
    from benchmarks.quality import small_norm

    s, steps = small["setup"], str(small["setup"]["steps"])
    final: dict[str, dict[str, float]] = {}
    for row in small["best"].values():
        final.setdefault(row["std_label"], {})[row["arm"]] = sum(row["relative_loss"][steps]) / len(
            row["relative_loss"][steps])
    reading = "; ".join(f"W0 std {std}: " + ", ".join(f"{arm} {x:.3f}" for arm, x in arms.items())
                        for std, arms in final.items())
    return "\n".join([
        "## normalize_weight on a synthetic small-norm layer (`benchmarks/quality/small_norm.py`)\n",
        f"One frozen {s['d']}x{s['d']} layer, NEAT r={s['r']}, {s['optimizer']}, target W0 + D with D of rank "
        f"{s['target_rank']} and entry RMS {s['target_rms']}; loss relative to the untouched W0 (lower is better), "
        f"best learning rate of {', '.join(f'{g:g}' for g in s['lr_grid'])} per variant, mean ± std over "
        f"{s['seeds']} seeds; {small['seconds']:.0f} s. Command: `python benchmarks/quality/small_norm.py --out "
        "benchmarks/quality/results/small_norm.json`.\n",
        small_norm.markdown(small) + "\n",
        f"Final relative loss (step {steps}): {reading}."
        + "".join(f" {row['arm']} (W0 std {row['std_label']}) chose lr {row['lr']:g}, an end of the grid: a better "
                  "rate may lie beyond it." for row in small["best"].values()
                  if row["lr"] in (min(s["lr_grid"]), max(s["lr_grid"])))
        + "\n"])


def retired_section(retired: list[dict[str, Any]]) -> list[str]:
    """Runs moved aside by `study.py retire`: not in any table, but their compute and the reason are shown."""
    if not retired:
        return []
    out = ["## Retired runs\n",
           "Runs made under an earlier definition of a task and set aside (`study.py retire`; kept in study.json "
           "under \"retired\"). They are in no table above; the task was run again under the protocol below.\n"]
    for r in retired:
        t = r["protocol"]
        cpu = sum(x.get("cpu_seconds", 0) for x in r["runs"]) / 3600
        out.append(f"- {r['task']}: {len(r['runs'])} run(s), {cpu:.1f} CPU-core-hours, retired {r['retired']}; "
                   f"they ran {t['train_examples']} training examples for {t['epochs']} epoch(s) ({t['steps']} steps of "
                   f"batch {t['batch_size']}). Why: {r['why']}")
    return out + [""]


def task_status(v: View, task: str) -> tuple[int, int]:
    mine = v.planned(task)
    return sum(j.key in v.records[task] for j in mine), len(mine)


def job_seconds(v: View, task: str, job: Job, pilot: dict[str, Any]) -> float:
    """A run's predicted wall time: the pilot's wall seconds per step of its task (NEAT r=8), times its family's
    cost relative to NEAT measured on sentiment, plus validations, the test pass (as validations, per example)
    and start-up. The family ratio compares CPU seconds per step (wall x CPU share), so that probes run under
    different loads still compare the methods' work, not the machine's business at that moment."""
    t = v.proto.tasks[task]
    single = pilot["single"]
    base = next(p for p in single if p["task"] == task and p["method"] == "neat-r8")
    sent = next(p for p in single if p["task"] == "sentiment" and p["method"] == "neat-r8")
    fam = next((p for p in single if p["task"] == "sentiment" and p["family"] == v.proto.methods[job.method].family),
               sent)
    per_step = base["seconds_per_step"] * (fam["seconds_per_step"] * fam["cpu_share"]) / (
        sent["seconds_per_step"] * sent["cpu_share"])
    return (t.steps * per_step + t.steps // t.eval_every * base["seconds_per_validation"]
            + base["other_seconds"] + (t.test_examples / t.validation_examples - 1) * base["seconds_per_validation"])


def estimate(v: View, pilot: dict[str, Any]) -> dict[str, Any]:
    """Total and remaining compute in CPU-core-hours (a probe's wall seconds x its CPU share): finished runs at their
    measured CPU time, the rest at the pilot's prediction. Wall hours = CPU hours / the measured gain of the chosen
    workers, on an otherwise idle machine."""
    per_task: dict[str, dict[str, Any]] = {}
    probed = {p["task"] for p in pilot["single"] if p["method"] == "neat-r8"}
    for task in v.proto.tasks:
        entry = per_task[task] = {"runs": 0, "done_runs": 0, "done_cpu_hours": 0.0, "remaining_cpu_hours": 0.0,
                                  "estimated": task in probed}
        for job in v.planned(task):
            entry["runs"] += 1
            rec = v.records[task].get(job.key)
            if rec is not None:
                entry["done_runs"] += 1
                entry["done_cpu_hours"] += rec.get("cpu_seconds", 0) / 3600
            elif entry["estimated"]:
                share = next(p["cpu_share"] for p in pilot["single"] if p["task"] == task and p["method"] == "neat-r8")
                entry["remaining_cpu_hours"] += job_seconds(v, task, job, pilot) * share / 3600
    workers = pilot.get("parallel", {}).get("workers", 1)
    gain = pilot.get("parallel", {}).get("throughput_gain", 1.0) if workers == 2 else 1.0
    remaining = sum(e["remaining_cpu_hours"] for e in per_task.values())
    return {"per_task": per_task, "summary": {
        "runs": sum(e["runs"] for e in per_task.values()), "done_runs": sum(e["done_runs"] for e in per_task.values()),
        "done_cpu_hours": sum(e["done_cpu_hours"] for e in per_task.values()), "remaining_cpu_hours": remaining,
        "workers": workers, "gain": gain, "remaining_wall_hours": remaining / gain,
        "not_estimated": [t for t, e in per_task.items() if not e["estimated"]]}}


def load(results: Path) -> View:
    """RESULTS/study.json and every task's RESULTS/<task>/compare.json."""
    study = json.loads((results / "study.json").read_text(encoding="utf-8"))
    tasks = {t: json.loads((results / t / DATA_FILE).read_text(encoding="utf-8")) for t in study["protocol"]["tasks"]}
    return View(study, tasks)


def build(results: Path, doc: Path) -> str:
    """The document (and each task's compare report, written into its folder by compare_report)."""
    v = load(results)
    data = v.data
    pilot_path = results / "pilot.json"
    pilot = json.loads(pilot_path.read_text()) if pilot_path.is_file() else None
    snap = data["protocol"]
    done_total = sum(task_status(v, t)[0] for t in v.proto.tasks)
    all_total = sum(task_status(v, t)[1] for t in v.proto.tasks)
    est = estimate(v, pilot) if pilot and "parallel" in pilot else None
    m, ver = data["machine"], data["versions"]
    out = ["# Results: NEAT vs LoRA, tuned per method, paired seeds, confidence intervals\n",
           "*Generated by `python -m benchmarks.quality.study render` from the study's `neat-peft compare` folders "
           "(`benchmarks/quality/results/<task>/compare.json`), `study.json`" + (" and `pilot.json`" if pilot else "")
           + "; no figure in this file is typed by hand.*\n"]
    state = "complete" if done_total == all_total else "in progress"
    out.append(f"**Status: study {state}: {done_total} of {all_total} planned runs finished** (JSON updated "
               f"{data.get('updated', '?')})."
               + (f" Estimated remaining compute: about {est['summary']['remaining_cpu_hours']:.0f} CPU-core-hours, "
                  f"about {est['summary']['remaining_wall_hours']:.0f} hours of wall time on this machine with "
                  f"{est['summary']['workers']} run(s) at once and nothing else running"
                  + (f", not counting {', '.join(est['summary']['not_estimated'])} (no pilot probe yet)"
                     if est["summary"].get("not_estimated") else "") + "." if est and state != "complete" else "")
               + "\n")
    out.append("## Summary\n")
    for task in v.proto.tasks:
        done, total = task_status(v, task)
        out.append(f"**{task}** ({done} of {total} runs):\n")
        out += pair_lines(v, task)
        headroom = headroom_line(v, task)
        if headroom:
            out.append(headroom)
        out += check_pair_lines(v, task)
        pending = [mm.label for mm in v.proto.methods_of(task).values()
                   if not mm.tuned_as and v.chosen(task, mm.name) is None]
        if pending:
            out.append(f"- Tuning still pending for: {', '.join(pending)}.")
        out.append("")
    out.append("A verdict (better/worse) is stated only where the 95% interval of the paired difference excludes 0; "
               "otherwise the line says no difference was detected, with the interval's width: the smallest "
               "difference the study, at that many seeds, could have shown. 'pending' means the cell has no "
               "result yet.\n")

    out += retired_section(data.get("retired", []))
    out.append("## Protocol\n")
    out += [
        "- Every run is one `neat-peft train` (the CLI's own entry point, started in a fresh process per run with 1 "
        "torch thread: by the study's own runner for these runs, by `neat-peft compare` from now on) with the task's "
        "data and size overrides, the method's overrides, the learning rate, NEAT's scale s and the seed; each run's "
        "exact command is in its task's `compare.json`. Each task's compare report (`report.md` beside it) is written "
        "from the same file by `neat-peft compare`'s report writer.",
        "- Tuning, on validation only, at seed 0: learning rate over "
        f"{', '.join(f'{x:g}' for x in snap['grid_lr'])} for the adapters and head-only (whose rate is the "
        f"head's), {', '.join(f'{x:g}' for x in snap['grid_full_lr'])} for full fine-tuning (a stated deviation: "
        "the usual range for fine-tuning every weight of a BERT-size model, a decade and a half below the "
        f"adapters'); NEAT also over s in {{{', '.join(f'{x:g}' for x in snap['grid_scale'])}}}."
        + (" Where the best rate is the largest (smallest) tried, the next rate past it on the half-decade ladder "
           f"(3e-2, 1e-1, ...; for NEAT at the best cell's s) is tried too, up to {snap['edge_steps']} rates each "
           "way, before anything is chosen: an added rule, since at the fixed grid NEAT r=8's best rate was its "
           "largest on all three classification tasks and the comparison would otherwise rest on a NEAT tuned at "
           "its grid's edge." if snap.get("edge_steps") else "")
        + " The cell with the best validation accuracy at the end of training is chosen (first in grid order on "
        f"ties; a diverged run never wins). The classifier head trains at {snap['head_lr']:g} for every method "
        "but head-only. LoRA: peft, alpha = 2r fixed, dropout 0. NEAT: relu, axis out, depth 0 unless the row says "
        "depth 1.",
        "- Seeds: " + "; ".join(f"{mm.label} {mm.seeds}" for mm in v.proto.methods.values() if not mm.tuned_as)
        + "".join(f" ({name}: {t.seeds} seed(s), methods {', '.join(t.methods or ())})"
                  for name, t in v.proto.tasks.items() if t.seeds)
        + ". Seed 0 at the chosen cell is the tuning run itself (selection used validation only; test is untouched "
        "by it). The seed draws the split and the subset once (the CLI seeds its split with train.seed), and "
        "every method uses it at that seed: the design is paired (the runs' `split_sha256` fields show it).",
        f"- Accuracy vs parameters: LoRA and NEAT at r in {{{', '.join(map(str, snap['sweep_r']))}}}, seed 0; r=2, 4 "
        "and 16 at the cell chosen for r=8 (not tuned on their own).",
        f"- Budget: a fixed number of steps per task, the same for every method and seed (below); validation "
        f"{snap['evals_per_run']} times per run (the curves). 'Plateaued' = the last third of the curve gains less "
        f"than {100 * snap['plateau_points']:.0f} point over the best before it. Test accuracy is that of the model "
        "at the end of training.",
        "- Recorded per run: trainable parameters, wall time, CPU time and CPU share (CPU seconds / wall seconds: "
        "below 1 when other jobs competed for the cores), peak RSS of the run's own process (ru_maxrss: libraries "
        "included), the load average before and after.",
    ]
    for name, t in snap["tasks"].items():
        out.append(f"- {name}: {t['description']}; {t['train_examples']} training examples, {t['epochs']} epochs "
                   f"= {t['steps']} steps of batch {t['batch_size']}, {t['validation_examples']} validation and "
                   f"{t['test_examples']} test examples, `{t['input_size']}`. Data: {t['source_note']}")
    out.append(f"\nMachine: {m['cpu']}, {m['cores']} logical cores, shared with other jobs (load average when the "
               f"study started: {m['load_average']}); {m['platform']}, Python {m['python']}; "
               + ", ".join(f"{k} {val}" for k, val in ver.items() if val) + ".\n")
    out.append("Invocations (from `study.json`):\n")
    out += [f"- `python benchmarks/quality/study.py {' '.join(inv['argv'])}` (started {inv['started']}"
            + (f", finished {inv['finished']}" if inv.get("finished") else ", running or stopped")
            + (f"; code {inv['versions']['git_commit']}" if inv.get("versions", {}).get("git_commit") else "") + ")"
            for inv in data["invocations"]]
    out.append("")

    out.append("## Compute\n")
    if pilot:
        out.append(f"Timed pilot (`python benchmarks/quality/study.py pilot`, {pilot['created']}): each task's "
                   f"NEAT r=8 run cut to {pilot['pilot_steps']} steps at the real data sizes, plus LoRA, full "
                   "fine-tuning and head-only on sentiment for the per-family cost (compared in CPU seconds per step: "
                   "wall x CPU share). The CPU share and load average columns show how busy the machine was "
                   "during each probe:\n")
        out.append("| task | method | s per step | s per validation | start-up + test + save s | CPU share | "
                   "load average |\n|---|---|---:|---:|---:|---:|---|")
        for p in pilot["single"]:
            out.append(f"| {p['task']} | {p['method']} | {p['seconds_per_step']:.2f} | "
                       f"{p['seconds_per_validation']:.1f} | {p['other_seconds']:.0f} | {p['cpu_share']:.2f} | "
                       f"{p['load_average']} |")
        for f in pilot.get("failed", []):
            out.append(f"| {f['task']} | {f['method']} | failed: {f['error'][-160:].splitlines()[-1]} | | | | |")
        out.append("")
        par = pilot.get("parallel")
        if par:
            out.append(f"\nTwo runs at once: {par['pair_wall_seconds']:.0f} s for the pair vs "
                       f"{par['single_wall_seconds']:.0f} s for one, a throughput gain of "
                       f"{par['throughput_gain']:.2f}x; rule: {par['rule']} -> **{par['workers']} worker(s)**.\n")
        if est:
            out.append("| task | runs finished / planned | CPU-core-hours done | CPU-core-hours remaining (estimate) |\n"
                       "|---|---:|---:|---:|")
            for task, e in est["per_task"].items():
                left = (f"{e['remaining_cpu_hours']:.1f}" if e.get("estimated", True)
                        else "not estimated (no pilot probe)")
                out.append(f"| {task} | {e['done_runs']} / {e['runs']} | {e['done_cpu_hours']:.1f} | {left} |")
            s = est["summary"]
            out.append(f"| all | {s['done_runs']} / {s['runs']} | {s['done_cpu_hours']:.1f} | "
                       f"{s['remaining_cpu_hours']:.1f}"
                       + (f" + {', '.join(s['not_estimated'])}" if s.get("not_estimated") else "") + " |\n")
            out.append("Finished runs count at their measured CPU time, the others at the pilot's prediction "
                       "(steps x s/step scaled by the family's cost on sentiment, validations, test, start-up; each "
                       "probe's wall seconds x its CPU share, so a busy machine during a probe does not inflate "
                       f"it). Wall time = CPU-core-hours / {s['gain']:.2f} (the measured gain of "
                       f"{s['workers']} worker(s)) when nothing else runs; read it as the order of magnitude.\n")
    displaced = [r for t in v.proto.tasks for planned in [{j.key for j in v.planned(t)}]
                 for r in v.runs(t) if r["key"] not in planned]
    if displaced:
        out.append(f"Runs at a cell no longer chosen (a grid extension moved the choice after they ran; kept in "
                   f"study.json, in no table above): {len(displaced)} run(s), "
                   f"{sum(r.get('cpu_seconds', 0) for r in displaced) / 3600:.1f} CPU-core-hours.\n")
    checks = [r for t in v.proto.tasks for r in v.tasks[t]["runs"] if r["phase"] == "check" and r["status"] == "ok"]
    if checks:
        out.append(f"Budget checks (`study.py check`, in no table above): {len(checks)} run(s), "
                   f"{sum(r['cpu_seconds'] for r in checks) / 3600:.1f} CPU-core-hours.\n")
    out.append("Resume (skips every finished run; the JSON is rewritten after each run):\n")
    out.append("```bash\n" + RESUME
               + "\npython -m benchmarks.quality.study render       # this file\n```\n")

    for task in v.proto.tasks:
        done, total = task_status(v, task)
        out.append(f"## {task}: {v.proto.tasks[task].description}\n")
        out.append(f"{done} of {total} runs finished. Pairing checked: {compare_report.pairing(v.tasks[task])}. Its compare report: "
                   f"[{task}/report.md]({os.path.relpath(results / task / 'report.md', doc.parent)}).\n")
        compare_report.write(results / task, v.tasks[task])
        out.append("### Main table (chosen cells; mean ± sample std over seeds)\n")
        out.append(main_table(v, task) + "\n")
        out.append("### NEAT vs LoRA, paired by seed\n")
        out += pair_lines(v, task)
        out.append("")
        out.append("### Tuning (seed 0, validation)\n")
        out.append(tuning_table(v, task) + "\n")
        sweep_png, curve_png = results / task / "sweep.png", results / task / "curves.png"  # compare_report's
        if sweep_png.is_file():
            out.append("### Accuracy vs parameters (seed 0; r=1 and 8 at their chosen cells, the other r at r=8's)\n")
            out.append(sweep_table(v, task) + "\n")
            out.append(f"![{task}: accuracy vs parameters]({os.path.relpath(sweep_png, doc.parent)})\n")
        else:
            out.append("Accuracy vs parameters: pending (no seed-0 run at a chosen cell yet).\n")
        if curve_png.is_file():  # compare_report's tuning curves, written above
            out.append(f"![{task}: validation curves]({os.path.relpath(curve_png, doc.parent)})\n")
        else:
            out.append("Validation curves: pending.\n")
        out += budget_check_section(v, task, results / task / "budget_check.png", doc.parent)

    small_path = results / "small_norm.json"
    if small_path.is_file():
        out.append(small_norm_section(json.loads(small_path.read_text())))
    out.append("## What this replaces\n")
    out.append("The previous version of this file reported 24-step runs on 384 examples (`benchmarks/quality/run.py`, "
               "now removed): a smoke test of the pipeline, far from converged, with learning rates shared across "
               "methods and NEAT's scale never tuned. Its numbers are superseded by this study and no longer shown.\n")
    return "\n".join(out) + "\n"


def render(results: Path, doc: Path) -> None:
    from neat_peft.cli.rundir import atomic_write_text

    atomic_write_text(doc, build(results, doc))
    print(f"wrote {doc}")
