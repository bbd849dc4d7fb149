"""Statistics of `neat-peft compare` (the quality study is compares too): mean ± sample std over seeds, and paired
differences with a Student t interval. Standard library only (checked against scipy in tests/test_compare.py).

For two methods run at the same seeds s = 1..n (at one seed both train and are scored on the same split), with
test metrics a_s and b_s, the paired differences d_s = a_s - b_s give

    mean  d̄ = (1/n) Σ d_s,     sd  s_d = sqrt(Σ (d_s - d̄)² / (n - 1)),
    95% interval  d̄ ± t_{0.975, n-1} · s_d / sqrt(n)

(Student's t with n - 1 degrees of freedom). A verdict (better / worse) is given only when the interval excludes
0; otherwise no difference was detected at n seeds, and the interval's width says how large a difference this
many seeds could have shown.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

CONFIDENCE = 0.95
BETTER, WORSE, NO_DIFFERENCE, PENDING = "better", "worse", "no difference detected", "pending"
UNTESTED = "untested: one seed"  # a pair whose methods are planned at fewer than MIN_PAIRED_SEEDS seeds
MIN_PAIRED_SEEDS = 2  # an interval needs n - 1 >= 1 degrees of freedom


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); (nan, nan) for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_central(t: float, dof: int) -> float:
    """P(|T| < t) for Student's T with an integer number of degrees of freedom: the closed form of Abramowitz &
    Stegun 26.7.3-4 in θ = atan(t / sqrt(ν)) (a finite sum of powers of cos θ, exact for integer ν)."""
    theta = math.atan(t / math.sqrt(dof))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if dof % 2 == 0:  # sin θ (1 + c²/2 + 1·3 c⁴/(2·4) + ... up to c^(ν-2))
        term, total = 1.0, 1.0
        for k in range(1, dof // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if dof == 1:
        return 2 * theta / math.pi
    term, total = math.cos(theta), math.cos(theta)  # (2/π)(θ + sin θ (cos θ + 2/3 cos³θ + ... up to cos^(ν-2)θ))
    for k in range(1, (dof - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * total)


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `dof` degrees of freedom, by bisection on `t_central`."""
    if not 0.5 < p < 1 or dof < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and dof >= 1, got p={p}, dof={dof}")
    target, low, high = 2 * p - 1, 0.0, 1.0
    while t_central(high, dof) < target:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_central(mid, dof) < target else (low, mid)
        if high - low < 1e-13 * high:
            break
    return (low + high) / 2


def paired(a: dict[int, float], b: dict[int, float]) -> Optional[dict]:
    """Paired difference a - b over the seeds both have. None when fewer than MIN_PAIRED_SEEDS are shared (no
    interval)."""
    seeds = sorted(set(a) & set(b))
    n = len(seeds)
    if n < MIN_PAIRED_SEEDS:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n)
    return {"seeds": seeds, "n": n, "differences": d, "mean": mean, "sd": sd, "low": mean - half,
            "high": mean + half, "half_width": half, "width": 2 * half}


def verdict_status(result: Optional[dict], lower_is_better: bool = False) -> str:
    """BETTER / WORSE (for the first method of the pair) only where the interval excludes 0; NO_DIFFERENCE
    otherwise; PENDING with fewer than 2 paired seeds. With a lower-is-better metric (a loss), a negative
    difference is the better one."""
    if result is None:
        return PENDING
    if result["low"] > 0:
        return WORSE if lower_is_better else BETTER
    if result["high"] < 0:
        return BETTER if lower_is_better else WORSE
    return NO_DIFFERENCE


PLATEAU = 0.01  # a curve whose last third gains less than this (in its own units) over the best before it: plateaued


def plateaued(values: list[float], points: float = PLATEAU, lower_is_better: bool = False) -> Optional[bool]:
    """True when the last third of a validation curve gains less than `points` over the best before it (the run
    had stopped improving; for a loss, the best is the lowest); None for curves too short to tell (under 3 points)."""
    if len(values) < 3:
        return None
    if lower_is_better:
        values = [-v for v in values]
    cut = len(values) - max(1, len(values) // 3)
    return max(values[cut:]) - max(values[:cut]) < points
