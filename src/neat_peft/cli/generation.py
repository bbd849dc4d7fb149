"""Prompts as the model sees them, greedy (or beam) decoding, and reading an answer out of generated text.

Used by generative-qa (training items, test scoring, predict) and by causal-lm (predict, and with
eval.generate_answers the scoring of label answers). The answer extractors follow LLM-Adapters: the first of a
dataset's choice words found in the generated text, or for "number" the last number (commas removed), compared
numerically within 1e-3; "first-word" reads the first word (lowercased, surrounding punctuation removed), for
responses that are class labels.
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Any

import numpy as np
import torch

from . import features, metrics

TEMPLATES = ("chat", "alpaca", "plain")
# LLM-Adapters' instruction template (commonsense and math), without its optional "### Input:" block.
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")

_CHOICES = {
    "boolq": ("true", "false"), "piqa": ("solution1", "solution2"),
    "siqa": tuple(f"answer{i}" for i in range(1, 6)), "arc": tuple(f"answer{i}" for i in range(1, 6)),
    "obqa": tuple(f"answer{i}" for i in range(1, 6)), "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"), "true-false": ("true", "false"), "yes-no": ("yes", "no"),
    "letter": tuple("ABCDE"),
}
EXTRACTORS = (*_CHOICES, "number", "first-word")
_CASE_FOLDED = ("yes-no", "true-false")  # LLM-Adapters' lists match case-sensitively; these two do not


def encode_prompt(tokenizer, prompt: str, template: str) -> list[int]:
    """Token ids of the prompt as the model sees it, in training and in generation alike."""
    if template == "chat":
        return features.prompt_ids(tokenizer, prompt)
    text = ALPACA.format(prompt=prompt) if template == "alpaca" else prompt + "\n" if template == "plain" else \
        template.replace("{prompt}", prompt)
    return features.bos_ids(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
             num_beams: int = 1, precision: str = "fp32") -> list[str]:
    """Decoded continuations of already-encoded prompts (greedy, or beam search with num_beams), batched with left
    padding, under the run's mixed precision (the weights stay fp32). The model's training mode is restored
    however generation ends."""
    left = copy.copy(tokenizer)
    left.padding_side = "left"
    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            for start in range(0, len(prompt_ids), batch_size):
                batch = left.pad({"input_ids": prompt_ids[start:start + batch_size]}, padding=True,
                                 return_tensors="pt")
                batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                out = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                width = batch["input_ids"].shape[1]
                outputs += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    finally:
        model.train(was_training)
    return outputs


def extract_answer(text: str, extractor: str) -> str:
    """The answer read from generated text ('' when none is found)."""
    if extractor == "number":
        numbers = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
        return numbers[-1] if numbers else ""
    if extractor == "first-word":
        words = text.strip().split()
        return words[0].strip(".,;:!?\"'()*").lower() if words else ""
    choices = _CHOICES[extractor]
    flags = re.IGNORECASE if extractor in _CASE_FOLDED else 0
    pattern = r"\b(" + "|".join(map(re.escape, choices)) + r")\b" if extractor == "letter" else \
        "|".join(map(re.escape, choices))
    found = re.search(pattern, text.strip(), flags)
    return found.group(0).lower() if found and extractor in _CASE_FOLDED else (found.group(0) if found else "")


def is_correct(pred: str, gold: str, extractor: str) -> bool:
    if extractor == "number":
        try:
            return abs(float(pred) - float(gold.replace(",", ""))) <= 1e-3
        except ValueError:
            return False
    if extractor in (*_CASE_FOLDED, "first-word"):
        return pred == gold.strip().lower()
    return pred == gold.strip()


def score(outputs: list[str], answers: list[str], extractor: str) -> dict[str, Any]:
    """Accuracy of the answers extracted from `outputs` against the gold `answers`, with every prediction."""
    preds = [extract_answer(o, extractor) for o in outputs]
    correct = [is_correct(p, a, extractor) for p, a in zip(preds, answers)]
    return {"accuracy": float(np.mean(correct)), "examples": len(answers), "extractor": extractor,
            "unanswered": sum(not p for p in preds),
            "predictions": [{"output": o, "pred": p, "answer": a, "correct": c}
                            for o, p, a, c in zip(outputs, preds, answers, correct)]}


def score_labels(outputs: list[str], responses: list[str], majority: str) -> dict[str, Any]:
    """Generated answers to prompts whose responses are class labels, read by "first-word": `score`'s accuracy
    and predictions, macro-F1 over the labels L = the distinct responses of these rows (lowercased),

        macro_f1 = (1/|L|) Σ_{l in L} 2 TP_l / (2 TP_l + FP_l + FN_l),

    where an answer that is no label is a false negative of its reference and a false positive of none, the
    histogram of the answers (most frequent first), and the majority class `majority` (the training split's most
    frequent response) scored the same way."""
    from collections import Counter

    scored = score(outputs, responses, "first-word")
    answers = [p["pred"] for p in scored["predictions"]]
    truth = [r.strip().lower() for r in responses]
    labels = sorted(set(truth))
    ids = {label: i for i, label in enumerate(labels)}

    def f1(pred: list[str]) -> float:  # an answer outside L gets id |L|, which is no class of macro_f1's
        return metrics.macro_f1([ids.get(a, len(labels)) for a in pred], [ids[t] for t in truth], len(labels))

    baseline = [majority] * len(truth)
    return {**scored, "macro_f1": f1(answers), "answer_histogram": dict(Counter(answers).most_common()),
            "majority_baseline": {"label": majority, "accuracy": metrics.accuracy(baseline, truth),
                                  "macro_f1": f1(baseline)}}
