"""`neat-peft compare`: is NEAT (or another method) better than LoRA on this recipe's task, model and data?

Each method is tuned on validation at seed 0 over its grid (compare_plan.py), then run at its chosen cell at n
paired seeds, and scored on test; compare_stats.py gives the paired intervals and compare_report.py the report.
Every run is one `neat-peft train` in its own process, so its time and peak memory are its own.

The output folder holds only what compare writes: OUTPUT_NAMES (and the temporary files of writes killed midway,
which the next compare removes under its lock). OUT/compare.json is written atomically after every
finished run; the same command again continues (a finished run is never redone; a run cut short is redone whole,
through `train --overwrite`, which removes only what that run wrote). A lock keeps two compares off one folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from . import compare_report, compare_stats as stats, recipe, rundir, tasks
from .compare_plan import AXES, Job, Plan, load_grid
from ..formats import leftovers
from .errors import CliError

SCHEMA = 1
KIND = "neat-peft-compare"
DATA_FILE, LOCK_FILE, RUNS = "compare.json", "compare.lock", "runs"
OUTPUT_NAMES = (DATA_FILE, LOCK_FILE, RUNS, *compare_report.FILES)
DIVERGED = "the loss became NaN or infinite"  # train's message for a non-finite loss
PILOT_STEPS = 10
ANSWER_KEYS = ("accuracy", "macro_f1", "examples", "answer_histogram")  # a run's generated answers, recorded
# Keys that differ between the runs of one compare by design: everything else must match to continue a compare.
PER_RUN_KEYS = ("output.dir", "train.seed", "train.lr", "train.head_lr", "method.name", "method.scaling")
# compare.json keys a compare written before they existed holds implicitly.
SETUP_DEFAULTS = {"variants": {}, "pairs": None, "extend": list(AXES)}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_average() -> Optional[list[float]]:
    """1, 5 and 15 minute load averages (None where the OS has none): how busy the shared machine was (also
    what the benchmarks record, benchmarks/machine.py)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("neat_peft", "torch", "transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    return out


# --- checking the input, before anything is written ---------------------------------------------------------
def check_arguments(methods: list[str], seeds: int, workers: int, budget_check: Optional[int]) -> None:
    if len(set(methods)) != len(methods) or len(methods) < 2:
        raise CliError(f"--methods needs at least two different methods (the first is compared with each other "
                       f"one, unless the grid file states its pairs), got {' '.join(methods)}.")
    if seeds < 1:
        raise CliError(f"--seeds must be at least 1 (2 or more give a paired interval), got {seeds}.")
    if workers < 1:
        raise CliError(f"--workers must be at least 1, got {workers}.")
    if budget_check is not None and budget_check < 2:
        raise CliError(f"--budget-check must be a whole factor of 2 or more, got {budget_check}.")


def method_configs(config_path: Optional[str], overrides: list[str], plan: Plan) -> dict[str, dict[str, Any]]:
    """Each method's resolved recipe at its first cell: the recipe's rules refuse a method it cannot run (e.g.
    method.match_lora_r with LoRA) here, before any run starts, with the key named."""
    out = {}
    for method in plan.methods:
        job = plan.job(method, *plan.base_cells(method)[0], 0, "tune")
        try:
            out[method] = recipe.resolve(config_path, [*overrides, *job.overrides()])
        except CliError as e:
            where = f" (its overrides in the grid file: {' '.join(job.extra)})" if job.extra else ""
            raise CliError(f"The recipe cannot run method {method}{where}: {e}") from None
    return out


def run_steps(config: dict[str, Any], train_examples: int, factor: int = 1) -> int:
    """Optimizer steps of one run (train.max_steps, or epochs over the training examples), `factor` times longer."""
    if config["train.max_steps"] > 0:
        return config["train.max_steps"] * factor
    per_epoch = math.ceil(train_examples / (config["train.batch_size"] * config["train.grad_accum_steps"]))
    return math.ceil(config["train.epochs"] * per_epoch) * factor


def longer(config: dict[str, Any], factor: int) -> list[str]:
    """The budget check's overrides: `factor` times the steps (max_steps, else epochs)."""
    if config["train.max_steps"] > 0:
        return [f"train.max_steps={config['train.max_steps'] * factor}"]
    return [f"train.epochs={config['train.epochs'] * factor}"]


def check_output(out: Path) -> Optional[dict[str, Any]]:
    """The compare already in `out` (None for a new or empty folder); refuses a folder holding anything else."""
    if out.exists() and not out.is_dir():
        raise CliError(f"-o '{out}' is a file; give a folder (new, empty, or one an earlier compare wrote).")
    if not out.is_dir():
        return None
    names = sorted(p.name for p in out.iterdir())
    ours = {*OUTPUT_NAMES, *(p.name for n in OUTPUT_NAMES for p in leftovers(out, n))}  # + a killed write's temp
    foreign = [n for n in names if n not in ours]
    if foreign:
        raise CliError(f"-o '{out}' holds {', '.join(foreign[:5])}, which neat-peft compare did not write; it only "
                       "writes into a new or empty folder, or continues its own. Nothing was changed; choose "
                       "another -o.")
    if not ({DATA_FILE, RUNS} & set(names)):
        return None
    try:
        data = json.loads((out / DATA_FILE).read_text(encoding="utf-8"))
        if data.get("kind") != KIND or data.get("schema") != SCHEMA:
            raise ValueError("not a compare of this version")
    except (OSError, ValueError, AttributeError) as e:
        raise CliError(f"'{out / DATA_FILE}' does not load as a neat-peft compare ({e}); nothing was changed. "
                       "Choose another -o.") from None
    return data


def check_continuation(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    """A compare continues only with the same recipe, methods, grids and edge rule (seeds may grow). A recipe key
    the compare's recipe lacks was added to neat-peft after it started: its runs had the key's default."""
    defaults = recipe.defaults()
    differ = [k for k in sorted(set(old["recipe"]) | set(new["recipe"]))
              if old["recipe"].get(k, defaults.get(k)) != new["recipe"].get(k, defaults.get(k))]
    differ += [k for k in ("methods", "grids", "edge_steps", "variants", "pairs", "extend")
               if old.get(k, SETUP_DEFAULTS.get(k)) != new.get(k, SETUP_DEFAULTS.get(k))]
    if differ:
        raise CliError(f"'{out}' holds a compare run with another setup (differs: {', '.join(differ[:6])}); its "
                       "runs would not be comparable with new ones. Nothing was changed; repeat that compare's "
                       f"command (in {DATA_FILE}, 'invocations') to continue it, or choose another -o.")


# --- one run in its own process -------------------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover (runs in the child)
    """Linux: the run is killed when compare dies, even by SIGKILL (a rerun must not race an orphan)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Runner:
    """Starts `neat-peft train` processes and turns their run directories into records."""

    def __init__(self, config_path: Optional[str], overrides: list[str], base: dict[str, Any], primary: str,
                 threads: Optional[int]):
        self.config_path = str(Path(config_path).resolve()) if config_path else None
        self.overrides, self.base, self.primary = overrides, base, primary
        self.threads = threads

    def argv(self, job: Job, run_dir: Path, extra: list[str]) -> list[str]:
        config = ["-c", self.config_path] if self.config_path else []
        longer_ = longer(self.base, job.factor) if job.factor > 1 else []
        threads = [f"train.threads={self.threads}"] if self.threads else []
        return ["train", *config, *self.overrides, *job.overrides(), *longer_, *threads, *extra,
                "-o", str(run_dir), "--overwrite"]

    def start(self, job: Job, run_dir: Path, extra: list[str] = ()) -> dict[str, Any]:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        argv = self.argv(job, run_dir, list(extra))
        log = open(run_dir.with_name(run_dir.name + ".log"), "w", encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-m", "neat_peft.cli.main", *argv], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        return {"job": job, "proc": proc, "log": log, "run_dir": run_dir, "start": time.perf_counter(),
                "record": {"key": job.key, "method": job.method, "lr": job.lr, "scaling": job.scaling,
                           "seed": job.seed, "phase": job.phase, "factor": job.factor,
                           "command": "neat-peft " + " ".join(argv), "started": now(),
                           "load_average_before": load_average()}}

    @staticmethod
    def poll(running: dict[str, Any]) -> bool:
        """True once the process ended; its exit code, wall and CPU time and peak memory go into the record."""
        pid, status, usage = os.wait4(running["proc"].pid, os.WNOHANG)
        if pid == 0:
            return False
        running["proc"].returncode = os.waitstatus_to_exitcode(status)
        running["log"].close()
        wall = time.perf_counter() - running["start"]
        cpu = usage.ru_utime + usage.ru_stime
        running["record"].update(exit_code=running["proc"].returncode, wall_seconds=wall, cpu_seconds=cpu,
                                 cpu_share=cpu / max(wall, 1e-9), peak_rss_mb=usage.ru_maxrss / 1024,
                                 load_average_after=load_average(), finished=now())
        return True

    def stop(self, running: dict[str, Any]) -> None:
        with contextlib.suppress(ProcessLookupError):
            running["proc"].kill()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(running["proc"].pid, 0)
        running["log"].close()

    def result(self, running: dict[str, Any]) -> dict[str, Any]:
        record, run_dir = running["record"], running["run_dir"]
        metrics_path = run_dir / "metrics.json"
        if record["exit_code"] != 0 or not metrics_path.is_file():
            text = run_dir.with_name(run_dir.name + ".log").read_text(encoding="utf-8", errors="replace")
            record.update(status="diverged" if DIVERGED in text else "error", error=text[-800:].strip())
            return record
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        history = json.loads((run_dir / "log_history.json").read_text(encoding="utf-8"))["log_history"]
        curve = metrics.get("validation_curve") or []
        record.update(
            status="ok", trainable_params=metrics["trainable_params"], total_params=metrics["total_params"],
            train_seconds=metrics["train_seconds"], steps=metrics["steps"], method_info=metrics.get("method_info"),
            validation=curve[-1][self.primary] if curve else None, validation_curve=curve,
            eval_seconds=sum(h.get("eval_runtime", 0.0) for h in history if any(k.startswith("eval_") for k in h)),
            evaluations=sum(1 for h in history if f"eval_{self.primary}" in h),
            train_loss=[{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
            test=without_predictions(metrics["test"]), test_value=test_value(metrics["test"], self.primary),
            baseline=metrics.get("majority_baseline") or metrics.get("base_model"),
            data_used=metrics["data"].get("used"), split_sha256=split_digest(run_dir))
        if "answer_histogram" in metrics["test"]:  # causal-lm with eval.generate_answers
            record["answers"] = {part: {k: metrics[part][k] for k in ANSWER_KEYS} for part in ("validation", "test")}
            record["answers"]["majority_baseline"] = metrics["majority_baseline"]
        return record


def without_predictions(test: dict[str, Any]) -> dict[str, Any]:
    """The test metrics without the per-example predictions of generated answers (they stay in metrics.json)."""
    return {k: without_predictions(v) if isinstance(v, dict) else v for k, v in test.items() if k != "predictions"}


def test_value(test: dict[str, Any], primary: str) -> Optional[float]:
    """The primary metric on test: `test[primary]`, or on the first test set of a task with several."""
    if primary in test:
        return test[primary]
    return next((v[primary] for v in test.values() if isinstance(v, dict) and primary in v), None)


def split_digest(run_dir: Path) -> str:
    """sha256 over the run's split files: equal digests = the very same examples (the pairing, checked)."""
    h = hashlib.sha256()
    files = [run_dir / "split" / f"{part}.jsonl" for part in ("train", "validation", "test")]
    files += sorted(p for p in (run_dir / "split").glob("*.jsonl") if p not in files)  # tasks with more eval sets
    for path in files:
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


# --- pilot and estimate --------------------------------------------------------------------------------------
def pilot(runner: Runner, plan: Plan, steps: int, workers: int) -> dict[str, Any]:
    """One short timed run per method (PILOT_STEPS steps, one validation), `workers` at once as the compare will
    run them, in a temporary folder removed after: seconds per step, per validation and outside training
    (start-up, test, saving)."""
    pilot_steps = max(1, min(PILOT_STEPS, steps))
    extra = [f"train.max_steps={pilot_steps}", f"train.eval_every={pilot_steps}", f"train.log_every={pilot_steps}",
             f"train.save_every={pilot_steps + 1}"]
    out: dict[str, Any] = {"steps": pilot_steps, "methods": {}, "created": now()}
    scratch = Path(tempfile.mkdtemp(prefix="neat-peft-compare-pilot-"))
    waiting: list[dict[str, Any]] = []
    try:
        records = []
        for i in range(0, len(plan.methods), workers):
            batch = [runner.start(plan.job(m, *plan.base_cells(m)[0], 0, "pilot"), scratch / m, extra)
                     for m in plan.methods[i:i + workers]]
            waiting = list(batch)
            while waiting:
                waiting = [r for r in waiting if not runner.poll(r)]
                time.sleep(0.2 if waiting else 0)
            records += [runner.result(r) for r in batch]
        for method, rec in zip(plan.methods, records):
            if rec["status"] != "ok":
                raise CliError(f"The timed pilot run of {method} failed (exit code {rec['exit_code']}), so the "
                               f"compare's runs would fail too; nothing was started. Its command: "
                               f"{rec['command']}. The end of its output: {rec['error'][-400:]}")
            train_only = rec["train_seconds"] - rec["eval_seconds"]
            out["methods"][method] = {
                "seconds_per_step": train_only / rec["steps"],
                "seconds_per_validation": rec["eval_seconds"] / max(1, rec["evaluations"]),
                "other_seconds": rec["wall_seconds"] - rec["train_seconds"], "wall_seconds": rec["wall_seconds"],
                "cpu_share": rec["cpu_share"], "peak_rss_mb": rec["peak_rss_mb"]}
    finally:  # interrupted: the pilot runs still going stop first, so that none writes into the removed folder
        for r in waiting:
            runner.stop(r)
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def job_seconds(job: Job, pilot_data: dict[str, Any], steps: int, eval_every: int) -> float:
    p = pilot_data["methods"][job.method]
    n = steps * job.factor
    return n * p["seconds_per_step"] + (n // max(1, eval_every)) * p["seconds_per_validation"] + p["other_seconds"]


def estimate(plan: Plan, records: dict[str, dict], pilot_data: dict[str, Any], steps: int, eval_every: int,
             workers: int) -> dict[str, Any]:
    jobs = plan.jobs(records, full=True)
    todo = [j for j in jobs if j.key not in records]
    seconds = sum(job_seconds(j, pilot_data, steps, eval_every) for j in todo)
    return {"runs": len(jobs), "done": len(jobs) - len(todo), "remaining_run_seconds": seconds,
            "workers": workers, "remaining_wall_seconds": seconds / workers}


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


# --- the command ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def exclusive(path: Path):
    import fcntl

    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise CliError(f"Another neat-peft compare is running in '{path.parent}' (it holds {path}); wait for it "
                       "or stop it, then run the command again.") from None
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


class Compare:
    """OUT/compare.json: the setup, every invocation, and every run's record."""

    def __init__(self, out: Path, data: dict[str, Any]):
        self.out, self.data = out, data

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        """Finished runs by key: ok or diverged (a diverged tuning cell is a result; an error is retried)."""
        return {r["key"]: r for r in self.data["runs"]}

    def add(self, record: dict[str, Any]) -> None:
        if record["status"] in ("ok", "diverged"):
            self.data["runs"] = [r for r in self.data["runs"] if r["key"] != record["key"]] + [record]
        else:
            self.data["errors"].append(record)
        self.save()
        # report.md follows every record, so a compare stopped between runs (Ctrl-C, a kill) leaves a current one.
        compare_report.write(self.out, self.data)

    def save(self) -> None:
        self.data["updated"] = now()
        rundir.atomic_write_text(self.out / DATA_FILE, json.dumps(self.data, indent=1) + "\n")


def run_compare(config_path: Optional[str], overrides: list[str], output_dir: Optional[str], methods: list[str],
                seeds: int, grid: str, workers: int, budget_check: Optional[int], dry_run: bool) -> dict[str, Any]:
    """The whole `compare` command. Every input is checked before OUT is touched."""
    grid_spec = load_grid(grid, methods)
    methods = grid_spec.methods
    check_arguments(methods, seeds, workers, budget_check)
    base = recipe.resolve(config_path, overrides)
    task = tasks.for_config(base)
    edge_steps = grid_spec.edge_steps
    plan = Plan(methods, grid_spec.grids, seeds, edge_steps, task.lower_is_better,
                extend=grid_spec.extend, budget_factor=budget_check, variants=grid_spec.variants,
                pairs=grid_spec.pairs)
    method_configs(config_path, overrides, plan)
    out = Path(output_dir or f"runs/compare-{base['task']}")
    old = check_output(out)
    splits = task.build_splits()  # the data loads and has its columns (seed 0's split; each run draws its own)
    steps = run_steps(base, splits.info["used"]["train"])
    eval_every = base["train.eval_every"] if isinstance(base["train.eval_every"], int) else steps
    threads = base["train.threads"] or (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None)
    setup = {"schema": SCHEMA, "kind": KIND, "recipe": {k: v for k, v in base.items() if k not in PER_RUN_KEYS},
             "recipe_file": config_path, "overrides": overrides, "task": base["task"], "model": base["model.name"],
             "data_source": base["data.source"], "data_used": splits.info["used"], "methods": methods,
             "grids": json.loads(json.dumps(plan.grids)), "edge_steps": edge_steps, "seeds": seeds,
             **({"variants": plan.variants} if plan.variants else {}), **({"pairs": plan.pairs} if plan.pairs else {}),
             **({"extend": list(plan.extend)} if plan.extend != AXES else {}),
             "budget_check": budget_check, "primary_metric": task.primary_metric,
             "lower_is_better": task.lower_is_better, "steps_per_run": steps}
    if old is not None:
        check_continuation(old, setup, out)
    runner = Runner(config_path, overrides, base, task.primary_metric, threads)
    records = {r["key"]: r for r in old["runs"]} if old else {}
    print(f"compare: {', '.join(methods)} on {base['task']} ({base['model.name']}, {base['data.source']}); "
          f"{steps} steps a run; metric: {task.primary_metric} ({'lower' if task.lower_is_better else 'higher'} "
          f"is better); {seeds} seed(s); output: {out}", flush=True)
    print(describe_plan(plan, records), flush=True)
    pilot_data = old.get("pilot") if old else None
    if pilot_data is None or set(pilot_data["methods"]) != set(methods):
        print(f"timing a pilot ({min(PILOT_STEPS, steps)} steps per method) ...", flush=True)
        pilot_data = pilot(runner, plan, steps, workers)
    est = estimate(plan, records, pilot_data, steps, eval_every, workers)
    print(f"estimate: {est['runs'] - est['done']} of {est['runs']} runs to do, about "
          f"{duration(est['remaining_run_seconds'])} of run time, {duration(est['remaining_wall_seconds'])} with "
          f"{workers} worker(s) (from the pilot; grid extensions not yet known are not counted)", flush=True)
    if dry_run:
        return {"plan": [j.key for j in plan.jobs(records, full=True)], "estimate": est}

    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / LOCK_FILE):
        for name in OUTPUT_NAMES:  # no compare writes here but this one: a temporary file left is a killed write's
            for tmp in leftovers(out, name):
                tmp.unlink()
        data = old or {**setup, "created": now(), "invocations": [], "runs": [], "errors": []}
        data.update(seeds=seeds, budget_check=budget_check, pilot=pilot_data, versions=versions(),
                    machine={"cores": os.cpu_count(), "platform": platform.platform(), "threads_per_run": threads})
        data["invocations"].append({"started": now(), "argv": sys.argv[1:], "workers": workers,
                                    "load_average": load_average(), "estimate": est})
        study = Compare(out, data)
        study.save()
        failed = drive(study, Plan.from_data(data), runner, workers, pilot_data, steps, eval_every)
        data["invocations"][-1]["finished"] = now()
        study.save()
        compare_report.write(out, data)
    print(compare_report.summary(data), flush=True)
    print(f"\nwrote {out / DATA_FILE}, {out / 'report.md'}", flush=True)
    if failed:
        first = failed[0]
        raise CliError(f"{len(failed)} run(s) failed and are not in the results (the first: {first['key']}, exit "
                       f"code {first['exit_code']}; its output is in {out / RUNS / (first['key'] + '.log')}). Fix "
                       "the cause and run the same command again: finished runs are kept, failed ones are retried.")
    return data


def seed_range(first: int, last: int) -> str:
    return f"seed {first}" if first == last else f"seeds {first}..{last}"


def describe_plan(plan: Plan, records: dict[str, dict]) -> str:
    lines = []
    for m in plan.methods:
        variant = plan.variants.get(m)
        what = f" ({variant['method']} {' '.join(variant['overrides'])})".replace(" )", ")") if variant else ""
        last_seed = plan.seeds_of(m) - 1
        if plan.cell_of(m):
            lines.append(f"  {m}{what}: the cell chosen for {plan.cell_of(m)}, at {seed_range(0, last_seed)}")
            continue
        axes = plan.grids[m]
        cells = "lr " + ", ".join(f"{v:g}" for v in axes["lr"]) + (
            "; s " + ", ".join(f"{v:g}" for v in axes["scaling"]) if axes.get("scaling", [None]) != [None] else "")
        lines.append(f"  {m}{what}: tune {len(plan.base_cells(m))} cell(s) at seed 0 ({cells}; up to "
                     f"{plan.edge_steps} more past each edge)"
                     + (f", then the chosen cell at {seed_range(1, last_seed)}" if last_seed else "")
                     + (f", then x{plan.budget_factor} longer at seed 0" if plan.budget_factor else ""))
    lines.append("  tested: " + ", ".join(
        f"{a} − {b}" + ("" if plan.testable(a, b) else f" ({stats.UNTESTED})") for a, b in plan.pair_list()))
    return "plan:\n" + "\n".join(lines)


def drive(study: Compare, plan: Plan, runner: Runner, workers: int, pilot_data: dict[str, Any], steps: int,
          eval_every: int) -> list[dict[str, Any]]:
    """Run every pending run with at most `workers` at once; the plan is re-read after each finished run (a grid
    may grow, a chosen cell may become known). Returns the runs that failed in this invocation."""
    from tqdm.auto import tqdm

    failed: list[dict[str, Any]] = []
    running: dict[str, dict[str, Any]] = {}
    predicted = actual = 0.0

    def pending() -> list[Job]:
        tried = {r["key"] for r in failed}
        return [j for j in plan.jobs(study.records) if j.key not in study.records and j.key not in running
                and j.key not in tried]

    total = len(plan.jobs(study.records, full=True))
    bar = tqdm(total=total, initial=len(study.records), unit="run", dynamic_ncols=True, file=sys.stderr)
    try:
        while True:
            for job in pending()[:workers - len(running)]:
                running[job.key] = runner.start(job, study.out / RUNS / job.key)
            if not running:
                break
            done = [k for k, r in running.items() if runner.poll(r)]
            for key in done:
                r = running.pop(key)
                record = runner.result(r)
                study.add(record)
                if record["status"] == "error":
                    failed.append(record)
                    bar.write(f"run {key} failed (exit code {record['exit_code']}); see {r['run_dir']}.log")
                predicted += job_seconds(r["job"], pilot_data, steps, eval_every)
                actual += record["wall_seconds"]
                bar.total = len(plan.jobs(study.records, full=True))
                bar.update(1)
            if done:
                todo = [j for j in plan.jobs(study.records, full=True) if j.key not in study.records]
                left = sum(job_seconds(j, pilot_data, steps, eval_every) for j in todo) * (
                    actual / predicted if predicted else 1.0) / workers
                bar.set_postfix_str(f"eta {duration(left)} (pilot, corrected by the runs so far)")
            else:
                time.sleep(0.2)
    except KeyboardInterrupt:  # main.py says how to continue
        for r in running.values():
            runner.stop(r)
        bar.close()
        raise
    bar.close()
    return failed
