"""`neat-peft train` throughput with 1 and 2 processes on this machine (CPU, torchrun, gloo).

The same small training run three ways, interleaved (the order rotates every repeat, so a burst of load from
other jobs does not land on one way only):

  1p x 1t   one process, one torch thread, batch 16
  1p x 2t   one process, two torch threads, batch 16
  2p x 1t   torchrun --nproc_per_node 2, one thread each, batch 8 per process (global batch 16)

All three train the same examples in the same global batches. Without dropout the 2-process run equals the
1-process one to fp32 tolerance (tests/test_cli_distributed.py); MiniLM keeps its dropout of 0.1 here, whose
masks are drawn per process, so "final loss" (the mean training loss over all steps) differs a little between
the 1- and 2-process runs and not at all between the 1-process ones. "train ex/s" is the
examples trained divided by the time `trainer.train` took (metrics.json's train_seconds: DDP setup and the
first step included, no evaluation or checkpoint inside it); "wall s" is the whole command (imports, data,
model loading, final test evaluation, writing the run). Prints every run and then the ratios.

    PYTHONPATH=src python -m benchmarks.ddp_throughput                 # MiniLM-L6, 20 steps of 16, 2 repeats
    PYTHONPATH=src python -m benchmarks.ddp_throughput --repeats 3 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAYS = {  # name -> (processes, threads per process)
    "1p x 1t": (1, 1),
    "1p x 2t": (1, 2),
    "2p x 1t": (2, 1),
}


def run_once(way: str, out: Path, args: argparse.Namespace) -> dict:
    processes, threads = WAYS[way]
    overrides = [f"model.name={args.model}", f"data.max_train_examples={args.steps * args.batch}",
                 "data.max_validation_examples=16", "data.max_test_examples=16", f"train.max_steps={args.steps}",
                 f"train.batch_size={args.batch // processes}", "train.eval_every=100000",
                 "train.save_every=100000", f"train.log_every={args.steps}", f"train.threads={threads}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run([*launcher, "-m", "neat_peft.cli.main", "train", "-o", str(out), *overrides],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{way} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "log_history.json").read_text())["log_history"]
    examples = metrics["steps"] * args.batch
    return {"way": way, "train_ex_s": examples / metrics["train_seconds"], "train_s": metrics["train_seconds"],
            "wall_s": wall, "final_loss": [h["loss"] for h in history if "loss" in h][-1], "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm-l6", help="model.name of the runs (default: the real MiniLM-L6)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over the processes)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, interleaved")
    args = parser.parse_args()
    if args.batch % 2:
        parser.error("--batch must be even (it is split over 2 processes)")
    names = list(WAYS)
    runs = []
    print(f"model {args.model}, {args.steps} steps x global batch {args.batch}, max_length 64, NEAT r=8 q+v + head; "
          f"{os.cpu_count()} CPUs")
    print(f"{'run':>3}  {'way':8}  {'train ex/s':>10}  {'train s':>7}  {'wall s':>6}  {'final loss':>10}  "
          f"{'load 1m':>7}")
    with tempfile.TemporaryDirectory(prefix="ddp_throughput_") as tmp:
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for way in order:
                r = run_once(way, Path(tmp) / f"{repeat}-{way.replace(' ', '')}", args)
                runs.append(r)
                print(f"{len(runs):>3}  {way:8}  {r['train_ex_s']:>10.1f}  {r['train_s']:>7.1f}  {r['wall_s']:>6.1f}  "
                      f"{r['final_loss']:>10.5f}  {r['load']:>7.2f}", flush=True)
    by_way = {w: [r for r in runs if r["way"] == w] for w in names}
    print("\nper way: train ex/s best / mean (wall s mean)")
    for w in names:
        rates = [r["train_ex_s"] for r in by_way[w]]
        print(f"  {w}: {max(rates):.1f} / {statistics.mean(rates):.1f}  "
              f"({statistics.mean(r['wall_s'] for r in by_way[w]):.1f} s)")

    def ratio(a: str, b: str, pick) -> float:
        return pick([r["train_ex_s"] for r in by_way[a]]) / pick([r["train_ex_s"] for r in by_way[b]])

    for a, b in (("2p x 1t", "1p x 1t"), ("2p x 1t", "1p x 2t"), ("1p x 2t", "1p x 1t")):
        print(f"ratio {a} / {b}: best {ratio(a, b, max):.2f}, mean {ratio(a, b, statistics.mean):.2f}")


if __name__ == "__main__":
    main()
