"""Quality benchmark: every method through the same `neat-peft train` pipeline, learning rate tuned on validation.

    python benchmarks/quality/run.py --out benchmarks/quality/results            # the full benchmark
    python benchmarks/quality/run.py --quick --out /tmp/q                       # a few minutes, what tests run

Each run is `neat-peft train` (the CLI's own `main`, called in this process so the ~20 s import of torch and
transformers is paid once) with the built-in text-classification recipe, the task's data overrides, the size
overrides below and the method's overrides; the benchmark reads the run directory's metrics.json and
log_history.json. Protocol: for every task, each family's representative method (head-only, full, LoRA r=8,
NEAT at LoRA r=8's budget, NEAT with normalize_weight) is trained at seed 0 for every learning rate of the
grid; the rate with the best validation accuracy is then used for every method of that family (LoRA r=1 takes
LoRA r=8's, the other NEAT variants NEAT r=8's; --tune per-method tunes each method) at seeds 0..N-1. The head always trains at
train.head_lr (fixed, 2e-3) except for head-only, where the head's rate is the tuned one.

The seed also selects the split and the subset (the CLI seeds its split with train.seed), so the spread over
seeds covers data sampling as well as initialisation and order; at a given seed every method sees the same data.

The JSON (--out/quality.json) is rewritten after every run, so an interrupted benchmark leaves a usable partial
result; --resume skips the runs already recorded there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tasks import METHODS, TASKS, Method, Task  # noqa: E402

SCHEMA_VERSION = 1
HEAD_LR = 2e-3  # the recipe's default head learning rate, the same for every method but head-only
DEFAULT_GRID = (1e-4, 1e-3, 1e-2)

# Sized for a shared 2-core CPU (measured: 2-3 s per MiniLM training step there while other jobs run).
FULL = dict(train_examples=384, validation_examples=200, test_examples=600, batch_size=16, max_length=32,
            seeds=3, grid=DEFAULT_GRID)
QUICK = dict(train_examples=48, validation_examples=24, test_examples=48, batch_size=16, max_length=32,
             seeds=1, grid=(2e-3,), methods=("lora-r8", "neat-r8"))


# --- machine and versions ------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "load_average_at_start": load,
            "memory_note": "peak memory is the process's resident set size (RSS) sampled every 20 ms during a run "
                           "(CPU runs, one process for all runs: it includes the libraries and allocator caches)"}


def versions() -> dict[str, Optional[str]]:
    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    import neat_peft

    out["neat_peft"] = getattr(neat_peft, "__version__", None)
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                           text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["git_commit"] = None
    return out


# --- one run -------------------------------------------------------------------------------------------
class PeakRss:
    """Samples this process's RSS in a thread; .peak is the maximum seen (bytes)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process, self.interval, self.peak, self.start = psutil.Process(), interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def size_overrides(settings: dict[str, Any]) -> list[str]:
    steps = settings["steps"]
    return [
        f"data.max_train_examples={settings['train_examples']}",
        f"data.max_validation_examples={settings['validation_examples']}",
        f"data.max_test_examples={settings['test_examples']}",
        f"data.max_length={settings['max_length']}",
        f"train.batch_size={settings['batch_size']}",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",        # one validation at the end: the tuning criterion
        f"train.save_every={steps + 1}",    # no checkpoints: nothing here resumes a single run
        f"train.log_every={max(1, steps // 10)}",
    ]


def lr_overrides(method: Method, lr: float) -> list[str]:
    if method.family == "head-only":
        return [f"train.head_lr={lr}"]
    return [f"train.lr={lr}", f"train.head_lr={HEAD_LR}"]


def train_argv(task_overrides: list[str], method: Method, lr: float, seed: int, settings: dict[str, Any],
               run_dir: Path) -> list[str]:
    return ["train", *task_overrides, *size_overrides(settings), *method.overrides, *lr_overrides(method, lr),
            f"train.seed={seed}", "--output-dir", str(run_dir), "--overwrite"]


def final_validation(log_history: list[dict[str, Any]]) -> dict[str, float]:
    evals = [h for h in log_history if "eval_accuracy" in h]
    if not evals:
        return {}
    last = max(evals, key=lambda h: h["step"])
    return {"accuracy": last["eval_accuracy"], "macro_f1": last.get("eval_macro_f1"), "loss": last.get("eval_loss"),
            "step": last["step"]}


def run_one(task: Task, task_overrides: list[str], method: Method, lr: float, seed: int, settings: dict[str, Any],
            runs_root: Path) -> dict[str, Any]:
    """Train one (method, lr, seed) with the CLI and return its record."""
    from neat_peft.cli.main import main as cli_main

    run_dir = runs_root / task.name / f"{method.name}_lr{lr:g}_seed{seed}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    argv = train_argv(task_overrides, method, lr, seed, settings, run_dir)
    record: dict[str, Any] = {"task": task.name, "method": method.name, "family": method.family, "lr": lr,
                              "head_lr": lr if method.family == "head-only" else HEAD_LR, "seed": seed,
                              "run_dir": str(run_dir), "command": "neat-peft " + " ".join(argv)}
    log_path = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    with PeakRss() as rss, open(log_path, "w", encoding="utf-8") as log:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                code = cli_main(argv)
        except Exception:  # a crash inside the CLI is a failed run, not a failed benchmark
            log.write(traceback.format_exc())
            code = -1
    record["wall_seconds"] = time.perf_counter() - start
    record["peak_rss_mb"] = rss.peak / 2**20
    record["rss_before_mb"] = rss.start / 2**20
    metrics_path = run_dir / "metrics.json"
    if code != 0 or not metrics_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-600:]
        record.update(status="failed", exit_code=code, error=tail.strip())
        return record
    metrics = json.loads(metrics_path.read_text())
    history = json.loads((run_dir / "log_history.json").read_text())["log_history"]
    record.update(
        status="ok", trainable_params=metrics["trainable_params"], total_params=metrics["total_params"],
        adapter_params=metrics["method_info"].get("adapter_params"), r=metrics["method_info"].get("r"),
        adapted_modules=metrics["method_info"].get("targets"), train_seconds=metrics["train_seconds"],
        steps=metrics["steps"], validation=final_validation(history),
        test={k: metrics["test"][k] for k in ("accuracy", "macro_f1", "examples")},
        majority_baseline={k: metrics["majority_baseline"][k] for k in ("accuracy", "macro_f1", "label")},
        train_loss=[{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        data_used=metrics["data"].get("used"),
    )
    return record


# --- the protocol --------------------------------------------------------------------------------------
def choose_lr(records: list[dict[str, Any]], grid: list[float]) -> Optional[float]:
    """The grid value with the best seed-0 validation accuracy (first in grid order on ties); None if all failed."""
    best, best_acc = None, -math.inf
    for lr in grid:
        accs = [r["validation"].get("accuracy", -math.inf) for r in records
                if r["lr"] == lr and r["status"] == "ok" and r["validation"]]
        if accs and accs[0] > best_acc:
            best, best_acc = lr, accs[0]
    return best


class Benchmark:
    def __init__(self, out: Path, resume: bool):
        self.out = out
        self.json_path = out / "quality.json"
        self.data: dict[str, Any]
        if resume and self.json_path.is_file():
            self.data = json.loads(self.json_path.read_text())
        else:
            self.data = {"schema": SCHEMA_VERSION, "benchmark": "quality", "machine": machine_info(),
                         "versions": versions(), "started": _now(), "invocations": [], "tasks": {}, "runs": []}
        self.started = time.perf_counter()

    def save(self) -> None:
        self.data["updated"] = _now()
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.json_path)

    def find(self, task: str, method: str, lr: float, seed: int) -> Optional[dict[str, Any]]:
        for r in self.data["runs"]:
            if (r["task"], r["method"], r["lr"], r["seed"]) == (task, method, lr, seed):
                return r
        return None

    def run(self, task: Task, task_overrides: list[str], method: Method, lr: float, seed: int,
            settings: dict[str, Any], deadline: Optional[float], phase: str) -> Optional[dict[str, Any]]:
        found = self.find(task.name, method.name, lr, seed)
        if found is not None and found["status"] in ("ok", "failed"):
            return found
        if deadline is not None:
            done = [r["wall_seconds"] for r in self.data["runs"] if "wall_seconds" in r and r["task"] == task.name]
            estimate = (sum(done) / len(done)) if done else 0.0
            if time.perf_counter() - self.started + estimate > deadline:
                skipped = {"task": task.name, "method": method.name, "family": method.family, "lr": lr, "seed": seed,
                           "status": "skipped", "why": "deadline", "phase": phase}
                if found is None:
                    self.data["runs"].append(skipped)
                self.save()
                print(f"  skipped (deadline): {task.name} {method.name} lr={lr:g} seed={seed}", flush=True)
                return None
        if found is not None:
            self.data["runs"].remove(found)
        record = run_one(task, task_overrides, method, lr, seed, settings, self.out / "runs")
        record["phase"] = phase
        self.data["runs"].append(record)
        self.save()
        shown = (f"val {record['validation'].get('accuracy', float('nan')):.4f} "
                 f"test {record['test']['accuracy']:.4f}" if record["status"] == "ok" else "FAILED")
        print(f"  {task.name} {method.name:12s} lr={lr:<7g} seed={seed}: {shown} "
              f"({record['wall_seconds']:.0f} s, elapsed {(time.perf_counter() - self.started) / 60:.1f} min)",
              flush=True)
        return record


def run_task(bench: Benchmark, task: Task, methods: list[Method], settings: dict[str, Any], tune: str,
             deadline: Optional[float], lr_from: Optional[str] = None) -> None:
    task_overrides = list(task.data_overrides)
    if task.prepare is not None:
        task_overrides = task.prepare(bench.out / "data")
    entry = bench.data["tasks"].setdefault(task.name, {})
    entry.update(description=task.description, source=task.source_note, data_overrides=task_overrides,
                 settings=settings, methods=[m.name for m in methods], tune=tune,
                 method_labels={m.name: m.label for m in methods}, families={m.name: m.family for m in methods},
                 method_overrides={m.name: list(m.overrides) for m in methods}, chosen_lr=entry.get("chosen_lr", {}))
    bench.save()
    if lr_from is not None:  # no tuning: the learning rates chosen on another task of the same JSON
        source = bench.data["tasks"].get(lr_from, {}).get("chosen_lr", {})
        missing = [m.name for m in methods if source.get(m.name) is None]
        if missing:
            print(f"--lr-from {lr_from}: no chosen learning rate for {missing} in {bench.json_path}; they are not run.",
                  flush=True)
        entry["chosen_lr"] = {m.name: source.get(m.name) for m in methods}
        entry["lr_from"] = lr_from
        entry["tuned_by"] = {}
        bench.save()
        print(f"{task.name}: learning rates from {lr_from}: {entry['chosen_lr']}", flush=True)
    else:
        entry.pop("lr_from", None)
        tune_learning_rates(bench, task, task_overrides, methods, settings, tune, deadline, entry)
    for seed in range(settings["seeds"]):
        for m in methods:
            lr = entry["chosen_lr"][m.name]
            if lr is not None:
                bench.run(task, task_overrides, m, lr, seed, settings, deadline, "final")


def tune_learning_rates(bench: Benchmark, task: Task, task_overrides: list[str], methods: list[Method],
                        settings: dict[str, Any], tune: str, deadline: Optional[float], entry: dict[str, Any]) -> None:
    grid = list(settings["grid"])
    tuned_by = {m.name: (m.name if tune == "per-method" or len(grid) == 1 else
                         next((x.name for x in methods if x.family == m.family and x.representative), m.name))
                for m in methods}
    print(f"{task.name}: tuning {sorted(set(tuned_by.values()))} over lr grid {grid} at seed 0", flush=True)
    for name in dict.fromkeys(tuned_by.values()):
        for lr in grid:
            bench.run(task, task_overrides, METHODS[name], lr, 0, settings, deadline, "tune")
    chosen = {}
    for name in dict.fromkeys(tuned_by.values()):
        records = [r for r in bench.data["runs"] if r["task"] == task.name and r["method"] == name and r["seed"] == 0]
        chosen[name] = choose_lr(records, grid)
    entry["chosen_lr"] = {m.name: chosen[tuned_by[m.name]] for m in methods}
    entry["tuned_by"] = tuned_by
    bench.save()
    print(f"{task.name}: chosen learning rates {entry['chosen_lr']}", flush=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: quality.json, runs/, data/ (created)")
    p.add_argument("--quick", action="store_true", help="tiny subsets, 1 seed, 2 methods, one learning rate")
    p.add_argument("--tasks", default="sentiment,bbc-news", help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default: all; quick: 3)")
    p.add_argument("--seeds", type=int, help="seeds per method at the chosen learning rate")
    p.add_argument("--grid", help="comma list of learning rates to tune over")
    p.add_argument("--tune", choices=("per-family", "per-method"), default="per-family")
    p.add_argument("--lr-from", help="do not tune: use the learning rates chosen on this task (same --out JSON)")
    p.add_argument("--train-examples", type=int)
    p.add_argument("--validation-examples", type=int)
    p.add_argument("--test-examples", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--steps", type=int, help="optimizer steps (default: one epoch of the training subset)")
    p.add_argument("--deadline-minutes", type=float, help="skip the runs that would end after this (recorded)")
    p.add_argument("--stop-at", help="UTC clock time HH:MM: skip the runs that would end after it (recorded)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out/quality.json")
    p.add_argument("--report", action="store_true", help="write the Markdown table and the plot at the end")
    return p.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], list[Method], list[Task]]:
    base = dict(QUICK if args.quick else FULL)
    for key in ("train_examples", "validation_examples", "test_examples", "batch_size", "max_length", "seeds"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.grid:
        base["grid"] = tuple(float(x) for x in args.grid.split(","))
    base["grid"] = list(base["grid"])
    base["steps"] = args.steps or max(1, base["train_examples"] // base["batch_size"])
    names = args.methods.split(",") if args.methods else list(base.pop("methods", METHODS))
    base.pop("methods", None)
    unknown = [n for n in names if n not in METHODS]
    tasks = args.tasks.split(",")
    unknown_tasks = [t for t in tasks if t not in TASKS]
    if unknown or unknown_tasks:
        raise SystemExit(f"unknown methods {unknown} / tasks {unknown_tasks}; known: {list(METHODS)} / {list(TASKS)}")
    return base, [METHODS[n] for n in names], [TASKS[t] for t in tasks]


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    settings, methods, tasks = resolve_settings(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Benchmark(out, args.resume)
    bench.data["invocations"].append({"argv": sys.argv[1:] if argv is None else list(argv), "started": _now(),
                                      "settings": settings, "methods": [m.name for m in methods]})
    bench.data["quick"] = bool(args.quick)
    bench.save()
    deadline = args.deadline_minutes * 60 if args.deadline_minutes else None
    if args.stop_at:
        now = dt.datetime.now(dt.timezone.utc)
        hour, minute = (int(x) for x in args.stop_at.split(":"))
        stop = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if stop < now - dt.timedelta(hours=12):
            stop += dt.timedelta(days=1)
        until_stop = (stop - now).total_seconds()
        deadline = until_stop if deadline is None else min(deadline, until_stop)
    for task in tasks:
        run_task(bench, task, methods, settings, args.tune, deadline, args.lr_from)
    bench.data["finished"] = _now()
    bench.save()
    print(f"wrote {bench.json_path}")
    if args.report:
        import report

        report.write_report(bench.json_path, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
