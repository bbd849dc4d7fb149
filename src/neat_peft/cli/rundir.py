"""The run directory: what a run writes, how a new run treats an existing directory, and checkpoints.

A run directory holds only the names in RUN_FILES. A new run refuses a directory that holds a finished
run (unless --overwrite), an unfinished one (unless --resume or --overwrite) or anything else (always):
--overwrite removes only the names a run writes, never other files.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

from ..formats import atomic_write
from .errors import CliError

RUN_FILES = ("config.yaml", "run.json", "split", "checkpoints", "adapter", "model", "head.safetensors",
             "metrics.json", "training_curves.png", "log_history.json", "base_model_eval.json")
COMPLETE_MARKER = "checkpoint_complete"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder and rename it into place (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def state(run_dir: Path) -> str:
    """'new' (absent or empty), 'finished', 'unfinished' (a run without metrics.json) or 'foreign'."""
    if not run_dir.exists():
        return "new"
    if not run_dir.is_dir():
        return "foreign"
    names = {p.name for p in run_dir.iterdir()}
    if not names:
        return "new"
    if "config.yaml" in names and "metrics.json" in names:
        return "finished"
    if "config.yaml" in names:
        return "unfinished"
    return "foreign"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def last_complete_checkpoint(run_dir: Path) -> Optional[Path]:
    """The highest-step checkpoint whose save finished (a SIGKILL mid-save leaves one without the marker)."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if match and (p / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), p))
    return max(found)[1] if found else None


def prepare(run_dir: Path, resume: bool, overwrite: bool, dry_run: bool = False) -> str:
    """Check what `run_dir` holds against --resume / --overwrite; returns 'fresh' or 'resume'.

    With --overwrite only the names a run writes are removed; anything else in the folder is left alone.
    dry_run: check only (the caller validates data and model first, then calls again to act)."""
    current = state(run_dir)
    if current == "foreign":
        raise CliError(f"Output directory '{run_dir}' already exists and is not a neat-peft run directory (it has "
                       "no config.yaml). Nothing was changed. Choose another output.dir (or --output-dir); "
                       "--overwrite only ever replaces a neat-peft run.")
    if current == "finished":
        if resume:
            raise CliError(f"'{run_dir}' holds a finished run (metrics.json exists): there is nothing to resume. "
                           "Use `neat-peft eval` on it, or --overwrite to train it again from scratch.")
        if not overwrite:
            raise CliError(f"'{run_dir}' already holds a finished run (metrics.json exists). Nothing was changed. "
                           "Pass --overwrite to replace it, or choose another output.dir (or --output-dir).")
    if current == "unfinished" and not (resume or overwrite):
        last = last_complete_checkpoint(run_dir)
        at = f" (last checkpoint: {last.name})" if last else " (no checkpoint yet)"
        raise CliError(f"'{run_dir}' holds an unfinished run{at}. Nothing was changed. Pass --resume to continue "
                       "it, --overwrite to start again, or choose another output.dir (or --output-dir).")
    if current == "new" and resume:
        raise CliError(f"--resume given but '{run_dir}' holds no run to resume. Drop --resume to start a new run.")
    if overwrite and current in ("finished", "unfinished"):
        if dry_run:
            return "fresh"
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return "fresh"
    if current == "unfinished" and resume:
        return "resume"
    return "fresh"


def check_empty_output(out: Path, what: str) -> None:
    """OUT of merge / export-lora must not exist or be empty: never write over a user's files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"'{out}' already exists and is not empty. Nothing was written. Give a new folder for the "
                       f"{what}.")


def check_run(run_dir: Path) -> None:
    """A finished run directory (for eval / predict / merge / export-lora)."""
    current = state(run_dir)
    if current == "finished":
        return
    if current == "unfinished":
        raise CliError(f"'{run_dir}' holds an unfinished run (no metrics.json). Finish it first with "
                       f"`neat-peft train --output-dir {run_dir} --resume`.")
    raise CliError(f"'{run_dir}' is not a neat-peft run directory (it needs config.yaml and metrics.json, "
                   "as written by `neat-peft train`).")
