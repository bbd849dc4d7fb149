"""Writes recipes/paper/**.yaml from the tables below: the hyper-parameters of the authors' released scripts.

Sources (read on GitHub, values copied by hand):
  GLUE    yibozhong/neat natural-language-understanding/neat-l.sh, neat-s.sh, glue.py
  vision  yibozhong/neat image-classification/run.sh, main.py (data sets, Trainer arguments, seed 7)
  LLM     yibozhong/peanut commonsense&math/scripts/finetune.sh, finetune.py's LLM-Adapters defaults,
          commonsense_evaluate.py / math_evaluate.py (beams 4; 32 / 1024 new tokens)
  peft    huggingface/peft method_comparison/MetaMathQA/default_training_params.json and
          experiments/peanut/llama-3.2-3B-rank{32,1}-relu-depth0-s{2.0,32.0}/adapter_config.json

Run `python recipes/paper/generate.py` after editing a table; tests/test_paper_recipes.py checks that the
committed files are what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# --- GLUE: RoBERTa-base, q and v ------------------------------------------------------------------------
# name: (hub config, text column, pair column, eval splits, metric, task)
GLUE_DATA = {
    "cola": ("cola", "sentence", None, ["validation"], "matthews", "text-pair-classification"),
    "sst2": ("sst2", "sentence", None, ["validation"], "accuracy", "text-pair-classification"),
    "mrpc": ("mrpc", "sentence1", "sentence2", ["validation"], "accuracy", "text-pair-classification"),
    "qnli": ("qnli", "question", "sentence", ["validation"], "accuracy", "text-pair-classification"),
    "mnli": ("mnli", "premise", "hypothesis", ["validation_matched", "validation_mismatched"], "accuracy",
             "text-pair-classification"),
    "qqp": ("qqp", "question1", "question2", ["validation"], "accuracy", "text-pair-classification"),
    "rte": ("rte", "sentence1", "sentence2", ["validation"], "accuracy", "text-pair-classification"),
    "stsb": ("stsb", "sentence1", "sentence2", ["validation"], "pearson", "text-regression"),
}
# name: (scale s, head lr, adapter lr, epochs, batch)
NEAT_L = {"cola": (0.1, 1e-3, 1e-3, 100, 64), "mrpc": (0.01, 5e-3, 5e-3, 100, 64),
          "qnli": (0.01, 1e-3, 1e-3, 40, 32), "mnli": (0.01, 5e-3, 5e-3, 20, 32),
          "qqp": (0.01, 5e-3, 5e-3, 20, 64), "rte": (0.01, 5e-3, 5e-3, 100, 32),
          "sst2": (0.01, 5e-3, 5e-3, 40, 32), "stsb": (0.1, 5e-3, 5e-3, 100, 64)}
NEAT_S = {"cola": (0.1, 1e-3, 5e-3, 100, 64), "mrpc": (0.01, 5e-3, 5e-3, 100, 64),
          "qnli": (0.1, 1e-3, 1e-3, 40, 32), "mnli": (0.01, 5e-3, 5e-3, 20, 32),
          "qqp": (1.0, 1e-3, 1e-3, 20, 64), "rte": (1.0, 1e-3, 1e-3, 100, 32),
          "sst2": (0.01, 5e-3, 5e-3, 40, 32), "stsb": (0.1, 1e-3, 5e-3, 100, 64)}


def glue(name: str, variant: str) -> dict:
    config, text, pair, evals, metric, task = GLUE_DATA[name]
    scale, head_lr, lr, epochs, batch = (NEAT_L if variant == "l" else NEAT_S)[name]
    method = {"name": "neat", "r": 8 if variant == "l" else 1, "depth": 0, "act_fn": "relu", "scaling": scale,
              "axis": "out", "dropout": 0.0, "targets": ["query", "value"]}
    if variant == "s":  # the script adapts the attention of layers 4..11 only
        method["layers_to_transform"] = list(range(4, 12))
    return {
        "task": task,
        "model": {"name": "FacebookAI/roberta-base"},
        "data": {"source": "nyu-mll/glue", "hub_config": config, "hub_split": "train", "text_column": text,
                 "text_pair_column": pair, "label_column": "label", "eval_splits": evals, "dedupe": False,
                 "max_train_examples": None, "max_validation_examples": None, "max_test_examples": None,
                 "max_length": 512},
        "method": method,
        "train": {"epochs": epochs, "batch_size": batch, "eval_batch_size": batch, "lr": lr, "head_lr": head_lr,
                  "weight_decay": 0.0, "warmup_ratio": 0.06, "scheduler": "linear", "max_grad_norm": 0.0,
                  "eval_strategy": "epoch", "log_every": 50, "seed": 0, "precision": "fp32"},
        "eval": {"metric": metric},
        "output": {"dir": f"runs/paper/glue/{name}-neat-{variant}"},
    }


# --- vision: ViT-B/16 (in21k), q and v, r = 7 -----------------------------------------------------------
# name: (train source, train split, validation split or None (10 % held out), test source, test split,
#        head lr, adapter lr, weight decay)
VISION = {
    "cars": ("Multimodal-Fatima/StanfordCars_train", None, "Multimodal-Fatima/StanfordCars_test", 1e-2, 1e-2, 4e-5),
    "cifar10": ("Multimodal-Fatima/CIFAR10_train", None, "Multimodal-Fatima/CIFAR10_test", 5e-3, 5e-3, 9e-5),
    "cifar100": ("Multimodal-Fatima/CIFAR100_train", None, "Multimodal-Fatima/CIFAR100_test", 5e-3, 5e-3, 1e-4),
    "eurosat": ("timm/eurosat-rgb", "validation", None, 5e-3, 5e-3, 3e-4),
    "fgvc": ("Multimodal-Fatima/FGVC_Aircraft_train", None, "Multimodal-Fatima/FGVC_Aircraft_test", 1e-2, 1e-2, 7e-5),
    "pets": ("timm/oxford-iiit-pet", None, "timm/oxford-iiit-pet", 5e-3, 5e-3, 8e-4),
    "resisc": ("timm/resisc45", "validation", None, 1e-2, 5e-3, 3e-4),
}


def vision(name: str, depth: int = 0) -> dict:
    source, validation, test_source, head_lr, lr, wd = VISION[name]
    data = {"source": source, "hub_split": "train", "image_column": "image", "label_column": "label",
            "eval_splits": [validation] if validation else None, "validation_fraction": 0.1,
            "test_split": "test", "test_source": test_source if test_source != source else None,
            "max_train_examples": None, "max_validation_examples": None, "max_test_examples": None}
    suffix = f"-depth{2 * depth + 2}" if depth else ""
    return {
        "task": "image-classification",
        "model": {"name": "google/vit-base-patch16-224-in21k"},
        "data": data,
        "method": {"name": "neat", "r": 7, "depth": depth, "act_fn": "relu", "scaling": 1.0, "axis": "out",
                   "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "train": {"epochs": 10, "batch_size": 64, "eval_batch_size": 64, "grad_accum_steps": 4, "lr": lr,
                  "head_lr": head_lr, "weight_decay": wd, "warmup_ratio": 0.0, "scheduler": "linear",
                  "max_grad_norm": 1.0, "eval_strategy": "epoch", "log_every": 10, "seed": 7,
                  "precision": "fp32"},
        "eval": {"metric": "accuracy"},
        "output": {"dir": f"runs/paper/vision/{name}-neat{suffix}"},
    }


# --- LLMs: LLaMA-2-7B / LLaMA-3-8B / Qwen3-8B on Commonsense-170K and MetaMathQA (LLM-Adapters' files) ------
LLM_ADAPTERS = "LLM-Adapters"  # a clone of github.com/AGI-Edgerunners/LLM-Adapters (its data files)
MODELS = {"llama2-7b": ("meta-llama/Llama-2-7b-hf", "fp16"), "llama3-8b": ("meta-llama/Meta-Llama-3-8B", "fp16"),
          "qwen3-8b": ("Qwen/Qwen3-8B", "bf16")}
COMMONSENSE = [("boolq", "boolq"), ("piqa", "piqa"), ("social_i_qa", "siqa"), ("hellaswag", "hellaswag"),
               ("winogrande", "winogrande"), ("ARC-Easy", "arc"), ("ARC-Challenge", "arc"), ("openbookqa", "obqa")]
MATH = [("gsm8k", "number"), ("MATH", "number")]


def llm(model: str, suite: str, method: str) -> dict:
    name, precision = MODELS[model]
    sets = COMMONSENSE if suite == "commonsense" else MATH
    if suite == "commonsense":
        train = {"source": f"{LLM_ADAPTERS}/ft-training_set/commonsense_170k.json", "prompt_column": "instruction",
                 "response_column": "output"}
    else:  # the authors' transformed_MetaMathQA.json is not public: the hub's MetaMathQA, same template
        train = {"source": "meta-math/MetaMathQA", "hub_split": "train", "prompt_column": "query",
                 "response_column": "response"}
    if method == "neat":
        adapter = {"name": "neat", "r": 32, "scaling": 1.0, "axis": "in", "act_fn": "relu", "depth": 0,
                   "dropout": 0.0}
    else:
        adapter = {"name": "lora", "r": 32, "lora_alpha": 32, "dropout": 0.05}
    adapter["targets"] = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    return {
        "task": "generative-qa",
        "model": {"name": name},
        "data": {**train, "answer_column": "answer", "prompt_template": "alpaca",
                 "eval_sets": [{"name": n, "source": f"{LLM_ADAPTERS}/dataset/{n}/test.json", "extractor": e}
                               for n, e in sets],
                 "dedupe": False, "validation_fraction": 0.005, "max_train_examples": None,
                 "max_validation_examples": 200, "max_test_examples": None, "max_length": 256},
        "method": adapter,
        "train": {"epochs": 1, "batch_size": 2, "grad_accum_steps": 8, "eval_batch_size": 16, "lr": 3e-4,
                  "warmup_steps": 100, "scheduler": "linear", "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "eval_every": 80, "save_every": 80, "log_every": 10, "seed": 0, "precision": precision},
        "eval": {"num_beams": 4, "max_new_tokens": 32 if suite == "commonsense" else 1024},
        "output": {"dir": f"runs/paper/llm/{model}-{suite}-{method}"},
    }


# --- peft's method comparison twin: Llama-3.2-3B, MetaMathQA -> GSM8K, q and v --------------------------
PEFT_TWINS = {"r32-s2": (32, 2.0), "r1-s32": (1, 32.0)}


def peft_twin(key: str) -> dict:
    r, scale = PEFT_TWINS[key]
    return {
        "task": "generative-qa",
        "model": {"name": "meta-llama/Llama-3.2-3B"},
        "data": {"source": "meta-math/MetaMathQA", "hub_split": "train", "prompt_column": "query",
                 "response_column": "response", "prompt_template": "Question: {prompt} Think step by step.\nAnswer:",
                 "eval_sets": [{"name": "gsm8k", "source": f"{LLM_ADAPTERS}/dataset/gsm8k/test.json",
                                "extractor": "number"}],
                 "dedupe": False, "validation_fraction": 0.005, "max_train_examples": None,
                 "max_validation_examples": 200, "max_test_examples": None, "max_length": 768},
        "method": {"name": "neat", "r": r, "scaling": scale, "axis": "out", "act_fn": "relu", "depth": 0,
                   "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "train": {"epochs": 1, "max_steps": 5000, "batch_size": 4, "eval_batch_size": 51, "lr": 1e-4,
                  "weight_decay": 0.1, "scheduler": "cosine", "warmup_ratio": 0.0, "max_grad_norm": 1.0,
                  "eval_every": 250, "save_every": 250, "log_every": 10, "seed": 0, "precision": "bf16"},
        "eval": {"num_beams": 1, "max_new_tokens": 512},
        "output": {"dir": f"runs/paper/peft-benchmark/llama3.2-3b-neat-{key}"},
    }


def recipes() -> dict[str, dict]:
    """relative path -> recipe tree, every experiment of the paper's released scripts."""
    out = {}
    for name in GLUE_DATA:
        for variant in ("l", "s"):
            out[f"glue/{name}-neat-{variant}.yaml"] = glue(name, variant)
    for name in VISION:
        out[f"vision/{name}-neat.yaml"] = vision(name)
    out["vision/cars-neat-depth6.yaml"] = vision("cars", depth=2)
    for model in MODELS:
        for suite in ("commonsense", "math"):
            for method in ("neat", "lora"):
                out[f"llm/{model}-{suite}-{method}.yaml"] = llm(model, suite, method)
    for key in PEFT_TWINS:
        out[f"peft-benchmark/llama3.2-3b-neat-{key}.yaml"] = peft_twin(key)
    return out


HEADER = "# Generated by recipes/paper/generate.py from the authors' released scripts; see docs/paper.md.\n"


def render(tree: dict) -> str:
    return HEADER + yaml.safe_dump(tree, sort_keys=False, width=110)


def main(check: bool = False) -> int:
    stale = []
    for rel, tree in recipes().items():
        path = HERE / rel
        if check:
            if not path.is_file() or path.read_text() != render(tree):
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(tree))
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv))
