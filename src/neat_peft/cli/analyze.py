"""`neat-peft analyze RUN_DIR [--compare OTHER_RUN] [--out DIR]`: what the trained update dW looks like.

Per adapted layer: the singular values of dW (materialised, d_out x d_in), its effective rank (exp of the
entropy of the normalised singular values), stable rank (||dW||_F^2 / ||dW||_2^2), numerical rank and
||dW||_F / ||W0||_F (neat_peft.analysis), plus how much of dW's energy lies in the top-k singular subspaces of
W0 itself (NEAT's network reads W0, so this asks whether its update follows W0's dominant directions more than
LoRA's does; a random matrix puts k/d of its energy there). With --compare (a LoRA or NEAT run of the same model
and task) the two runs are put side by side, layer by layer, with the overlap of their top singular subspaces.
Writes analysis.json, spectra.png and summary.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from . import rundir
from .commands import load_run_model, open_run
from .errors import CliError
from .report import table

W0_SUBSPACE_K = 16
ADAPTER_METHODS = ("neat", "lora")


def run_updates(run_dir: str) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(facts about the run, {layer path: (dW, W0)}) of a finished NEAT or LoRA run."""
    from neat_peft.analysis import lora_updates, neat_updates

    path, config, splits = open_run(run_dir)
    method = config["method.name"]
    if method not in ADAPTER_METHODS:
        raise CliError(f"'{run_dir}' is a method.name={method} run; analyze reads the low-rank update of an adapter "
                       f"run ({' or '.join(ADAPTER_METHODS)}). Train one with method.name=neat or method.name=lora.")
    if config["task"] == "image-classification":
        raise CliError("analyze handles nn.Linear adapters (text models); this run adapts convolutions.")
    model = load_run_model(path, config, splits)
    updates = neat_updates(model) if method == "neat" else lora_updates(model)
    if not updates:
        raise CliError(f"No {method} layers found in the model of '{run_dir}'.")
    try:
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        metrics.get("test")
    except (ValueError, AttributeError) as e:
        raise CliError(f"'{path / 'metrics.json'}' is damaged ({type(e).__name__}: {e}); train the run again "
                       "with --overwrite.") from None
    info = {"run_dir": str(path), "method": method, "model": config["model.name"], "task": config["task"],
            "data": config["data.source"], "r": metrics.get("method_info", {}).get("r", config["method.r"]),
            "trainable_params": metrics.get("trainable_params"), "test": metrics.get("test")}
    if method == "neat":
        info.update({k: config[f"method.{k}"] for k in ("depth", "act_fn", "axis", "scaling", "normalize_weight")})
    else:
        info["lora_alpha"] = config["method.lora_alpha"] or 2 * config["method.r"]
    return info, updates


def subspace_energy(delta: torch.Tensor, W0: torch.Tensor, k: int) -> dict[str, float]:
    """Fraction of ||dW||_F^2 inside the span of W0's top-k left (output) and right (input) singular vectors."""
    delta, W0 = delta.to(torch.float64), W0.to(torch.float64)
    U, _, Vh = torch.linalg.svd(W0, full_matrices=False)
    total = delta.pow(2).sum()
    if total == 0:
        return {"k": k, "left": 0.0, "right": 0.0, "random_left": k / W0.shape[0], "random_right": k / W0.shape[1]}
    return {"k": k, "left": float((U[:, :k].T @ delta).pow(2).sum() / total),
            "right": float((delta @ Vh[:k].T).pow(2).sum() / total),
            "random_left": k / W0.shape[0], "random_right": k / W0.shape[1]}


def pair_statistics(a: torch.Tensor, b: torch.Tensor, q: int) -> dict[str, float]:
    """Cosine of dW_a and dW_b (Frobenius), and the overlap ||U_a^T U_b||_F^2 / q of their top-q left and right
    singular subspaces (1: same subspace, q/d: what two random subspaces give)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    denom = a.norm() * b.norm()
    Ua, _, Vha = torch.linalg.svd(a, full_matrices=False)
    Ub, _, Vhb = torch.linalg.svd(b, full_matrices=False)
    return {"cosine": float((a * b).sum() / denom) if denom > 0 else 0.0, "q": q,
            "left_overlap": float((Ua[:, :q].T @ Ub[:, :q]).pow(2).sum() / q),
            "right_overlap": float((Vha[:q] @ Vhb[:q].T).pow(2).sum() / q)}


def analyze_run(run_dir: str) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    from neat_peft.analysis import analyze_updates

    info, updates = run_updates(run_dir)
    top_k = max(min(d.shape) for d, _ in updates.values())
    result = analyze_updates(updates, top_k=top_k)
    for name, (delta, W0) in updates.items():
        result["layers"][name]["w0_subspace_energy"] = subspace_energy(delta, W0, min(W0_SUBSPACE_K, *W0.shape))
    energies = [s["w0_subspace_energy"] for s in result["layers"].values()]
    result["summary"]["mean_w0_energy_left"] = sum(e["left"] for e in energies) / len(energies)
    result["summary"]["mean_w0_energy_right"] = sum(e["right"] for e in energies) / len(energies)
    return {"run": info, **result}, updates


def run_analyze(run_dir: str, compare: Optional[str] = None, out: Optional[str] = None) -> dict[str, Any]:
    main, main_updates = analyze_run(run_dir)
    report: dict[str, Any] = {"analysis": main}
    if compare:
        other, other_updates = analyze_run(compare)
        if other["run"]["model"] != main["run"]["model"]:
            raise CliError(f"--compare needs a run of the same model: '{run_dir}' used {main['run']['model']}, "
                           f"'{compare}' used {other['run']['model']}.")
        shared = [n for n in main_updates if n in other_updates]
        if not shared:
            raise CliError(f"'{run_dir}' and '{compare}' adapt no layer in common (first: "
                           f"{next(iter(main_updates))} vs {next(iter(other_updates))}); compare runs with the "
                           "same method.targets.")
        q = max(1, min(int(main["run"]["r"]), int(other["run"]["r"])))
        report["compare"] = other
        report["pairs"] = {n: pair_statistics(main_updates[n][0], other_updates[n][0], q) for n in shared}
    folder = Path(out) if out else Path(f"{Path(run_dir).as_posix().rstrip('/')}-analysis")
    folder.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_text(folder / "analysis.json", json.dumps(report, indent=1) + "\n")
    plot_spectra(report, folder / "spectra.png")
    plot_summary(report, folder / "summary.png")
    print(summary_table(report))
    print(f"\nsaved: {folder}/ (analysis.json, spectra.png, summary.png)")
    return report


def _label(analysis: dict[str, Any]) -> str:
    run = analysis["run"]
    return f"{run['method'].upper() if run['method'] == 'neat' else 'LoRA'} r={run['r']}"


def summary_table(report: dict[str, Any]) -> str:
    runs = [report["analysis"]] + ([report["compare"]] if "compare" in report else [])
    headers = ["layer"]
    for a in runs:
        headers += [f"{_label(a)} eff. rank", f"{_label(a)} |dW|/|W0|"]
    if "pairs" in report:
        headers.append("cosine")
    rows = []
    for name in report["analysis"]["layers"]:
        row = [name]
        for a in runs:
            s = a["layers"].get(name)
            row += [f"{s['effective_rank']:.2f}", f"{s['relative_norm']:.2e}"] if s else ["–", "–"]
        if "pairs" in report:
            p = report["pairs"].get(name)
            row.append(f"{p['cosine']:.3f}" if p else "–")
        rows.append(row)
    return table(rows, headers)


def _layer_names(report: dict[str, Any]) -> list[str]:
    return list(report["analysis"]["layers"])


def plot_spectra(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [report["analysis"]] + ([report["compare"]] if "compare" in report else [])
    names = _layer_names(report)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    shown = max(2 * max(int(a["run"]["r"]) for a in runs), 16)
    for ax, name in zip(axes.flat, names):
        for i, a in enumerate(runs):
            s = a["layers"].get(name)
            if not s:
                continue
            sv = torch.tensor(s["singular_values"][:shown])
            if sv.numel() and sv[0] > 0:
                ax.semilogy(range(1, len(sv) + 1), (sv / sv[0]).clamp_min(1e-12).tolist(), marker=".",
                            color=f"C{i}", label=_label(a))
        ax.set_title(name.replace("base_model.model.", ""), fontsize=7)
        ax.set_ylim(1e-8, 2)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("singular values of dW, normalised by the largest (log scale)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_summary(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [report["analysis"]] + ([report["compare"]] if "compare" in report else [])
    names = _layer_names(report)
    panels = [("effective rank of dW", lambda s: s["effective_rank"]),
              ("|dW|_F / |W0|_F", lambda s: s["relative_norm"]),
              (f"share of |dW|^2 in W0's top-{W0_SUBSPACE_K} input directions", lambda s: s["w0_subspace_energy"]["right"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.6 * len(names) + 2), 2.6 * len(panels)), squeeze=False)
    width = 0.8 / len(runs)
    for ax, (title, get) in zip(axes[:, 0], panels):
        for i, a in enumerate(runs):
            values = [get(a["layers"][n]) if n in a["layers"] else float("nan") for n in names]
            ax.bar([j + i * width for j in range(len(names))], values, width=width, color=f"C{i}", label=_label(a))
        ax.set_title(title, fontsize=9)
        ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(names))])
        ax.set_xticklabels([n.split("encoder.")[-1] for n in names], rotation=60, ha="right", fontsize=6)
        ax.grid(alpha=0.3, axis="y")
    first = runs[0]["layers"][names[0]]["w0_subspace_energy"]
    axes[-1, 0].axhline(first["random_right"], color="grey", ls="--", lw=1, label="random direction")
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
