"""Turning split rows into model inputs: tokenized text, prompt/response pairs (loss on the response only),
and images scaled as EfficientNet-Lite expects ((x - 0.5) / 0.5, three channels)."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .models import from_pretrained, resolve_source

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


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as the model sees them in training and generation: its chat template when it has
    one, else the tokenizer's BOS token (when it has one: base models such as Gemma are trained with it, and their
    loss is far higher without it), the prompt and a newline."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return bos_ids(tokenizer) + tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]


def bos_ids(tokenizer) -> list[int]:
    """[the tokenizer's BOS token id], or [] for a tokenizer without one."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def causal_lm_dataset(rows, tokenizer, max_length: int, encode_prompt=None) -> ListDataset:
    """input_ids = prompt + response + eos; labels = IGNORE_INDEX on the prompt, so only the response is learnt.
    Too-long examples lose the start of the prompt, never the response, nor a leading BOS token when the
    tokenizer has no chat template. encode_prompt(prompt) -> token ids (default: prompt_ids)."""
    if encode_prompt is None:
        def encode_prompt(prompt):
            return prompt_ids(tokenizer, prompt)
    bos = [] if getattr(tokenizer, "chat_template", None) else bos_ids(tokenizer)
    items = []
    for r in rows:
        prompt = encode_prompt(r["prompt"])
        response_ids = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        response_ids = response_ids[:max_length]
        kept = bos if bos and prompt[:1] == bos and len(response_ids) < max_length else []
        prompt = kept + prompt[len(kept):][max(0, len(prompt) + len(response_ids) - max_length):]
        ids = prompt + response_ids
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                      "labels": [IGNORE_INDEX] * len(prompt) + response_ids})
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


# --- the datasets-sourced tasks: text (pairs), regression scores, `datasets` image sets ---------------------
def text_dataset(rows, tokenizer, max_length: int, labels: list[str], regression: bool = False) -> ListDataset:
    """Tokenized text (and text_pair) rows; labels: class ids, or the float score when regression."""
    firsts = [r["text"] for r in rows]
    seconds = [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None
    encoded = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
    index = {name: i for i, name in enumerate(labels)}
    items = []
    for i, r in enumerate(rows):
        item = {k: v[i] for k, v in encoded.items()}
        if "label" in r:
            item["labels"] = float(r["label"]) if regression else index[str(r["label"])]
        items.append(item)
    return ListDataset(items)


def image_transforms(processor) -> tuple[Callable, Callable]:
    """(train, eval) transforms PIL image -> 3 x H x W float tensor normalised by the processor's mean/std.

    Train: a random crop of area fraction U(0.08, 1) and aspect ratio log-U(3/4, 4/3) resized to H x W, then
    a horizontal flip with probability 1/2 (RandomResizedCrop + RandomHorizontalFlip). Eval: the shorter side
    resized (to size.shortest_edge, or to cover size.height x size.width), then a centre crop (the authors'
    Resize + CenterCrop; for square images the same as the ViT processor's own resize)."""
    size = dict(processor.size)
    crop = dict(getattr(processor, "crop_size", None) or {}) if getattr(processor, "do_center_crop", False) else {}
    if "height" in size:
        out_hw = (crop.get("height", size["height"]), crop.get("width", size["width"]))
    else:
        out_hw = (crop.get("height", size["shortest_edge"]), crop.get("width", size["shortest_edge"]))
    mean = torch.tensor(processor.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(processor.image_std, dtype=torch.float32)[:, None, None]

    def to_tensor(image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - mean) / std

    def eval_transform(image):
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        # shorter side to shortest_edge, or just enough to cover height x width (the aspect ratio is kept)
        scale = size["shortest_edge"] / min(w, h) if "shortest_edge" in size else max(out_hw[0] / h, out_hw[1] / w)
        image = image.resize((max(out_hw[1], round(w * scale)), max(out_hw[0], round(h * scale))), Image.BILINEAR)
        w, h = image.size
        th, tw = out_hw
        left, top = max(0, (w - tw) // 2), max(0, (h - th) // 2)
        image = image.crop((left, top, left + tw, top + th))
        return to_tensor(image)

    def train_transform(image, rng: np.random.Generator):
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        box = (0, 0, w, h)
        for _ in range(10):
            area = w * h * rng.uniform(0.08, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                box = (left, top, left + cw, top + ch)
                break
        image = image.resize((out_hw[1], out_hw[0]), Image.BILINEAR, box=box)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(image)

    return train_transform, eval_transform


class ImageSetDataset(torch.utils.data.Dataset):
    """Rows {split, index, label} of `datasets` image splits, decoded and transformed when read."""

    def __init__(self, sources: dict[str, Any], rows, column: str, labels: list[str], transform,
                 rng: Optional[np.random.Generator] = None):
        self.sources, self.rows, self.column, self.rng = sources, rows, column, rng
        self.index, self.transform = {name: i for i, name in enumerate(labels)}, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows[i]
        image = self.sources[(r["source"], r["split"])][r["index"]][self.column]
        x = self.transform(image, self.rng) if self.rng is not None else self.transform(image)
        return {"pixel_values": x, "labels": self.index[r["label"]]}


def load_processor(config: dict[str, Any]):
    from transformers import AutoImageProcessor

    source, _ = resolve_source(config)
    return from_pretrained(AutoImageProcessor, source, config["model.name"])

