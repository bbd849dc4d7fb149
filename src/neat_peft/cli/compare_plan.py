"""The plan of `neat-peft compare`: each method's tuning grid, the edge-extension rule, the chosen cell, and the
runs these imply (also the quality study's rule for its tuning, benchmarks/quality).

For each method:

1. tuning at seed 0 over its grid of cells (learning rate; NEAT also its scale s = method.scaling), chosen on the
   final validation value of the task's primary metric. While the best finished cell sits at the edge of a tuned
   axis (an axis with at least two values), the neighbour beyond that edge on the half-decade ladder
   (..., 0.1, 0.3, 1, 3, ...) is added at the best cell's other coordinates, at most `edge_steps` values past each
   edge of each axis: a fixed grid cannot tell a best value at its edge from one beyond it;
2. the chosen cell at seeds 1..n-1 (seed 0 is its tuning run). The CLI seeds the split with train.seed, so at one
   seed every method trains and is scored on the same examples: the seeds are paired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from .errors import CliError

AXES = ("lr", "scaling")  # the tuned axes: the learning rate (head-only: the head's) and NEAT's s
GRID_LR = (3e-4, 1e-3, 3e-3, 1e-2)
# Full fine-tuning moves every weight: the usual range for fine-tuning a BERT-size model, a decade and a half lower.
GRID_FULL_LR = (3e-5, 1e-4, 3e-4, 1e-3)
GRID_SCALE = (0.1, 1.0)
EDGE_STEPS = 2
QUICK_LR, QUICK_EDGE_STEPS = (1e-3, 3e-3), 1


def next_value(value: float, up: bool) -> float:
    """The neighbour of `value` on the half-decade ladder (..., 3e-3, 1e-2, 3e-2, 1e-1, ...)."""
    k = round(2 * math.log10(value)) + (1 if up else -1)
    return float(f"{(1 if k % 2 == 0 else 3) * 10.0 ** (k // 2):.0e}")


@dataclass(frozen=True)
class Job:
    """One `neat-peft train` run of the plan."""
    method: str
    lr: float
    scaling: Optional[float]
    seed: int
    phase: str  # tune, seed, check
    factor: int = 1  # the budget check: trained `factor` times longer

    @property
    def cell(self) -> tuple[float, Optional[float]]:
        return self.lr, self.scaling

    @property
    def key(self) -> str:
        s = "" if self.scaling is None else f"_s{self.scaling:g}"
        longer = "" if self.factor == 1 else f"_x{self.factor}"
        return f"{self.method}_lr{self.lr:g}{s}_seed{self.seed}{longer}"

    def overrides(self) -> list[str]:
        rate = "train.head_lr" if self.method == "head-only" else "train.lr"
        scale = [] if self.scaling is None else [f"method.scaling={self.scaling}"]
        return [f"method.name={self.method}", f"{rate}={self.lr}", *scale, f"train.seed={self.seed}"]


def default_axes(method: str, quick: bool) -> dict[str, list[float]]:
    """The built-in grid of `method`: 'quick' (two rates, s = 1) or 'default'."""
    if quick:
        lrs = [lr / 10 for lr in QUICK_LR] if method == "full" else list(QUICK_LR)
        return {"lr": lrs, **({"scaling": [1.0]} if method == "neat" else {})}
    lrs = GRID_FULL_LR if method == "full" else GRID_LR
    return {"lr": list(lrs), **({"scaling": list(GRID_SCALE)} if method == "neat" else {})}


def _values(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value):
        raise CliError(f"{where} must be a non-empty list of positive numbers, got {value!r}. Example: "
                       "lr: [1.0e-3, 3.0e-3].")
    return sorted({float(v) for v in value})


def load_grid(spec: str, methods: list[str]) -> tuple[dict[str, dict[str, list[float]]], int]:
    """--grid quick | default | FILE -> ({method: {axis: values}}, edge_steps). A FILE (YAML or JSON) holds
    `edge_steps: N` (optional) and, per method (or `default:` for every method not named), `lr: [...]` and, for
    NEAT, `scaling: [...]`; a method it does not name gets the built-in default grid."""
    if spec in ("quick", "default"):
        return {m: default_axes(m, spec == "quick") for m in methods}, (
            QUICK_EDGE_STEPS if spec == "quick" else EDGE_STEPS)
    import yaml

    try:
        with open(spec, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise CliError(f"--grid: cannot read '{spec}' ({e.strerror or e}). Give quick, default or a YAML file "
                       "with e.g. `neat: {lr: [1.0e-3, 3.0e-3], scaling: [0.1, 1.0]}`.") from None
    except yaml.YAMLError as e:
        raise CliError(f"--grid: '{spec}' is not valid YAML ({str(e).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise CliError(f"--grid: '{spec}' must hold a mapping (method: {{lr: [...]}}), got {type(data).__name__}.")
    edge = data.get("edge_steps", EDGE_STEPS)
    if not isinstance(edge, int) or isinstance(edge, bool) or edge < 0:
        raise CliError(f"--grid: edge_steps in '{spec}' must be a whole number >= 0, got {edge!r}.")
    unknown = [k for k in data if k not in ("edge_steps", "default", *methods)]
    if unknown:
        raise CliError(f"--grid: '{spec}' names {', '.join(map(repr, unknown))}, which is not a method being "
                       f"compared ({', '.join(methods)}), 'default' or 'edge_steps'.")
    grids = {}
    for method in methods:
        entry = data.get(method, data.get("default"))
        if entry is None:
            grids[method] = default_axes(method, False)
            continue
        name = method if method in data else "default"
        if not isinstance(entry, dict) or "lr" not in entry or set(entry) - set(AXES):
            raise CliError(f"--grid: {name} in '{spec}' must be a mapping with `lr: [...]` (and for neat "
                           f"`scaling: [...]`), got {entry!r}.")
        axes = {"lr": _values(entry["lr"], f"--grid: {name}.lr in '{spec}'")}
        if "scaling" in entry:
            if method != "neat":
                raise CliError(f"--grid: {name}.scaling in '{spec}' applies to neat only ({method} has no scale s).")
            axes["scaling"] = _values(entry["scaling"], f"--grid: {name}.scaling in '{spec}'")
        elif method == "neat":
            axes["scaling"] = [None]
        grids[method] = axes
    return grids, edge


@dataclass
class Plan:
    """The methods (the first is compared with each other one), their grids, the seeds and the metric."""
    methods: list[str]
    grids: dict[str, dict[str, list]]
    seeds: int
    edge_steps: int
    lower_is_better: bool = False
    extend: tuple[str, ...] = AXES  # the axes the edge rule extends (the quality study: lr only)
    budget_factor: Optional[int] = None
    key_prefix: str = ""  # records are keyed prefix + Job.key (the quality study: "task/")
    score_key: Optional[str] = None  # the validation value is record["validation"][score_key] (the study: accuracy)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "Plan":
        """The plan recorded in a compare.json."""
        return cls(data["methods"], data["grids"], data["seeds"], data["edge_steps"], data["lower_is_better"],
                   budget_factor=data.get("budget_check"))

    def base_cells(self, method: str) -> list[tuple[float, Optional[float]]]:
        axes = self.grids[method]
        return [(lr, s) for lr in axes["lr"] for s in axes.get("scaling", [None])]

    def score(self, record: Optional[dict]) -> Optional[float]:
        """A finished run's tuning score (higher wins): its final validation value; -inf when it diverged."""
        if record is None:
            return None
        value = record.get("validation")
        if self.score_key is not None and value is not None:
            value = value.get(self.score_key)
        if record["status"] != "ok" or value is None:
            return -math.inf
        return -value if self.lower_is_better else value

    def best(self, records: dict[str, dict], method: str, cells: list, partial: bool = False):
        """The best of `cells` at seed 0 (the first on ties; a diverged run never wins over a finished one). None
        while a cell has no result, unless `partial` (then the best of those finished, if any)."""
        best, best_score = None, -math.inf
        for lr, s in cells:
            score = self.score(records.get(self.key_prefix + Job(method, lr, s, 0, "tune").key))
            if score is None:
                if partial:
                    continue
                return None
            if best is None or score > best_score:
                best, best_score = (lr, s), score
        return best

    def grid(self, records: dict[str, dict], method: str) -> list[tuple[float, Optional[float]]]:
        """The cells `method` is tuned over: its grid, extended by the edge rule (module docstring)."""
        cells = self.base_cells(method)
        added = {(axis, up): 0 for axis in AXES for up in (True, False)}
        while True:
            best = self.best(records, method, cells)
            if best is None:
                return cells
            grew = False
            for i, axis in enumerate(AXES):
                values = sorted({c[i] for c in cells if c[i] is not None})
                if axis not in self.extend or len(values) < 2 or best[i] not in (values[0], values[-1]):
                    continue
                up = best[i] == values[-1]
                if added[axis, up] == self.edge_steps:
                    continue
                added[axis, up] += 1
                new = list(best)
                new[i] = next_value(best[i], up)
                cells.append(tuple(new))
                grew = True
                break  # one step at a time: the new cell's result decides the next
            if not grew:
                return cells

    def choose(self, records: dict[str, dict], method: str) -> Optional[tuple[float, Optional[float]]]:
        """The tuned cell: the best over the whole extended grid. None until every cell has a result."""
        return self.best(records, method, self.grid(records, method))

    def jobs(self, records: dict[str, dict], full: bool = False) -> list[Job]:
        """Every run that can be defined now, in run order: tuning (by learning rate, then method, so the methods'
        cells of one rate finish side by side), then the seeds, then the budget checks. full=True: every run of
        the whole plan, a cell not yet chosen standing in by the best finished so far (for the estimate)."""
        def cell_of(method):
            cell = self.choose(records, method)
            if cell is None and full:
                cell = self.best(records, method, self.grid(records, method), partial=True)
                return cell or self.base_cells(method)[0]
            return cell

        grids = {m: self.grid(records, m) for m in self.methods}
        tune = sorted(((sorted({c[0] for c in grids[m]}).index(lr), i, j, Job(m, lr, s, 0, "tune"))
                       for i, m in enumerate(self.methods) for j, (lr, s) in enumerate(grids[m])),
                      key=lambda t: t[:3])
        out = [job for *_, job in tune]
        cells = {m: cell_of(m) for m in self.methods}
        for seed in range(1, self.seeds):
            out += [Job(m, *cells[m], seed, "seed") for m in self.methods if cells[m] is not None]
        if self.budget_factor:
            out += [Job(m, *cells[m], 0, "check", self.budget_factor) for m in self.methods if cells[m] is not None]
        return out

    def seed_runs(self, records: dict[str, dict], method: str) -> dict[int, dict]:
        """seed -> the finished run of `method` at its chosen cell."""
        cell = self.choose(records, method)
        if cell is None:
            return {}
        out = {}
        for seed in range(self.seeds):
            rec = records.get(Job(method, *cell, seed, "tune" if seed == 0 else "seed").key)
            if rec is not None and rec["status"] == "ok":
                out[seed] = rec
        return out
