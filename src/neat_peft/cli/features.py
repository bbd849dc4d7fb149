"""Turning split rows into model inputs: tokenized text, prompt/response pairs (loss on the response only),
and images scaled as EfficientNet-Lite expects ((x - 0.5) / 0.5, three channels)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value the cross-entropy loss skips


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def classification_dataset(rows, tokenizer, labels: list[str], max_length: int) -> ListDataset:
    index = {name: i for i, name in enumerate(labels)}
    encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
    items = []
    for i, r in enumerate(rows):
        item = {k: v[i] for k, v in encoded.items()}
        if "label" in r:
            item["labels"] = index[r["label"]]
        items.append(item)
    return ListDataset(items)


def prompt_text(tokenizer, prompt: str) -> str:
    """The prompt as the model saw it in training: its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n"


def causal_lm_dataset(rows, tokenizer, max_length: int, encode_prompt=None) -> ListDataset:
    """input_ids = prompt + response + eos; labels = IGNORE_INDEX on the prompt, so only the response is learnt.
    Too-long examples lose the start of the prompt, never the response. encode_prompt(prompt) -> token ids
    (default: the prompt as prompt_text shows it to the model)."""
    if encode_prompt is None:
        def encode_prompt(prompt):
            return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    items = []
    for r in rows:
        prompt_ids = encode_prompt(r["prompt"])
        response_ids = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        response_ids = response_ids[:max_length]
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(response_ids) - max_length):]
        ids = prompt_ids + response_ids
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                      "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids})
    return ListDataset(items)


def causal_lm_collator(tokenizer):
    """transformers' DataCollatorForSeq2Seq, right-padding input_ids with the pad token and labels with
    IGNORE_INDEX (a copy of the tokenizer, so generation can keep its own padding side)."""
    from transformers import DataCollatorForSeq2Seq

    right = copy.copy(tokenizer)
    right.padding_side = "right"
    return DataCollatorForSeq2Seq(right, padding="longest", label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def image_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 H x W (grey) -> 3 x size x size float, scaled to [-1, 1] as (x - 0.5) / 0.5."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)[None, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0]
    return ((x - 0.5) / 0.5).expand(3, size, size).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: list[int], size: int):
        self.images, self.labels, self.indices, self.size = images, labels, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.indices[i]
        return {"pixel_values": image_tensor(self.images[j], self.size), "labels": int(self.labels[j])}


def image_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "labels": torch.tensor([it["labels"] for it in items], dtype=torch.long)}
