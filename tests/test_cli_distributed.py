"""`neat-peft train` under torchrun and accelerate launch (2 CPU processes, gloo), on a tiny random BERT.

Why the runs are comparable: Trainer draws one seeded permutation of the training set (data_seed = train.seed)
and accelerate deals its per-process batches of b examples round-robin to the ranks, so optimizer step k of a
2-process run covers positions [2kb, 2kb + 2b) of the permutation, which is exactly the batch of a 1-process run
with batch 2b. Each rank's loss is the mean over its b examples and DDP averages the gradients, so the update
is the one of the mean over 2b. Dropout is off (the model's and the adapter's), the only randomness left is
the initialisation, which is seeded and broadcast from rank 0. The logged loss of every step is checked too:
it is the mean over both ranks, so equal losses from equal weights mean equal batches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import ROOT, cli, make_tiny_bert, needs_corpus, needs_minilm, tree_digest
from neat_peft.cli.rundir import MARKER

pytestmark = [needs_minilm, needs_corpus]

# 48 examples, 4 steps of a global batch of 8; lr 0.01 moves every weight far beyond the tolerance.
RUN = ["data.max_train_examples=48", "data.max_validation_examples=16", "data.max_test_examples=16",
       "train.max_steps=4", "train.save_every=2", "train.eval_every=2", "train.log_every=1",
       "train.eval_batch_size=32", "train.lr=0.01", "train.head_lr=0.01", "method.dropout=0.0"]
RTOL, ATOL = 1e-5, 1e-6  # fp32: the two runs sum the same gradients in a different order
TWO_PROCESSES = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate's multi-process launcher (it runs torchrun); neat-peft selects CPU + gloo itself.
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0"],
}


def launch(launcher: str, *argv, timeout: int = 300, log_dir: Path | None = None) -> subprocess.CompletedProcess:
    """Run `neat-peft` with 2 processes; log_dir (torchrun): each rank's stdout/stderr in its own file there."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    return subprocess.run([*TWO_PROCESSES[launcher], *logs, "-m", "neat_peft.cli.main", *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), dropout=0.0)


@pytest.fixture(scope="module")
def one_process(model, tmp_path_factory):
    """The reference: one process, batch 2b = 8."""
    run = tmp_path_factory.mktemp("one") / "run"
    assert cli("train", "-o", run, f"model.name={model}", *RUN, "train.batch_size=8")[0] == 0
    return run


@pytest.fixture(scope="module")
def two_processes(model, tmp_path_factory):
    """torchrun --nproc_per_node 2, batch b = 4 per process."""
    run = tmp_path_factory.mktemp("two") / "run"
    result = launch("torchrun", "train", "-o", run, f"model.name={model}", *RUN, "train.batch_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trainable params  train time") == 1  # one final table, from rank 0
    return run


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def step_losses(run: Path) -> list[float]:
    history = json.loads((run / "log_history.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def killed_after(run: Path, step: int, dest: Path) -> Path:
    """What `run` held had it been killed right after its checkpoint at `step`: its recipe, its split and that
    checkpoint (as in test_resume_after_sigkill_matches_uninterrupted, without racing a kill against torchrun)."""
    dest.mkdir(parents=True)
    shutil.copy2(run / MARKER, dest / MARKER)
    shutil.copy2(run / "config.yaml", dest / "config.yaml")
    shutil.copytree(run / "split", dest / "split")
    shutil.copytree(run / "checkpoints" / f"checkpoint-{step}", dest / "checkpoints" / f"checkpoint-{step}")
    return dest


def test_two_processes_equal_one_process_with_double_batch(one_process, two_processes, model, tmp_path):
    one, two = adapter(one_process), adapter(two_processes)
    assert any(".classifier." in n for n in one) and sum("neat" in n or "peanut" in n for n in one) == 8
    assert_same_weights(one, two)
    # Same examples in every global batch: the per-step losses (mean over the ranks) are the same.
    assert step_losses(two_processes) == pytest.approx(step_losses(one_process), rel=RTOL, abs=ATOL)
    assert len(step_losses(one_process)) == 4
    # The weights moved far from their start (B starts at zero) ...
    assert min(float(w.abs().max()) for n, w in one.items() if "_B." in n) > 1e3 * ATOL
    # ... and the comparison can fail: the same 4 steps with batch b in one process land elsewhere.
    half = tmp_path / "half"
    assert cli("train", "-o", half, f"model.name={model}", *RUN, "train.batch_size=4")[0] == 0
    assert max(float((adapter(half)[n] - one[n]).abs().max()) for n in one) > 1e3 * ATOL
    # Each checkpoint records how many processes wrote it (what --resume checks).
    for run, world in ((one_process, 1), (two_processes, 2)):
        record = json.loads((run / "checkpoints" / "checkpoint-4" / "launch.json").read_text())
        assert record == {"world_size": world, "per_process_batch_size": 8 // world, "grad_accum_steps": 1,
                          "global_batch_size": 8}


def test_accelerate_launch_runs_the_same_command(one_process, model, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine: DDP over gloo, same weights."""
    run = tmp_path / "accelerate"
    result = launch("accelerate", "train", "-o", run, f"model.name={model}", *RUN, "train.batch_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "checkpoints" / "checkpoint-4" / "launch.json").read_text())["world_size"] == 2
    assert_same_weights(adapter(one_process), adapter(run))


def test_resume_needs_the_same_number_of_processes(one_process, two_processes, tmp_path, capsys):
    # A 2-process run resumed by one process: refused, nothing changed.
    broken = killed_after(two_processes, 2, tmp_path / "two_killed")
    before = tree_digest(broken)
    code, _, err = cli("train", "-o", broken, "--resume", capsys=capsys)
    assert code == 2 and tree_digest(broken) == before
    err = " ".join(err.split())
    assert "was trained with 2 processes" in err and "this launch has 1 process." in err
    assert f"torchrun --nproc_per_node 2 -m neat_peft.cli.main train -o {broken} --resume" in err
    # A 1-process run resumed by torchrun with 2: refused on every rank (no hang), nothing changed.
    single = killed_after(one_process, 2, tmp_path / "one_killed")
    before_single = tree_digest(single)
    result = launch("torchrun", "train", "-o", single, "--resume", timeout=120, log_dir=tmp_path / "logs")
    assert result.returncode != 0 and tree_digest(single) == before_single
    rank_errors = [" ".join(p.read_text().split()) for p in sorted((tmp_path / "logs").rglob("stderr.log"))]
    assert len(rank_errors) == 2 and all("error: --resume: the run in" in e and "was trained with 1 process (" in e
                                         and "this launch has 2 processes." in e for e in rank_errors)
    # With 2 processes again the run continues from checkpoint-2 and ends like the uninterrupted run.
    result = launch("torchrun", "train", "-o", broken, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint-2" in result.stdout
    assert_same_weights(adapter(two_processes), adapter(broken))
    assert step_losses(broken)[-2:] == pytest.approx(step_losses(two_processes)[-2:], rel=RTOL, abs=ATOL)
