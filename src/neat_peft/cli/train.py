"""`neat-peft train`: one pipeline for every task and method: the recipe, the task (tasks.py), the engine
(trainer.py), and a run directory that is only touched once every input has been checked (rundir.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import data as data_mod
from . import launch, models, recipe, report, rundir, tasks, trainer as engine
from .errors import CliError, describe_os_error

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
    task = tasks.for_config(config)
    args = engine.training_arguments(config, run_dir, loss_only=task.loss_only)
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
        task = tasks.for_config(config)
        args = engine.training_arguments(config, run_dir, loss_only=task.loss_only)
        checkpoint = choose_checkpoint(run_dir, announce)
        launch.check_resume(checkpoint, run_dir, config, args.world_size)
        splits = data_mod.read_splits(run_dir)
    else:
        splits = task.build_splits()
    if config["train.threads"] is not None:
        torch.set_num_threads(config["train.threads"])
    transformers.set_seed(config["train.seed"])
    tokenizer = task.tokenizer()
    model = models.load_base_model(config, splits.labels)
    models.check_logits_to_keep(model, config)
    model, method_info = models.apply_method(model, config)
    datasets, collator = task.datasets(splits, tokenizer)

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
             + (f" ({method_info['targets']} layers trained in full)" if config["method.name"] == "targets-only"
                else f" (r={method_info['r']}, {method_info['targets']} adapted modules"
                + (f"; {method_info['matched']}" if "matched" in method_info else "") + ")"
                if "targets" in method_info else "")
             + f"; trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    announce(describe_data(config, splits))

    examples_per_step = config["train.batch_size"] * config["train.grad_accum_steps"] * args.world_size
    trainer = engine.make_trainer_class()(
        model=model, args=args, train_dataset=datasets["train"], eval_dataset=task.eval_dataset(datasets, splits),
        data_collator=collator, compute_metrics=task.compute_metrics(splits),
        callbacks=engine.make_callbacks(examples_per_step, task.primary_metric),
        heads=method_info["heads"], head_lr=float(config["train.head_lr"]),
        a_lr_ratio=float(config["method.a_lr_ratio"]), sums_loss=task.sums_loss,
        logits_at_labels=config["train.logits_to_keep"] == "labels",
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # our Progress callback shows loss and validation results
    trainer.remove_callback(ProgressCallback)
    try:
        before = _read_base_eval(run_dir) if mode == "resume" else None
        if before is None:
            before = task.before_training(trainer, datasets)
            if before is not None and main:
                with rundir.writing(run_dir, "base_model_eval.json"):
                    models.write_json(run_dir / "base_model_eval.json", before)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - start
    except engine.NonFiniteLoss as e:
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
    result: dict[str, Any] = {"method": config["method.name"], "task": config["task"], "model": config["model.name"],
                              "trainable_params": trainable, "total_params": total, "train_seconds": train_seconds,
                              "steps": trainer.state.global_step, "resumed_from": checkpoint.name if checkpoint else None,
                              "data": splits.info, "method_info": dict(method_info)}
    result.update(task.test_report(trainer, datasets, splits, tokenizer, before))
    result["validation_curve"] = task.validation_curve(trainer.state.log_history, splits)
    if main:
        try:
            with rundir.writing(run_dir, "adapter", "model", *rundir.TRAINED_FILES.values()):
                models.save_trained(trainer.model, config, run_dir, tokenizer)
            with rundir.writing(run_dir, "log_history.json", "training_curves.png", "metrics.json"):
                models.write_json(run_dir / "log_history.json", {"log_history": trainer.state.log_history})
                report.plot_curves(trainer.state.log_history, task.primary_metric, run_dir / "training_curves.png",
                                   f"{config['model.name']} · {config['method.name']} · {config['data.source']}")
                models.write_json(run_dir / "metrics.json", result)  # written last: it marks the run finished
        except OSError as e:
            raise _stopped(run_dir, f"saving the trained run failed. {describe_os_error(e)}") from None
        print()
        print(task.final_table(result))
        print(f"\nsaved: {run_dir}/ (adapter or weights, config.yaml, metrics.json, training_curves.png, split/)")
    return result


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
