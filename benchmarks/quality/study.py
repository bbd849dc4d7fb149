"""The NEAT vs LoRA study (issue #12, protocol in protocol.py) as one `neat-peft compare` per task.

    python -m benchmarks.quality.study run [--tasks sentiment ...] [--workers 2]   # start or continue each task
    python -m benchmarks.quality.study render                                      # docs/RESULTS.md

`run` runs `neat-peft compare` for each task in turn into results/<task>/ (compare's own runner: resumable, a
finished run is never redone, a timed pilot and an ETA). A task folder that already holds a compare continues with
the recipe overrides recorded there (e.g. the prepared BBC News file's path), so the command is the one it was
started with. `render` writes docs/RESULTS.md and each task's compare report (study_doc.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

from benchmarks.quality import study_doc
from benchmarks.quality.protocol import STUDY
from neat_peft.cli.compare import DATA_FILE

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parents[1] / "docs" / "RESULTS.md"


def task_argv(task: str, results: Path, grid_file: Path) -> list[str]:
    """`neat-peft compare` arguments of one task: a continued compare keeps the overrides recorded in it."""
    out = results / task
    recorded = out / DATA_FILE
    if recorded.is_file():
        overrides = json.loads(recorded.read_text(encoding="utf-8"))["overrides"]
        seeds = max(STUDY.seeds_of(task, n) for n in STUDY.methods_of(task))
        return ["compare", *overrides, "--grid", str(grid_file), "--seeds", str(seeds), "-o", str(out)]
    prepare = STUDY.tasks[task].prepare
    return STUDY.compare_args(task, prepare(results / "data") if prepare else None, grid_file, out)


def run(tasks: list[str], results: Path, workers: int) -> int:
    from neat_peft.cli.main import main as cli

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for task in tasks:
        with tempfile.TemporaryDirectory() as tmp:
            grid_file = Path(tmp) / f"{task}.yaml"
            grid_file.write_text(json.dumps(STUDY.compare_grid(task), indent=1), encoding="utf-8")  # JSON is YAML
            argv = [*task_argv(task, results, grid_file), "--workers", str(workers)]
            print(f"study: neat-peft {' '.join(argv)}", flush=True)
            code = cli(argv)
        if code != 0:
            return code
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or continue) neat-peft compare for each task")
    r.add_argument("--tasks", nargs="+", choices=list(STUDY.tasks), default=list(STUDY.tasks))
    r.add_argument("--workers", type=int, default=1, help="runs at once (compare --workers)")
    d = sub.add_parser("render", help="docs/RESULTS.md and each task's compare report")
    d.add_argument("--doc", default=str(DOC))
    for s in (r, d):
        s.add_argument("--results", default=str(RESULTS), help=f"the task folders (default {RESULTS})")
    args = p.parse_args(argv)
    if args.command == "run":
        return run(args.tasks, Path(args.results), args.workers)
    study_doc.render(Path(args.results), Path(args.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
