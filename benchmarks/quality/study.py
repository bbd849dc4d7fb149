"""The NEAT vs LoRA study (issue #12, protocol in protocol.py): run it, resume it, time it.

    python -m benchmarks.quality.study run [--workers 2] [--stop-at HH:MM]    # start or continue the study
    python -m benchmarks.quality.study pilot                                  # timed short runs -> estimate
    python -m benchmarks.quality.study status                                 # done / pending / estimate
    python -m benchmarks.quality.study retire --task T --why "..."            # T's definition changed: redo it
    python -m benchmarks.quality.study check --task T [--factor 2]            # the r=8 pair trained longer
    python -m benchmarks.quality.study run --quick --out /tmp/q               # the few-minute version (tests)
    python -m benchmarks.quality.study_doc                                    # docs/RESULTS.md from the JSON

Each run is one `neat-peft train` in its own process (1 torch thread), so its peak memory (ru_maxrss) and CPU
time are its own. The coordinator writes OUT/study.json atomically after every finished run; `run` again skips
every run already there (finished or diverged), so the study can be stopped at any moment (a run cut short
is redone whole) and continued with the same command. A lock file keeps two coordinators off one folder; a
coordinator started after one was killed adds what that one's still-running workers finished (OUT/spool), and
refuses to start while they still run (rather than run their jobs twice).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.machine import machine_info, versions
from neat_peft.cli.compare import load_average
from benchmarks.quality.protocol import LONGER, QUICK, STUDY, Job, Protocol
from neat_peft.cli.compare import split_digest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

SCHEMA = 1
DEFAULT_OUT = HERE / "results"
DIVERGED = "the loss became NaN or infinite"  # the CLI's message for a non-finite loss
PILOT_STEPS = 12
ANSWER_TOKENS = 4  # greedy tokens per answer of a generation task: a one-word label


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def slug(key: str) -> str:
    return key.replace("/", "__")


# --- one run (in its own process) ----------------------------------------------------------------------------
def run_one(proto: Protocol, job: Job, out: Path, extra: list[str]) -> dict[str, Any]:
    """Train `job` with the CLI in this process and return its record."""
    from neat_peft.cli.main import main as cli_main

    task, method = proto.task(job.task), proto.methods[job.method]
    data = task.prepare(out / "data") if task.prepare is not None else None
    run_dir = out / "runs" / slug(job.key)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    answers = ["eval.generate_answers=true", f"eval.max_new_tokens={ANSWER_TOKENS}"] if task.generation else []
    argv = ["train", *job.overrides(method, task.overrides(data)), *answers, *extra, "--output-dir", str(run_dir),
            "--overwrite"]
    record: dict[str, Any] = {**asdict(job), "key": job.key, "family": method.family, "r": method.r,
                              "command": "neat-peft " + " ".join(argv), "started": now(),
                              "git_commit": versions()["git_commit"],  # the code (and numerics) of this run
                              "load_average_before": load_average()}
    log_path = run_dir.with_name(run_dir.name + ".log")
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                code = cli_main(argv)
        except Exception:  # a crash inside the CLI is this run's result, not the study's
            log.write(traceback.format_exc())
            code = -1

    def measured() -> None:  # wall, CPU and peak memory of the run so far (training, test, generation)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
        record.update(wall_seconds=time.perf_counter() - start, cpu_seconds=cpu,
                      peak_rss_mb=usage.ru_maxrss / 1024, load_average_after=load_average(), finished=now())
        # How much of a core the run got: 1.0 on an idle machine with 1 thread, less when others compete.
        record["cpu_share"] = record["cpu_seconds"] / max(record["wall_seconds"], 1e-9)

    measured()
    metrics_path = run_dir / "metrics.json"
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if code != 0 or not metrics_path.is_file():
        record.update(status="diverged" if DIVERGED in text else "error", exit_code=code, error=text[-800:].strip())
        return record
    metrics = json.loads(metrics_path.read_text())
    history = json.loads((run_dir / "log_history.json").read_text())["log_history"]
    record.update(
        status="ok", trainable_params=metrics["trainable_params"], total_params=metrics["total_params"],
        adapter_params=metrics["method_info"].get("adapter_params"), adapted_modules=metrics["method_info"].get(
            "targets"), train_seconds=metrics["train_seconds"], steps=metrics["steps"],
        train_loss=[{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        data_used=metrics["data"].get("used"), split_sha256=split_digest(run_dir))
    if task.generation:  # the CLI scored greedy answers on validation and test (eval.generate_answers)
        curve = [{"step": h["step"], "loss": h["eval_loss"], "seconds": h.get("eval_runtime")}
                 for h in history if "eval_loss" in h]
        scored = {part: {k: metrics[part][k] for k in ("accuracy", "macro_f1", "examples", "answer_histogram")}
                  for part in ("validation", "test")}
        for part in scored.values():
            part["answers"] = dict(list(part["answer_histogram"].items())[:5])
        record.update(validation={**scored["validation"], "loss": curve[-1]["loss"] if curve else None},
                      validation_curve=curve, test={**scored["test"], "loss": metrics["test"]["loss"]},
                      majority_baseline={k: metrics["majority_baseline"][k] for k in ("accuracy", "label")})
        return record
    curve = [{"step": h["step"], "accuracy": h["eval_accuracy"], "macro_f1": h["eval_macro_f1"],
              "loss": h["eval_loss"], "seconds": h.get("eval_runtime")} for h in history if "eval_accuracy" in h]
    record.update(validation=curve[-1] if curve else {}, validation_curve=curve,
                  test={k: metrics["test"][k] for k in ("accuracy", "macro_f1", "examples")},
                  majority_baseline={k: metrics["majority_baseline"][k] for k in ("accuracy", "macro_f1", "label")})
    return record


def worker_main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    proto = QUICK if args.quick else STUDY
    job = Job(**json.loads(args.job))
    record_path = Path(args.record)
    # Held while the run lives: a coordinator started after this one's died refuses to start until it ends (`adopt`).
    with exclusive(record_path.with_suffix(".lock")):
        record = run_one(proto, job, Path(args.out), json.loads(args.extra))
        atomic_write_json(record_path, record)
    return 0


# --- the coordinator ------------------------------------------------------------------------------------------
class Study:
    """OUT/study.json: the protocol it was run under, the machine, every invocation and every run's record."""

    def __init__(self, out: Path, proto: Protocol, quick: bool):
        self.out, self.proto, self.quick = out, proto, quick
        self.path = out / "study.json"
        out.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
            new = json.loads(json.dumps(proto.snapshot()))
            changed = Protocol.incompatible(self.data["protocol"], new)
            if changed:
                raise SystemExit(f"{self.path} was run under another protocol than protocol.py now defines "
                                 f"(changed: {', '.join(changed)}); its runs would not be comparable with new ones. "
                                 "Use another --out, restore protocol.py as it was (git log "
                                 "benchmarks/quality/protocol.py), or, for a changed task, set its runs aside "
                                 "and redo it: study.py retire --task NAME --why '...'.")
            self.data["protocol"] = new  # the same, or extended by new tasks or methods
        else:
            self.data = {"schema": SCHEMA, "study": "neat-vs-lora", "quick": quick, "created": now(),
                         "protocol": proto.snapshot(), "machine": machine_info(), "versions": versions(),
                         "invocations": [], "runs": [], "errors": []}

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        """Finished runs by key: ok or diverged (a diverged tuning cell is a result; an error is retried)."""
        return {r["key"]: r for r in self.data["runs"]}

    def add(self, record: dict[str, Any], part: str = "runs") -> None:
        """A finished run into `part` ("runs", or "checks" for the budget checks); an error into "errors"."""
        if record["status"] in ("ok", "diverged"):
            kept = [r for r in self.data.get(part, []) if r["key"] != record["key"]]
            self.data[part] = kept + [record]
        else:
            self.data["errors"].append(record)
        self.save()

    def save(self) -> None:
        self.data["updated"] = now()
        atomic_write_json(self.path, self.data)

    def pending(self) -> list[Job]:
        done = self.records
        return [j for j in self.proto.jobs(done) if j.key not in done]


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold the lock file `path` (OUT/study.lock, or a worker's) for the block; refuse at once if another
    process holds it."""
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"Another study process holds {path}; wait for it or stop it "
                         "(its pid is in that file).") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def start_worker(job: Job, out: Path, quick: bool, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    spool = out / "spool"
    spool.mkdir(exist_ok=True)
    record = spool / f"{slug(job.key)}.json"
    record.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "benchmarks.quality.study", "_one", "--job", json.dumps(asdict(job)), "--out",
           str(out), "--record", str(record), "--extra", json.dumps(extra)] + (["--quick"] if quick else [])
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, cwd=ROOT), record


def stop_time(text: Optional[str]) -> Optional[float]:
    """UTC HH:MM -> seconds since the epoch of its next occurrence."""
    if not text:
        return None
    hour, minute = (int(x) for x in text.split(":"))
    t = dt.datetime.now(dt.timezone.utc).replace(hour=hour, minute=minute, second=0, microsecond=0)
    if t < dt.datetime.now(dt.timezone.utc):
        t += dt.timedelta(days=1)
    return t.timestamp()


def workers(option: str, out: Path) -> int:
    if option != "auto":
        return int(option)
    try:
        return int(json.loads((out / "pilot.json").read_text())["parallel"]["workers"])
    except (OSError, KeyError, ValueError):
        return 1


def drive(study: Study, pending: Callable[[], list[Job]], add: Callable[[dict[str, Any]], None],
          n_workers: Callable[[], int], quick: bool, stop: Optional[float] = None,
          max_runs: Optional[int] = None) -> None:
    """Run `pending()` jobs, `n_workers()` at a time, each in its own process; `add` each record as it finishes.
    No job starts after `stop` (epoch seconds) or beyond `max_runs`; each is attempted once per invocation."""
    running: dict[str, tuple[subprocess.Popen, Path, Job]] = {}
    attempted: set[str] = set()
    started = 0
    while True:
        can_start = (stop is None or time.time() < stop) and (max_runs is None or started < max_runs)
        queue = [j for j in pending() if j.key not in running and j.key not in attempted] if can_start else []
        while queue and len(running) < n_workers():
            job = queue.pop(0)
            proc, record = start_worker(job, study.out, quick, [])
            running[job.key] = (proc, record, job)
            attempted.add(job.key)
            started += 1
            print(f"[{now()}] start {job.key} ({job.phase})", flush=True)
        if not running:
            return
        time.sleep(2)
        for key, (proc, record, job) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            record.with_suffix(".lock").unlink(missing_ok=True)
            if record.is_file():
                rec = json.loads(record.read_text())
                record.unlink()
            else:  # the worker itself died (killed, out of memory): retried by the next invocation
                rec = {**asdict(job), "key": job.key, "status": "error", "exit_code": proc.returncode,
                       "error": "the worker process ended without writing its record", "finished": now()}
            add(rec)
            shown = (f"val {rec['validation']['accuracy']:.4f} test {rec['test']['accuracy']:.4f}"
                     if rec["status"] == "ok" else rec["status"].upper())
            print(f"[{now()}] done  {key}: {shown} ({rec.get('wall_seconds', 0):.0f} s; "
                  f"{len(pending())} runnable now)", flush=True)


def invoked(study: Study, args: argparse.Namespace) -> dict[str, Any]:
    invocation = {"argv": sys.argv[1:], "started": now(), "workers": args.workers, "pid": os.getpid(),
                  "versions": versions(), "load_average": load_average()}
    study.data["invocations"].append(invocation)
    study.save()
    return invocation


def adopt(study: Study) -> int:
    """Add the records that workers of a stopped coordinator wrote after it ended (OUT/spool/*.json), so no
    finished run is lost or run twice; refuse while one of those workers still runs (it holds its .lock).
    Returns the records adopted."""
    spool = study.out / "spool"
    for lock in sorted(spool.glob("*.lock")):
        with exclusive(lock):  # raises SystemExit naming the lock while its worker runs
            pass
    adopted = 0
    for path in sorted(spool.glob("*.json")):
        record = json.loads(path.read_text())
        study.add(record, "checks" if LONGER in record["key"].split("/", 1)[0] else "runs")
        path.unlink()
        print(f"[{now()}] adopted {record['key']} ({record['status']}), finished after its coordinator stopped")
        adopted += 1
    for lock in spool.glob("*.lock"):
        lock.unlink()
    return adopted


def run_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    proto = QUICK if args.quick else STUDY
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / "study.lock"):
        study = Study(out, proto, args.quick)
        adopt(study)
        invocation = invoked(study, args)
        drive(study, study.pending, study.add, lambda: workers(args.workers, out), args.quick,
              stop_time(args.stop_at), args.max_runs)
        invocation["finished"] = now()
        study.save()
    print(f"wrote {study.path} ({len(study.records)} runs)")
    return 0


def check_main(args: argparse.Namespace) -> int:
    """The budget check: `task`'s pair methods at seed 0, chosen cells, trained `factor` times longer, into
    study.json's "checks" (not part of any table's statistics; the report compares them with the seed-0 runs)."""
    out = Path(args.out)
    proto = QUICK if args.quick else STUDY
    with exclusive(out / "study.lock"):
        study = Study(out, proto, args.quick)
        adopt(study)
        try:
            jobs = proto.budget_checks(study.records, args.task, args.factor, tuple(args.methods))
        except ValueError as e:
            raise SystemExit(f"study.py check: {e}") from None
        invocation = invoked(study, args)

        def pending() -> list[Job]:
            done = {r["key"] for r in study.data.get("checks", [])}
            return [j for j in jobs if j.key not in done]

        drive(study, pending, lambda rec: study.add(rec, "checks"), lambda: workers(args.workers, out), args.quick)
        invocation["finished"] = now()
        study.save()
    print(f"wrote {study.path} ({len(study.data.get('checks', []))} budget checks)")
    return 0


# --- pilot and estimate ------------------------------------------------------------------------------------
def pilot_main(args: argparse.Namespace) -> int:
    """Short runs at the real sizes (PILOT_STEPS steps, one validation) -> seconds per step, per validation and
    per start-up of each task (NEAT r=8, which runs on every task) and of each method family relative to it (on
    sentiment); then two runs at once against one, to decide on 2 workers. Probes already in OUT/pilot.json are
    kept (rerun to continue an interrupted pilot)."""
    out = Path(args.out)
    scratch = out / "pilot"
    scratch.mkdir(parents=True, exist_ok=True)
    path = out / "pilot.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {
        "created": now(), "machine": machine_info(), "pilot_steps": PILOT_STEPS, "single": []}
    extra = [f"train.max_steps={PILOT_STEPS}", f"train.eval_every={PILOT_STEPS}", f"train.log_every={PILOT_STEPS}"]
    probes = [Job(t, "neat-r8", 1e-3, 1.0, 0, "pilot") for t in STUDY.tasks]
    probes += [Job("sentiment", m, 1e-3, None, 0, "pilot") for m in ("lora-r8", "full", "head-only")]

    def collect(jobs: list[Job]) -> list[dict[str, Any]]:
        started = [start_worker(job, scratch, False, extra) for job in jobs]
        recs = []
        for proc, rec_path in started:
            proc.wait()
            rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {"status": "error", "error": "died"}
            recs.append(rec)
        return recs

    for job in probes:
        if any(p["task"] == job.task and p["method"] == job.method for p in result["single"] + result.get(
                "failed", [])):
            continue
        (rec,) = collect([job])
        if rec["status"] != "ok":  # recorded: the study's runs of this kind will fail the same way
            result.setdefault("failed", []).append({"task": job.task, "method": job.method,
                                                    "error": rec.get("error", "")[-400:]})
            print(f"pilot {job.task} {job.method}: FAILED {rec.get('error', '')[-300:]}", flush=True)
        else:
            result["single"].append(pilot_timing(rec))
            print(f"pilot {job.task} {job.method}: {json.dumps(result['single'][-1])}", flush=True)
        atomic_write_json(path, result)
    if "parallel" in result:  # measured by an earlier pilot: only the probes were missing
        result["estimate"] = estimate(STUDY, {}, result)
        atomic_write_json(path, result)
        print(json.dumps(result["estimate"]["summary"], indent=1))
        return 0
    # Two at once: the same sentiment probe at seeds 1 and 2; gain = 2 x (one run's wall) / (the pair's wall).
    t0 = time.perf_counter()
    pair = collect([Job("sentiment", "neat-r8", 1e-3, 1.0, s, "pilot") for s in (1, 2)])
    pair_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    (single,) = collect([Job("sentiment", "neat-r8", 1e-3, 1.0, 1, "pilot")])
    single_wall = time.perf_counter() - t0
    gain = 2 * single_wall / pair_wall
    result["parallel"] = {"single_wall_seconds": single_wall, "pair_wall_seconds": pair_wall,
                          "throughput_gain": gain, "workers": 2 if gain >= 1.15 else 1,
                          "pair_cpu_share": [r.get("cpu_share") for r in pair],
                          "single_cpu_share": single.get("cpu_share"),
                          "load_average": [r.get("load_average_before") for r in pair + [single]],
                          "rule": "2 workers if two runs at once finish >= 15% more runs per hour than one"}
    result["estimate"] = estimate(STUDY, {}, result)
    result["finished"] = now()
    atomic_write_json(path, result)
    print(json.dumps(result["parallel"], indent=1))
    print(json.dumps(result["estimate"]["summary"], indent=1))
    return 0


def pilot_timing(rec: dict[str, Any]) -> dict[str, Any]:
    eval_s = rec["validation_curve"][-1]["seconds"]
    return {"task": rec["task"], "method": rec["method"], "family": rec["family"],
            "seconds_per_step": (rec["train_seconds"] - eval_s) / rec["steps"], "seconds_per_validation": eval_s,
            "other_seconds": rec["wall_seconds"] - rec["train_seconds"], "wall_seconds": rec["wall_seconds"],
            "cpu_share": rec["cpu_share"], "load_average": rec["load_average_before"]}


def job_seconds(proto: Protocol, job: Job, pilot: dict[str, Any]) -> float:
    """A run's predicted wall time: the pilot's wall seconds per step of its task (NEAT r=8), times its family's
    cost relative to NEAT measured on sentiment, plus validations, the test pass (as validations, per example)
    and start-up. The family ratio compares CPU seconds per step (wall x CPU share), so that probes run under
    different loads still compare the methods' work, not the machine's business at that moment."""
    task = proto.tasks[job.task]
    single = pilot["single"]
    base = next(p for p in single if p["task"] == job.task and p["method"] == "neat-r8")
    sent = next(p for p in single if p["task"] == "sentiment" and p["method"] == "neat-r8")
    fam = next((p for p in single if p["task"] == "sentiment" and p["family"] == proto.methods[job.method].family),
               sent)
    per_step = base["seconds_per_step"] * (fam["seconds_per_step"] * fam["cpu_share"]) / (
        sent["seconds_per_step"] * sent["cpu_share"])
    evals = task.steps // task.eval_every
    test_passes = task.test_examples / task.validation_examples
    return (task.steps * per_step + evals * base["seconds_per_validation"]
            + base["other_seconds"] + (test_passes - 1) * base["seconds_per_validation"])


def estimate(proto: Protocol, records: dict[str, dict[str, Any]], pilot: dict[str, Any]) -> dict[str, Any]:
    """Total and remaining compute in CPU-core-hours, which do not depend on how busy the machine was (a probe's
    wall seconds x its CPU share). Finished runs count at their measured CPU time; the rest at the pilot's
    prediction. Wall hours = CPU hours / the measured gain of the chosen workers, on an otherwise idle machine."""
    per_task: dict[str, dict[str, Any]] = {}
    probed = {p["task"] for p in pilot["single"] if p["method"] == "neat-r8"}
    for job in proto.jobs(records, full=True):
        entry = per_task.setdefault(job.task, {"runs": 0, "done_runs": 0, "done_cpu_hours": 0.0,
                                               "remaining_cpu_hours": 0.0, "estimated": job.task in probed})
        entry["runs"] += 1
        rec = records.get(job.key)
        if rec is not None:
            entry["done_runs"] += 1
            entry["done_cpu_hours"] += rec.get("cpu_seconds", 0) / 3600
        elif entry["estimated"]:
            share = next(p["cpu_share"] for p in pilot["single"] if p["task"] == job.task and p["method"] == "neat-r8")
            entry["remaining_cpu_hours"] += job_seconds(proto, job, pilot) * share / 3600
    workers = pilot.get("parallel", {}).get("workers", 1)
    gain = pilot.get("parallel", {}).get("throughput_gain", 1.0) if workers == 2 else 1.0
    remaining = sum(e["remaining_cpu_hours"] for e in per_task.values())
    return {"per_task": per_task, "summary": {
        "runs": sum(e["runs"] for e in per_task.values()), "done_runs": sum(e["done_runs"] for e in per_task.values()),
        "done_cpu_hours": sum(e["done_cpu_hours"] for e in per_task.values()), "remaining_cpu_hours": remaining,
        "workers": workers, "gain": gain, "remaining_wall_hours": remaining / gain,
        "not_estimated": [t for t, e in per_task.items() if not e["estimated"]]}}


def status_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    study = Study(out, STUDY, False)
    records = study.records
    print(f"{study.path}: {len(records)} runs finished, {len(study.data['errors'])} errors logged, "
          f"{len(study.pending())} runnable now")
    pilot_path = out / "pilot.json"
    if pilot_path.is_file():
        print(json.dumps(estimate(STUDY, records, json.loads(pilot_path.read_text())), indent=1))
    return 0


def retire(out: Path, task: str, why: str) -> int:
    """Move `task`'s runs and errors out of the study into study.json's "retired" list, with the task's protocol
    they ran under and why, and drop the task from the recorded protocol: protocol.py's changed definition of
    it then runs afresh. Nothing is deleted; the report lists what was retired. Returns the runs moved."""
    path = out / "study.json"
    data = json.loads(path.read_text())
    if task not in data["protocol"]["tasks"]:
        raise SystemExit(f"{path} has no task {task!r} (its tasks: {', '.join(data['protocol']['tasks'])}).")
    if not why.strip():
        raise SystemExit("--why must say why the runs are retired (the report shows it).")

    def mine(record: dict[str, Any]) -> bool:  # the task's runs and its budget checks ("T@xN/...")
        return record["key"].split("/", 1)[0].partition(LONGER)[0] == task

    parts = ("runs", "errors", "checks")
    moved = {part: [r for r in data.get(part, []) if mine(r)] for part in parts}
    data.setdefault("retired", []).append({"task": task, "why": why.strip(), "retired": now(),
                                           "protocol": data["protocol"]["tasks"].pop(task), **moved})
    for part in parts:
        if part in data:
            data[part] = [r for r in data[part] if not mine(r)]
    data["updated"] = now()
    atomic_write_json(path, data)
    return len(moved["runs"])


def retire_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    with exclusive(out / "study.lock"):
        moved = retire(out, args.task, args.why)
    print(f"retired {moved} run(s) of {args.task}; `study.py run` now runs it under protocol.py's definition")
    return 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start or continue the study (skips the runs already in OUT/study.json)")
    run.add_argument("--workers", default="auto", help="runs at once, each with 1 torch thread; auto (default): "
                     "the pilot's measured decision in OUT/pilot.json, read again before each start (1 until then)")
    run.add_argument("--stop-at", help="UTC HH:MM: start no run after it (a running one finishes)")
    run.add_argument("--max-runs", type=int, help="start at most this many runs")
    run.add_argument("--quick", action="store_true", help="the few-minute version the tests run")
    run.set_defaults(func=run_main)
    pilot = sub.add_parser("pilot", help="timed short runs and a 2-at-once run -> OUT/pilot.json with the estimate")
    pilot.set_defaults(func=pilot_main)
    status = sub.add_parser("status", help="print what is done and the estimated remaining compute")
    status.set_defaults(func=status_main)
    retire_p = sub.add_parser("retire", help="move a task's runs aside (kept in study.json, listed in the report) "
                              "so that its changed definition in protocol.py runs afresh")
    retire_p.add_argument("--task", required=True)
    retire_p.add_argument("--why", required=True, help="the reason, shown in the report")
    retire_p.set_defaults(func=retire_main)
    check = sub.add_parser("check", help="train a task's chosen cells at seed 0 FACTOR times longer (more examples, "
                           "same epochs): does the result still move with more training?")
    check.add_argument("--task", required=True)
    check.add_argument("--factor", type=int, default=2, help="times the task's training examples and steps (2)")
    check.add_argument("--methods", nargs="+", default=["neat-r8", "lora-r8"], help="tuned methods to check "
                       "(default: the r=8 pair)")
    check.add_argument("--workers", default="auto", help="as for run")
    check.add_argument("--quick", action="store_true", help="on the quick study's results (the tests)")
    check.set_defaults(func=check_main)
    one = sub.add_parser("_one", help=argparse.SUPPRESS)
    one.add_argument("--job", required=True)
    one.add_argument("--record", required=True)
    one.add_argument("--extra", default="[]")
    one.add_argument("--quick", action="store_true")
    one.set_defaults(func=worker_main)
    for s in (run, pilot, status, retire_p, check, one):
        s.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
