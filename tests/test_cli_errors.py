"""Bad input: one clear paragraph on stderr, exit code 2, no traceback, and nothing of the user's changed."""

from __future__ import annotations

import json

import pytest

from cli_helpers import TINY_RUN, cli, cli_subprocess, make_tiny_bert, needs_corpus, needs_minilm, tree_digest


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_errors"))


@pytest.fixture(scope="module")
def finished_run(tiny_bert, tmp_path_factory):
    from neat_peft.cli.main import main

    run = tmp_path_factory.mktemp("runs_errors") / "done"
    assert main(["train", "-o", str(run), f"model.name={tiny_bert}", *TINY_RUN[:3], "train.max_steps=2",
                 "train.batch_size=8"]) == 0
    return run


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.replace("\r", "\n").split("\n")
    start = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(start) == 1, err  # one message, after at most a progress bar
    message = "\n".join(lines[start[0]:]).strip()
    assert "\n\n" not in message  # one paragraph
    flat = " ".join(message.split())
    for fragment in fragments:
        assert fragment in flat, flat


def test_unknown_override_suggests_closest(capsys, tmp_path):
    code, _, err = cli("train", "-o", tmp_path / "x", "method.rank=4", capsys=capsys)
    assert_clean_error(code, err, "Unknown recipe key 'method.rank'", "Did you mean 'method.r'?")
    code, _, err = cli("train", "-o", tmp_path / "x", "train.learning_rate=1e-3", capsys=capsys)
    assert_clean_error(code, err, "Did you mean 'train.lr'?")
    assert not (tmp_path / "x").exists()


def test_unknown_yaml_key_suggests_closest(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: text-classification\ndata:\n  text_colum: tweet\n")
    code, _, err = cli("train", "--config", recipe, "-o", tmp_path / "x", capsys=capsys)
    assert_clean_error(code, err, "'data.text_colum'", f"in file '{recipe}'", "Did you mean 'data.text_column'?")
    recipe.write_text("trainer:\n  lr: 0.1\n")
    code, _, err = cli("train", "--config", recipe, "-o", tmp_path / "x", capsys=capsys)
    assert_clean_error(code, err, "Unknown recipe key 'trainer'", "Did you mean 'train.lr'?")


def test_bad_values_and_missing_recipe(capsys, tmp_path):
    code, _, err = cli("train", "-o", tmp_path / "x", "method.name=loraa", capsys=capsys)
    assert_clean_error(code, err, "method.name must be one of", "Did you mean 'lora'?")
    code, _, err = cli("train", "-o", tmp_path / "x", "method.r=four", capsys=capsys)
    assert_clean_error(code, err, "'method.r' must be integer")
    code, _, err = cli("train", "--config", tmp_path / "nope.yaml", capsys=capsys)
    assert_clean_error(code, err, "nope.yaml' does not exist")


def test_missing_data_file(capsys, tmp_path):
    code, _, err = cli("train", "-o", tmp_path / "x", f"data.source={tmp_path}/tweets.csv", capsys=capsys)
    assert_clean_error(code, err, "Data file", "tweets.csv' does not exist")
    assert not (tmp_path / "x").exists()


@needs_minilm
def test_missing_column_lists_columns(capsys, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("tweet,sentiment\nhello,positive\nbye,negative\n")
    code, _, err = cli("train", "-o", tmp_path / "x", f"data.source={data}", capsys=capsys)
    assert_clean_error(code, err, "Column 'text' (recipe key data.text_column)", "Its columns are: tweet, sentiment",
                       "data.text_column=")
    assert not (tmp_path / "x").exists()


@needs_corpus
def test_empty_after_filtering(capsys, tmp_path):
    code, _, err = cli("train", "-o", tmp_path / "x", "data.keep_labels=[joyful]", capsys=capsys)
    assert_clean_error(code, err, "No examples left", "data.keep_labels=['joyful']", "38158 rows read")
    data = tmp_path / "blank.jsonl"
    data.write_text('{"text": "", "sentiment": "positive"}\n{"text": "  ", "sentiment": "negative"}\n')
    code, _, err = cli("train", "-o", tmp_path / "x", f"data.source={data}", capsys=capsys)
    assert_clean_error(code, err, "No examples left", "2 rows read")


@needs_minilm
@needs_corpus
def test_labels_not_seen_in_training(finished_run, capsys, tmp_path):
    data = tmp_path / "new.csv"
    data.write_text("text,sentiment\ngreat stuff,positive\nmeh,sarcastic\n")
    code, _, err = cli("eval", finished_run, "--data", data, capsys=capsys)
    assert_clean_error(code, err, "Labels ['sarcastic']", "never in the training data",
                       "['negative', 'neutral', 'positive']")


def test_labels_not_seen_check_unit():
    from neat_peft.cli.data import check_labels_seen
    from neat_peft.cli.errors import CliError

    check_labels_seen([{"label": "a"}], ["a", "b"], "x")
    with pytest.raises(CliError, match=r"Labels \['c'\] appear in the test split"):
        check_labels_seen([{"label": "c"}, {"label": "a"}], ["a", "b"], "the test split")


@needs_corpus
def test_model_path_missing(capsys, tmp_path):
    code, _, err = cli("train", "-o", tmp_path / "x", f"model.name={tmp_path}/no_model", "data.max_train_examples=8",
                       capsys=capsys)
    assert_clean_error(code, err, "Model path", "no_model' does not exist")
    (tmp_path / "not_a_model").mkdir()
    code, _, err = cli("train", "-o", tmp_path / "x", f"model.name={tmp_path}/not_a_model", capsys=capsys)
    assert_clean_error(code, err, "is not a transformers model folder")
    assert not (tmp_path / "x").exists()


def test_gguf_model_sources(tmp_path):
    """model.name may be a .gguf file (its folder and name go to transformers) or a folder with model.gguf_file;
    a missing file, or both at once, is refused naming the keys."""
    from neat_peft.cli.errors import CliError
    from neat_peft.cli.models import resolve_source

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    config = {"model.name": str(tmp_path / "m.gguf"), "model.gguf_file": None}
    assert resolve_source(config) == (str(tmp_path), "m.gguf")
    assert resolve_source({**config, "model.name": str(tmp_path), "model.gguf_file": "m.gguf"}) == (
        str(tmp_path), "m.gguf")
    with pytest.raises(CliError, match=r"model.gguf_file 'other.gguf' is not in the folder"):
        resolve_source({"model.name": str(tmp_path), "model.gguf_file": "other.gguf"})
    with pytest.raises(CliError, match=r"is a .gguf file and model.gguf_file is set too"):
        resolve_source({**config, "model.gguf_file": "m.gguf"})
    (tmp_path / "m.bin").write_bytes(b"x")  # any other file is still no model
    with pytest.raises(CliError, match="is not a transformers model folder"):
        resolve_source({"model.name": str(tmp_path / "m.bin"), "model.gguf_file": None})


@needs_corpus
def test_hub_model_not_cached_offline(tmp_path):
    result = cli_subprocess("train", "-o", tmp_path / "x", "model.name=nobody-here/no-such-model-3f9a",
                            "data.max_train_examples=8",
                            env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_clean_error(result.returncode, result.stderr, "Model 'nobody-here/no-such-model-3f9a'", "is not cached",
                       "offline (HF_HUB_OFFLINE=1)")
    assert not (tmp_path / "x").exists()


@needs_minilm
@needs_corpus
def test_finished_run_refused_then_overwrite_keeps_user_files(finished_run, tiny_bert, capsys, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "my_notes.txt").write_text("mine")
    before = tree_digest(run)
    args = ["train", "-o", run, f"model.name={tiny_bert}", *TINY_RUN[:3], "train.max_steps=2", "train.batch_size=8"]
    code, _, err = cli(*args, capsys=capsys)
    assert_clean_error(code, err, "already holds a finished run", "--overwrite")
    assert tree_digest(run) == before
    code, _, err = cli(*args[:3], "--resume", capsys=capsys)
    assert_clean_error(code, err, "nothing to resume")
    # A failing --overwrite (bad data) changes nothing either: inputs are checked before the directory is touched.
    code, _, err = cli(*args, "data.text_column=nope", "--overwrite", capsys=capsys)
    assert_clean_error(code, err, "Column 'nope'")
    assert tree_digest(run) == before
    code, _, _ = cli(*args, "train.seed=1", "--overwrite", capsys=capsys)
    assert code == 0
    assert (run / "my_notes.txt").read_text() == "mine"
    assert "seed: 1" in (run / "config.yaml").read_text()


def test_foreign_directory_refused_even_with_overwrite(capsys, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("important")
    for extra in ([], ["--overwrite"]):
        code, _, err = cli("train", "-o", folder, *extra, capsys=capsys)
        assert_clean_error(code, err, "is not a neat-peft run directory", "Nothing was changed")
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]


@needs_minilm
@needs_corpus
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_bert, capsys, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "nan"
    # Learning rate 1e30 with a linear warm-up (rate 0 at step 1): step 2's update is huge but finite, so the
    # step-2 checkpoint is finite, and the loss of step 3 overflows.
    code, _, err = cli("train", "-o", run, f"model.name={tiny_bert}", *TINY_RUN, "train.max_steps=10",
                       "train.lr=1e30", "train.head_lr=1e30", "train.warmup_ratio=0.5", capsys=capsys)
    assert_clean_error(code, err, "the loss became NaN or infinite at step", "last good checkpoint")
    step = int(" ".join(err.split()).split("at step ")[1].split(".")[0])
    assert step == 3 and "checkpoint-2, is kept" in " ".join(err.split())
    assert not (run / "metrics.json").exists()
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert checkpoints, "a checkpoint from before the failure is kept"
    for ckpt in checkpoints:
        weights = load_file(ckpt / "trainable.safetensors")
        assert all(bool(v.isfinite().all()) for v in weights.values())


def test_eval_on_non_run_directory(capsys, tmp_path):
    code, _, err = cli("eval", tmp_path, capsys=capsys)
    assert_clean_error(code, err, "is not a neat-peft run directory")
    code, _, err = cli("predict", tmp_path / "nothing", "hi", capsys=capsys)
    assert_clean_error(code, err, "is not a neat-peft run directory")


def test_recipe_keys_and_shipped_recipes():
    from pathlib import Path

    from neat_peft.cli import recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    shipped = sorted(p.name for p in root.glob("*.yaml"))
    assert shipped == ["causal_lm_instruct.yaml", "image_classification.yaml", "text_classification.yaml"]
    for path in root.glob("*.yaml"):
        recipe.resolve(str(path), [])
    # The text-classification recipe is exactly the built-in default run.
    assert recipe.resolve(str(root / "text_classification.yaml"), []) == recipe.resolve(None, [])
    config = recipe.resolve(None, ["train.lr=1e-3", "method.targets=[query, key]", "data.keep_labels=null"])
    assert config["train.lr"] == 1e-3 and config["method.targets"] == ["query", "key"]
    assert json.loads(json.dumps(recipe.to_tree(config)))["method"]["targets"] == ["query", "key"]


def test_hub_dataset_unavailable_offline(tmp_path):
    result = cli_subprocess("train", "-o", tmp_path / "x", "data.source=nobody-here/no-such-dataset-3f9a",
                            env_extra={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                       "HF_HOME": str(tmp_path / "hf")})
    assert_clean_error(result.returncode, result.stderr, "Data source 'nobody-here/no-such-dataset-3f9a'",
                       "offline and it is not in the local cache")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_local_file_formats_read_the_same(suffix, tmp_path):
    import pandas as pd

    from neat_peft.cli import recipe
    from neat_peft.cli.data import build_text_splits

    texts = [f"example number {i}" for i in range(60)] + ["example number 0"]  # one duplicate
    labels = ["good" if i % 3 else "bad" for i in range(60)] + ["good"]
    frame = pd.DataFrame({"review": texts, "stars": labels})
    path = tmp_path / f"data{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
     ".json": lambda: frame.to_json(path, orient="records"),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    config = recipe.resolve(None, [f"data.source={path}", "data.text_column=review", "data.label_column=stars",
                                   "data.max_train_examples=null", "data.max_test_examples=null"])
    splits = build_text_splits(config)
    assert splits.labels == ["bad", "good"] and splits.info["duplicates_dropped"] == 1
    assert sum(len(v) for v in splits.rows.values()) == 60
    # Stratified: each split keeps the 1:2 class ratio (floor of 10% of 20 and of 40 per class).
    assert sorted(r["label"] for r in splits.rows["test"]) == ["bad"] * 2 + ["good"] * 4
    assert len({r["text"] for v in splits.rows.values() for r in v}) == 60


def test_core_never_imports_the_cli():
    import subprocess
    import sys

    from cli_helpers import ROOT

    code = ("import sys, neat_peft; bad = [m for m in sys.modules if m.startswith('neat_peft.cli') or "
            "m in ('transformers', 'yaml', 'peft')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_recipe_keys_command_lists_every_key(capsys):
    from neat_peft.cli.recipe import KEYS

    code, out, _ = cli("recipe-keys", capsys=capsys)
    assert code == 0 and all(f"  {k} = " in out for k in KEYS)
