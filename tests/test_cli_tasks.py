"""The paper's task types end to end (train -> eval -> predict) on tiny random models and small local data in
the hub datasets' schemas, read through the same `datasets.load_dataset` call the hub path uses. Every metric
in metrics.json is recomputed with scikit-learn / scipy from predictions made independently: the adapter
reloaded with NeatModel.from_pretrained and the inputs prepared from the source files, not from the run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import cli, have, make_tiny_bert, make_tiny_llama, needs_minilm

pytestmark = [needs_minilm, pytest.mark.usefixtures("isolated_datasets_cache"),
              pytest.mark.skipif(not (have("sklearn") and have("scipy")),
                                 reason="scikit-learn and scipy compute the reference metrics")]

WORDS = "cat dog bird fish tree car road house blue red green small big fast slow".split()
COLOURS = ("red", "green", "blue")


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="module")
def tiny_bert(work):
    return make_tiny_bert(work / "bert")


def _train(run: Path, *overrides: str) -> dict:
    assert cli("train", "-o", run, *overrides) == (0, "", "")
    return json.loads((run / "metrics.json").read_text())


def _neat_reload(base, run: Path):
    from neat_peft import NeatModel

    return NeatModel.from_pretrained(base, run / "adapter").eval()


# --- text pairs (GLUE MRPC / QQP / MNLI schema) -------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_data(work):
    """A folder of split files like GLUE's: premise / hypothesis / label (0, 1) / idx, two evaluation splits."""
    rng, folder = random.Random(0), work / "pairs"
    folder.mkdir()
    for split, n in (("train", 64), ("validation_matched", 24), ("validation_mismatched", 20)):
        rows = []
        for i in range(n):
            a = _sentence(rng)
            same = rng.random() < 0.5
            rows.append({"premise": a, "hypothesis": a if same else _sentence(rng), "label": int(same), "idx": i})
        _write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


@pytest.fixture(scope="module")
def pair_run(tiny_bert, pair_data, work):
    run = work / "runs" / "pair"
    metrics = _train(run, "task=text-pair-classification", f"model.name={tiny_bert}", f"data.source={pair_data}",
                     "data.text_column=premise", "data.text_pair_column=hypothesis", "data.label_column=label",
                     "data.eval_splits=[validation_matched, validation_mismatched]", "train.epochs=3",
                     "train.eval_strategy=epoch", "train.batch_size=16", "train.lr=5e-3", "train.head_lr=1e-2",
                     "method.scaling=0.5", "data.max_length=32")
    return run, metrics


def _pair_logits(run: Path, tiny_bert: Path, rows: list[dict]) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, ignore_mismatched_sizes=True)
    model = _neat_reload(base, run)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tok([r["premise"] for r in rows], [r["hypothesis"] for r in rows], truncation=True, max_length=32,
                padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.numpy()


def test_pair_metrics_match_sklearn_on_both_eval_splits(pair_run, tiny_bert, pair_data):
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    run, metrics = pair_run
    assert set(metrics["test"]) == {"validation_matched", "validation_mismatched"}
    for split in ("validation_matched", "validation_mismatched"):
        rows = _read_jsonl(pair_data / f"{split}.jsonl")
        gold = [r["label"] for r in rows]
        pred = _pair_logits(run, tiny_bert, rows).argmax(-1)
        got = metrics["test"][split]
        assert got["examples"] == len(rows)
        assert got["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
        assert got["f1"] == pytest.approx(f1_score(gold, pred, pos_label=1, zero_division=0), abs=1e-12)
        assert got["matthews"] == pytest.approx(matthews_corrcoef(gold, pred), abs=1e-12)


def test_pair_best_validation_epoch_is_reported(pair_run):
    run, metrics = pair_run
    curve = metrics["validation_curve"]
    assert [round(p["epoch"]) for p in curve] == [1, 2, 3]  # one validation per epoch
    best = metrics["best_validation"]
    assert best["metric"] == "accuracy" and best["value"] == max(p["accuracy"] for p in curve)
    assert best["epoch"] == next(p["epoch"] for p in curve if p["accuracy"] == best["value"])
    # Both evaluation splits were validated each epoch (MNLI matched / mismatched).
    history = json.loads((run / "log_history.json").read_text())["log_history"]
    assert sum("eval_validation_mismatched_accuracy" in h for h in history) == 3


def test_pair_head_and_adapter_learning_rates(pair_run):
    """train.head_lr drives the classifier and train.lr the adapter: the optimizer's two groups in the
    checkpoint's scheduler state start at those values' warm-up fractions."""
    run, _ = pair_run
    checkpoint = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    state = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    assert sorted(state["base_lrs"]) == [5e-3, 1e-2]


def test_pair_eval_and_predict(pair_run, tiny_bert, pair_data, capsys):
    from neat_peft.cli.commands import run_eval, run_predict

    run, metrics = pair_run
    result = run_eval(str(run), None)
    assert result["test"]["validation_matched"]["accuracy"] == metrics["test"]["validation_matched"]["accuracy"]
    row = _read_jsonl(pair_data / "validation_mismatched.jsonl")[0]
    [out] = run_predict(str(run), [f"{row['premise']} ||| {row['hypothesis']}"], None, True)
    probs = torch.softmax(torch.from_numpy(_pair_logits(run, tiny_bert, [row])[0]), -1)
    assert [out["scores"]["0"], out["scores"]["1"]] == pytest.approx(probs.tolist(), abs=1e-5)
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["label"] == out["label"]


# --- text regression (STS-B schema) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def sts_data(work):
    rng, folder = random.Random(1), work / "stsb"
    folder.mkdir()
    for split, n in (("train", 48), ("validation", 24)):
        _write_jsonl(folder / f"{split}.jsonl", [
            {"sentence1": _sentence(rng), "sentence2": _sentence(rng), "label": round(rng.uniform(0, 5), 3),
             "idx": i} for i in range(n)])
    return folder


def test_regression_mse_loss_and_pearson_spearman_match_scipy(tiny_bert, sts_data, work):
    from scipy.stats import pearsonr, spearmanr
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from neat_peft.cli.commands import run_predict

    run = work / "runs" / "stsb"
    metrics = _train(run, "task=text-regression", f"model.name={tiny_bert}", f"data.source={sts_data}",
                     "data.text_column=sentence1", "data.text_pair_column=sentence2", "data.label_column=label",
                     "data.eval_splits=[validation]", "train.epochs=2", "train.eval_strategy=epoch",
                     "train.batch_size=16", "data.max_length=32")
    rows = _read_jsonl(sts_data / "validation.jsonl")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=1, ignore_mismatched_sizes=True)
    model = _neat_reload(base, run)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tok([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], truncation=True, max_length=32,
                padding=True, return_tensors="pt")
    gold = torch.tensor([r["label"] for r in rows])
    with torch.no_grad():
        out = model(**batch, labels=gold)
    pred = out.logits[:, 0]
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(pred, gold))  # regression: MSE
    got = metrics["test"]["validation"]
    assert got["pearson"] == pytest.approx(pearsonr(pred.numpy(), gold.numpy())[0], abs=1e-5)
    assert got["spearman"] == pytest.approx(spearmanr(pred.numpy(), gold.numpy())[0], abs=1e-5)
    assert got["mse"] == pytest.approx(float(((pred - gold) ** 2).mean()), rel=1e-5)
    assert metrics["best_validation"]["metric"] == "pearson"
    [score] = run_predict(str(run), [f"{rows[0]['sentence1']} ||| {rows[0]['sentence2']}"], None, False)
    assert score["score"] == pytest.approx(float(pred[0]), abs=1e-5)


# --- image classification (any `datasets` image set / image folder, ViT processor) ------------------------
@pytest.fixture(scope="module")
def image_folder(work):
    """train/validation/<class>/<n>.png: each class a dominant colour channel, 40 x 40 pixels."""
    from PIL import Image

    folder = work / "images"
    for split, n in (("train", 8), ("validation", 4)):
        for c, colour in enumerate(COLOURS):
            (folder / split / colour).mkdir(parents=True)
            for i in range(n):
                pixels = np.random.default_rng(1000 * c + i + (0 if split == "train" else 500)).integers(
                    0, 80, (40, 40, 3), dtype=np.uint8)
                pixels[..., c] += 170
                Image.fromarray(pixels).save(folder / split / colour / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiny_vit(work):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    folder = work / "vit"
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_image_transforms_eval_matches_the_processor_train_is_random(tiny_vit, image_folder):
    from PIL import Image
    from transformers import AutoImageProcessor

    from neat_peft.cli.features import image_transforms

    processor = AutoImageProcessor.from_pretrained(tiny_vit)
    train_tf, eval_tf = image_transforms(processor)
    image = Image.open(image_folder / "validation" / "red" / "0.png")
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(eval_tf(image), expected, atol=1e-5, rtol=0)
    # Not square: the shorter side is resized and the centre cropped (the aspect ratio is kept, as in the
    # authors' Resize + CenterCrop): a picture whose left and right thirds differ keeps only its middle.
    wide = np.zeros((32, 96, 3), dtype=np.uint8)
    wide[:, 32:64] = 200
    torch.testing.assert_close(eval_tf(Image.fromarray(wide)), eval_tf(Image.fromarray(wide[:, 32:64])))
    rng = np.random.default_rng(0)
    crops = [train_tf(image, rng) for _ in range(4)]
    assert all(c.shape == (3, 32, 32) for c in crops)
    assert not torch.allclose(crops[0], crops[1])  # random crop / flip
    flip_only = train_tf(image.transpose(Image.FLIP_LEFT_RIGHT), np.random.default_rng(5))
    assert torch.isfinite(flip_only).all()


@pytest.fixture(scope="module")
def image_run(tiny_vit, image_folder, work):
    run = work / "runs" / "image"
    metrics = _train(run, "task=image-classification", f"model.name={tiny_vit}", f"data.source={image_folder}",
                     "data.label_column=label", "data.eval_splits=[validation]", "method.targets=[q_proj, v_proj]",
                     "method.r=4", "train.epochs=2", "train.eval_strategy=epoch", "train.batch_size=8",
                     "train.lr=1e-2", "train.head_lr=1e-2", "train.weight_decay=1e-4")
    return run, metrics


def test_image_classification_end_to_end_matches_sklearn(image_run, tiny_vit, image_folder):
    from PIL import Image
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from neat_peft.cli.commands import run_eval, run_predict

    run, metrics = image_run
    processor = AutoImageProcessor.from_pretrained(tiny_vit)
    labels = sorted(COLOURS)  # the image folder's class names, in `datasets`' order
    files = [(image_folder / "validation" / c / f"{i}.png", c) for c in labels for i in range(4)]
    base = AutoModelForImageClassification.from_pretrained(tiny_vit, num_labels=3, ignore_mismatched_sizes=True)
    model = _neat_reload(base, run)
    pixels = processor(images=[Image.open(f) for f, _ in files], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pred = model(pixel_values=pixels).logits.argmax(-1).numpy()
    gold = [labels.index(c) for _, c in files]
    got = metrics["test"]["validation"]
    assert got["examples"] == 12
    assert got["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0), abs=1e-12)
    assert run_eval(str(run), None)["test"]["validation"]["accuracy"] == got["accuracy"]
    out = run_predict(str(run), [str(f) for f, _ in files[:3]], None, False)
    assert [o["label"] for o in out] == [labels[int(p)] for p in pred[:3]]


# --- generative QA (LLM-Adapters' schema, answers extracted from generations) ------------------------------
@pytest.mark.parametrize("extractor, text, expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false, then true", "false"),                 # the first one found
    ("boolq", "The answer is True", ""),                   # LLM-Adapters matches case-sensitively
    ("piqa", "solution2 is right", "solution2"),
    ("arc", "the correct answer is answer4", "answer4"),
    ("hellaswag", "ending3", "ending3"),
    ("winogrande", "option1 fits", "option1"),
    ("letter", "I think (B) because", "B"),
    ("letter", "Because A is wrong", "A"),
    ("yes-no", "Yes, it is.", "yes"),
    ("number", "3 + 4 = 7. The answer is 1,007", "1007"),   # the last number, commas removed
    ("number", "no digits", ""),
])
def test_extractors(extractor, text, expected):
    from neat_peft.cli.generation import extract_answer

    assert extract_answer(text, extractor) == expected


def test_number_answers_compare_within_tolerance():
    from neat_peft.cli.generation import is_correct

    assert is_correct("18.0", "18", "number") and is_correct("1007", "1,007", "number")
    assert not is_correct("18.01", "18", "number") and not is_correct("", "18", "number")
    assert is_correct("true", "true", "boolq") and not is_correct("false", "true", "boolq")


@pytest.fixture(scope="module")
def qa_data(work):
    rng, folder = random.Random(2), work / "qa"
    folder.mkdir()
    train = []
    for _ in range(40):
        answer = rng.choice(["true", "false"])
        train.append({"instruction": f"Please answer: {_sentence(rng)}? Answer format: true/false", "input": "",
                      "output": f"the correct answer is {answer}", "answer": answer})
    (folder / "commonsense_170k.json").write_text(json.dumps(train))
    (folder / "boolq_test.json").write_text(json.dumps(train[:6]))
    math = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"The answer is {a + b}",
             "answer": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    (folder / "gsm8k_test.json").write_text(json.dumps(math))
    return folder


def test_causal_lm_collator_pads_right_and_masks_the_prompt(work):
    from transformers import AutoTokenizer

    from neat_peft.cli.features import IGNORE_INDEX, causal_lm_collator
    from neat_peft.cli.tasks import GenerativeQA

    tok = AutoTokenizer.from_pretrained(make_tiny_llama(work / "llama_collator"))
    tok.padding_side = "left"  # the collator must still pad on the right, and leave the tokenizer as it was
    config = {"data.max_length": 64, "data.prompt_template": "alpaca"}
    data = GenerativeQA(config).examples([{"prompt": "one two", "response": "three"},
                                          {"prompt": "a b c d e f", "response": "g h"}], tok)
    batch = causal_lm_collator(tok)([data[0], data[1]])
    assert tok.padding_side == "left"
    for i, item in enumerate(data.items):
        n = len(item["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == item["input_ids"]
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        response = tok("three" if i == 0 else "g h", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = batch["labels"][i, :n].tolist()
        assert labels == [IGNORE_INDEX] * (n - len(response)) + response  # loss on the response only


def test_generative_qa_end_to_end(qa_data, work):
    from sklearn.metrics import accuracy_score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neat_peft.cli.commands import run_eval, run_predict
    from neat_peft.cli.generation import ALPACA, extract_answer

    llama = make_tiny_llama(work / "llama")
    run = work / "runs" / "qa"
    sets = (f"data.eval_sets=[{{name: boolq, source: {qa_data / 'boolq_test.json'}, extractor: boolq}}, "
            f"{{name: gsm8k, source: {qa_data / 'gsm8k_test.json'}, extractor: number}}]")
    metrics = _train(run, "task=generative-qa", f"model.name={llama}",
                     f"data.source={qa_data / 'commonsense_170k.json'}",
                     "data.prompt_column=instruction", "data.response_column=output", "data.prompt_template=alpaca",
                     sets, "train.max_steps=3", "train.batch_size=8", "train.eval_batch_size=4",
                     "eval.max_new_tokens=6", "method.targets=[q_proj, v_proj]", "method.axis=in")
    assert set(metrics["test"]) == {"boolq", "gsm8k"}
    # Independent generation: one prompt at a time (no padding), greedy, from the reloaded adapter.
    tok = AutoTokenizer.from_pretrained(llama)
    model = _neat_reload(AutoModelForCausalLM.from_pretrained(llama), run)
    for name, file, extractor in (("boolq", "boolq_test.json", "boolq"), ("gsm8k", "gsm8k_test.json", "number")):
        rows = json.loads((qa_data / file).read_text())
        outputs = []
        for r in rows:
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
            prompt = tok(ALPACA.format(prompt=r["instruction"]), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([bos + prompt])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
            outputs.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
        got = metrics["test"][name]
        assert [p["output"] for p in got["predictions"]] == outputs  # batched left-padded == one by one
        preds = [extract_answer(o, extractor) for o in outputs]
        assert [p["pred"] for p in got["predictions"]] == preds
        gold_ok = [(float(p) if extractor == "number" and p else p) == (float(r["answer"]) if extractor == "number"
                                                                       else r["answer"]) for p, r in zip(preds, rows)]
        assert got["accuracy"] == pytest.approx(accuracy_score([True] * len(rows), gold_ok), abs=1e-12)
    # eval --data: another file in the test sets' schema, scored with the first test set's extractor
    again = run_eval(str(run), str(qa_data / "boolq_test.json"))["test"]["test"]
    assert again["extractor"] == "boolq" and again["accuracy"] == metrics["test"]["boolq"]["accuracy"]
    first = json.loads((qa_data / "boolq_test.json").read_text())[0]["instruction"]
    [pred] = run_predict(str(run), [first], None, False)  # default: the run's eval.max_new_tokens
    assert pred["output"] == metrics["test"]["boolq"]["predictions"][0]["output"]
    # --max-new-tokens reaches generation: 2 tokens, as generate() gives them one prompt at a time.
    ids = torch.tensor([([tok.bos_token_id] if tok.bos_token_id is not None else [])
                        + tok(ALPACA.format(prompt=first), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    [short] = run_predict(str(run), [first], 2, False)
    assert short["output"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


# --- bad input -----------------------------------------------------------------------------------------
def _error(capsys, *argv) -> str:
    code, _, err = cli(*argv, capsys=capsys)
    assert code == 2, err
    return " ".join(err.split())


def test_pair_task_with_one_text_column(tiny_bert, capsys, tmp_path):
    data = tmp_path / "single.csv"
    data.write_text("sentence,label\nthe cat sat,1\nthe dog ran,0\n" * 10)
    msg = _error(capsys, "train", "-o", tmp_path / "run", "task=text-pair-classification", f"model.name={tiny_bert}",
                 f"data.source={data}", "data.text_column=sentence", "data.text_pair_column=sentence2",
                 "data.label_column=label")
    assert "'sentence2' (data.text_pair_column)" in msg and "Its columns are: sentence, label" in msg
    assert "data.text_pair_column: null" in msg and not (tmp_path / "run").exists()


def test_regression_with_string_labels(tiny_bert, capsys, tmp_path):
    data = tmp_path / "sts.csv"
    data.write_text("sentence1,sentence2,label\na cat,a dog,similar\n" * 10)
    msg = _error(capsys, "train", "-o", tmp_path / "run", "task=text-regression", f"model.name={tiny_bert}",
                 f"data.source={data}", "data.text_column=sentence1", "data.text_pair_column=sentence2",
                 "data.label_column=label")
    assert "numeric labels" in msg and "column 'label'" in msg and "'similar'" in msg
    assert not (tmp_path / "run").exists()


def test_qa_task_without_answer_field(capsys, tmp_path, work):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"instruction": "q?", "output": "the correct answer is true"}] * 10))
    msg = _error(capsys, "train", "-o", tmp_path / "run", "task=generative-qa",
                 f"model.name={make_tiny_llama(tmp_path / 'llama')}", f"data.source={data}",
                 "data.prompt_column=instruction", "data.response_column=output", "eval.extractor=boolq")
    assert "'answer' (data.answer_column)" in msg and "Its columns are: instruction, output" in msg
    assert not (tmp_path / "run").exists()


def test_qa_task_needs_an_extractor(capsys, tmp_path):
    msg = _error(capsys, "train", "-o", tmp_path / "run", "task=generative-qa")
    assert "eval.extractor" in msg and "boolq" in msg


def test_unknown_dataset_offline_names_network_and_local_schema(tiny_bert, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    msg = _error(capsys, "train", "-o", tmp_path / "run", "task=text-pair-classification", f"model.name={tiny_bert}",
                 "data.source=nobody-here/no-such-glue-3f9a", "data.text_column=sentence1",
                 "data.text_pair_column=sentence2", "data.label_column=label")
    assert "needs the network" in msg and "offline" in msg
    assert "folder of split files (train.jsonl, validation.jsonl, ...)" in msg
    assert "'sentence1', 'sentence2', 'label'" in msg and not (tmp_path / "run").exists()


def test_image_splits_with_a_separate_test_source(image_folder, tmp_path):
    """The vision protocol: validation held out of the training split (seeded, per class), test from a second
    data set (the authors' CIFAR/Cars/FGVC test repositories)."""
    import shutil

    from neat_peft.cli import recipe, tasks

    test_only = tmp_path / "test_set"
    shutil.copytree(image_folder / "validation", test_only / "test")
    config = recipe.resolve(None, ["task=image-classification", f"data.source={image_folder}",
                                   "data.label_column=label",
                                   f"data.test_source={test_only}", "data.test_split=test",
                                   "data.validation_fraction=0.25"])
    splits = tasks.for_config(config).build_splits()
    assert splits.labels == sorted(COLOURS)
    assert {(r["source"], r["split"]) for r in splits.rows["test"]} == {(str(test_only), "test")}
    assert len(splits.rows["test"]) == 12
    assert [sum(r["label"] == c for r in splits.rows["validation"]) for c in sorted(COLOURS)] == [2, 2, 2]
    train = {(r["split"], r["index"]) for r in splits.rows["train"]}
    assert len(train) == 18 and not train & {(r["split"], r["index"]) for r in splits.rows["validation"]}


def test_merge_pair_and_image_runs_load_with_plain_transformers(pair_run, tiny_bert, pair_data, image_run, tiny_vit,
                                                                 image_folder, tmp_path):
    """`neat-peft merge` writes a plain transformers model (and its tokenizer / image processor) whose logits
    are the adapter's, computed independently from the reloaded adapter."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, AutoModelForSequenceClassification

    from neat_peft.cli.commands import run_merge

    run, _ = pair_run
    run_merge(str(run), str(tmp_path / "pair"))
    rows = _read_jsonl(pair_data / "validation_matched.jsonl")[:4]
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pair").eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "pair")
    batch = tok([r["premise"] for r in rows], [r["hypothesis"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(merged(**batch).logits.numpy(), _pair_logits(run, tiny_bert, rows), atol=1e-5)

    image_run, _ = image_run
    run_merge(str(image_run), str(tmp_path / "vit"))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vit")
    pixels = processor(images=[Image.open(image_folder / "validation" / "red" / "0.png")], return_tensors="pt")
    base = AutoModelForImageClassification.from_pretrained(tiny_vit, num_labels=3, ignore_mismatched_sizes=True)
    with torch.no_grad():
        expected = _neat_reload(base, image_run)(**pixels).logits
        got = AutoModelForImageClassification.from_pretrained(tmp_path / "vit").eval()(**pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_killed_and_resumed_pair_run_matches_uninterrupted(tiny_bert, pair_data, tmp_path):
    """SIGKILL right after the epoch-1 checkpoint, then --resume: the per-epoch validations (both splits), the
    best epoch and the final test metrics equal an uninterrupted run's (dropout 0, same seed)."""
    from cli_helpers import cli_killed_after_checkpoint

    bert = make_tiny_bert(tmp_path / "bert0", dropout=0.0)
    args = ["task=text-pair-classification", f"model.name={bert}", f"data.source={pair_data}",
            "data.text_column=premise", "data.text_pair_column=hypothesis", "data.label_column=label",
            "data.eval_splits=[validation_matched, validation_mismatched]", "train.epochs=2",
            "train.eval_strategy=epoch", "train.batch_size=16", "method.dropout=0", "data.max_length=32"]
    killed = cli_killed_after_checkpoint(4, "train", "-o", tmp_path / "resumed", *args)
    assert killed.returncode == -9 and not (tmp_path / "resumed" / "metrics.json").exists()
    assert cli("train", "-o", tmp_path / "resumed", "--resume") == (0, "", "")
    assert cli("train", "-o", tmp_path / "full", *args) == (0, "", "")
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("resumed", "full"))
    assert a["resumed_from"] == "checkpoint-4"
    assert [p["epoch"] for p in a["validation_curve"]] == [1.0, 2.0]
    histories = [json.loads((tmp_path / r / "log_history.json").read_text())["log_history"]
                 for r in ("resumed", "full")]
    for split in ("validation_matched", "validation_mismatched"):
        losses = [[h[f"eval_{split}_loss"] for h in history if f"eval_{split}_loss" in h] for history in histories]
        assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-6)
        assert a["test"][split]["accuracy"] == pytest.approx(b["test"][split]["accuracy"], abs=1e-12)
    assert a["best_validation"]["step"] == b["best_validation"]["step"]


def test_unknown_dataset_offline_default_task_names_its_schema(capsys, tmp_path):
    msg = _error(capsys, "train", "-o", tmp_path / "run", "data.source=nobody-here/no-such-tweets-3f9a")
    assert "needs the network" in msg and "columns 'text', 'sentiment'" in msg and not (tmp_path / "run").exists()


def test_generation_under_bf16_autocast(work):
    """train.precision=bf16 generates under autocast (CPU supports bf16): outputs come back as text, the
    weights stay fp32 and the model's mode is restored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neat_peft.cli import recipe
    from neat_peft.cli.tasks import GenerativeQA

    llama = make_tiny_llama(work / "llama_bf16")
    model, tok = AutoModelForCausalLM.from_pretrained(llama).train(), AutoTokenizer.from_pretrained(llama)
    config = recipe.resolve(None, ["task=generative-qa", "eval.extractor=number", "train.precision=bf16",
                                   "eval.max_new_tokens=3", "train.eval_batch_size=2"])
    outputs = GenerativeQA(config).generate(model, tok, ["one two", "three four five", "six"])
    assert len(outputs) == 3 and all(isinstance(o, str) for o in outputs)
    assert model.training and next(model.parameters()).dtype == torch.float32
