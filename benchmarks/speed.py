"""Speed and memory of NEAT against peft's LoRA and peft's PEANuT, measured side by side in ONE process.

    python -m benchmarks.speed                       # d = 384, 768, 2048 (about 10 minutes on 2 CPU cores)
    python -m benchmarks.speed --quick               # tiny sizes, a few seconds (what the tests run)
    python -m benchmarks.speed --json out.json --markdown docs/speed.md
    python -m benchmarks.speed --from-json out.json --markdown docs/speed.md   # regenerate the page only

Every method runs on the same randomly initialised BERT-shaped encoder (transformers BertModel: hidden d,
intermediate 4d, d/64 heads), the same batch and the same classification head; the frozen weights are one
set of tensors shared by all methods. Adapters: q + v ("query", "value"), r = 8, no dropout.

Training step = zero_grad + forward + cross-entropy + backward + AdamW step. Methods:
  floor   no adapter; only the head and the biases of the q and v layers train, so backward runs through
          the same layers as with q/v adapters (what any adapter must pay at least)
  lora    peft LoraConfig(r=8, lora_alpha=8)          peanut  peft PeanutConfig(r=8)
  neat    neat_peft NeatConfig(r=8)
Times: median over `repeats` rounds after `warmup` rounds; in every round each method runs once, and the
order rotates from round to round, so machine noise (a shared machine) hits all methods alike. Ratios are
ratios of the medians; the spread of the per-round ratios is printed as a noise gauge.

Peak memory (CPU): PyTorch's CPU allocator reports every allocation and free to the profiler when
`profile_memory=True`; we run one training step under it (after warm-up, grads freed, optimizer state
already allocated) and take the maximum of the allocator's running total: "step" = the peak of what the
step allocates on top of what is resident (activations, gradients, temporaries such as PEANuT's dW).
"total" adds the resident tensors (parameters, buffers, optimizer state; each storage counted once).
Allocations made by BLAS/oneDNN outside PyTorch's allocator are not seen (the same for every method).

Inference (eval, no_grad, batch 1 and 32): base model, LoRA and PEANuT unmerged, NEAT unmerged with its
eval cache of H, NEAT unmerged with the cache cleared before each call (what the cache saves), and NEAT
merged (merge_and_unload) against the base model. Before inference NEAT's B is set to random values so the
update is far from zero, and the script checks that merged weights equal W0 + dW (dW from the formula,
in float64) and that merged outputs equal the unmerged ones.
"""


from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.machine import machine_info, versions
from benchmarks.speed_measure import (COMPARE, RANK, TARGET_MODULES, bench_infer, bench_train, load_compare_package, make_base,
                           plan_for, profile_adapted_layer)
from benchmarks.speed_render import render_markdown, render_text
from benchmarks.speed_targets import evaluate_targets
from neat_peft.cli.compare import load_average


def run(args) -> dict:
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    report = {
        "command": "python -m benchmarks.speed " + shlex.join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {"clock": args.clock, "train_only": args.train_only, "compare_src": str(args.compare_src) if args.compare_src else None,
                     "compare_label": args.compare_label, "warmup": args.warmup, "infer_warmup": args.infer_warmup, "repeats": args.repeats, "seed": args.seed, "rank": RANK, "quick": args.quick,
                     "targets": TARGET_MODULES},
        "results": [],
    }
    for d in args.d:
        plan = plan_for(d, args)
        log(f"d={d}: {plan}")
        base = make_base(plan, args.seed)
        torch.manual_seed(args.seed + 6)
        head = nn.Linear(d, 2)
        train, trained = bench_train(plan, base, head, args, log)
        infer = None if args.train_only else bench_infer(plan, base, trained, args, log)
        entry = {"plan": plan, "train": train, "infer": infer, "targets": evaluate_targets(d, train, infer, args.clock)}
        if args.profile:
            log("  profiling one adapted layer")
            entry["layer_profile"] = profile_adapted_layer(plan, args.seed)
        report["results"].append(entry)
        del base, trained
        gc.collect()
    report["machine"]["load_average_end"] = load_average()
    report["wall_s"] = time.perf_counter() - start
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (d=64,128; 2 layers; batch 2x16)")
    parser.add_argument("--d", type=int, nargs="+", help="hidden sizes (default 384 768 2048; quick: 64 128)")
    parser.add_argument("--layers", type=int, help="encoder layers (default 4; 2 for d >= 1536)")
    parser.add_argument("--batch", type=int, help="training batch size (default 8)")
    parser.add_argument("--seq", type=int, help="sequence length (default 128; inference 32 for d >= 1536)")
    parser.add_argument("--no-reduce", action="store_true", help="no size reduction for wide models")
    parser.add_argument("--warmup", type=int, default=2, help="training warm-up rounds (default 2)")
    parser.add_argument("--infer-warmup", type=int, default=1, help="inference warm-up rounds (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, at least 5 (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--profile", action="store_true",
                        help="also run torch.profiler on one adapted layer per method and list its costliest ops")
    parser.add_argument("--compare-src", type=Path,
                        help=f"also train NEAT from the neat_peft package under this directory (method {COMPARE!r}), "
                             "interleaved with the others: the effect of a change to the package, measured side by side")
    parser.add_argument("--compare-label", default="", help="what --compare-src holds, for the report")
    parser.add_argument("--train-only", action="store_true", help="skip the inference measurements")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="which time the PASS/MISS marks use: wall (default) or process CPU time (a shared "
                             "machine; use with --threads 1); both are always reported")
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--markdown", type=Path, help="write a Markdown report generated from the results here")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="do not measure: render --markdown from these JSON files (the first is the main run, "
                             "the others are appended as further runs)")
    args = parser.parse_args(argv)
    if args.d is None:
        args.d = [64, 128] if args.quick else [384, 768, 2048]
    if any(d <= 0 or d % 64 for d in args.d):
        parser.error(f"--d values must be positive multiples of 64 (heads of width 64), got {args.d}")
    if args.repeats < 5 and not args.quick:
        parser.error("--repeats must be at least 5 (medians of fewer are too noisy); --quick allows fewer")
    if args.repeats < 1 or args.warmup < 0 or args.infer_warmup < 1:
        parser.error("--repeats must be >= 1, --warmup >= 0 and --infer-warmup >= 1 (it fills NEAT's cache)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_src and not args.from_json:
        load_compare_package(args.compare_src)
    if args.from_json:
        if not args.markdown:
            raise SystemExit("--from-json needs --markdown PATH (the page to write)")
        reports = [json.loads(path.read_text()) for path in args.from_json]
    else:
        reports = [run(args)]
        print(render_text(reports[0]))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(reports[0], indent=1))
    if args.markdown:
        pages = [render_markdown(reports[0])]
        if args.from_json:
            pages[0] = pages[0].replace("- Command:", f"- Data: {', '.join(f'`{p}`' for p in args.from_json)} "
                                        "(regenerate this page with `--from-json` and these files)\n- Command:", 1)
        for i, report in enumerate(reports[1:], start=2):
            # A further run: its headings one level down, under a heading of its own.
            body = render_markdown(report).split("\n", 1)[1]
            body = "\n".join("#" + line if line.startswith("#") else line for line in body.splitlines())
            pages.append(f"## Run {i}: `{report['command']}`\n{body}")
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n\n".join(pages) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

