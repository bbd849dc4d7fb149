"""`neat-peft train`: one pipeline for every task and method, on transformers' Trainer.

Trainer brings checkpointing, resuming (optimizer, scheduler, RNG and data position) and multi-process runs
(torchrun / accelerate launch). This module adds: separate learning rates for adapter and head, checkpoints
holding only the trainable tensors (safetensors), a completion marker per checkpoint (a SIGKILL mid-save
never leaves a checkpoint that --resume would pick), a stop on the first non-finite loss, and the progress
bar (loss and throughput).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import data as data_mod
from . import features, launch, models, recipe, report, rundir, tasks
from .errors import CliError, describe_os_error

TRAINABLE_FILE = rundir.TRAINABLE_FILE
# Testing hook: SIGKILL this process right after the checkpoint of this step is complete (resume tests).
KILL_ENV = "NEAT_PEFT_SIGKILL_AFTER_CHECKPOINT"


class NonFiniteLoss(CliError):
    pass


def make_trainer_class():
    from safetensors.torch import load_file, save_file
    from transformers import Trainer

    class RunTrainer(Trainer):
        """Trainer with per-group learning rates, trainable-only checkpoints and a non-finite-loss stop."""

        def __init__(self, *args, heads: list[str], head_lr: float, sums_loss: bool = False, **kwargs):
            self.heads, self.head_lr = heads, head_lr
            super().__init__(*args, **kwargs)
            if not sums_loss:
                # Classification losses are per-batch means: Trainer must not rescale them by the number of
                # processes (it does so for models that accept **kwargs, e.g. any wrapper, under DDP).
                self.model_accepts_loss_kwargs = False

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
                head = [p for n, p in named if models.is_head_param(n, self.heads)]
                body = [p for n, p in named if not models.is_head_param(n, self.heads)]
                groups = [{"params": g, "lr": lr} for g, lr in ((body, self.args.learning_rate),
                                                               (head, self.head_lr)) if g]
                self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate,
                                                   weight_decay=self.args.weight_decay)
            return self.optimizer

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
            if os.environ.get(KILL_ENV) == str(state.global_step):
                os.kill(os.getpid(), signal.SIGKILL)

    return [Progress(), CheckpointMarker()]


def build_datasets(config: dict[str, Any], splits: data_mod.Splits, tokenizer):
    """{split: Dataset} and the collator for the task."""
    task = config["task"]
    if tasks.handles(config):
        return tasks.build_datasets(config, splits, tokenizer)
    if task == "text-classification":
        from transformers import DataCollatorWithPadding

        sets = {k: features.classification_dataset(v, tokenizer, splits.labels, config["data.max_length"])
                for k, v in splits.rows.items()}
        return sets, DataCollatorWithPadding(tokenizer)
    if task == "causal-lm":
        sets = {k: features.causal_lm_dataset(v, tokenizer, config["data.max_length"]) for k, v in splits.rows.items()}
        return sets, features.causal_lm_collator(tokenizer)
    folder = Path(splits.info["folder"])
    arrays = {part: data_mod.load_images(folder, part) for part in ("train", "test")}
    sets = {}
    for k, rows in splits.rows.items():
        part = "test" if k == "test" else "train"
        images, labels = arrays[part]
        sets[k] = features.ImageDataset(images, labels, [r["index"] for r in rows], config["data.image_size"])
    return sets, features.image_collate


def label_ids(dataset) -> list[int]:
    if isinstance(dataset, features.ImageDataset):
        return [int(dataset.labels[j]) for j in dataset.indices]
    return [it["labels"] for it in dataset.items]


def training_arguments(config: dict[str, Any], run_dir: Path, for_training: bool = True):
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
        prediction_loss_only=config["task"] in ("causal-lm", tasks.QA), dataloader_num_workers=0,
        # Several processes on CPU (torchrun): accelerate wraps the model in DDP only when told the run is on CPU;
        # without use_cpu every process silently trained its own copy. gloo: NCCL is for GPUs only.
        use_cpu=cpu_processes, ddp_backend="gloo" if cpu_processes else None,
    )
    try:
        return TrainingArguments(**settings)
    except ValueError as e:  # recipe.validate checks every key first; this names what transformers still refuses
        raise CliError(f"transformers refuses the training settings of this recipe (train.*): {e}") from None


def describe_data(config: dict[str, Any], splits: data_mod.Splits) -> str:
    info = splits.info
    used, available = info["used"], info["available"]
    parts = [f"{used[k]:,} of {available[k]:,} {k}" for k in data_mod.SPLITS]
    cleaning = ""
    if "rows_read" in info:
        cleaning = (f"{info['rows_read']:,} rows read, {info.get('rows_empty_dropped', 0):,} empty dropped, "
                    f"{info.get('duplicates_dropped', 0):,} duplicate inputs dropped; ")
    subset = " (a seeded stratified subset; data.max_*_examples=null uses all)" if any(
        used[k] < available[k] for k in data_mod.SPLITS) else ""
    return f"data: {info['source']}: {cleaning}using {', '.join(parts)} examples{subset}"


def check_resume_config(saved: dict[str, Any], new: dict[str, Any], given: bool, run_dir: Path) -> None:
    if not given:
        return
    differ = [k for k in recipe.KEYS if saved.get(k) != new.get(k) and k != "output.dir"]
    if differ:
        shown = "; ".join(f"{k}: run has {saved.get(k)!r}, now {new.get(k)!r}" for k in differ[:6])
        raise CliError(f"--resume continues the run in '{run_dir}' with its own recipe, but the recipe given now "
                       f"differs ({shown}). Drop --config and the overrides to resume as it was, or use --overwrite "
                       "to start a new run with the new recipe.")


def choose_checkpoint(run_dir: Path, announce) -> Optional[Path]:
    """The newest checkpoint of `run_dir` that loads; each newer one skipped is announced with its reason."""
    checkpoint, skipped = rundir.resume_checkpoint(run_dir)
    for folder, why in skipped:
        announce(f"--resume: skipping {folder.name}: {why}.")
    return checkpoint


def remove_newer_checkpoints(run_dir: Path, checkpoint: Optional[Path]) -> None:
    """Delete the (skipped) checkpoints after the one resumed from: Trainer saves those steps again, and new
    files must not land beside a damaged checkpoint's old ones."""
    start = rundir.checkpoint_step(checkpoint) if checkpoint else -1
    folder = rundir.checkpoints_dir(run_dir)
    for path in (folder.iterdir() if folder.is_dir() else []):
        step = rundir.checkpoint_step(path)
        if step is not None and step > start:
            shutil.rmtree(path)


def _stopped(run_dir: Path, why: str) -> CliError:
    last = rundir.last_complete_checkpoint(run_dir)
    kept = f"The last complete checkpoint, {last.name}, is kept" if last else "No checkpoint had been written yet"
    return CliError(f"Training stopped: {why} {kept}; continue with `neat-peft train -o {run_dir} --resume` "
                    "once that is fixed.")


def run_train(config_path: Optional[str], overrides: list[str], output_dir: Optional[str], resume: bool,
              overwrite: bool) -> dict[str, Any]:
    """The whole `train` command. Everything that can fail on bad input fails before the run directory changes."""
    import transformers

    config = recipe.resolve(config_path, overrides, output_dir)
    run_dir = Path(config["output.dir"])
    args = training_arguments(config, run_dir)
    main = args.process_index == 0

    def announce(text: str) -> None:
        if main:
            print(text, flush=True)

    if main:
        mode = rundir.prepare(run_dir, resume, overwrite, dry_run=True)
    else:  # other ranks of a torchrun launch: rank 0 checks (and may already be writing) the directory
        mode = "resume" if resume else "fresh"
    checkpoint = None
    if mode == "resume":
        saved = recipe.load_resolved(run_dir / "config.yaml")
        check_resume_config(saved, config, bool(config_path or overrides), run_dir)
        config = saved
        config["output.dir"] = str(run_dir)
        args = training_arguments(config, run_dir)
        checkpoint = choose_checkpoint(run_dir, announce)
        launch.check_resume(checkpoint, run_dir, config, args.world_size)
        splits = data_mod.read_splits(run_dir)
    elif tasks.handles(config):
        splits = tasks.build_splits(config)
    elif config["task"] == "image-classification":
        splits = data_mod.build_image_splits(config)
    else:
        splits = data_mod.build_text_splits(config)
    if config["train.threads"] is not None:
        torch.set_num_threads(config["train.threads"])
    transformers.set_seed(config["train.seed"])
    tokenizer = None if config["task"] == "image-classification" else models.load_tokenizer(config)
    model = models.load_base_model(config, splits.labels)
    model, method_info = models.apply_method(model, config)
    datasets, collator = build_datasets(config, splits, tokenizer)

    # Inputs are good: only now touch the run directory.
    if main:
        try:
            rundir.prepare(run_dir, resume, overwrite)
            if mode == "fresh":
                with rundir.writing(run_dir, "split"):
                    data_mod.write_splits(run_dir, splits)
                with rundir.writing(run_dir, "config.yaml"):  # written last: it marks the start complete
                    rundir.atomic_write_text(run_dir / "config.yaml", recipe.dump(config))
                rundir.claim(run_dir, "checkpoints")  # Trainer creates the folder when it is built
            else:
                remove_newer_checkpoints(run_dir, checkpoint)
        except OSError as e:
            if mode == "fresh" and rundir.read_marker(run_dir) is not None:
                with contextlib.suppress(OSError):
                    rundir.discard(run_dir)  # the next run would remove it anyway; a clean folder is clearer
            raise CliError(f"Could not set up the run in '{run_dir}'. {describe_os_error(e)} Nothing of yours "
                           "was changed; run the command again once that is fixed.") from None

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    announce(f"run directory: {run_dir}" + (f" (resuming from {checkpoint.name})" if checkpoint else
                                            " (resuming: no complete checkpoint, starting again)" if mode == "resume"
                                            else ""))
    announce(f"task: {config['task']}; model: {config['model.name']}; method: {config['method.name']}"
             + (f" (r={method_info['r']}, {method_info['targets']} adapted modules"
                + (f"; {method_info['matched']}" if "matched" in method_info else "") + ")"
                if "targets" in method_info else "")
             + f"; trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    announce(describe_data(config, splits))

    classification = config["task"] not in ("causal-lm", tasks.QA)
    n_classes = len(splits.labels)
    custom = tasks.handles(config)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return report.classification_metrics(logits, prediction.label_ids, n_classes)

    if custom:
        compute_metrics = tasks.metrics_fn(config, splits)

    examples_per_step = config["train.batch_size"] * config["train.grad_accum_steps"] * args.world_size
    trainer = make_trainer_class()(
        model=model, args=args, train_dataset=datasets["train"],
        eval_dataset=tasks.eval_dataset(datasets, splits) if custom else datasets["validation"],
        data_collator=collator, compute_metrics=compute_metrics if classification else None,
        callbacks=make_callbacks(examples_per_step, tasks.primary_metric(config) if custom else
                                 "accuracy" if classification else "loss"),
        heads=method_info["heads"], head_lr=float(config["train.head_lr"]), sums_loss=not classification,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # our Progress callback shows loss and validation results
    trainer.remove_callback(ProgressCallback)
    try:
        base_eval = _read_base_eval(run_dir) if mode == "resume" else None
        if not classification and not custom and base_eval is None:
            # Adapters start at zero, so before training every method computes the base model: its test loss.
            base_eval = trainer.evaluate(datasets["test"], metric_key_prefix="test")
            if main:
                with rundir.writing(run_dir, "base_model_eval.json"):
                    models.write_json(run_dir / "base_model_eval.json", base_eval)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - start
    except NonFiniteLoss as e:
        _close_bars(trainer)
        last = rundir.last_complete_checkpoint(run_dir)
        kept = f"The last good checkpoint, {last}, is kept" if last else "No checkpoint had been written yet"
        raise CliError(f"Training stopped: the loss became NaN or infinite at step {e}. {kept}; nothing was "
                       "saved after it. Lower train.lr / train.head_lr (or method.scaling) and start again with "
                       "--overwrite.") from None
    except OSError as e:
        _close_bars(trainer)
        raise _stopped(run_dir, describe_os_error(e)) from None

    # Test evaluation and what the run keeps.
    metrics: dict[str, Any] = {"method": config["method.name"], "task": config["task"], "model": config["model.name"],
                               "trainable_params": trainable, "total_params": total, "train_seconds": train_seconds,
                               "steps": trainer.state.global_step, "resumed_from": checkpoint.name if checkpoint else None,
                               "data": splits.info, "method_info": {k: v for k, v in method_info.items()}}
    if custom:
        metrics["test"] = tasks.test_report(trainer, datasets, config, splits, tokenizer)
        metrics["best_validation"] = tasks.best_validation(trainer.state.log_history, config, splits)
    elif classification:
        prediction = trainer.predict(datasets["test"], metric_key_prefix="test")
        metrics["test"] = {"accuracy": prediction.metrics["test_accuracy"],
                           "macro_f1": prediction.metrics["test_macro_f1"], "examples": len(datasets["test"])}
        train_labels = label_ids(datasets["train"])
        test_labels = list(prediction.label_ids)
        base = report.majority_baseline(train_labels, test_labels, n_classes)
        base["label"] = splits.labels[base["class"]]
        metrics["majority_baseline"] = base
    else:
        test = trainer.evaluate(datasets["test"], metric_key_prefix="test")
        metrics["test"] = {"loss": test["test_loss"], "perplexity": report.perplexity(test["test_loss"]),
                           "examples": len(datasets["test"])}
        if base_eval is not None:
            metrics["base_model"] = {"loss": base_eval["test_loss"],
                                     "perplexity": report.perplexity(base_eval["test_loss"])}
    primary = tasks.primary_metric(config) if custom else "accuracy" if classification else "loss"
    validation = [h for h in trainer.state.log_history if f"eval_{primary}" in h]
    metrics["validation_curve"] = [{"step": h["step"], primary: h[f"eval_{primary}"]} for h in validation]
    if custom:
        metrics["validation_curve"] = tasks.validation_curve(trainer.state.log_history, config, splits)
    if main:
        try:
            with rundir.writing(run_dir, "adapter", "model", "head.safetensors"):
                models.save_trained(trainer.model, config, run_dir, tokenizer)
            with rundir.writing(run_dir, "log_history.json", "training_curves.png", "metrics.json"):
                models.write_json(run_dir / "log_history.json", {"log_history": trainer.state.log_history})
                report.plot_curves(trainer.state.log_history, primary, run_dir / "training_curves.png",
                                   f"{config['model.name']} · {config['method.name']} · {config['data.source']}")
                models.write_json(run_dir / "metrics.json", metrics)  # written last: it marks the run finished
        except OSError as e:
            raise _stopped(run_dir, f"saving the trained run failed. {describe_os_error(e)}") from None
        print()
        print(tasks.final_table(metrics) if custom else report.final_table(metrics))
        print(f"\nsaved: {run_dir}/ (adapter or weights, config.yaml, metrics.json, training_curves.png, split/)")
    return metrics


def _close_bars(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        if hasattr(callback, "bar"):
            callback.bar.close()


def _read_base_eval(run_dir: Path) -> Optional[dict[str, Any]]:
    """The base model's test loss recorded by the run's start (None if absent or damaged: evaluated again)."""
    try:
        value = json.loads((run_dir / "base_model_eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and isinstance(value.get("test_loss"), float) else None
