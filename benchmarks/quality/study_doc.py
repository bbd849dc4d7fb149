"""docs/RESULTS.md from the study's compare folders: every figure in it is read from a file, none is typed.

    python -m benchmarks.quality.study render [--results benchmarks/quality/results] [--doc docs/RESULTS.md]

Each task of the study is one `neat-peft compare` folder, RESULTS/<task>/compare.json, and each task's section of
the document is compare's own report of it: compare_report.sections (the code that writes report.md) in percent under
the protocol's method labels, each followed by compare_report's plot of it (sweep.png, curves.png,
budget_check.png). This module adds what spans the tasks: the summary (the verdicts as sentences, the headroom, the
budget-check pairs), RESULTS/study.json (the study's protocol, the machine, its invocations and retired runs),
RESULTS/pilot.json (optional) and the small-norm measurement, and writes the document.
Cells without results are listed as pending: the document is valid at any point of the study.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from benchmarks.quality.protocol import Protocol
from neat_peft.cli import compare_report, compare_stats as stats
from neat_peft.cli.compare import DATA_FILE
from neat_peft.cli.compare_plan import Job, Plan
from neat_peft.cli.compare_report import Style

RESUME = "nice -n 19 python -m benchmarks.quality.study run --workers 2   # neat-peft compare per task"


class View:
    """The study read through compare: per task its compare.json, plan and records; the study's protocol (labels,
    tasks, seeds) from study.json; and the report style of its tables (percent, the protocol's method labels)."""

    def __init__(self, study: dict[str, Any], tasks: dict[str, dict[str, Any]]):
        self.data, self.tasks = study, tasks
        self.proto = Protocol.from_snapshot(study["protocol"])
        self.plans = {t: Plan.from_data(d) for t, d in tasks.items()}
        self.records = {t: {r["key"]: r for r in d["runs"]} for t, d in tasks.items()}
        self.style = Style(percent=True, labels={n: m.label for n, m in self.proto.methods.items()}, level=3)

    def runs(self, task: str) -> list[dict[str, Any]]:
        """The task's runs at the study's budget (not its budget checks)."""
        return [r for r in self.tasks[task]["runs"] if r["phase"] != "check"]

    def planned(self, task: str) -> list[Job]:
        """Every run of the study's plan of `task` (its budget checks are extra)."""
        return [j for j in self.plans[task].jobs(self.records[task], full=True) if j.phase != "check"]


def headroom_line(v: View, task: str) -> Optional[str]:
    """How much error the task leaves to tell methods apart: near the ceiling, no method can be far ahead."""
    means = {v.style.name(row["method"]): row["mean"] for row in compare_report.method_rows(v.tasks[task])
             if row["n"] and not v.proto.methods[row["method"]].tuned_as}
    if not means:
        return None
    best = max(means, key=means.get)
    shown = v.style.value(means[best])  # the error left is computed from the rounded figure, so the two add up to 100
    base = compare_report.baseline(v.tasks[task])
    done, total = task_status(v, task)
    so_far = "" if done == total else " so far"
    return (f"- Headroom: the best mean test accuracy{so_far}, {best}'s {shown}%, leaves "
            f"{100 - float(shown):.1f} points of error in which methods can differ"
            + (f" ({base[0]}: {v.style.value(stats.mean_std(list(base[1].values()))[0])}%)." if base else "."))


GLANCE_HEADER = ["| task or row | comparison (A − B) | test metric | A − B | 95% interval | width | seeds | verdict (A) | "
                 "tuned cells (A; B) |", "|---|---|---|---:|---|---:|---:|---|---|"]


def glance_rows(where: str, data: dict[str, Any], style: Style, answers: bool) -> list[str]:
    """One compare's tested pairs as rows of the summary table: report.md's verdict rows (the paired test difference
    A − B of the primary metric and, with `answers`, of the generated answers' accuracy and macro-F1 in points) led
    by the task or row, and closed by the cell each side's tuning chose: the setting behind the verdict."""
    plan, records = Plan.from_data(data), {r["key"]: r for r in data["runs"]}
    out = []
    for metric in (None, *(compare_report.ANSWER_METRICS if answers else ())):
        st = style if metric is None else Style(percent=True, labels=style.labels)
        prefix, unit = ("answer " if metric else ""), (" (points)" if st.percent else "")
        for c in compare_report.comparisons(data, metric):
            (row,) = compare_report.verdict_rows([dict(c, metric=f"{prefix}{c['metric']}{unit}")], st)
            cells = "; ".join(compare_report.cell_text(*cell) if cell else "pending"
                              for cell in (plan.choose(records, c["a"]), plan.choose(records, c["b"])))
            out.append(f"| {where} {row} {cells} |")
    return out


def check_pair_lines(v: View, task: str) -> list[str]:
    """compare_report.check_pairs in points: A − B at seed 0 at the study's budget and in the longer check."""
    return [f"- Budget check, {v.style.name(c['a'])} − {v.style.name(c['b'])} at seed 0 (test accuracy): "
            f"{100 * c['difference']:+.1f} points at {c['steps']} steps, {100 * c['check_difference']:+.1f} at "
            f"{c['check_steps']} steps (one seed each; the results table's spread over seeds is the yardstick)."
            for c in compare_report.check_pairs(v.tasks[task])]


def report_sections(name: str, data: dict[str, Any], style: Style, folder: Path, doc: Path,
                    notes: Optional[dict[str, list[str]]] = None,
                    reference: Optional[tuple[str, dict]] = None) -> list[str]:
    """compare_report's sections of one compare (`notes`: lines put under a section's heading; `reference`: a
    screen's reference run), each followed by compare_report's plot of it in `folder` where there is one."""
    out = []
    for section, lines in compare_report.sections(data, style, reference).items():
        out += lines[:2] + (notes or {}).get(section, []) + lines[2:] + ([""] if lines[-1] else [])
        png = folder / compare_report.SECTION_PLOTS.get(section, "-")
        if png.is_file():
            out.append(f"![{name}: {png.stem}]({os.path.relpath(png, doc.parent)})\n")
    return out


def task_sections(v: View, task: str, results: Path, doc: Path) -> list[str]:
    """The task's part of the document: its compare report (in percent, under the protocol's labels), written into
    its folder too."""
    done, total = task_status(v, task)
    data = v.tasks[task]
    compare_report.write(results / task, data)
    factors = sorted({c["factor"] for c, _ in compare_report.budget_checks(data)})
    check_note = [
        "; ".join(f"`python benchmarks/quality/study.py check --task {task} --factor {f}`" for f in factors)
        + " (the study's earlier runner; compare's `--budget-check` trains on the same examples for longer instead): "
        "the same cells at seed 0 on that many times the training examples for the same epochs (so that many times "
        "the steps). The longer run draws its larger training subset with the same seed, so the two methods again "
        "share it.", ""]
    return [f"## {task}: {v.proto.tasks[task].description}\n",
            f"{done} of {total} runs finished. Pairing checked: {compare_report.pairing(data)}. Its compare report: "
            f"[{task}/report.md]({os.path.relpath(results / task / 'report.md', doc.parent)}).\n",
            *report_sections(task, data, v.style, results / task, doc, {"budget_check": check_note})]


def llm_rows(results: Path) -> dict[str, dict[str, Any]]:
    """The longer-budget LLM rows and screens (issue #26): name -> compare.json of each compare folder in
    benchmarks/quality/llm (beside RESULTS), in name order. Their commands and setup are in that folder's README."""
    return {p.parent.name: json.loads(p.read_text(encoding="utf-8"))
            for p in sorted((results.parent / "llm").glob(f"*/{DATA_FILE}"))}


def row_status(data: dict[str, Any]) -> tuple[int, int]:
    """Runs finished and planned (budget checks included) of one compare."""
    plan, records = Plan.from_data(data), {r["key"]: r for r in data["runs"]}
    jobs = plan.jobs(records, full=True)
    return sum(j.key in records for j in jobs), len(jobs)


# A one-seed screen (compare --seeds 1) -> the row and method whose seed-0 run its variants are screened against:
# the plain method at the cell they all share, on the same split and budget (screen_reference checks both).
SCREEN_REFERENCES = {"smollm2-r1-screen": ("smollm2-r1", "neat-r1")}


def screen_reference(name: str, data: dict[str, Any], rows: dict[str, dict[str, Any]]) -> Optional[tuple[str, dict]]:
    """(label, record) of the run screen `name` is ranked against, or None where it names none; raises ValueError
    where that run is missing or was not trained like the screen's (command overrides, steps, split)."""
    if name not in SCREEN_REFERENCES:
        return None
    row, method = SCREEN_REFERENCES[name]
    ref = rows[row]
    plan = Plan.from_data(data)
    cells = {cell for m in plan.methods if not plan.cell_of(m) for cell in plan.base_cells(m)}
    if len(cells) != 1:
        raise ValueError(f"screen {name}: its methods' grids hold {len(cells)} cells; a reference needs one shared")
    for key in ("overrides", "steps_per_run", "data_used"):
        if ref[key] != data[key]:
            raise ValueError(f"screen {name}: its {key} differ from {row}'s, so {row}'s {method} is no reference")
    key = Plan.from_data(ref).job(method, *cells.pop(), 0, "tune").key
    record = next((r for r in ref["runs"] if r["key"] == key and r["status"] == "ok"), None)
    splits = {r["split_sha256"] for r in data["runs"] if r["seed"] == 0 and r["phase"] != "check"}
    if record is None or splits - {record["split_sha256"]}:
        raise ValueError(f"screen {name}: {row} has no finished run {key} on the screen's seed-0 split")
    return f"reference: {method} in {row}", record


def screen_summary(name: str, data: dict[str, Any], reference: Optional[tuple[str, dict]]) -> list[str]:
    """A screen in sentences: which variants beat the reference's seed-0 validation value, which did not."""
    done, total = row_status(data)
    out = [f"**{name}**, a one-seed screen ({done} of {total} runs; {data['steps_per_run']} steps a run; ranked, "
           "no verdicts):\n"]
    if reference is None:
        return out + [""]
    label, ref = reference
    score = Plan.from_data(data).score  # tuning's own "better" (either metric direction; a diverged run never wins)
    groups: dict[str, list[str]] = {"beat": [], "did not beat": [], "pending": []}
    for m, (_, rec) in compare_report.screen_runs(data).items():
        if rec is None:
            groups["pending"].append(m)
        else:
            groups["beat" if score(rec) > score(ref) else "did not beat"].append(
                f"{m} ({rec['validation']:.4f})" if rec["status"] == "ok" else f"{m} ({rec['status']})")
    out.append(f"- Seed-0 validation {data['primary_metric']}, against the {label} ({ref['validation']:.4f}): "
               + "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items() if v) + ".")
    return out + [""]


def llm_sections(name: str, data: dict[str, Any], results: Path, doc: Path,
                 reference: Optional[tuple[str, dict]] = None) -> list[str]:
    """A longer-budget LLM row's or screen's part of the document: its compare report's sections (values as recorded:
    the loss is no fraction; a screen's ranking with its `reference` run) and plots; its report.md is written too,
    as a task's is."""
    folder, (done, total) = results.parent / "llm" / name, row_status(data)
    compare_report.write(folder, data)
    kind = "a one-seed screen" if Plan.from_data(data).is_screen() else "the longer-budget LLM row"
    model = Path(data["model"]).name if os.path.isabs(data["model"]) else data["model"]  # a local file: no home path
    out = [f"## {name}: {' vs '.join(data['methods'])} on {model}, {data['steps_per_run']} steps a run "
           f"({kind})\n",
           f"{done} of {total} runs finished. Pairing checked: {compare_report.pairing(data)}. Its setup and command: "
           f"[llm/README.md]({os.path.relpath(folder.parent / 'README.md', doc.parent)}); its compare report: "
           f"[{name}/report.md]({os.path.relpath(folder / 'report.md', doc.parent)}).\n"]
    return out + report_sections(name, data, Style(level=3), folder, doc, reference=reference)


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
    rows = llm_rows(results)
    out.append("Every tested pair: the paired difference A − B on test over the seeds, with its 95% interval. A verdict "
               "(better/worse) is stated only where the interval excludes 0; otherwise no difference was detected, "
               "and the interval's width is the smallest difference the study, at that many seeds, could have shown. "
               "Accuracy and macro-F1 are in points (higher is better); the LLM rows' test loss is the response's "
               "cross-entropy (lower is better). 'pending' means the cell has no result yet. The tuned cells are the "
               "settings each side's validation tuning chose (its section below has the grid).\n")
    out += GLANCE_HEADER
    for task in v.proto.tasks:
        out += glance_rows(f"{task} ({v.tasks[task]['steps_per_run']} steps)", v.tasks[task], v.style, answers=False)
    for name, row in rows.items():
        if not Plan.from_data(row).is_screen():  # a screen ranks, it tests no pair
            out += glance_rows(f"{name} ({row['steps_per_run']} steps)", row, Style(), answers=True)
    out.append("")
    for task in v.proto.tasks:
        done, total = task_status(v, task)
        lines = [headroom_line(v, task), *check_pair_lines(v, task)]
        pending = [mm.label for mm in v.proto.methods_of(task).values()
                   if not mm.tuned_as and v.plans[task].choose(v.records[task], mm.name) is None]
        if pending:
            lines.append(f"- Tuning still pending for: {', '.join(pending)}.")
        out += [f"**{task}** ({done} of {total} runs):\n", *filter(None, lines), ""]
    references = {name: screen_reference(name, row, rows) for name, row in rows.items()}
    for name, row in rows.items():
        if Plan.from_data(row).is_screen():
            out += screen_summary(name, row, references[name])

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
        f"than {100 * stats.PLATEAU:.0f} point over the best before it. Test accuracy is that of the model "
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
        out += task_sections(v, task, results, doc)
    for name, row in rows.items():
        out += llm_sections(name, row, results, doc, references[name])

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
