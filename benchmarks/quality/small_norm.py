"""NEAT's small-norm question, measured: does normalize_weight (or a larger learning rate for A) change how fast
NEAT fits when W0 has small entries?

Why it matters: H = act(W0^T A^T), so both H and dL/dA scale with W0. With GPT-2-style weights (std 0.02) the
network's output, and with it dW = s * B H^T per unit of B, is small; Adam's steps on B are bounded by the
learning rate, so dW grows slowly. normalize_weight makes the network read W0 / rms(W0) (the same input at any
weight scale); neat_param_groups(a_lr_ratio=...) only speeds up A.

Task (synthetic, seconds on a CPU): one frozen d x d linear layer W0 ~ N(0, std^2), a NEAT adapter (r=8, relu,
depth 0), trained with Adam to match a teacher y = (W0 + D) x, where D is a fixed random rank-4 matrix with
entries of RMS 0.01: the same change of the function at every weight scale, as when a task needs a given change
whatever the initialisation was. Loss = mean squared error / mean squared target change (1.0 = the untouched W0).
Reported: the relative loss after a few step counts, for std 0.02 (GPT-2 init) and std 1/sqrt(d) (unit-variance
outputs), over seeds, at the best learning rate of a small grid per variant.
(Had D been scaled with W0, relu's positive homogeneity would make plain NEAT's relative loss exactly the same at
every std: the question is about a fixed target, not a relative one.) With normalize_weight the network's input
is W0 / rms(W0), the same matrix for both stds here (one random draw, scaled), so its curves are identical by
construction: what the table shows is how far plain NEAT is from that.

    python -m benchmarks.quality.small_norm --out benchmarks/quality/results/small_norm.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

D, R, TARGET_RANK, BATCH = 128, 8, 4, 256
TARGET_RMS = 0.01
CHECKPOINTS = (25, 50, 100, 200, 300)
ARMS = {  # name -> (normalize_weight, a_lr_ratio)
    "neat": (False, 1.0),
    "neat + normalize_weight": (True, 1.0),
    "neat + A lr x16": (False, 16.0),
}


def one_run(std: float, arm: str, lr: float, seed: int, steps: int) -> dict[str, Any]:
    from neat_peft import NeatConfig, get_neat_model
    from neat_peft.optim import neat_param_groups

    g = torch.Generator().manual_seed(seed)
    base = nn.Sequential(nn.Linear(D, D, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(torch.randn(D, D, generator=g) * std)
        W0 = base[0].weight.clone()
        U, V = torch.randn(D, TARGET_RANK, generator=g), torch.randn(TARGET_RANK, D, generator=g)
        target = U @ V
        target *= TARGET_RMS * D / target.norm()
    normalize, ratio = ARMS[arm]
    torch.manual_seed(seed)  # A's Kaiming init
    model = get_neat_model(base, NeatConfig(r=R, target_modules=["0"], normalize_weight=normalize))
    optimizer = torch.optim.Adam(neat_param_groups(model, lr=lr, a_lr_ratio=ratio))
    curve = {}
    for step in range(1, steps + 1):
        x = torch.randn(BATCH, D, generator=g)
        with torch.no_grad():
            y = x @ (W0 + target).T
            scale = (x @ target.T).pow(2).mean()
        loss = (model(x) - y).pow(2).mean() / scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in CHECKPOINTS or step == steps:
            curve[step] = float(loss.detach())
    return {"std": std, "arm": arm, "lr": lr, "seed": seed, "relative_loss": curve}


def run(seeds: int, steps: int, grid: list[float]) -> dict[str, Any]:
    stds = {"0.02 (GPT-2 init)": 0.02, f"1/sqrt(d) = {1 / math.sqrt(D):.3f}": 1 / math.sqrt(D)}
    runs = []
    start = time.perf_counter()
    for label, std in stds.items():
        for arm in ARMS:
            for lr in grid:
                for seed in range(seeds):
                    r = one_run(std, arm, lr, seed, steps)
                    r["std_label"] = label
                    runs.append(r)
    # Per (std, arm): the learning rate with the lowest mean final loss; its curve, mean ± std over seeds.
    best = {}
    for label in stds:
        for arm in ARMS:
            finals = {lr: statistics.fmean(r["relative_loss"][steps] for r in runs
                                           if r["std_label"] == label and r["arm"] == arm and r["lr"] == lr)
                      for lr in grid}
            lr = min(finals, key=finals.get)
            chosen = [r for r in runs if r["std_label"] == label and r["arm"] == arm and r["lr"] == lr]
            best[f"{label} | {arm}"] = {
                "std_label": label, "arm": arm, "lr": lr,
                "relative_loss": {str(s): [r["relative_loss"][s] for r in chosen] for s in chosen[0]["relative_loss"]}}
    return {"setup": {"d": D, "r": R, "target_rank": TARGET_RANK, "batch": BATCH, "steps": steps, "seeds": seeds,
                      "lr_grid": grid, "optimizer": "Adam", "target_rms": TARGET_RMS, "arms": list(ARMS)},
            "seconds": time.perf_counter() - start, "best": best, "runs": runs}


def markdown(data: dict[str, Any]) -> str:
    steps = [str(s) for s in next(iter(data["best"].values()))["relative_loss"]]
    lines = ["| W0 std | variant | best lr | " + " | ".join(f"loss @ {s}" for s in steps) + " |",
             "|---|---|---:|" + "---:|" * len(steps)]
    for row in data["best"].values():
        cells = []
        for s in steps:
            v = row["relative_loss"][s]
            cells.append(f"{statistics.fmean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}")
        lines.append(f"| {row['std_label']} | {row['arm']} | {row['lr']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--grid", default="1e-3,3e-3,1e-2", help="comma list of learning rates (best one per variant kept)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = run(args.seeds, args.steps, [float(x) for x in args.grid.split(",")])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(markdown(data))
    print(f"wrote {args.out} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
