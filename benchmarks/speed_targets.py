"""Speed benchmark, targets: the ratios the issues set, and PASS/MISS for a measured run."""

from __future__ import annotations

from typing import Optional

# Targets from issues 2 and 5. (name, numerator, denominator, comparison, threshold, applies to d or None = all)
TRAIN_TARGETS = [
    ("train time NEAT/LoRA", "neat", "lora", "<=", 1.03, None),
    ("PEANuT/NEAT train time", "peanut", "neat", ">=", 1.10, 768),
    ("PEANuT/NEAT train time", "peanut", "neat", ">=", 1.40, 2048),
]
MEMORY_TARGET = ("peak memory NEAT/LoRA (step)", 1.05)
INFER_TARGET = ("cached unmerged inference NEAT/LoRA, batch 1", 1.05)
MERGED_TIME_TARGET = 1.05  # merged NEAT is a plain base model: its time ratio to the base is 1 up to noise
OUTPUT_ATOL = 1e-4  # merged vs unmerged outputs (fp32, LayerNorm-scale activations)


def check(value: float, op: str, threshold: float) -> str:
    ok = value <= threshold if op == "<=" else value >= threshold
    return "PASS" if ok else "MISS"



def evaluate_targets(d: int, train: dict, infer: Optional[dict], clock: str = "wall") -> list[dict]:
    """PASS/MISS per target. Time ratios are judged on `clock`: "wall" (ratio of wall-time medians) or "cpu"
    (ratio of process CPU-time medians, for a machine shared with other jobs); each row keeps both."""
    key = "ratio" if clock == "wall" else "cpu_ratio"

    def time_row(target: str, entry: dict, op: str, threshold: float, **extra) -> dict:
        return {"target": target, "value": entry[key], "status": check(entry[key], op, threshold),
                "wall_ratio": entry["ratio"], "cpu_ratio": entry["cpu_ratio"], "clock": clock, **extra}

    rows = []
    flops = train["matmul_flops"]
    for name, num, den, op, threshold, only_d in TRAIN_TARGETS:
        if only_d is None or only_d == d:
            rows.append(time_row(f"{name} {op} {threshold}", train["ratios"][f"{num}/{den}"], op, threshold,
                                 matmul_flop_ratio=flops[num] / flops[den]))
    name, threshold = MEMORY_TARGET
    value = train["memory_ratios"]["neat/lora (step)"]
    rows.append({"target": f"{name} <= {threshold}", "value": value, "status": check(value, "<=", threshold)})
    if infer is None:
        return rows
    name, threshold = INFER_TARGET
    rows.append(time_row(f"{name} <= {threshold}", infer["batches"]["1"]["ratios"]["neat/lora"], "<=", threshold))
    merge = infer["merge"]
    worst_out = max(b["merged_vs_unmerged_max_abs_diff"] for b in infer["batches"].values())
    equal = merge["merged_is_plain_base"] and worst_out <= OUTPUT_ATOL and \
        merge["merged_weight_vs_formula_max_abs_diff"] <= 1e-5
    rows.append({"target": f"merged NEAT = base model + dW (outputs within {OUTPUT_ATOL}, plain base modules)",
                 "value": worst_out, "status": "PASS" if equal else "MISS"})
    for bs, b in infer["batches"].items():
        rows.append(time_row(f"merged NEAT/base inference time, batch {bs} <= {MERGED_TIME_TARGET}",
                             b["ratios"]["neat_merged/base"], "<=", MERGED_TIME_TARGET))
    return rows


