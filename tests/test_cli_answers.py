"""eval.generate_answers: a causal-lm run whose responses are class labels scores greedy answers on validation and
test. Checked against answers decoded by hand (one prompt at a time, model.generate) and counted by hand."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from cli_helpers import TINY_RUN, cli, make_tiny_llama, needs_minilm


def hand_macro_f1(answers: list[str], truth: list[str]) -> float:
    """Mean over the reference labels of 2 TP / (2 TP + FP + FN), counted one pair at a time."""
    scores = []
    for label in sorted(set(truth)):
        tp = fp = fn = 0
        for a, t in zip(answers, truth):
            tp += a == label and t == label
            fp += a == label and t != label
            fn += a != label and t == label
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def test_score_labels_counts_by_hand():
    from neat_peft.cli.generation import score_labels

    outputs = ["Positive.", "negative", "  neutral yes", "", "maybe positive", "positive!", "(negative)"]
    truth = ["positive", "positive", "neutral", "negative", "positive", "negative", "negative"]
    result = score_labels(outputs, truth, "positive")
    answers = ["positive", "negative", "neutral", "", "maybe", "positive", "negative"]
    assert [p["pred"] for p in result["predictions"]] == answers
    assert result["accuracy"] == pytest.approx(3 / 7)
    # positive: tp 1, fp 1, fn 2 -> 2/5; neutral: tp 1 -> 1; negative: tp 1, fp 1, fn 2 -> 2/5
    assert result["macro_f1"] == pytest.approx((0.4 + 1 + 0.4) / 3) == pytest.approx(hand_macro_f1(answers, truth))
    assert result["answer_histogram"] == {"positive": 2, "negative": 2, "neutral": 1, "": 1, "maybe": 1}
    assert list(result["answer_histogram"])[:2] == ["positive", "negative"]  # most frequent first
    assert result["majority_baseline"] == {"label": "positive", "accuracy": pytest.approx(3 / 7),
                                           "macro_f1": pytest.approx(hand_macro_f1(["positive"] * 7, truth))}


def test_first_word_extractor():
    from neat_peft.cli.generation import extract_answer, is_correct

    assert [extract_answer(t, "first-word") for t in (" Positive.", "neutral\nBecause", "**negative**", "", "The x")] \
        == ["positive", "neutral", "negative", "", "the"]
    assert is_correct("positive", " Positive", "first-word") and not is_correct("positive", "negative", "first-word")


def test_generate_answers_only_for_causal_lm():
    from neat_peft.cli import recipe
    from neat_peft.cli.errors import CliError

    assert recipe.resolve(None, ["task=causal-lm", "eval.generate_answers=true"])["eval.generate_answers"] is True
    with pytest.raises(CliError, match="eval.generate_answers.*causal-lm"):
        recipe.resolve(None, ["eval.generate_answers=true"])  # text-classification


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'()*").lower() if words else ""


def decode_by_hand(model, tokenizer, prompt: str) -> str:
    """One prompt alone (no padding), as the CLI shows it to a model without a chat template: prompt + newline."""
    ids = tokenizer(prompt + "\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def label_table(model_dir, path):
    """Prompts whose responses are, for two rows in three, what the untrained model answers (so a barely trained
    model gets a fair share right and the scores are not all zero) and otherwise one of two fixed labels."""
    import csv
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    words = "sun rain happy sad train late coffee music storm friend lost found great awful calm".split()
    rng = random.Random(0)
    rows = []
    for i in range(150):
        prompt = f"Classify the mood: {' '.join(rng.choices(words, k=6))} {i}"
        answer = first_word(decode_by_hand(model, tokenizer, prompt))
        rows.append({"prompt": prompt, "response": answer if answer and i % 3 else ("calm", "storm")[i % 2]})
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "response"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@needs_minilm
def test_causal_lm_scores_greedy_label_answers(tmp_path, capsys):
    from neat_peft.cli import commands, models

    model_dir = make_tiny_llama(tmp_path / "tiny_llama")
    table = label_table(model_dir, tmp_path / "labels.csv")
    common = ["task=causal-lm", f"model.name={model_dir}", f"data.source={table}", "data.max_length=96",
              "method.name=lora", "train.lr=1e-5", *TINY_RUN, "eval.max_new_tokens=3", "train.eval_batch_size=8"]
    run, plain = tmp_path / "answers", tmp_path / "plain"
    code, out, _ = cli("train", "-o", run, *common, "eval.generate_answers=true", capsys=capsys)
    assert code == 0 and "test answer accuracy" in out and "majority class" in out
    assert cli("train", "-o", plain, *common, capsys=capsys)[0] == 0
    metrics = json.loads((run / "metrics.json").read_text())
    without = json.loads((plain / "metrics.json").read_text())
    # Training is unchanged by the flag: the same losses and curve.
    assert metrics["test"]["loss"] == without["test"]["loss"]
    assert metrics["validation_curve"] == without["validation_curve"]
    assert "accuracy" not in without["test"] and "validation" not in without

    path, config, splits = commands.open_run(str(run))
    tokenizer = models.load_tokenizer(config)
    model = models.load_trained(path, config, splits.labels)
    for part, scored in (("validation", metrics["validation"]), ("test", metrics["test"])):
        rows = splits.rows[part]
        answers = [first_word(decode_by_hand(model, tokenizer, r["prompt"])) for r in rows]
        truth = [r["response"].lower() for r in rows]
        assert [p["pred"] for p in scored["predictions"]] == answers
        assert scored["examples"] == len(truth)
        assert scored["accuracy"] == pytest.approx(sum(a == t for a, t in zip(answers, truth)) / len(truth))
        assert scored["macro_f1"] == pytest.approx(hand_macro_f1(answers, truth))
        assert scored["answer_histogram"] == dict(Counter(answers))
    # the scores are not trivially zero: the barely trained model answers as the untrained one did
    assert 0 < metrics["test"]["accuracy"] < 1 and 0 < metrics["test"]["macro_f1"] < 1
    majority = Counter(r["response"].lower() for r in splits.rows["train"]).most_common(1)[0][0]
    test_truth = [r["response"].lower() for r in splits.rows["test"]]
    assert metrics["majority_baseline"]["label"] == majority
    assert metrics["majority_baseline"]["accuracy"] == pytest.approx(
        sum(t == majority for t in test_truth) / len(test_truth))
    # compare's record of the run carries the answers (without the per-example predictions)
    from neat_peft.cli.compare import Runner

    record = Runner(None, [], config, "loss", None).result({"record": {"exit_code": 0}, "run_dir": run})
    assert record["answers"]["test"] == {k: metrics["test"][k] for k in ("accuracy", "macro_f1", "examples",
                                                                           "answer_histogram")}
    assert record["answers"]["majority_baseline"] == metrics["majority_baseline"]
    assert record["test_value"] == metrics["test"]["loss"] and "predictions" not in record["test"]
