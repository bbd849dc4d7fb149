"""The CLI never damages what the user owns (issue 10): it deletes only what it wrote (the run-directory marker),
checks every recipe value before creating anything, explains every expected failure in one paragraph with exit
code 2, resumes from the newest checkpoint that loads, and writes merge / export-lora outputs whole or not at all.

Each case asserts that the message names the culprit, the exit code is 2, and the files on disk are unchanged."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import ROOT, TINY_RUN, cli, make_tiny_bert, needs_corpus, needs_minilm, tree_digest
from neat_peft.cli import recipe, rundir
from neat_peft.cli.rundir import MARKER
from test_cli_errors import assert_clean_error



def needs_run(test):
    """The tests that train: tiny random BERT with MiniLM's tokenizer, on the real tweet corpus."""
    return needs_minilm(needs_corpus(test))


# 6 steps, a checkpoint every 2 and all three kept: the fallback cases damage checkpoint-4 and resume from 2.
RUN = [*TINY_RUN, "train.max_steps=6", "train.keep_checkpoints=3", "method.dropout=0.1"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_reliability"))


@pytest.fixture(scope="module")
def whole_run(tiny_bert, tmp_path_factory):
    """An uninterrupted run: the reference every resumed run must equal bit for bit."""
    from neat_peft.cli.main import main

    run = tmp_path_factory.mktemp("reliability") / "whole"
    assert main(["train", "-o", str(run), f"model.name={tiny_bert}", *RUN]) == 0
    return run


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def killed_after(run: Path, step: int, dest: Path) -> Path:
    """What `run` held had it been killed right after its checkpoint at `step` (its marker, recipe, split and
    checkpoints up to that step)."""
    dest.mkdir(parents=True)
    for name in (MARKER, "config.yaml"):
        shutil.copy2(run / name, dest / name)
    shutil.copytree(run / "split", dest / "split")
    for ckpt in (run / "checkpoints").iterdir():
        if rundir.checkpoint_step(ckpt) <= step:
            shutil.copytree(ckpt, dest / "checkpoints" / ckpt.name)
    return dest


def flat(err: str) -> str:
    return " ".join(err.split())


# --- 1. only files the CLI wrote are deleted ------------------------------------------------------------------
def test_users_folder_with_config_yaml_is_never_taken_for_a_run(capsys, tmp_path):
    """The audit's data loss: a folder with the user's own config.yaml, model/ and split/ and --overwrite."""
    folder = tmp_path / "mine"
    (folder / "model").mkdir(parents=True)
    (folder / "split").mkdir()
    (folder / "config.yaml").write_text("my: own settings\n")
    (folder / "model" / "weights.bin").write_bytes(b"\x00weights")
    (folder / "split" / "train.jsonl").write_text('{"text": "mine"}\n')
    before = tree_digest(folder)
    for flags in (["--overwrite"], ["--resume"], []):
        code, _, err = cli("train", "-o", folder, *flags, capsys=capsys)
        assert_clean_error(code, err, f"'{folder}' holds a config.yaml but not {MARKER}", "nothing was changed")
    assert tree_digest(folder) == before


@needs_run
def test_overwrite_removes_only_listed_names(tiny_bert, whole_run, capsys, tmp_path):
    """A name a run could write but this one did not (a NEAT run writes no model/) is the user's: refused."""
    run = tmp_path / "run"
    shutil.copytree(whole_run, run)
    assert "model" not in json.loads((run / MARKER).read_text())["written"]
    (run / "model").mkdir()
    (run / "model" / "mine.bin").write_bytes(b"mine")
    (run / "notes.txt").write_text("mine too")
    before = tree_digest(run)
    args = ["train", "-o", run, f"model.name={tiny_bert}", *TINY_RUN[:3], "train.max_steps=1", "--overwrite"]
    code, _, err = cli(*args, capsys=capsys)
    assert_clean_error(code, err, "model in it was not written by neat-peft", "Move them out")
    assert tree_digest(run) == before
    shutil.rmtree(run / "model")
    code, _, _ = cli(*args, capsys=capsys)
    assert code == 0 and (run / "notes.txt").read_text() == "mine too"
    written = json.loads((run / MARKER).read_text())["written"]
    assert set(written) == {p.name for p in run.iterdir()} - {MARKER, "notes.txt"}


@needs_run
def test_old_run_without_marker(tiny_bert, whole_run, capsys, tmp_path):
    """A run from before the marker: train refuses it (with instructions), the read-only commands still read it."""
    run = tmp_path / "old"
    shutil.copytree(whole_run, run)
    (run / MARKER).unlink()
    before = tree_digest(run)
    code, _, err = cli("train", "-o", run, "--overwrite", capsys=capsys)
    assert_clean_error(code, err, "from before that file existed", "delete its folder yourself",
                       "eval, predict, merge, export-lora and analyze still read")
    assert tree_digest(run) == before
    code, out, _ = cli("eval", run, "--json", capsys=capsys)
    metrics = json.loads((run / "metrics.json").read_text())
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["accuracy"] == metrics["test"]["accuracy"]
    assert tree_digest(run) == before


def test_damaged_marker_is_refused(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text('{"format": 1, "written": ["../../etc"]}')
    (run / "config.yaml").write_text("task: text-classification\n")
    before = tree_digest(run)
    code, _, err = cli("train", "-o", run, "--overwrite", capsys=capsys)
    assert_clean_error(code, err, f"'{run / MARKER}'", "is damaged", "Nothing was changed")
    assert tree_digest(run) == before


# --- 2. every recipe value is checked before anything is created ----------------------------------------------
# One value each key refuses; every key of the schema must be here, so a new key gets a check too.
BAD_VALUES = {
    "task": "translation", "model.name": "''", "model.gguf_file": "''", "model.revision": "' '",
    "model.quantization": "int3", "model.compute_dtype": "float64",
    "data.source": "''", "data.hub_config": "''", "data.hub_split": "''", "data.text_column": "''",
    "data.label_column": "''", "data.prompt_column": "''", "data.response_column": "''", "data.keep_labels": "[]",
    "data.dedupe": "maybe", "data.validation_fraction": "0.5", "data.test_fraction": "-0.1",
    "data.max_train_examples": "0", "data.max_validation_examples": "-3", "data.max_test_examples": "1.5",
    "data.max_length": "0", "data.image_size": "0", "method.name": "adapter", "method.r": "0",
    "method.depth": "-1", "method.act_fn": "no_such_activation", "method.scaling": ".inf", "method.axis": "both",
    "method.dropout": "1.0", "method.normalize_weight": "'false'", "method.targets": "[1, 2]",
    "method.exclude": "[]", "method.match_lora_r": "0", "method.lora_alpha": "-16", "method.train_head": "2",
    "train.epochs": ".inf", "train.max_steps": "0", "train.batch_size": "0", "train.eval_batch_size": "-1",
    "train.grad_accum_steps": "0", "train.lr": "-1", "train.head_lr": ".nan", "train.weight_decay": "-0.1",
    "train.warmup_ratio": "1.0", "train.scheduler": "bogus", "train.max_grad_norm": "-1",
    "train.logits_to_keep": "some", "train.eval_every": "0",
    "train.save_every": "0", "train.log_every": "0", "train.keep_checkpoints": "0", "train.seed": "-1",
    "train.threads": "-1", "output.dir": "' '",
    "data.text_pair_column": "''", "data.answer_column": "''", "data.image_column": "''", "data.eval_splits": "[]",
    "data.test_split": "''", "data.test_source": "''", "data.eval_sets": "[1]", "data.prompt_template": "bogus",
    "method.layers_to_transform": "[-1]", "train.warmup_steps": "-1", "train.eval_strategy": "sometimes",
    "train.precision": "fp8", "eval.metric": "bogus", "eval.extractor": "bogus", "eval.num_beams": "0",
    "eval.max_new_tokens": "0", "eval.generate_answers": "maybe", "method.a_lr_ratio": "0", "method.layers_pattern": "[]",
}


def test_every_recipe_key_has_a_rule_and_a_refused_value():
    assert set(BAD_VALUES) == set(recipe.SCHEMA) == set(recipe.RULES)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_bad_recipe_value_is_refused_before_anything_is_created(key, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default run directory (runs/...) would go
    output = [] if key == "output.dir" else ["-o", tmp_path / "run"]
    if key != "model.name":  # a value let through fails fast on the model instead of training the default run
        output.append(f"model.name={tmp_path / 'no-model'}")
    code, _, err = cli("train", *output, f"{key}={BAD_VALUES[key]}", capsys=capsys)
    assert_clean_error(code, err, f"{key}")
    assert list(tmp_path.iterdir()) == []
    # The same value in a recipe file is refused the same way.
    section, _, name = key.rpartition(".")
    tree = f"{section}:\n  {name}: {BAD_VALUES[key]}\n" if section else f"{name}: {BAD_VALUES[key]}\n"
    (tmp_path / "r.yaml").write_text(tree)
    code, _, err = cli("train", "--config", tmp_path / "r.yaml", *output, capsys=capsys)
    assert_clean_error(code, err, f"{key}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_rules_that_involve_several_keys(capsys, tmp_path):
    for overrides, fragment in ((["data.text_column=sentiment"], "name the same column 'sentiment'"),
                                (["method.match_lora_r=4", "method.name=lora"], "'method.match_lora_r'"),
                                (["method.lora_alpha=16"], "'method.lora_alpha'")):
        code, _, err = cli("train", "-o", tmp_path / "run", *overrides, capsys=capsys)
        assert_clean_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_edited_recipe_of_a_run_names_its_file(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text(json.dumps({"format": 1, "written": ["config.yaml"]}))
    (run / "config.yaml").write_text("train:\n  lr: -1\n")
    before = tree_digest(run)
    code, _, err = cli("train", "-o", run, "--resume", capsys=capsys)
    assert_clean_error(code, err, "'train.lr'", f"(in '{run / 'config.yaml'}')", "greater than 0")
    assert tree_digest(run) == before


def test_method_help_comes_from_neat_config(capsys):
    import dataclasses

    from neat_peft import NeatConfig

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(NeatConfig)}
    for key, field in recipe.NEAT_FIELDS.items():
        assert recipe.SCHEMA[key][2].startswith(helps[field]), key
    code, out, _ = cli("recipe-keys", capsys=capsys)
    assert code == 0 and helps["depth"] in out and "Must be one of linear, cosine" in out


# --- 3. expected failures: one paragraph, exit code 2 --------------------------------------------------------
def _refuse_writes_under(monkeypatch, folder: Path, error: int) -> None:
    """Make every write below `folder` fail with `error`, as a read-only or a full file system does."""
    import builtins
    import pathlib

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def inside(path) -> bool:
        return str(Path(os.fspath(path)).absolute()).startswith(str(folder))

    def fail(path):
        raise OSError(error, os.strerror(error), str(path))

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    def guarded_write_text(self, *args, **kwargs):
        if inside(self):
            fail(self)
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", guarded_write_text)


real_write_text = Path.write_text


@needs_run
def test_read_only_output_folder(tiny_bert, monkeypatch, capsys, tmp_path):
    parent = tmp_path / "readonly"
    parent.mkdir()
    (parent / "keep.txt").write_text("mine")
    parent.chmod(0o555)
    try:
        (parent / ".probe").write_text("x")
        (parent / ".probe").unlink()
        _refuse_writes_under(monkeypatch, parent, errno.EROFS)  # root ignores permissions: emulate the mount
    except PermissionError:
        pass
    try:
        before = tree_digest(parent)
        code, _, err = cli("train", "-o", parent / "run", f"model.name={tiny_bert}", *TINY_RUN, capsys=capsys)
        assert_clean_error(code, err, f"Could not set up the run in '{parent / 'run'}'", f"'{parent / 'run'}",
                           "Choose a folder you can write to", "Nothing of yours was changed")
        assert tree_digest(parent) == before and sorted(p.name for p in parent.iterdir()) == ["keep.txt"]
    finally:
        parent.chmod(0o755)


@needs_run
def test_disk_full_while_the_run_starts(tiny_bert, monkeypatch, capsys, tmp_path):
    """ENOSPC while the split is written: a clear message, nothing but the (empty) marker left, a rerun works."""
    import pathlib

    run = tmp_path / "run"

    def full(self, *args, **kwargs):
        if self.name.startswith(".test.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    args = ["train", "-o", run, f"model.name={tiny_bert}", *TINY_RUN[:3], "train.max_steps=1"]
    code, _, err = cli(*args, capsys=capsys)
    assert_clean_error(code, err, "No space left on device", ".test.jsonl", "Free some space")
    assert [p.name for p in run.iterdir()] == [MARKER]
    assert json.loads((run / MARKER).read_text())["written"] == []
    monkeypatch.undo()
    code, out, _ = cli(*args, capsys=capsys)
    assert code == 0 and (run / "metrics.json").is_file()


@needs_run
def test_disk_full_during_training_keeps_the_last_checkpoint(tiny_bert, whole_run, monkeypatch, capsys,
                                                            tmp_path):
    """ENOSPC in the middle of the step-4 checkpoint: training stops, checkpoint-2 is kept, --resume skips the
    unfinished checkpoint-4 and ends exactly like the uninterrupted run."""
    run = tmp_path / "run"
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    code, _, err = cli("train", "-o", run, f"model.name={tiny_bert}", *RUN, capsys=capsys)
    assert_clean_error(code, err, "Training stopped", "No space left on device", "checkpoint-4", "optimizer.pt",
                       "checkpoint-2, is kept", f"neat-peft train -o {run} --resume")
    monkeypatch.undo()
    code, out, _ = cli("train", "-o", run, "--resume", capsys=capsys)
    assert code == 0, out
    assert "skipping checkpoint-4: its save did not finish" in out and "resuming from checkpoint-2" in out
    a, b = adapter(whole_run), adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_run
def test_eval_on_damaged_runs(whole_run, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(whole_run, run)
    shutil.rmtree(run / "split")
    before = tree_digest(run)
    code, _, err = cli("eval", run, capsys=capsys)
    assert_clean_error(code, err, f"Cannot read '{run / 'split' / 'info.json'}'", "--overwrite")
    shutil.copytree(whole_run / "split", run / "split")
    lines = (run / "split" / "test.jsonl").read_text().splitlines()
    (run / "split" / "test.jsonl").write_text("\n".join(lines[:-3]) + "\n")
    code, _, err = cli("eval", run, capsys=capsys)
    assert_clean_error(code, err, f"'{run / 'split' / 'test.jsonl'}' holds {len(lines) - 3} rows but the run "
                                  f"used {len(lines)}")
    (run / "split" / "test.jsonl").write_text("\n".join(lines)[:-7])
    code, _, err = cli("eval", run, capsys=capsys)
    assert_clean_error(code, err, f"Cannot read '{run / 'split' / 'test.jsonl'}' (JSONDecodeError")
    shutil.copy2(whole_run / "split" / "test.jsonl", run / "split" / "test.jsonl")
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = tree_digest(run)
    for command in (["eval", run], ["predict", run, "hello"], ["merge", run, tmp_path / "merged"],
                    ["export-lora", run, tmp_path / "lora"]):
        code, _, err = cli(*command, capsys=capsys)
        assert_clean_error(code, err, f"Cannot load the adapter of '{run}'", f"'{weights}'", "truncated or corrupt")
    assert tree_digest(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --- 4. --resume falls back to the newest checkpoint that loads -----------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


DAMAGE = {
    "truncated trainable.safetensors": (lambda c: _truncate(c / "trainable.safetensors"),
                                        "trainable.safetensors does not load"),
    "broken trainer_state.json": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 4,'),
                                  "trainer_state.json does not load"),
    "corrupt optimizer.pt": (lambda c: (c / "optimizer.pt").write_bytes(b"PK\x03\x04 not a zip file at all"),
                             "optimizer.pt does not load"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@needs_run
def test_resume_skips_a_damaged_checkpoint(damage, whole_run, capsys, tmp_path):
    run = killed_after(whole_run, 4, tmp_path / "killed")
    hurt, reason = DAMAGE[damage]
    hurt(run / "checkpoints" / "checkpoint-4")
    code, out, err = cli("train", "-o", run, "--resume", capsys=capsys)
    assert code == 0, err
    assert f"--resume: skipping checkpoint-4: {reason}" in out and "resuming from checkpoint-2" in out
    # The damaged checkpoint was replaced as a whole by the one the resumed run wrote at step 4.
    name = "checkpoints/checkpoint-4/trainable.safetensors"
    assert (run / name).read_bytes() == (whole_run / name).read_bytes()
    assert rundir.checkpoint_problem(run / "checkpoints" / "checkpoint-4") is None
    a, b = adapter(whole_run), adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the whole run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"] == json.loads((whole_run / "metrics.json").read_text())["test"]


@needs_run
def test_resume_with_no_loadable_checkpoint_starts_again(whole_run, capsys, tmp_path):
    run = killed_after(whole_run, 4, tmp_path / "killed")
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        (run / "checkpoints" / ckpt / "scheduler.pt").unlink()
    code, out, _ = cli("train", "-o", run, "--resume", capsys=capsys)
    assert code == 0
    assert "skipping checkpoint-4: scheduler.pt missing" in out and "skipping checkpoint-2" in out
    assert "no complete checkpoint, starting again" in out
    a, b = adapter(whole_run), adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_run
def test_resume_with_a_truncated_split_is_refused(whole_run, capsys, tmp_path):
    run = killed_after(whole_run, 4, tmp_path / "killed")
    train = run / "split" / "train.jsonl"
    train.write_bytes(train.read_bytes()[:-40])
    before = tree_digest(run)
    code, _, err = cli("train", "-o", run, "--resume", capsys=capsys)
    assert_clean_error(code, err, f"Cannot read '{train}'", "cannot be evaluated or resumed", "--overwrite")
    assert tree_digest(run) == before


def test_checkpoint_problems_are_named(tmp_path):
    """The checks behind the fallback, on hand-made checkpoints (no training)."""
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoints" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    assert rundir.checkpoint_problem(ckpt).startswith("checkpoint_complete, trainer_state.json")
    (ckpt / rundir.COMPLETE_MARKER).write_text("3\n")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    save_file({"w": torch.ones(2)}, str(ckpt / rundir.TRAINABLE_FILE))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    torch.save({"last_epoch": 3}, ckpt / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, ckpt / "rng_state.pth")
    assert rundir.checkpoint_problem(ckpt) == "trainer_state.json is for step 2"
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert rundir.checkpoint_problem(ckpt) is None
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(ckpt / rundir.TRAINABLE_FILE))
    assert rundir.checkpoint_problem(ckpt) == "trainable.safetensors holds non-finite or non-float w"
    save_file({"w": torch.ones(2)}, str(ckpt / rundir.TRAINABLE_FILE))
    (ckpt / "launch.json").write_text("{")
    assert rundir.checkpoint_problem(ckpt).startswith("launch.json does not load")
    (ckpt / "launch.json").unlink()
    (ckpt / "rng_state.pth").unlink()
    assert rundir.checkpoint_problem(ckpt) == "rng_state.pth missing"
    assert rundir.resume_checkpoint(tmp_path) == (None, [(ckpt, "rng_state.pth missing")])


# --- 5. merge / export-lora write whole outputs ---------------------------------------------------------------
KILL_ON_RENAME = """
import os, signal, sys
real_rename = os.rename
def rename(src, dst):
    if '.neat-peft-partial-' in str(src):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst)
os.rename = rename
from neat_peft.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@needs_run
def test_sigkill_during_merge_leaves_nothing_that_blocks_a_rerun(whole_run, capsys, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "merged"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = subprocess.run([sys.executable, "-c", KILL_ON_RENAME, "merge", str(whole_run), str(out)],
                            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0].startswith(".merged.neat-peft-partial-") and left[1] == left[0] + ".json"
    assert (tmp_path / left[0] / "model.safetensors").is_file()
    # A folder that merely looks like ours (no marker file beside it) is the user's and stays.
    lookalike = tmp_path / ".merged.neat-peft-partial-1"
    lookalike.mkdir()
    (lookalike / "mine.txt").write_text("mine")
    code, text, _ = cli("merge", whole_run, out, capsys=capsys)
    assert code == 0 and "merged neat model saved" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == [lookalike.name, "merged"]
    assert (lookalike / "mine.txt").read_text() == "mine"
    AutoModelForSequenceClassification.from_pretrained(out)


@needs_run
def test_export_lora_failing_midway_leaves_no_output(whole_run, monkeypatch, capsys, tmp_path):
    from neat_peft import NeatModel

    real_export = NeatModel.export_lora

    def export_then_fill_the_disk(self, folder, *args, **kwargs):
        real_export(self, folder, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "README.md"))

    monkeypatch.setattr(NeatModel, "export_lora", export_then_fill_the_disk)
    out = tmp_path / "lora"
    code, _, err = cli("export-lora", whole_run, out, capsys=capsys)
    assert_clean_error(code, err, "No space left on device", "README.md")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    code, _, _ = cli("export-lora", whole_run, out, capsys=capsys)
    assert code == 0 and (out / "adapter_config.json").is_file() and list(tmp_path.iterdir()) == [out]
