"""The number of processes of a run: recorded with every checkpoint, and checked by --resume.

Under torchrun / accelerate launch one optimizer step consumes a global batch of
processes × train.batch_size × train.grad_accum_steps examples, each process its own share. A checkpoint holds
one RNG state per process, and Trainer's resume skips the batches already seen counted in per-process batches.
Resumed with another number of processes, the global batch, the data order and the restored RNG states no
longer match the checkpoint: the run would go on as a different run while looking like a resumed one. So the
checkpoint records the number of processes (LAUNCH_FILE) and --resume refuses a different one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from .errors import CliError
from .rundir import LAUNCH_FILE, record, recorded_world_size  # noqa: F401

def world_size() -> int:
    """Processes in this launch (torchrun and accelerate launch set WORLD_SIZE; a plain run has none).

    Read only to configure TrainingArguments (CPU + gloo under several processes); once they exist their
    world_size and process_index are what the run uses."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _processes(n: int) -> str:
    return f"{n} process" + ("" if n == 1 else "es")


def check_resume(checkpoint: Optional[Path], run_dir: Path, config: dict[str, Any], now: int) -> None:
    """Refuse to resume `checkpoint` with `now` processes if a different number wrote it (nothing is changed)."""
    if checkpoint is None:  # nothing to resume from: the run starts again, with any number of processes
        return
    recorded = recorded_world_size(checkpoint)
    if recorded is None or recorded == now:
        return
    per_process = config["train.batch_size"] * config["train.grad_accum_steps"]
    again = (f"neat-peft train -o {run_dir} --resume" if recorded == 1 else
             f"torchrun --nproc_per_node {recorded} -m neat_peft.cli.main train -o {run_dir} --resume")
    raise CliError(
        f"--resume: the run in '{run_dir}' was trained with {_processes(recorded)} (its last checkpoint, "
        f"{checkpoint.name}, was written with a global batch of {recorded} × {per_process} examples), but this "
        f"launch has {_processes(now)}. Resuming with another number of processes would change the global batch "
        "and the data order, so the run would not continue as it was. Nothing was changed. Relaunch with "
        f"{_processes(recorded)}: `{again}`, or start a new run with --overwrite.")


def finish() -> None:
    """End a multi-process run together: wait until rank 0 has written the run, then close the process group.

    Called after run_train has returned, once its trainer and DDP-wrapped model are unreachable: collected here,
    while every rank still has the process group. Closed before them (as it once was), the group was torn down
    later by the model's DDP reducer as the trainer was freed, and that teardown hung a rank now and then (about
    1 launch in 12 on 2 busy cores). Left to interpreter exit, a rank that is done early tears its gloo
    connections down while rank 0 still writes; that aborted the rank (SIGABRT) and torchrun then killed rank 0
    mid-write."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
