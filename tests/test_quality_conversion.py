"""The quality study, converted once from its own runner's study.json into one compare folder per task
(benchmarks/quality/results/<task>/compare.json), gives through compare's plan and statistics exactly the figures
the study's own code gave: tests/data/quality_study_expected.json was written by that code (protocol.py's tuning
rule, study_doc.View, compare_stats) from the committed study.json before the conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neat_peft.cli import compare_stats as stats
from neat_peft.cli.compare_plan import Plan
from neat_peft.cli.compare_report import build, comparisons

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "quality" / "results"
EXPECTED = json.loads((ROOT / "tests" / "data" / "quality_study_expected.json").read_text(encoding="utf-8"))
scipy_stats = pytest.importorskip("scipy.stats")


def load(task: str) -> dict:
    return json.loads((RESULTS / task / "compare.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_converted_task_gives_the_studys_cells_values_and_intervals(task):
    data, expected = load(task), EXPECTED[task]
    plan, records = Plan.from_data(data), {r["key"]: r for r in data["runs"]}
    assert plan.methods == list(expected["methods"])
    for method, want in expected["methods"].items():
        chosen = plan.choose(records, method)
        assert (list(chosen) if chosen else None) == want["chosen"], method
        assert sorted(map(list, plan.grid(records, method))) == sorted(want["grid"]), method  # edge rule: lr only
        values = {str(s): r["test_value"] for s, r in plan.seed_runs(records, method).items()}
        assert values == want["test"], method
    found = comparisons(data)
    assert [(c["a"], c["b"]) for c in found] == [(p["a"], p["b"]) for p in expected["pairs"]]
    for c, want in zip(found, expected["pairs"]):
        assert c["status"] == want["status"]
        assert c["result"] == want["result"]  # seeds, n, differences, mean, sd, low, high, widths: exactly
        if c["result"] is not None:
            a = [plan.seed_runs(records, c["a"])[s]["test_value"] for s in c["result"]["seeds"]]
            b = [plan.seed_runs(records, c["b"])[s]["test_value"] for s in c["result"]["seeds"]]
            ref = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
            assert (c["result"]["low"], c["result"]["high"]) == pytest.approx((ref.low, ref.high), rel=1e-9)
            assert (c["status"] == stats.NO_DIFFERENCE) == (ref.low <= 0 <= ref.high)


def test_every_run_carries_over_once():
    study_runs = sum(len(t["methods"]) for t in EXPECTED.values())
    assert study_runs == 13 + 13 + 13 + 4
    keys = [(task, r["key"]) for task in EXPECTED for r in load(task)["runs"]]
    assert len(keys) == len(set(keys)) == 250 + 4  # the study's 250 runs and its 4 budget checks


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_converted_task_renders_with_compares_report(task):
    text = build(load(task))
    for c in comparisons(load(task)):
        assert f"| {c['a']} − {c['b']} | accuracy |" in text
    assert "pending" not in text.split("## Results")[0]  # every pair of the study has its verdict
