"""The plan of `neat-peft compare`: each method's tuning grid, the edge-extension rule, the chosen cell, and the
runs these imply (the quality study, benchmarks/quality, is one compare per task).

For each method:

1. tuning at seed 0 over its grid of cells (learning rate; NEAT also its scale s = method.scaling), chosen on the
   final validation value of the task's primary metric. While the best finished cell sits at the edge of a tuned
   axis (an axis with at least two values), the neighbour beyond that edge on the half-decade ladder
   (..., 0.1, 0.3, 1, 3, ...) is added at the best cell's other coordinates, at most `edge_steps` values past each
   edge of each axis: a fixed grid cannot tell a best value at its edge from one beyond it;
2. the chosen cell at seeds 1..n-1 (seed 0 is its tuning run). The CLI seeds the split with train.seed, so at one
   seed every method trains and is scored on the same examples: the seeds are paired.

A compared "method" is a base method (neat, lora, full, head-only, targets-only) or a named variant of one from the
grid file (`methods: {neat-r1: {method: neat, overrides: [method.r=1], lr: [...]}}`), which may also set its own
number of seeds and take its cell from another variant instead of tuning (`cell_of`: the r sweep of the quality
study).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from . import compare_stats as stats
from .errors import CliError
from .recipe import METHODS, parse_override

AXES = ("lr", "scaling")  # the tuned axes: the learning rate (head-only: the head's) and NEAT's s
GRID_LR = (3e-4, 1e-3, 3e-3, 1e-2)
# Full fine-tuning moves every weight: the usual range for fine-tuning a BERT-size model, a decade and a half lower.
GRID_FULL_LR = (3e-5, 1e-4, 3e-4, 1e-3)
FULL_METHODS = ("full", "targets-only")  # the methods that train weights in full, at GRID_FULL_LR
GRID_SCALE = (0.1, 1.0)
EDGE_STEPS = 2
QUICK_LR, QUICK_EDGE_STEPS = (1e-3, 3e-3), 1


def next_value(value: float, up: bool) -> float:
    """The neighbour of `value` on the half-decade ladder (..., 3e-3, 1e-2, 3e-2, 1e-1, ...)."""
    k = round(2 * math.log10(value)) + (1 if up else -1)
    return float(f"{(1 if k % 2 == 0 else 3) * 10.0 ** (k // 2):.0e}")


@dataclass(frozen=True)
class Job:
    """One `neat-peft train` run of the plan (Plan.job fills in a variant's base method and overrides)."""
    method: str  # the compared method: a base method or a variant's name
    lr: float
    scaling: Optional[float]
    seed: int
    phase: str  # tune, seed, check
    factor: int = 1  # the budget check: trained `factor` times longer
    base: str = ""  # the variant's base method (neat, lora, full, head-only, targets-only); "" when `method` is one
    extra: tuple[str, ...] = ()  # the variant's recipe overrides

    @property
    def cell(self) -> tuple[float, Optional[float]]:
        return self.lr, self.scaling

    @property
    def key(self) -> str:
        s = "" if self.scaling is None else f"_s{self.scaling:g}"
        longer = "" if self.factor == 1 else f"_x{self.factor}"
        return f"{self.method}_lr{self.lr:g}{s}_seed{self.seed}{longer}"

    def overrides(self) -> list[str]:
        base = self.base or self.method
        rate = "train.head_lr" if base == "head-only" else "train.lr"
        scale = [] if self.scaling is None else [f"method.scaling={self.scaling}"]
        return [f"method.name={base}", *self.extra, f"{rate}={self.lr}", *scale, f"train.seed={self.seed}"]


def default_axes(method: str, quick: bool) -> dict[str, list[float]]:
    """The built-in grid of `method`: 'quick' (two rates, s = 1) or 'default'."""
    if quick:
        lrs = [lr / 10 for lr in QUICK_LR] if method in FULL_METHODS else list(QUICK_LR)
        return {"lr": lrs, **({"scaling": [1.0]} if method == "neat" else {})}
    lrs = GRID_FULL_LR if method in FULL_METHODS else GRID_LR
    return {"lr": list(lrs), **({"scaling": list(GRID_SCALE)} if method == "neat" else {})}


def _values(value: Any, where: str) -> list[float]:
    if isinstance(value, list):  # YAML 1.1 reads 3e-5 (no dot) as a string
        value = [_number(v) for v in value]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value):
        raise CliError(f"{where} must be a non-empty list of positive numbers, got {value!r}. Example: "
                       "lr: [1.0e-3, 3.0e-3].")
    return sorted({float(v) for v in value})


def _number(v: Any) -> Any:
    try:
        return float(v) if isinstance(v, str) else v
    except ValueError:
        return v


@dataclass
class Grid:
    """What --grid says: each compared method's axes, the edge rule, and (from a file) the named variants, the
    pairs to compare and the axes the edge rule extends."""
    methods: list[str]
    grids: dict[str, dict[str, list]]
    edge_steps: int
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    pairs: Optional[list[list[str]]] = None
    extend: tuple[str, ...] = AXES


# Per-run keys compare sets itself: a variant's overrides may not set them (the grid sets lr and s, compare the
# seed and the folder, the variant's `method` the base method).
RESERVED = ("method.name", "train.lr", "train.head_lr", "method.scaling", "train.seed", "output.dir")
VARIANT_KEYS = ("method", "overrides", "seeds", "cell_of", *AXES)


def _axes(entry: Any, base: str, name: str, spec: str) -> dict[str, list]:
    if not isinstance(entry, dict) or "lr" not in entry:
        raise CliError(f"--grid: {name} in '{spec}' must have `lr: [...]` (and for neat `scaling: [...]`), got "
                       f"{entry!r}.")
    axes = {"lr": _values(entry["lr"], f"--grid: {name}.lr in '{spec}'")}
    if "scaling" in entry:
        if base != "neat":
            raise CliError(f"--grid: {name}.scaling in '{spec}' applies to neat only ({base} has no scale s).")
        axes["scaling"] = _values(entry["scaling"], f"--grid: {name}.scaling in '{spec}'")
    elif base == "neat":
        axes["scaling"] = [None]
    return axes


def _variant(name: str, entry: Any, spec: str) -> dict[str, Any]:
    """A `methods:` entry -> {"method", "overrides"[, "seeds", "cell_of"]}, its shape checked (the recipe's own
    rules check the overrides later, compare.method_configs)."""
    where = f"--grid: methods.{name} in '{spec}'"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise CliError(f"{where}: a method's name must be letters, digits, '_', '.', '+' or '-' (it names run "
                       "folders), e.g. neat-r1.")
    if not isinstance(entry, dict) or entry.get("method") not in METHODS or set(entry) - set(VARIANT_KEYS):
        raise CliError(f"{where} must be a mapping with `method:` one of {', '.join(METHODS)} and optionally "
                       f"{', '.join(VARIANT_KEYS[1:])}; got {entry!r}.")
    if name in METHODS and entry["method"] != name:
        raise CliError(f"{where}: the name {name} is a base method; a variant of {entry['method']} needs another "
                       "name.")
    overrides = entry.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise CliError(f"{where}.overrides must be a list of KEY=VALUE strings, got {overrides!r}.")
    for text in overrides:
        try:
            key = parse_override(text)[0]
        except CliError as e:
            raise CliError(f"{where}.overrides: {e}") from None
        if key in RESERVED:
            raise CliError(f"{where}.overrides sets {key}, which compare sets per run ({', '.join(RESERVED)}): "
                           "give the method as `method:` and the rates as `lr:` / `scaling:`.")
    out = {"method": entry["method"], "overrides": list(overrides)}
    if "seeds" in entry:
        if not isinstance(entry["seeds"], int) or isinstance(entry["seeds"], bool) or entry["seeds"] < 1:
            raise CliError(f"{where}.seeds must be a whole number >= 1, got {entry['seeds']!r}.")
        out["seeds"] = entry["seeds"]
    if "cell_of" in entry:
        out["cell_of"] = entry["cell_of"]
    return out


def load_grid(spec: str, methods: Optional[list[str]]) -> Grid:
    """--grid quick | default | FILE. A FILE (YAML or JSON) holds `edge_steps: N` (optional) and, per base method
    (or `default:` for every method not named), `lr: [...]` and, for NEAT, `scaling: [...]`; a method it does not
    name gets the built-in default grid. It may instead define named variants under `methods:` (each with its base
    `method:`, recipe `overrides:`, `lr:`/`scaling:`, optionally `seeds:` and `cell_of:`), the `pairs:` to compare
    and `extend: [lr]` (the axes the edge rule extends). `methods` (--methods) defaults to the file's variants,
    else neat lora."""
    if spec in ("quick", "default"):
        methods = methods or ["neat", "lora"]
        _known(methods, {}, spec)
        return Grid(methods, {m: default_axes(m, spec == "quick") for m in methods},
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
    defined = data.get("methods", {})
    if not isinstance(defined, dict):
        raise CliError(f"--grid: methods in '{spec}' must map names to variants, e.g. `neat-r1: {{method: neat, "
                       f"overrides: [method.r=1], lr: [1.0e-3]}}`; got {defined!r}.")
    variants = {name: _variant(str(name), entry, spec) for name, entry in defined.items()}
    methods = methods or list(variants) or ["neat", "lora"]
    _known(methods, variants, spec)
    unknown = [k for k in data if k not in ("edge_steps", "default", "methods", "pairs", "extend", *METHODS)]
    if unknown:
        raise CliError(f"--grid: '{spec}' names {', '.join(map(repr, unknown))}, which is not a base method "
                       f"({', '.join(METHODS)}), 'methods', 'pairs', 'extend', 'default' or 'edge_steps'.")
    grids = {}
    for method in methods:
        if method in variants:
            entry, name, base = defined[method], f"methods.{method}", variants[method]["method"]
            if "cell_of" in entry:
                target = entry["cell_of"]
                if target not in methods or target == method or target in variants and "cell_of" in variants[target]:
                    raise CliError(f"--grid: methods.{method}.cell_of in '{spec}' must name another compared method "
                                   f"that is tuned itself ({', '.join(m for m in methods if m != method)}), got "
                                   f"{target!r}.")
                if (variants[target]["method"] if target in variants else target) != base:
                    raise CliError(f"--grid: methods.{method}.cell_of in '{spec}' names {target}, a method other "
                                   f"than {base}: its learning rate means something else.")
                if set(entry) & set(AXES):
                    raise CliError(f"--grid: methods.{method} in '{spec}' takes its cell from {target} (cell_of): "
                                   "drop its lr/scaling.")
                continue
        else:
            entry, name, base = data.get(method, data.get("default")), method if method in data else "default", method
            if entry is None:
                grids[method] = default_axes(method, False)
                continue
            if isinstance(entry, dict) and set(entry) - set(AXES):
                raise CliError(f"--grid: {name} in '{spec}' must be a mapping with `lr: [...]` (and for neat "
                               f"`scaling: [...]`), got {entry!r}.")
        grids[method] = _axes(entry, base, name, spec)
    for method in methods:  # a cell_of method runs at its target's cells (the pilot times the first)
        if method in variants and "cell_of" in variants[method]:
            grids[method] = grids[variants[method]["cell_of"]]
    pairs = data.get("pairs")
    if pairs is not None:
        if not isinstance(pairs, list) or not pairs or not all(
                isinstance(p, list) and len(p) == 2 and p[0] != p[1] and set(p) <= set(methods) for p in pairs) \
                or len({tuple(p) for p in pairs}) != len(pairs):
            raise CliError(f"--grid: pairs in '{spec}' must be a list of distinct [A, B] pairs of two different "
                           f"compared methods ({', '.join(methods)}); A − B is tested. Got {pairs!r}.")
    extend = data.get("extend", list(AXES))
    if not isinstance(extend, list) or not extend or set(extend) - set(AXES):
        raise CliError(f"--grid: extend in '{spec}' must list the axes the edge rule extends ({', '.join(AXES)}), "
                       f"got {extend!r}.")
    return Grid(methods, grids, edge, {m: v for m, v in variants.items() if m in methods}, pairs,
                tuple(a for a in AXES if a in extend))


def _known(methods: list[str], variants: dict[str, Any], spec: str) -> None:
    unknown = [m for m in methods if m not in METHODS and m not in variants]
    if unknown:
        named = f"; or a variant defined under `methods:` in the grid file ({', '.join(variants)})" if variants \
            else "; or a variant defined under `methods:` in a --grid file"
        raise CliError(f"--methods: unknown method {unknown[0]!r}; choose among {', '.join(METHODS)}{named}.")


@dataclass
class Plan:
    """The compared methods, their grids, the seeds and the metric; the pairs tested (default: the first method
    against each other one)."""
    methods: list[str]
    grids: dict[str, dict[str, list]]
    seeds: int
    edge_steps: int
    lower_is_better: bool = False
    extend: tuple[str, ...] = AXES  # the axes the edge rule extends (the quality study: lr only)
    budget_factor: Optional[int] = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> load_grid's variant
    pairs: Optional[list[list[str]]] = None

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "Plan":
        """The plan recorded in a compare.json."""
        return cls(data["methods"], data["grids"], data["seeds"], data["edge_steps"], data["lower_is_better"],
                   extend=tuple(data.get("extend", AXES)), budget_factor=data.get("budget_check"),
                   variants=data.get("variants", {}), pairs=data.get("pairs"))

    def pair_list(self) -> list[tuple[str, str]]:
        """(A, B) pairs whose paired difference A − B is tested."""
        if self.pairs:
            return [(a, b) for a, b in self.pairs]
        return [(self.methods[0], m) for m in self.methods[1:]]

    def job(self, method: str, lr: float, scaling: Optional[float], seed: int, phase: str, factor: int = 1) -> Job:
        v = self.variants.get(method)
        return Job(method, lr, scaling, seed, phase, factor, *((v["method"], tuple(v["overrides"])) if v else ()))

    def seeds_of(self, method: str) -> int:
        return self.variants.get(method, {}).get("seeds", self.seeds)

    def testable(self, a: str, b: str) -> bool:
        """Whether the pair A − B can get an interval: both are planned at MIN_PAIRED_SEEDS seeds or more."""
        return min(self.seeds_of(a), self.seeds_of(b)) >= stats.MIN_PAIRED_SEEDS

    def is_screen(self) -> bool:
        """Every method at one seed (`--seeds 1`): a screen that ranks them, with no pair to test."""
        return all(self.seeds_of(m) < stats.MIN_PAIRED_SEEDS for m in self.methods)

    def cell_of(self, method: str) -> Optional[str]:
        """The method whose chosen cell `method` runs at (no tuning of its own), or None."""
        return self.variants.get(method, {}).get("cell_of")

    def base_cells(self, method: str) -> list[tuple[float, Optional[float]]]:
        axes = self.grids[method]
        return [(lr, s) for lr in axes["lr"] for s in axes.get("scaling", [None])]

    def score(self, record: Optional[dict]) -> Optional[float]:
        """A finished run's tuning score (higher wins): its final validation value; -inf when it diverged."""
        if record is None:
            return None
        value = record.get("validation")
        if record["status"] != "ok" or value is None:
            return -math.inf
        return -value if self.lower_is_better else value

    def best(self, records: dict[str, dict], method: str, cells: list, partial: bool = False):
        """The best of `cells` at seed 0 (the first on ties; a diverged run never wins over a finished one). None
        while a cell has no result, unless `partial` (then the best of those finished, if any)."""
        best, best_score = None, -math.inf
        for lr, s in cells:
            score = self.score(records.get(Job(method, lr, s, 0, "tune").key))
            if score is None:
                if partial:
                    continue
                return None
            if best is None or score > best_score:
                best, best_score = (lr, s), score
        return best

    def grid(self, records: dict[str, dict], method: str) -> list[tuple[float, Optional[float]]]:
        """The cells `method` is tuned over: its grid, extended by the edge rule (module docstring); none for a
        method that takes another's cell."""
        if self.cell_of(method):
            return []
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
        """The tuned cell: the best over the whole extended grid (or the cell chosen for `cell_of`). None until every
        cell has a result."""
        if self.cell_of(method):
            return self.choose(records, self.cell_of(method))
        return self.best(records, method, self.grid(records, method))

    def jobs(self, records: dict[str, dict], full: bool = False) -> list[Job]:
        """Every run that can be defined now, in run order: tuning (by learning rate, then method, so the methods'
        cells of one rate finish side by side), then the seeds, then the methods that take another's cell, then the
        budget checks. full=True: every run of the whole plan, a cell not yet chosen standing in by the best
        finished so far (for the estimate)."""
        def cell(method):
            chosen = self.choose(records, method)
            if chosen is None and full:
                tuned = self.cell_of(method) or method
                chosen = self.best(records, tuned, self.grid(records, tuned), partial=True)
                return chosen or self.base_cells(tuned)[0]
            return chosen

        tuned = [m for m in self.methods if not self.cell_of(m)]
        grids = {m: self.grid(records, m) for m in tuned}
        tune = sorted(((sorted({c[0] for c in grids[m]}).index(lr), i, j, self.job(m, lr, s, 0, "tune"))
                       for i, m in enumerate(tuned) for j, (lr, s) in enumerate(grids[m])),
                      key=lambda t: t[:3])
        out = [job for *_, job in tune]
        cells = {m: cell(m) for m in self.methods}
        for seed in range(1, max(self.seeds_of(m) for m in tuned)):
            out += [self.job(m, *cells[m], seed, "seed") for m in tuned
                    if cells[m] is not None and seed < self.seeds_of(m)]
        for m in self.methods:
            if self.cell_of(m) and cells[m] is not None:
                out += [self.job(m, *cells[m], seed, "seed") for seed in range(self.seeds_of(m))]
        if self.budget_factor:
            out += [self.job(m, *cells[m], 0, "check", self.budget_factor) for m in tuned if cells[m] is not None]
        return out

    def seed_runs(self, records: dict[str, dict], method: str) -> dict[int, dict]:
        """seed -> the finished run of `method` at its chosen cell."""
        cell = self.choose(records, method)
        if cell is None:
            return {}
        out = {}
        for seed in range(self.seeds_of(method)):
            rec = records.get(Job(method, *cell, seed, "seed").key)
            if rec is not None and rec["status"] == "ok":
                out[seed] = rec
        return out
