"""The report of `neat-peft compare`, read from compare.json alone: report.md (`sections`: the verdicts, the results
at the chosen cells, the r sweeps, the generated answers, the budget check, the tuning tables), params.png (test
metric against trainable parameters), sweep.png, budget_check.png and curves.png (per tuned method, the validation
curves of its seed-0 tuning runs, the chosen cell thick). Every figure is read from the JSON; cells without results
show as pending, so the report is valid at any point of a compare. docs/RESULTS.md shows the same sections in
another `Style` (percent, the study's method labels): one report writer for both."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from . import compare_stats as stats
from .compare_plan import AXES, Job, Plan

FILES = ("report.md", "params.png", "sweep.png", "budget_check.png", "curves.png")
SECTION_PLOTS = {"sweep": "sweep.png", "budget_check": "budget_check.png", "tuning": "curves.png"}  # section -> its plot


def cell_text(lr: float, s: Optional[float]) -> str:
    return f"lr {lr:g}" + ("" if s is None else f", s {s:g}")


ANSWER_METRICS = ("accuracy", "macro_f1")  # of generated answers (causal-lm with eval.generate_answers)
HISTOGRAM_SHOWN = 8  # the most frequent answers the report lists (the rest summed; all are in compare.json)


def answer_value(record: dict[str, Any], metric: str) -> Optional[float]:
    return record.get("answers", {}).get("test", {}).get(metric)


def comparisons(data: dict[str, Any], answer_metric: Optional[str] = None) -> list[dict[str, Any]]:
    """Each tested pair (A, B): paired test differences A − B, interval and status; of the primary metric, or of
    the generated answers' `answer_metric` (accuracy, macro_f1: higher is better)."""
    plan, records = Plan.from_data(data), {r["key"]: r for r in data["runs"]}
    lower = data["lower_is_better"] if answer_metric is None else False

    def value(r):
        return r["test_value"] if answer_metric is None else answer_value(r, answer_metric)

    values = {m: {s: value(r) for s, r in plan.seed_runs(records, m).items() if value(r) is not None}
              for m in plan.methods}
    out = []
    for a, b in plan.pair_list():
        result = stats.paired(values[a], values[b])
        out.append({"a": a, "b": b, "metric": answer_metric or data.get("primary_metric"), "result": result,
                    "status": stats.verdict_status(result, lower) if plan.testable(a, b) else stats.UNTESTED})
    return out


def has_answers(data: dict[str, Any]) -> bool:
    return any("answers" in r for r in data["runs"])


@dataclass(frozen=True)
class Style:
    """How the report shows its figures. The default is report.md's: metric values as recorded (4 decimals) under
    the methods' own names, sections at heading level 2. `percent` shows fractions (accuracy, F1) in percent with
    1 decimal and differences in points; `labels` renames methods; `level` nests the sections under a document's
    own heading (docs/RESULTS.md shows each task's sections this way)."""
    percent: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    level: int = 2

    def value(self, x: Optional[float]) -> str:
        if x is None or math.isnan(x):
            return "–"
        return f"{100 * x:.1f}" if self.percent else f"{x:.4f}"

    def diff(self, x: float) -> str:
        return f"{100 * x:+.1f}" if self.percent else f"{x:+.4f}"

    def spread(self, values: list[float]) -> str:
        """Mean ± sample std over seeds; one value (no spread to show) as itself."""
        mean, sd = stats.mean_std(values)
        return self.value(mean) if len(values) <= 1 else f"{self.value(mean)} ± {self.value(sd)}"

    def metric(self, name: str) -> str:
        return f"{name} %" if self.percent else name

    def name(self, method: str) -> str:
        return self.labels.get(method, method)

    def heading(self, title: str) -> str:
        return "#" * self.level + " " + title


def curve_key(data: dict[str, Any]) -> tuple[str, bool]:
    """What the validation curves show, and whether lower is better on it: the primary metric, or the loss where
    no curve records it (a causal-lm compare scored on its generated answers, measured once at the end)."""
    metric = data["primary_metric"]
    if any(metric in p for r in data["runs"] for p in r.get("validation_curve") or ()):
        return metric, data["lower_is_better"]
    return "loss", True


def plateau_text(data: dict[str, Any], record: dict[str, Any]) -> str:
    key, lower = curve_key(data)
    values = [p[key] for p in record.get("validation_curve") or () if key in p]
    return {True: "yes", False: "no", None: "–"}[stats.plateaued(values, stats.PLATEAU, lower)]


def baseline(data: dict[str, Any]) -> Optional[tuple[str, dict[int, float]]]:
    """The runs' baseline of the test primary metric, per seed (each seed's split has its own): the majority
    class, else the untrained model; None where the runs record neither."""
    metric, found, kind = data["primary_metric"], {}, None
    for r in data["runs"]:
        base = r.get("baseline") or {}
        if r["status"] == "ok" and r["phase"] != "check" and metric in base:
            found[r["seed"]] = base[metric]
            kind = "majority class" if "label" in base else "untrained model"
    return (kind, found) if found else None


def method_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method, its runs at the chosen cell: the finished ones (`runs`, seed -> record) and how many diverged."""
    plan, records = Plan.from_data(data), {r["key"]: r for r in data["runs"]}
    rows = []
    for m in plan.methods:
        runs, cell = plan.seed_runs(records, m), plan.choose(records, m)
        diverged = 0 if cell is None else sum(
            records.get(Job(m, *cell, seed, "seed").key, {}).get("status") == "diverged"
            for seed in range(plan.seeds_of(m)))
        first = next(iter(runs.values()), {})
        answers = {metric: [answer_value(r, metric) for r in runs.values() if answer_value(r, metric) is not None]
                   for metric in ANSWER_METRICS}
        histogram: dict[str, int] = {}
        for r in runs.values():
            for answer, count in r.get("answers", {}).get("test", {}).get("answer_histogram", {}).items():
                histogram[answer] = histogram.get(answer, 0) + count
        mean, sd = stats.mean_std([r["test_value"] for r in runs.values()])
        rows.append({"method": m, "cell": cell, "runs": runs, "n": len(runs), "planned": plan.seeds_of(m),
                     "diverged": diverged, "mean": mean, "sd": sd, "trainable": first.get("trainable_params"),
                     "answers": answers, "histogram": dict(sorted(histogram.items(), key=lambda kv: -kv[1]))})
    return rows


def verdict_line(c: dict[str, Any]) -> str:
    r = c["result"]
    return f"{c['a']} vs {c['b']} ({c['metric']}): {c['status']}" + ("" if r is None else
           f" (difference {r['mean']:+.4f}, 95% interval [{r['low']:+.4f}, {r['high']:+.4f}], width "
           f"{r['width']:.4f}, {r['n']} paired seeds)")


def summary(data: dict[str, Any]) -> str:
    """The console's result: per method the chosen cell and test mean ± sd, then each verdict."""
    metric = data["primary_metric"]
    width = max(10, *(len(m) for m in data["methods"]))
    lines = [f"\n{'method':<{width}} {'chosen cell':<20} {'seeds':>5} {'test ' + metric:>22} {'trainable':>12}"]
    for row in method_rows(data):
        cell = cell_text(*row["cell"]) if row["cell"] else "tuning pending"
        test = f"{Style().value(row['mean'])} ± {Style().value(row['sd'])}" if row["n"] else "–"
        lines.append(f"{row['method']:<{width}} {cell:<20} {row['n']:>5} {test:>22} "
                     f"{row['trainable'] if row['trainable'] is not None else '–':>12}")
    if Plan.from_data(data).is_screen():
        return "\n".join(lines + [f"one seed: a screen, no pair tested; report.md ranks the methods by validation "
                                   f"{metric}"])
    lines += [verdict_line(c) for c in comparisons(data)]
    if has_answers(data):
        lines += [verdict_line(c) for metric in ANSWER_METRICS for c in comparisons(data, metric)]
    return "\n".join(lines)


def at_edge(plan: Plan, records: dict[str, dict], method: str) -> list[str]:
    """The tuned axes (lr, scaling) at whose smallest or largest value of the (extended) grid the chosen cell sits:
    on an axis the edge rule extends, its steps ran out there; on one it does not, it was never tried."""
    chosen, cells = plan.choose(records, method), plan.grid(records, method)
    if chosen is None:
        return []
    out = []
    for i, axis in enumerate(AXES):
        values = sorted({c[i] for c in cells if c[i] is not None})
        if len(values) >= 2 and chosen[i] in (values[0], values[-1]):
            out.append(axis)
    return out


def tuning_table(data: dict[str, Any], method: str, style: Style = Style()) -> str:
    plan, records = Plan.from_data(data), {r["key"]: r for r in data["runs"]}
    name = style.name(method)
    if plan.cell_of(method):
        return f"{name}: no tuning of its own; it runs at the cell chosen for {style.name(plan.cell_of(method))}."
    base = set(map(tuple, plan.base_cells(method)))
    chosen = plan.choose(records, method)
    lines = [f"| {name}: cell | validation {style.metric(data['primary_metric'])} (seed 0) | run | |",
             "|---|---:|---|---|"]
    for lr, s in sorted(plan.grid(records, method), key=lambda c: (c[0], c[1] or 0)):
        rec = records.get(Job(method, lr, s, 0, "tune").key)
        value = ("pending" if rec is None else style.value(rec.get("validation")) if rec["status"] == "ok"
                 else rec["status"])
        notes = ["chosen"] if (lr, s) == chosen else []
        if (lr, s) not in base:
            notes.append("added by the edge rule")
        for axis in at_edge(plan, records, method) if (lr, s) == chosen else ():
            notes.append(f"**at the grid's edge in {axis}**" + (
                f" after {plan.edge_steps} edge step(s): a better value may lie beyond (more --grid edge_steps)"
                if axis in plan.extend else ": a better value may lie beyond (the edge rule does not extend it)"))
        lines.append(f"| {cell_text(lr, s)} | {value} | {rec['key'] if rec else ''} | {', '.join(notes)} |")
    return "\n".join(lines)


def verdict_rows(found: list[dict[str, Any]], style: Style = Style()) -> list[str]:
    lines = []
    for c in found:
        r, pair = c["result"], f"{style.name(c['a'])} − {style.name(c['b'])}"
        if r is None:
            lines.append(f"| {pair} | {c['metric']} | – | – | – | – | {c['status']} |")
        else:
            lines.append(f"| {pair} | {c['metric']} | {style.diff(r['mean'])} | [{style.diff(r['low'])}, "
                         f"{style.diff(r['high'])}] | {style.value(r['width'])} | {r['n']} | {c['status']} |")
    return lines


def verdict_header(style: Style) -> list[str]:
    unit = " (points)" if style.percent else ""
    return [f"| comparison | metric | mean difference{unit} | 95% interval | width{unit} | seeds | verdict |",
            "|---|---|---:|---|---:|---:|---|"]


def answers_section(data: dict[str, Any], style: Style = Style()) -> list[str]:
    """Generated answers on test (causal-lm with eval.generate_answers): per method accuracy and macro-F1 over
    the labels, the answers' histogram over the seeds, and the paired verdicts of both."""
    sd = " (mean ± sd)" if not style.percent else " % (mean ± sd)"
    lines = [style.heading("Generated answers (test)"), "",
             "Greedy answers read as labels (their first word); higher is better. Tuning still used the validation "
             f"{data['primary_metric']}. Better or worse only where the paired 95% interval excludes 0.", "",
             f"| method | seeds | answer accuracy{sd} | answer macro-F1{sd} | answers, all seeds |",
             "|---|---:|---:|---:|---|"]
    for row in method_rows(data):
        top = list(row["histogram"].items())
        shown = ", ".join(f"{a or '(none)'} {n}" for a, n in top[:HISTOGRAM_SHOWN]) + (
            f", {len(top) - HISTOGRAM_SHOWN} other answers {sum(n for _, n in top[HISTOGRAM_SHOWN:])}"
            if len(top) > HISTOGRAM_SHOWN else "")
        acc, f1 = (style.spread(row["answers"][m]) for m in ANSWER_METRICS)
        lines.append(f"| {style.name(row['method'])} | {row['n']} | {acc} | {f1} | {shown or '–'} |")
    base = next((r["answers"]["majority_baseline"] for r in data["runs"] if "answers" in r), None)
    if base:
        lines += ["", f"Majority class ({base['label']}, the training split's most frequent response) on the test "
                  f"split of one seed: accuracy {style.value(base['accuracy'])}, macro-F1 "
                  f"{style.value(base.get('macro_f1'))}."]
    if not Plan.from_data(data).is_screen():  # a screen's answers are in its ranking table
        lines += ["", *verdict_header(style)]
        lines += verdict_rows([c for metric in ANSWER_METRICS for c in comparisons(data, metric)], style)
    return lines


def screen_runs(data: dict[str, Any]) -> dict[str, tuple[Optional[tuple], Optional[dict[str, Any]]]]:
    """Per method of a screen: its chosen cell and its seed-0 run there (None for either while pending)."""
    plan, records = Plan.from_data(data), {r["key"]: r for r in data["runs"]}
    out = {}
    for m in plan.methods:
        cell = plan.choose(records, m)
        out[m] = cell, None if cell is None else records.get(Job(m, *cell, 0, "tune").key)
    return out


def screen_table(data: dict[str, Any], style: Style = Style(),
                 reference: Optional[tuple[str, dict[str, Any]]] = None) -> list[str]:
    """A one-seed compare (a screen): each method's seed-0 run at its chosen cell, ranked by its validation value
    (the figure tuning chooses on; diverged runs last, pending ones after), with test and answer figures beside it.
    `reference`: (label, record) of a run from elsewhere on the same split and budget, ranked among them."""
    plan = Plan.from_data(data)
    rows = [(style.name(m), cell, rec) for m, (cell, rec) in screen_runs(data).items()]
    if reference:
        label, rec = reference
        rows.append((label, (rec["lr"], rec["scaling"]), rec))
    rows.sort(key=lambda row: (row[2] is None, -plan.score(row[2]) if row[2] else 0.0))
    metric = style.metric(data["primary_metric"])
    answers = has_answers(data) or any(rec and "answers" in rec for _, _, rec in rows)
    pct = " %" if style.percent else ""
    lines = [f"| rank | method | cell | validation {metric} | test {metric} | "
             + (f"answer accuracy{pct} | answer macro-F1{pct} | " if answers else "")
             + "trainable params | plateaued | run min |",
             "|---:|---|---|---:|---:|" + ("---:|---:|" if answers else "") + "---:|---:|---:|"]
    for rank, (name, cell, rec) in enumerate(rows, 1):
        if rec is None or rec["status"] != "ok":
            status = "pending" if rec is None else rec["status"]
            lines.append(f"| – | {name} | {cell_text(*cell) if cell else 'pending'} | {status} | – | "
                         + ("– | – | " if answers else "") + "– | – | – |")
            continue
        lines.append(f"| {rank} | {name} | {cell_text(*cell)} | {style.value(rec['validation'])} | "
                     f"{style.value(rec['test_value'])} | "
                     + "".join(f"{style.value(answer_value(rec, m))} | " for m in (ANSWER_METRICS if answers else ()))
                     + f"{rec['trainable_params']:,} | {plateau_text(data, rec)} | {rec['wall_seconds'] / 60:.1f} |")
    return lines


def pairing(data: dict[str, Any]) -> str:
    """Whether, at every seed, every finished run at the compare's budget (tuning and seeds; not the budget
    checks, which may draw more examples) used the very same split (equal digests of its files)."""
    by_seed: dict[int, set] = {}
    for r in data["runs"]:
        if r["phase"] != "check" and r["status"] == "ok":
            by_seed.setdefault(r["seed"], set()).add(r["split_sha256"])
    bad = sorted(s for s, d in by_seed.items() if len(d) > 1)
    if not by_seed:
        return "pending"
    seeds = "seed" if len(by_seed) == 1 else "each of seeds"
    return (f"at {seeds} {', '.join(map(str, sorted(by_seed)))} every finished run used the same split "
            "(equal split digests)" if not bad
            else f"NOT paired at seed(s) {bad}: the runs' splits differ (check the data source)")


def check_pairs(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each tested pair (A, B) with both budget checks of a factor finished: the seed-0 test difference A − B at
    the compare's budget ("difference", at "steps") and trained `factor` times longer ("check_difference", at
    "check_steps"). One seed each: whether the budget decided the comparison, not a verdict."""
    plan, records = Plan.from_data(data), {r["key"]: r for r in data["runs"]}
    checks = {(r["factor"], r["method"]): r for r in data["runs"] if r["phase"] == "check" and r["status"] == "ok"}
    out = []
    for a, b in plan.pair_list():
        base_a, base_b = plan.seed_runs(records, a).get(0), plan.seed_runs(records, b).get(0)
        for factor in sorted({f for f, _ in checks}):
            ca, cb = checks.get((factor, a)), checks.get((factor, b))
            if ca and cb and base_a and base_b:
                out.append({"a": a, "b": b, "factor": factor, "steps": base_a["steps"], "check_steps": ca["steps"],
                            "difference": base_a["test_value"] - base_b["test_value"],
                            "check_difference": ca["test_value"] - cb["test_value"]})
    return out


def budget_checks(data: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each finished budget check with the finished seed-0 run at its cell that it trains longer."""
    records = {r["key"]: r for r in data["runs"]}
    return [(r, base) for r in data["runs"] if r["phase"] == "check" and r["status"] == "ok"
            for base in [records.get(Job(r["method"], r["lr"], r["scaling"], 0, "tune").key)]
            if base is not None and base["status"] == "ok"]


def sweeps(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The r sweeps: two or more variants of one base method that differ only in `method.r=` (tuned on their own
    or at another's cell, `cell_of`). Per sweep (named by its base method and other overrides), by r: the seed-0
    run at the chosen cell as {"method", "r", "trainable", "test"} (None while pending)."""
    plan, records = Plan.from_data(data), {r["key"]: r for r in data["runs"]}
    groups: dict[str, list[tuple[int, str]]] = {}
    for m, v in plan.variants.items():
        r = [int(o.split("=", 1)[1]) for o in v["overrides"] if o.startswith("method.r=")]
        if m in plan.methods and r:
            rest = [o for o in v["overrides"] if not o.startswith("method.r=")]
            groups.setdefault(", ".join([v["method"], *rest]), []).append((r[0], m))
    out = {}
    for name, members in groups.items():
        if len(members) >= 2:
            out[name] = [{"method": m, "r": r, **({"trainable": rec["trainable_params"], "test": rec["test_value"]}
                                                  if rec else {"trainable": None, "test": None})}
                         for r, m in sorted(members) for rec in [plan.seed_runs(records, m).get(0)]]
    return out


def grid_text(plan: Plan, m: str) -> str:
    variant = plan.variants.get(m)
    what = f" ({variant['method']}" + "".join(f", {o}" for o in variant["overrides"]) + ")" if variant else ""
    if plan.cell_of(m):
        return f"{m}{what}: the cell of {plan.cell_of(m)}"
    g = plan.grids[m]
    return f"{m}{what}: lr {', '.join(f'{v:g}' for v in g['lr'])}" + (
        f", s {', '.join(f'{v:g}' for v in g['scaling'])}" if g.get("scaling", [None]) != [None] else "")


def results_table(data: dict[str, Any], style: Style = Style()) -> list[str]:
    """Per method at its chosen cell: seeds finished of planned (diverged ones named and left out), validation and
    test mean ± sd over seeds, trainable parameters, run time, peak memory, CPU share (below 1: the run waited for
    the cores) and how many runs had plateaued (compare_stats.plateaued); then the runs' baseline."""
    metric = style.metric(data["primary_metric"])
    lines = [f"| method | chosen cell | seeds done / planned | validation {metric} | test {metric} | "
             "trainable params | run min (mean) | peak memory MB (max) | CPU share (mean) | plateaued |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in method_rows(data):
        runs = list(row["runs"].values())
        flat = [p for p in (plateau_text(data, r) for r in runs) if p != "–"]
        wall = stats.mean_std([r["wall_seconds"] / 60 for r in runs])[0]
        share = stats.mean_std([r["cpu_share"] for r in runs if r.get("cpu_share") is not None])[0]
        label = style.name(row["method"]) + (
            f" ({row['diverged']} seed(s) diverged, left out)" if row["diverged"] else "")
        lines.append(f"| {label} | {cell_text(*row['cell']) if row['cell'] else 'pending'} | "
                     f"{row['n']} / {row['planned']} | {style.spread([r['validation'] for r in runs])} | "
                     f"{style.spread([r['test_value'] for r in runs])} | "
                     + (f"{row['trainable']:,}" if row["trainable"] is not None else "–") + " | "
                     + ("–" if math.isnan(wall) else f"{wall:.1f}") + " | "
                     + (f"{max(r['peak_rss_mb'] for r in runs):.0f}" if runs else "–") + " | "
                     + ("–" if math.isnan(share) else f"{share:.2f}") + " | "
                     + (f"{flat.count('yes')} of {len(flat)}" if flat else "–") + " |")
    base = baseline(data)
    if base:
        kind, values = base
        lines.append(f"| {kind} | – | {len(values)} | – | {style.spread(list(values.values()))} | 0 | – | – | – | – |")
    return lines


def sweep_table(data: dict[str, Any], style: Style = Style()) -> list[str]:
    metric = style.metric(data["primary_metric"])
    return [f"| sweep | r | method | trainable params | seed 0 test {metric} |", "|---|---:|---|---:|---:|"] + [
        f"| {name} | {p['r']} | {style.name(p['method'])} | " + (f"{p['trainable']:,}" if p["trainable"] else "–")
        + f" | {style.value(p['test']) if p['test'] is not None else 'pending'} |"
        for name, pts in sweeps(data).items() for p in pts]


def budget_check_tables(data: dict[str, Any], style: Style = Style()) -> list[str]:
    """Each budget check beside the seed-0 run it trains longer ("at the budget → longer"), then each tested
    pair's seed-0 difference at both budgets."""
    metric = style.metric(data["primary_metric"])
    lines = [f"| method | cell | steps | validation {metric} | test {metric} | plateaued | CPU-core-hours of the "
             "check |", "|---|---|---|---|---|---|---:|"]
    for check, base in budget_checks(data):
        lines.append(f"| {style.name(check['method'])} | {cell_text(check['lr'], check['scaling'])} | "
                     f"{base['steps']} → {check['steps']} | {style.value(base['validation'])} → "
                     f"{style.value(check['validation'])} | {style.value(base['test_value'])} → "
                     f"{style.value(check['test_value'])} | {plateau_text(data, base)} → {plateau_text(data, check)} | "
                     + (f"{check['cpu_seconds'] / 3600:.2f}" if "cpu_seconds" in check else "–") + " |")
    pairs = check_pairs(data)
    if pairs:
        unit = " (points)" if style.percent else ""
        lines += ["", f"| comparison | seed 0 test difference{unit} | at steps | trained longer | at steps |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {style.name(c['a'])} − {style.name(c['b'])} | {style.diff(c['difference'])} | {c['steps']} | "
                  f"{style.diff(c['check_difference'])} | {c['check_steps']} |" for c in pairs]
    return lines


def sections(data: dict[str, Any], style: Style = Style(),
             reference: Optional[tuple[str, dict[str, Any]]] = None) -> dict[str, list[str]]:
    """The report's sections in order, by name (verdict, or a one-seed compare's screen ranking; results, sweep,
    answers, budget_check, tuning), each a heading and its lines; those without content are left out. report.md is
    all of them; docs/RESULTS.md shows each task's in percent under its own headings. `reference`: a run from
    elsewhere that a screen's table ranks beside its methods (screen_table)."""
    plan = Plan.from_data(data)
    h = style.heading
    curve, _ = curve_key(data)
    # The rule is in the curve's own units: points only where the curve is the (percent-shown) primary metric.
    threshold = (f"{100 * stats.PLATEAU:g} point" if style.percent and curve == data["primary_metric"]
                 else f"{stats.PLATEAU:g} (in its units)")
    if plan.is_screen():
        out = {"screen": [h("Screen: one seed, ranked (no verdicts)"), "",
                          f"One seed per method: no pair is tested (a paired interval needs {stats.MIN_PAIRED_SEEDS} "
                          f"or more seeds), and a gap smaller than the spread over seeds is noise. The methods are "
                          f"ranked by their seed-0 validation {data['primary_metric']}, the figure tuning chooses on; "
                          "confirm a promising one at 3 or more paired seeds (`--seeds 3`) before relying on it.", "",
                          *screen_table(data, style, reference)]}
    else:
        out = {"verdict": [h("Verdict"), "", "Better or worse only where the paired 95% interval of the test "
                           "difference excludes 0; otherwise no difference detected, with the interval's width: the "
                           "smallest difference this many seeds could show.", "", *verdict_header(style),
                           *verdict_rows(comparisons(data), style)]}
    out["results"] = [h("Results at the chosen cells"), "", "Mean ± sample std over the seeds finished. "
                      f"'Plateaued': the last third of the validation curve gained less than {threshold} of {curve} "
                      "over the best before it.", "", *results_table(data, style)]
    if sweeps(data):
        out["sweep"] = [h(f"Test {data['primary_metric']} against r (seed 0 at the chosen cells; a `cell_of` variant "
                          "at the cell of the method it follows)"), "", *sweep_table(data, style)]
    if has_answers(data):
        out["answers"] = answers_section(data, style)
    if budget_checks(data):
        factors = sorted({c["factor"] for c, _ in budget_checks(data)})
        out["budget_check"] = [h(f"Budget check: the chosen cells at seed 0, trained "
                                 f"{', '.join(f'{f}x' for f in factors)} longer"), "",
                               "One seed each: whether the result still moves with more training, not a verdict.", "",
                               *budget_check_tables(data, style)]
    out["tuning"] = [h("Tuning (seed 0, validation)"), ""]
    for m in plan.methods:
        out["tuning"] += [tuning_table(data, m, style), ""]
    return out


def build(data: dict[str, Any], plots: tuple[str, ...] = ()) -> str:
    plan = Plan.from_data(data)
    metric, lower = data["primary_metric"], data["lower_is_better"]
    used = data.get("data_used", {})
    lines = [f"# neat-peft compare: {' vs '.join(plan.methods)} on {data['task']}", "",
             f"- model `{data['model']}`, data `{data['data_source']}`: "
             + ", ".join(f"{v:,} {k}" for k, v in used.items()) + f" examples; {data['steps_per_run']} steps a run",
             f"- metric: test {metric} ({'lower' if lower else 'higher'} is better), tuned on the final validation "
             f"{metric} at seed 0; {plan.seeds} paired seed(s) per method at its chosen cell",
             f"- grids: " + "; ".join(grid_text(plan, m) for m in plan.methods)
             + f"; edge rule: up to {plan.edge_steps} step(s) past each edge",
             f"- runs finished: {len(data['runs'])}; errors logged: {len(data.get('errors', []))}; pairing: "
             f"{pairing(data)}", ""]
    for section in sections(data).values():
        lines += section + ([""] if section[-1] else [])
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Every run's command, curves, parameters, time and memory are in compare.json."]
    return "\n".join(lines) + "\n"


def tuning_curves(data: dict[str, Any]) -> tuple[dict[str, dict[tuple, list[dict]]], str]:
    """Per tuned method (not a `cell_of` variant), cell -> the validation curve of its finished seed-0 run at that
    cell, its points that record `curve_key`; and that key."""
    plan, records = Plan.from_data(data), {r["key"]: r for r in data["runs"]}
    key = curve_key(data)[0]
    runs = {m: {cell: rec["validation_curve"] for cell in plan.grid(records, m)
                for rec in [records.get(Job(m, *cell, 0, "tune").key)]
                if rec is not None and rec["status"] == "ok" and rec["validation_curve"]}
            for m in plan.methods if not plan.cell_of(m)}
    return {m: {cell: [p for p in curve if key in p] for cell, curve in cells.items()}
            for m, cells in runs.items() if cells}, key


def plot(data: dict[str, Any], out: Path) -> tuple[str, ...]:
    """params.png, sweep.png, budget_check.png and curves.png, each where it has data (an earlier one of this
    folder's removed where not); none without matplotlib (the report says so by not listing them)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ()
    from ..formats import atomic_write  # a killed compare leaves the old figure or the new one, never half of one

    plan, records = Plan.from_data(data), {r["key"]: r for r in data["runs"]}
    metric = data["primary_metric"]
    written = []

    def save(fig, name: str, dpi: int) -> None:
        fig.tight_layout()
        atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in method_rows(data):
        if row["n"] and row["trainable"]:
            ax.errorbar([row["trainable"]], [row["mean"]], yerr=[row["sd"]], fmt="o", capsize=4, label=row["method"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"test {metric} (mean ± sd over seeds)")
    if ax.get_legend_handles_labels()[0]:  # no method has a finished seed yet: an empty plot, no legend
        ax.legend()
    save(fig, "params.png", 110)
    found = {name: [p for p in pts if p["test"] is not None] for name, pts in sweeps(data).items()}
    if any(found.values()):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name, pts in found.items():
            if pts:
                ax.plot([p["trainable"] for p in pts], [p["test"] for p in pts], marker="o", label=name)
                for p in pts:
                    ax.annotate(f"r={p['r']}", (p["trainable"], p["test"]), textcoords="offset points",
                                xytext=(4, -10), fontsize=7)
        base = baseline(data)
        if base is not None and 0 in base[1]:
            ax.axhline(base[1][0], color="grey", ls="--", lw=1, label=base[0])
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"test {metric}, seed 0")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        save(fig, "sweep.png", 100)
    else:
        (out / "sweep.png").unlink(missing_ok=True)
    panels, key = tuning_curves(data)
    checks = budget_checks(data)
    if checks:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, (check, base) in enumerate(checks):
            for run, style in ((base, ":"), (check, "-")):
                points = [p for p in run["validation_curve"] if key in p]
                ax.plot([p["step"] for p in points], [p[key] for p in points], style, marker=".", color=f"C{i}",
                        label=f"{check['method']}, {cell_text(check['lr'], check['scaling'])}, {run['steps']} steps")
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {key}, seed 0")
        ax.set_title("the compare's budget (dotted) and the budget check (solid)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "budget_check.png", 90)
    else:
        (out / "budget_check.png").unlink(missing_ok=True)
    if not panels:  # nothing to draw: no figure (and not an earlier one of this folder's)
        (out / "curves.png").unlink(missing_ok=True)
        return tuple(written)
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(5.0, 4.2 * cols), 3.4 * rows), squeeze=False, sharey=True)
    for ax, (m, runs) in zip(axes.flat, panels.items()):
        chosen = plan.choose(records, m)
        for cell, points in runs.items():
            ax.plot([p["step"] for p in points], [p[key] for p in points], lw=2.5 if cell == chosen else 1,
                    marker=".", label=cell_text(*cell))
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel(f"validation {key}")
    fig.suptitle("tuning runs at seed 0 (chosen cell thick)", fontsize=10)
    save(fig, "curves.png", 90)
    return tuple(written)


def write(out: Path, data: dict[str, Any]) -> None:
    from .rundir import atomic_write_text

    atomic_write_text(out / "report.md", build(data, plot(data, out)))
