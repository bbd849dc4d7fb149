"""The training engine of the CLI on transformers' Trainer, for every task.

Trainer brings checkpointing, resuming (optimizer, scheduler, RNG and data position) and multi-process runs
(torchrun / accelerate launch). RunTrainer adds: learning-rate groups (adapter, NEAT's A at train.lr *
method.a_lr_ratio, head at train.head_lr), checkpoints holding only the trainable tensors (safetensors), a
completion marker per checkpoint (a SIGKILL mid-save never leaves a checkpoint that --resume would pick), a stop
on the first non-finite loss, and the progress bar (loss and throughput).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import launch, rundir
from .errors import CliError
from .models import is_head_param

TRAINABLE_FILE = rundir.TRAINABLE_FILE


class NonFiniteLoss(CliError):
    pass


def make_trainer_class():
    from safetensors.torch import load_file, save_file
    from transformers import Trainer

    class RunTrainer(Trainer):
        """Trainer with per-group learning rates, trainable-only checkpoints and a non-finite-loss stop."""

        def __init__(self, *args, heads: list[str], head_lr: float, a_lr_ratio: float = 1.0, sums_loss: bool = False,
                     logits_at_labels: bool = False, **kwargs):
            self.heads, self.head_lr, self.a_lr_ratio = heads, head_lr, a_lr_ratio
            self.logits_at_labels = logits_at_labels
            super().__init__(*args, **kwargs)
            if not sums_loss:
                # Classification losses are per-batch means: Trainer must not rescale them by the number of
                # processes (it does so for models that accept **kwargs, e.g. any wrapper, under DDP).
                self.model_accepts_loss_kwargs = False

        def create_optimizer(self, model=None):
            """AdamW over the groups (adapter or body at train.lr; NEAT's A at train.lr * method.a_lr_ratio when
            that is not 1, the split neat_peft.optim.neat_param_groups makes; head at train.head_lr)."""
            if self.optimizer is None:
                named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
                head = [p for n, p in named if is_head_param(n, self.heads)]
                body = [p for n, p in named if not is_head_param(n, self.heads)]
                lr = self.args.learning_rate
                parts = [(body, lr), (head, self.head_lr)]
                if self.a_lr_ratio != 1.0:
                    from neat_peft.optim import neat_param_groups

                    a_ids = {id(p) for g in neat_param_groups(self.model, lr, self.a_lr_ratio)
                             if g["name"] == "neat_A" for p in g["params"]}
                    parts = [([p for p in body if id(p) in a_ids], lr * self.a_lr_ratio),
                             ([p for p in body if id(p) not in a_ids], lr), (head, self.head_lr)]
                groups = [{"params": g, "lr": group_lr} for g, group_lr in parts if g]
                self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=self.args.weight_decay)
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """train.logits_to_keep=labels: the model computes logits only at the positions whose next token is
            scored (transformers' logits_to_keep, the batch's union of them) and its own loss over those
            (shift_labels, the labels already shifted), so Trainer's normalisation is untouched."""
            if self.logits_at_labels and "labels" in inputs:
                shifted = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
                keep = (shifted != -100).any(dim=0).nonzero().squeeze(1)
                inputs = {**inputs, "logits_to_keep": keep, "shift_labels": shifted[:, keep].contiguous()}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                # Raised before the optimizer step, so the weights (and every checkpoint) stay finite.
                raise NonFiniteLoss(str(self.state.global_step + 1))
            return loss

        def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
            if not self.args.should_save:
                return
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            tensors = {n: p.detach().to("cpu").contiguous() for n, p in self.model.named_parameters()
                       if p.requires_grad}
            save_file(tensors, os.path.join(output_dir, TRAINABLE_FILE), metadata={"format": "pt"})

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            tensors = load_file(os.path.join(resume_from_checkpoint, TRAINABLE_FILE))
            params = dict((model or self.model).named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
            if missing or set(tensors) - set(params):
                raise CliError(f"Checkpoint '{resume_from_checkpoint}' does not fit this model (missing "
                               f"{missing[:3]}). Was the run's config.yaml edited? Use --overwrite to start again.")
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value)

    return RunTrainer


def make_callbacks(examples_per_step: int, primary: str):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A tqdm bar over optimizer steps showing the latest loss and examples/s; validation results as lines."""

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            tty = sys.stderr.isatty()
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True, mininterval=0.5 if tty else 15, file=sys.stderr)
            self.start_step, self.start_time, self.loss = state.global_step, time.perf_counter(), None

        def _postfix(self, state):
            elapsed = max(time.perf_counter() - self.start_time, 1e-9)
            rate = (state.global_step - self.start_step) * examples_per_step / elapsed
            shown = {"ex/s": f"{rate:.1f}"}
            if self.loss is not None:
                shown = {"loss": f"{self.loss:.4f}", **shown}
            self.bar.set_postfix(shown, refresh=False)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self._postfix(state)
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                self.loss = logs["loss"]
                self._postfix(state)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.is_world_process_zero and metrics and hasattr(self, "bar"):
                shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()
                                  if k.startswith("eval_") and k[5:] in ("loss", "accuracy", "macro_f1", primary))
                if shown:  # the test evaluations after training are reported in the final table instead
                    self.bar.write(f"step {state.global_step}: validation {shown}")

        def on_train_end(self, args, state, control, **kwargs):
            if hasattr(self, "bar"):
                self.bar.close()

    class CheckpointMarker(TrainerCallback):
        """Marks a checkpoint complete once Trainer has written all of it (model, optimizer, RNG, state)."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                launch.record(folder, args.world_size, args.per_device_train_batch_size,
                              args.gradient_accumulation_steps)
                rundir.atomic_write_text(folder / rundir.COMPLETE_MARKER, f"{state.global_step}\n")

    return [Progress(), CheckpointMarker()]


def training_arguments(config: dict[str, Any], run_dir: Path, for_training: bool = True, loss_only: bool = False):
    """transformers' TrainingArguments of the recipe. loss_only: the task evaluates its loss only (causal LMs)."""
    from transformers import TrainingArguments

    cpu_processes = launch.world_size() > 1 and not torch.cuda.is_available()
    settings = dict(
        output_dir=str(rundir.checkpoints_dir(run_dir)),
        per_device_train_batch_size=config["train.batch_size"],
        per_device_eval_batch_size=config["train.eval_batch_size"],
        gradient_accumulation_steps=config["train.grad_accum_steps"],
        learning_rate=float(config["train.lr"]),
        weight_decay=float(config["train.weight_decay"]),
        num_train_epochs=float(config["train.epochs"]),
        max_steps=config["train.max_steps"],
        lr_scheduler_type=config["train.scheduler"],
        warmup_steps=float(config["train.warmup_ratio"]) if config["train.warmup_steps"] is None
        else config["train.warmup_steps"],
        bf16=config["train.precision"] == "bf16", fp16=config["train.precision"] == "fp16",
        max_grad_norm=float(config["train.max_grad_norm"]),
        eval_strategy=config["train.eval_strategy"] if for_training else "no", eval_steps=config["train.eval_every"],
        # Validating per epoch also checkpoints at each epoch end, after that validation: a checkpoint written
        # mid-way (before it) would lose the epoch's result on resume, and with it the best-epoch report.
        save_strategy="epoch" if config["train.eval_strategy"] == "epoch" else "steps",
        save_steps=config["train.save_every"],
        save_total_limit=config["train.keep_checkpoints"],
        logging_strategy="steps", logging_steps=config["train.log_every"], logging_nan_inf_filter=False,
        seed=config["train.seed"], data_seed=config["train.seed"],
        report_to="none", disable_tqdm=True, remove_unused_columns=False, label_names=["labels"],
        prediction_loss_only=loss_only, dataloader_num_workers=0,
        # Several processes on CPU (torchrun): accelerate wraps the model in DDP only when told the run is on CPU;
        # without use_cpu every process silently trained its own copy. gloo: NCCL is for GPUs only.
        use_cpu=cpu_processes, ddp_backend="gloo" if cpu_processes else None,
    )
    try:
        return TrainingArguments(**settings)
    except ValueError as e:  # recipe.validate checks every key first; this names what transformers still refuses
        raise CliError(f"transformers refuses the training settings of this recipe (train.*): {e}") from None


