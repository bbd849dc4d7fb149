"""The run directory: how the CLI recognises its own runs, what it may delete, and checkpoints.

A folder is a neat-peft run only if it holds MARKER, a file `neat-peft train` writes first when it creates
the run. The marker lists, under "written", every top-level name the run wrote, recorded *before* the
name is written (so a crash leaves at most a listed name that does not exist yet). The CLI deletes only
listed names: `--overwrite`, a new run in an aborted start, and nothing else. A folder without the marker
is never deleted from or trained into, whatever it holds (a config.yaml proves nothing: users have their
own). Runs made before the marker existed hold config.yaml but no marker: `train` refuses them with
instructions; the read-only commands (eval, predict, merge, export-lora, analyze) still read finished ones.

States: 'new' (absent, empty, or marked without config.yaml: a start that stopped before its recipe was
written), 'unfinished' (marked, config.yaml, no metrics.json), 'finished' (marked, metrics.json),
'unmarked' (config.yaml, no marker) and 'foreign' (anything else).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

from ..formats import atomic_write, leftovers
from .errors import CliError

MARKER = "neat-peft-run.json"
MARKER_FORMAT = 1
# What a run of head-only or targets-only keeps (neat and lora keep `adapter/`, full `model/`): its trained
# tensors only, loaded back over the base model.
TRAINED_FILES = {"head-only": "head.safetensors", "targets-only": "targets.safetensors"}
# Every top-level name a run may write (what the marker's "written" may list).
RUN_FILES = ("config.yaml", "split", "checkpoints", "adapter", "model", *TRAINED_FILES.values(), "metrics.json",
             "training_curves.png", "log_history.json", "base_model_eval.json")
COMPLETE_MARKER = "checkpoint_complete"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder and rename it into place (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_marker(run_dir: Path) -> Optional[dict]:
    """The marker's content, None without one; a damaged marker is an error (nothing is assumed about it)."""
    path = run_dir / MARKER
    if not path.exists() and not path.is_symlink():
        return None
    try:
        if not path.is_file() or path.is_symlink():
            raise ValueError("not a plain file")
        data = json.loads(path.read_text(encoding="utf-8"))
        written = data["written"]
        if data.get("format") != MARKER_FORMAT or not isinstance(written, list) or \
                not set(written) <= set(RUN_FILES):
            raise ValueError(f"unexpected content {data!r:.200}")
    except (ValueError, KeyError, TypeError, UnicodeError) as e:
        raise CliError(f"'{path}' (the file marking '{run_dir}' as a neat-peft run) is damaged ({e}). Nothing was "
                       "changed. neat-peft only deletes files its marker lists, so it will not touch this folder: "
                       "choose another output.dir (or --output-dir), or delete the folder yourself.") from None
    return data


def _write_marker(run_dir: Path, written: list[str]) -> None:
    atomic_write_text(run_dir / MARKER, json.dumps({"format": MARKER_FORMAT, "written": written}, indent=1) + "\n")


def state(run_dir: Path) -> str:
    """'new', 'unfinished', 'finished', 'unmarked' or 'foreign' (see the module docstring)."""
    if not run_dir.exists():
        return "new"
    if not run_dir.is_dir():
        return "foreign"
    names = {p.name for p in run_dir.iterdir()}
    if not names:
        return "new"
    if MARKER in names:
        read_marker(run_dir)
        if "config.yaml" not in names:
            return "new"
        return "finished" if "metrics.json" in names else "unfinished"
    return "unmarked" if "config.yaml" in names else "foreign"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def discard(run_dir: Path) -> None:
    """Remove every name the marker lists (and atomic_write's leftover temporary files of those names);
    the marker stays, with an empty list, so the folder remains a (new) run directory."""
    marker = read_marker(run_dir)
    if marker is None:
        return
    for name in marker["written"]:
        _remove(run_dir / name)
        for tmp in leftovers(run_dir, name):
            _remove(tmp)
    _write_marker(run_dir, [])


def claim(run_dir: Path, *names: str) -> list[str]:
    """Record `names` in the marker before the caller writes them; returns the marker's new list."""
    marker = read_marker(run_dir)
    if marker is None:
        raise CliError(f"'{run_dir / MARKER}' disappeared while the run was writing. Nothing else was removed.")
    written = list(marker["written"])
    for name in names:
        if name not in written:
            if (run_dir / name).exists():
                raise CliError(f"'{run_dir / name}' exists but was not written by neat-peft, so the run will not "
                               "write over it. Move it out of the run directory, then run the command again.")
            written.append(name)
    if written != marker["written"]:
        _write_marker(run_dir, written)
    return written


@contextlib.contextmanager
def writing(run_dir: Path, *names: str) -> Iterator[None]:
    """claim(`names`), let the caller write them, then drop the names that were not written after all
    (a method writes one of adapter / model / TRAINED_FILES)."""
    written = claim(run_dir, *names)
    yield
    kept = [n for n in written if n not in names or (run_dir / n).exists()]
    if kept != written:
        _write_marker(run_dir, kept)


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_step(path: Path) -> Optional[int]:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else None


def marked_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints whose save finished (a SIGKILL mid-save leaves one without COMPLETE_MARKER), newest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in folder.iterdir() if checkpoint_step(p) is not None]
    return [p for _, p in sorted(found, reverse=True) if (p / COMPLETE_MARKER).is_file()]


def last_complete_checkpoint(run_dir: Path) -> Optional[Path]:
    """The highest-step checkpoint whose save finished."""
    marked = marked_checkpoints(run_dir)
    return marked[0] if marked else None


def _user_names_in_run(run_dir: Path) -> list[str]:
    """Names a run would write that exist in `run_dir` but are not listed in its marker: the user's."""
    marker = read_marker(run_dir)
    listed = set(marker["written"]) if marker else set()
    return [n for n in RUN_FILES if n not in listed and (run_dir / n).exists()]


def prepare(run_dir: Path, resume: bool, overwrite: bool, dry_run: bool = False) -> str:
    """Check what `run_dir` holds against --resume / --overwrite; returns 'fresh' or 'resume'.

    For a fresh run this removes the names the marker lists (--overwrite, or an aborted start) and creates
    the folder and its marker. dry_run: check only (the caller validates data and model first, then calls
    again to act)."""
    if resume and overwrite:
        raise CliError("--resume continues a run and --overwrite replaces it: give one of them. Nothing was changed.")
    current = state(run_dir)
    if current == "foreign":
        raise CliError(f"Output directory '{run_dir}' already exists and is not a neat-peft run directory (it has "
                       f"no {MARKER}). Nothing was changed. Choose another output.dir (or --output-dir); "
                       "--overwrite only ever replaces a neat-peft run.")
    if current == "unmarked":
        raise CliError(f"'{run_dir}' holds a config.yaml but not {MARKER}, the file neat-peft writes into every "
                       "run directory it creates: it is your own folder, or a run made by a neat-peft version "
                       "from before that file existed. neat-peft deletes and continues only runs it recognises, "
                       "so nothing was changed (with --overwrite or --resume neither). Choose another output.dir "
                       "(or --output-dir); to train an old run again, delete its folder yourself. eval, predict, "
                       "merge, export-lora and analyze still read an old finished run.")
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
    theirs = _user_names_in_run(run_dir)
    if theirs:
        raise CliError(f"'{run_dir}' is a neat-peft run directory, but {', '.join(theirs)} in it "
                       f"{'was' if len(theirs) == 1 else 'were'} not written by neat-peft (not listed in {MARKER}); "
                       "neat-peft will neither delete nor write over them. Nothing was changed. Move them out of "
                       "the run directory, then run the command again.")
    if current == "unfinished" and resume:
        return "resume"
    if not dry_run:
        if read_marker(run_dir) is not None:
            discard(run_dir)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_marker(run_dir, [])
    return "fresh"


def check_empty_output(out: Path, what: str) -> None:
    """OUT of merge / export-lora must not exist or be empty: never write over a user's files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"'{out}' already exists and is not empty. Nothing was written. Give a new folder for the "
                       f"{what}.")


def check_run(run_dir: Path) -> None:
    """A finished run directory (for eval / predict / merge / export-lora / analyze); reading an unmarked
    finished run made before the marker existed is allowed, since reading changes nothing."""
    current = state(run_dir)
    if current == "finished" or (current == "unmarked" and (run_dir / "metrics.json").is_file()):
        return
    if current == "unfinished":
        raise CliError(f"'{run_dir}' holds an unfinished run (no metrics.json). Finish it first with "
                       f"`neat-peft train --output-dir {run_dir} --resume`.")
    raise CliError(f"'{run_dir}' is not a neat-peft run directory holding a finished run (it needs {MARKER}, "
                   "config.yaml and metrics.json, as written by `neat-peft train`).")


# Files every checkpoint of a run holds (Trainer skips a missing optimizer or scheduler file silently, which
# would resume as a different run), and the trainable tensors' file (written by train.RunTrainer._save).
TRAINABLE_FILE = "trainable.safetensors"
CHECKPOINT_FILES = (COMPLETE_MARKER, "trainer_state.json", TRAINABLE_FILE, "optimizer.pt", "scheduler.pt")


def checkpoint_problem(checkpoint: Path) -> Optional[str]:
    """Why `checkpoint` cannot be resumed from (None: every file of it loads and fits its step)."""
    import torch
    from safetensors.torch import load_file
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_pt_utils import safe_globals

    missing = [name for name in CHECKPOINT_FILES if not (checkpoint / name).is_file()]
    rng_files = sorted(checkpoint.glob("rng_state*.pth"))
    if missing or not rng_files:
        return f"{', '.join(missing) or 'rng_state.pth'} missing"
    step = checkpoint_step(checkpoint)
    try:
        saved = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    except (ValueError, TypeError, UnicodeError) as e:
        return f"trainer_state.json does not load ({type(e).__name__}: {e})"
    if saved.global_step != step:
        return f"trainer_state.json is for step {saved.global_step}"
    try:
        tensors = load_file(str(checkpoint / TRAINABLE_FILE))
    except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError
        return f"{TRAINABLE_FILE} does not load ({type(e).__name__}: {e})"
    bad = [n for n, t in tensors.items() if not t.is_floating_point() or not bool(t.isfinite().all())]
    if not tensors or bad:
        return f"{TRAINABLE_FILE} holds {'no tensors' if not tensors else 'non-finite or non-float ' + bad[0]}"
    try:
        recorded_world_size(checkpoint)
    except (ValueError, KeyError, TypeError, UnicodeError) as e:
        return f"{LAUNCH_FILE} does not load ({type(e).__name__}: {e})"
    for name in ("optimizer.pt", "scheduler.pt", *(p.name for p in rng_files)):
        try:
            with safe_globals():  # what Trainer itself allows when it loads these files (weights only)
                value = torch.load(checkpoint / name, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many types on damaged files (RuntimeError, EOFError, ...)
            return f"{name} does not load ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        if not isinstance(value, dict) or (name == "optimizer.pt" and not {"state", "param_groups"} <= set(value)):
            return f"{name} is not a saved state"
    return None


def resume_checkpoint(run_dir: Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest checkpoint that loads, and the newer ones skipped on the way with the reason for each."""
    folder = checkpoints_dir(run_dir)
    found = sorted(((checkpoint_step(p), p) for p in folder.iterdir() if checkpoint_step(p) is not None),
                   reverse=True) if folder.is_dir() else []
    skipped = []
    for _, checkpoint in found:
        problem = ("its save did not finish" if not (checkpoint / COMPLETE_MARKER).is_file()
                   else checkpoint_problem(checkpoint))
        if problem is None:
            return checkpoint, skipped
        skipped.append((checkpoint, problem))
    return None, skipped


# --- the launch record of a checkpoint (launch.py explains why it exists) ------------------------------
LAUNCH_FILE = "launch.json"


def record(checkpoint: Path, world_size: int, batch_size: int, grad_accum_steps: int) -> None:
    """Write the checkpoint's launch record (before its completion marker, so a complete checkpoint has one)."""
    atomic_write_text(Path(checkpoint) / LAUNCH_FILE, json.dumps({
        "world_size": world_size, "per_process_batch_size": batch_size, "grad_accum_steps": grad_accum_steps,
        "global_batch_size": world_size * batch_size * grad_accum_steps}, indent=1) + "\n")


def recorded_world_size(checkpoint: Path) -> Optional[int]:
    """The number of processes that wrote `checkpoint`, or None if unknown.

    Checkpoints written before LAUNCH_FILE existed are read from Trainer's RNG files instead: one
    rng_state_<rank>.pth per process under several processes, a single rng_state.pth for one."""
    checkpoint = Path(checkpoint)
    launch = checkpoint / LAUNCH_FILE
    if launch.is_file():
        return int(json.loads(launch.read_text())["world_size"])
    per_rank = list(checkpoint.glob("rng_state_*.pth"))
    if per_rank:
        return len(per_rank)
    return 1 if (checkpoint / "rng_state.pth").is_file() else None


# --- merge / export-lora outputs ---------------------------------------------------------------------------
def _partial(out: Path, pid: int) -> tuple[Path, Path]:
    """(the temporary folder, the file beside it that marks the folder as ours) of a write of `out`."""
    folder = out.parent / f".{out.name}.neat-peft-partial-{pid}"
    return folder, folder.with_name(folder.name + ".json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(out: Path) -> None:
    """Delete what killed earlier writes of `out` left: a temporary folder only beside its marker file,
    and only once the process named in it is gone."""
    for mark in out.parent.glob(f".{glob.escape(out.name)}.neat-peft-partial-*.json"):
        pid = mark.name[:-len(".json")].rsplit("-", 1)[1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        folder, _ = _partial(out, int(pid))
        if folder.is_dir():
            shutil.rmtree(folder)
        mark.unlink()


@contextlib.contextmanager
def output_folder(out: Path, what: str) -> Iterator[Path]:
    """A temporary sibling folder to write `out` into, renamed to `out` once complete: a crash leaves `out`
    absent (never half-written) and a marked temporary folder that the next write of `out` removes."""
    check_empty_output(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    folder, mark = _partial(out, os.getpid())
    atomic_write_text(mark, json.dumps({"pid": os.getpid(), "output": str(out)}) + "\n")
    try:
        if folder.exists():  # this very process wrote it before (a failure it survived)
            shutil.rmtree(folder)
        folder.mkdir()
        yield folder
        try:
            os.rename(folder, out)  # replaces `out` only if it is (still) an empty folder
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise CliError(f"'{out}' was created or filled while the {what} was written. Nothing of it was "
                               f"touched and the {what} was not kept. Give a new folder.") from None
            raise
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        mark.unlink(missing_ok=True)
