"""One-off: the quality study's results/study.json (its own runner's format) as one `neat-peft compare` folder per
task (results/<task>/compare.json), so that compare's plan, statistics and report read the study (issue #27).

    python -m benchmarks.quality.convert_study            # writes results/<task>/compare.json
    python -m benchmarks.quality.convert_study --expected tests/data/quality_study_expected.json

--expected writes, with the study's own code (protocol.py, study_doc.View), every chosen cell, per-seed test value,
paired difference, interval and status: the fixture tests/test_quality_benchmark.py compares the converted folders
with (through compare_plan and compare_report), so the conversion is checked against the old code's figures.

A run's record carries over whole, under compare's names: key without the "task/" prefix, `scaling` for `scale`,
`validation` the final validation accuracy the study tuned on (the generated answers' on smollm2, kept whole in
`validation_metrics`), `test_value` the test accuracy; smollm2's generated answers also under `answers`. The study
extended its grids on the learning rate only (`extend: [lr]`); its r sweep is `cell_of` the r=8 variant with 1 seed;
its budget checks (twice the training examples) are runs of phase "check", factor 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from benchmarks.quality.protocol import LONGER, Protocol
from neat_peft.cli import compare, recipe

HERE = Path(__file__).resolve().parent


def task_overrides(task, command: str, head_lr: float) -> list[str]:
    """The overrides every run of the task shared: its data and sizes (a prepared data file as its runs read it)
    and the heads' rate of every method but head-only (whose own, tuned, rate comes later in its command)."""
    data = None
    if task.prepare is not None:
        data = [a for a in shlex.split(command) if a.startswith(("data.source=", "data.text_column=",
                                                                 "data.label_column="))]
    return [*task.overrides(data), f"train.head_lr={head_lr}"]


def answers(scores: dict) -> dict:
    """The study's generated-answer scores under compare's names: its `answers` (the five most frequent) is the
    whole histogram where its counts add up to the examples."""
    out = {k: v for k, v in scores.items() if k not in ("loss", "answers")}
    if "answer_histogram" not in out and sum(scores["answers"].values()) == scores["examples"]:
        out["answer_histogram"] = scores["answers"]
    return out


def record(old: dict, task: str, generation: bool) -> dict:
    new = {k: v for k, v in old.items() if k not in ("task", "scale", "key")}
    key = old["key"].split("/", 1)[1]
    factor = 1
    if LONGER in old["task"]:
        factor = int(old["task"].partition(LONGER)[2])
        key += f"_x{factor}"
    new.update(key=key, scaling=old["scale"], factor=factor, phase="check" if factor > 1 else old["phase"],
               validation=(old.get("validation") or {}).get("accuracy"), validation_metrics=old.get("validation"),
               test_value=(old.get("test") or {}).get("accuracy"), baseline=old.get("majority_baseline"))
    if generation and old["status"] == "ok":
        new["answers"] = {part: answers(old[part]) for part in ("validation", "test")}
        new["answers"]["majority_baseline"] = old["majority_baseline"]
    return new


def convert(data: dict) -> dict[str, dict]:
    proto = Protocol.from_snapshot(data["protocol"])
    out = {}
    for name, task in proto.tasks.items():
        runs = [r for r in data["runs"] if r["task"] == name]
        checks = [r for r in data.get("checks", []) if r["task"].partition(LONGER)[0] == name]
        overrides = task_overrides(task, runs[0]["command"], data["protocol"]["head_lr"])
        config = recipe.resolve(None, overrides)
        methods = proto.methods_of(name)
        variants, grids = {}, {}
        for m in methods.values():
            variant = {"method": m.family, "overrides": [o for o in m.overrides if not o.startswith("method.name=")]}
            seeds = proto.seeds_of(name, m.name)
            if seeds != max(proto.seeds_of(name, n) for n in methods):
                variant["seeds"] = seeds
            if m.tuned_as:
                variant["cell_of"] = m.tuned_as
            variants[m.name] = variant
        for m in methods.values():
            source = methods[m.tuned_as] if m.tuned_as else m
            grids[m.name] = {"lr": sorted({lr for lr, _ in source.grid}),
                             "scaling": sorted({s for _, s in source.grid if s is not None}) or [None]}
            if m.family != "neat":
                del grids[m.name]["scaling"]
        factors = sorted({int(r["task"].partition(LONGER)[2]) for r in checks})
        out[name] = {
            "schema": compare.SCHEMA, "kind": compare.KIND,
            "converted_from": "benchmarks/quality/results/study.json (benchmarks/quality/convert_study.py)",
            "study_task": {k: v for k, v in data["protocol"]["tasks"][name].items()},
            "recipe": {k: v for k, v in config.items() if k not in compare.PER_RUN_KEYS}, "recipe_file": None,
            "overrides": overrides, "task": config["task"], "model": config["model.name"],
            "data_source": config["data.source"], "data_used": runs[0]["data_used"], "methods": list(methods),
            "grids": grids, "edge_steps": proto.edge_steps, "seeds": max(proto.seeds_of(name, n) for n in methods),
            "budget_check": factors[0] if factors else None, "primary_metric": "accuracy", "lower_is_better": False,
            "steps_per_run": task.steps, "variants": variants,
            "pairs": [list(p) for p in proto.pairs if set(p) <= set(methods)], "extend": ["lr"],
            "created": data["created"], "updated": data["updated"], "machine": data["machine"],
            "versions": data["versions"], "invocations": data["invocations"],
            "runs": [record(r, name, task.generation) for r in runs + checks],
            "errors": [record(r, name, task.generation) for r in data["errors"] if r["task"] == name],
            "retired": [r for r in data.get("retired", []) if r["task"] == name],
        }
    return out


def expected(data: dict) -> dict:
    """Every figure the equivalence test checks, from the study's own code."""
    from benchmarks.quality.study_doc import View
    from neat_peft.cli import compare_stats as stats

    v = View(data)
    out = {}
    for task in v.proto.tasks:
        methods = {}
        for name in v.proto.methods_of(task):
            methods[name] = {"chosen": v.chosen(task, name),
                             "grid": v.proto.grid(v.records, task, name) if not v.proto.methods[name].tuned_as else [],
                             "test": {str(s): x for s, x in v.test_acc(task, name).items()}}
        pairs = []
        for a, b in v.proto.pairs:
            if a in methods and b in methods:
                result = stats.paired(v.test_acc(task, a), v.test_acc(task, b))
                pairs.append({"a": a, "b": b, "result": result, "status": stats.verdict_status(result)})
        out[task] = {"methods": methods, "pairs": pairs}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--expected", help="write the old code's figures to this file instead")
    args = p.parse_args(argv)
    results = Path(args.results)
    data = json.loads((results / "study.json").read_text(encoding="utf-8"))
    if args.expected:
        Path(args.expected).write_text(json.dumps(expected(data), indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.expected}")
        return 0
    for task, converted in convert(data).items():
        (results / task).mkdir(exist_ok=True)
        path = results / task / compare.DATA_FILE
        path.write_text(json.dumps(converted, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path} ({len(converted['runs'])} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
