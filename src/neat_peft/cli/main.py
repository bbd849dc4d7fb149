"""`neat-peft`: argument parsing and the subcommands. Errors the user can fix print one paragraph (exit 2)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import threading
from typing import Optional

from .errors import CliError, describe_os_error

DESCRIPTION = """\
Fine-tune a pre-trained model with NEAT (or LoRA, full fine-tuning, head-only) in one command.
With no arguments, `neat-peft train` fine-tunes MiniLM-L6 on a 3-class tweet-sentiment corpus with NEAT,
offline, in about 5 minutes on 2 CPU cores."""


def _train(args: argparse.Namespace) -> None:
    from .launch import finish
    from .train import run_train

    run_train(args.config, args.overrides, args.output_dir, args.resume, args.overwrite)
    finish()  # only once run_train's trainer and its DDP model are gone: see finish()


def _compare(args: argparse.Namespace) -> None:
    from .compare import run_compare

    try:
        run_compare(args.config, args.overrides, args.output_dir, args.methods, args.seeds, args.grid, args.workers,
                    args.budget_check, args.dry_run)
    except KeyboardInterrupt:  # not train's message: a compare continues with the same command, not --resume
        raise CliError("compare interrupted: the runs it finished are kept in compare.json; run the same command "
                       "again to continue (a run cut short is redone).") from None


def _eval(args: argparse.Namespace) -> None:
    import json

    from .commands import run_eval

    result = run_eval(args.run_dir, args.data)
    if args.json:
        print(json.dumps(result))


def _predict(args: argparse.Namespace) -> None:
    from .commands import run_predict

    run_predict(args.run_dir, args.inputs, args.max_new_tokens, args.json)


def _merge(args: argparse.Namespace) -> None:
    from .commands import run_merge

    run_merge(args.run_dir, args.out)


def _export_lora(args: argparse.Namespace) -> None:
    from .commands import run_export_lora

    run_export_lora(args.run_dir, args.out, args.gguf)


def _analyze(args: argparse.Namespace) -> None:
    from .analyze import run_analyze

    run_analyze(args.run_dir, args.compare, args.out)


def _recipe_keys(args: argparse.Namespace) -> None:
    from .recipe import explain

    print(explain())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neat-peft", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune a model (default: the embedded MiniLM-L6 sentiment run)",
                           description="Train from a YAML recipe plus section.key=value overrides, e.g. "
                                       "neat-peft train --config recipes/text_classification.yaml method.r=4. "
                                       "Run `neat-peft recipe-keys` for every key.")
    train.add_argument("--config", "-c", help="YAML recipe (default: the built-in text-classification run)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.lr=1e-3")
    train.add_argument("--output-dir", "-o", help="run directory (same as output.dir=...)")
    train.add_argument("--resume", action="store_true", help="continue the unfinished run in the run directory "
                       "from its newest checkpoint that loads")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in the run directory "
                       "(only the files that run wrote are removed)")
    train.set_defaults(func=_train)

    cp = sub.add_parser("compare", help="tune each method on validation, run it at paired seeds, and say where "
                        "the test difference is real (NEAT or LoRA for this task?)",
                        description="Each method: its learning-rate grid (NEAT: and s) tuned on validation at seed 0, "
                                    "extended past a best value at an edge; the chosen cell at N paired seeds; test. "
                                    "Writes DIR/compare.json (resumable: run the same command again) and "
                                    "DIR/report.md. See docs/compare.md.")
    cp.add_argument("--config", "-c", help="YAML recipe: the task, model and data (default: the built-in one)")
    cp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for every run")
    cp.add_argument("--output-dir", "-o", help="output folder: new, empty, or an earlier compare to continue "
                    "(default: runs/compare-<task>)")
    cp.add_argument("--methods", nargs="+", metavar="METHOD",
                    help="methods to compare: neat, lora, full, head-only, targets-only, or variants a --grid file "
                    "defines under `methods:`; the first is tested against each other one unless the grid file states "
                    "`pairs:` (default: the grid file's variants, else neat lora)")
    cp.add_argument("--seeds", type=int, default=3, help="paired seeds per method at its chosen cell (default 3)")
    cp.add_argument("--grid", default="default", help="quick (2 rates, s=1, 1 edge step), default (4 rates, "
                    "NEAT s in 0.1, 1; 2 edge steps) or a YAML file: `neat: {lr: [...], scaling: [...]}`, "
                    "`lora: {lr: [...]}`, `edge_steps: N`")
    cp.add_argument("--workers", type=int, default=1, help="runs at once (default 1); with more, each run gets "
                    "cores/workers torch threads unless the recipe sets train.threads")
    cp.add_argument("--budget-check", type=int, metavar="F", help="also train each chosen cell at seed 0 F times "
                    "longer: does the result still move with more training?")
    cp.add_argument("--dry-run", action="store_true", help="print the plan and the pilot's time estimate; "
                    "write nothing")
    cp.set_defaults(func=_compare)

    ev = sub.add_parser("eval", help="evaluate a finished run on its test split or on other data")
    ev.add_argument("run_dir")
    ev.add_argument("--data", help="a data file (or IDX folder) with the run's columns, instead of its test split")
    ev.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("predict", help="run a finished run's model on texts, prompts or image files")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", nargs="+", metavar="INPUT")
    pr.add_argument("--max-new-tokens", type=int, help="causal-lm and generative-qa: tokens to generate (default: "
                    "16 for causal-lm, the run's eval.max_new_tokens for generative-qa)")
    pr.add_argument("--json", action="store_true", help="one JSON object per input")
    pr.set_defaults(func=_predict)

    mg = sub.add_parser("merge", help="save the model with the adapter merged in (plain transformers model)")
    mg.add_argument("run_dir")
    mg.add_argument("out")
    mg.set_defaults(func=_merge)

    ex = sub.add_parser("export-lora", help="save a NEAT adapter as an exactly equivalent peft LoRA adapter")
    ex.add_argument("run_dir")
    ex.add_argument("out")
    ex.add_argument("--gguf", action="store_true",
                    help="also write OUT/adapter.gguf, a GGUF LoRA adapter for llama.cpp / Ollama (llama models)")
    ex.set_defaults(func=_export_lora)

    an = sub.add_parser("analyze", help="singular values, effective rank and |dW|/|W0| of a run's update per layer")
    an.add_argument("run_dir")
    an.add_argument("--compare", help="a second run (e.g. LoRA on the same task) shown side by side")
    an.add_argument("--out", help="output folder (default: RUN_DIR-analysis)")
    an.set_defaults(func=_analyze)

    keys = sub.add_parser("recipe-keys", help="list every recipe key with its default and meaning")
    keys.set_defaults(func=_recipe_keys, light=True)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def dispatch(args: argparse.Namespace) -> None:
    if not getattr(args, "light", False):
        try:
            import transformers  # noqa: F401
            import yaml  # noqa: F401
        except ImportError as e:
            raise CliError(f"The neat-peft command needs the training extras ({e.name} is missing): "
                           "pip install 'neat-peft[train]'.") from None
        _quiet_libraries()
    args.func(args)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `neat-peft` explains itself rather than starting a 5-minute run
        parser.print_help()
        return 0
    # SIGTERM (`kill`, a scheduler's time limit) stops a command as Ctrl-C does: runs and pilots it started are
    # stopped, its temporary folders removed, and it says how to continue. Restored after, for in-process callers.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main_thread else None
    try:
        dispatch(args)
    except (CliError, OSError) as e:
        # OSError: a file operation the command did not expect to fail (full disk, read-only folder, a file
        # removed under it); the commands turn the ones they expect into a CliError that says what was kept.
        message = str(e) if isinstance(e, CliError) else describe_os_error(e)
        sys.stdout.flush()
        print("\n".join(textwrap.wrap(f"error: {message}", width=100, break_long_words=False,
                                      break_on_hyphens=False)), file=sys.stderr)
        return e.exit_code if isinstance(e, CliError) else CliError.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: the last complete checkpoint is kept; continue with --resume.", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:  # None: the earlier handler was not set from Python (the default, as far as we know)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
