"""Statistics of the study: mean ± sample std over seeds, and paired NEAT-vs-LoRA differences with a t interval.

For a pair of methods run at the same seeds s = 1..n (same split, same subset at each seed), with test
accuracies a_s and b_s, the paired differences d_s = a_s - b_s give

    mean  d̄ = (1/n) Σ d_s,     sd  s_d = sqrt(Σ (d_s - d̄)² / (n - 1)),
    95% interval  d̄ ± t_{0.975, n-1} · s_d / sqrt(n)

(Student's t with n - 1 degrees of freedom). A verdict is given only when the interval excludes 0; otherwise
the study reports that no difference was detected at n seeds, with the interval's width: the size of a
difference this many seeds could have shown.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

CONFIDENCE = 0.95


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); (nan, nan) for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, dof))


def paired(a: dict[int, float], b: dict[int, float]) -> Optional[dict]:
    """Paired difference a - b over the seeds both have. None when fewer than 2 seeds are shared (no interval)."""
    seeds = sorted(set(a) & set(b))
    n = len(seeds)
    if n < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n)
    return {"seeds": seeds, "n": n, "differences": d, "mean": mean, "sd": sd, "low": mean - half,
            "high": mean + half, "half_width": half}


def verdict(result: Optional[dict], a: str, b: str, scale: float = 100.0, unit: str = " points") -> str:
    """'A better than B' / 'A worse than B' only where the interval excludes 0; otherwise no difference detected."""
    if result is None:
        return "pending (fewer than 2 paired seeds)"
    ci = (f"{scale * result['mean']:+.1f}{unit}, 95% CI [{scale * result['low']:+.1f}, "
          f"{scale * result['high']:+.1f}], n={result['n']} seeds")
    if result["low"] > 0:
        return f"{a} better than {b}: {ci}"
    if result["high"] < 0:
        return f"{a} worse than {b}: {ci}"
    width = scale * (result["high"] - result["low"])
    return f"no difference detected at {result['n']} seeds: {ci} (interval width {width:.1f}{unit})"


def plateaued(curve: list[dict], points: float) -> Optional[bool]:
    """True when the last third of a validation-accuracy curve gains less than `points` over the best before it
    (the run had stopped improving); None for curves too short to tell (under 3 points) or without accuracy."""
    accs = [c["accuracy"] for c in curve if "accuracy" in c]
    if len(accs) < 3:
        return None
    cut = len(accs) - max(1, len(accs) // 3)
    return max(accs[cut:]) - max(accs[:cut]) < points
