"""What one NeatLayer forward costs in Python: frames to the adapter's first matmul and Python calls per forward.

Counted with sys.setprofile on an nn.Linear (64 x 64, r=8) adapted by NEAT and, for reference, by peft's LoRA:

  frames to the matmul   library frames (neat_peft or peft, torch excluded) on the stack when the adapter's first
                         matmul runs, the layer's own forward counted (the base layer's matmul comes before it)
  calls train            Python function calls during one training-mode forward: in the library's files / in all
                         files (torch's included)
  calls cache hit        the same in eval mode under no_grad, H already cached (NEAT) -- what decoding pays

  us/step, step/lora     with --time D: CPU microseconds of one cached eval forward of a D x D layer on one token
                         (a decoding step), fastest of interleaved rounds, and its ratio to LoRA's

    PYTHONPATH=src python -m benchmarks.hot_path [--compare-src /tmp/old/src] [--time 576]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

def frames_at_first_matmul(layer: nn.Module, x: torch.Tensor, library: str) -> int:
    """Library frames on the Python stack when the adapter's first matmul runs (the base layer's comes first).

    A TorchDispatchMode sees every aten op, `@` included (sys.setprofile does not see operators)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[int] = []

    class Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "matmul", "linear", "embedding", "convolution"):
                depth, f = 0, sys._getframe(1)
                while f is not None:
                    depth += library in f.f_code.co_filename.replace("\\", "/")
                    f = f.f_back
                seen.append(depth)
            return func(*args, **(kwargs or {}))

    with Probe():
        layer(x)
    return seen[1]


def python_calls(layer: nn.Module, x: torch.Tensor, library: str) -> tuple[int, int]:
    """(Python calls in the library's files, Python calls in all files) during one forward."""
    calls = [0, 0]

    def profiler(frame, event, arg):
        if event == "call":
            calls[0] += library in frame.f_code.co_filename.replace("\\", "/")
            calls[1] += 1

    sys.setprofile(profiler)
    try:
        layer(x)
    finally:
        sys.setprofile(None)
    return calls[0], calls[1]


def neat_layer(package, d: int = 64):
    torch.manual_seed(0)
    model = package.get_neat_model(nn.Sequential(nn.Linear(d, d)), package.NeatConfig(r=8, target_modules=["0"]))
    return model.base_model[0]


def lora_layer(d: int = 64):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(nn.Sequential(nn.Linear(d, d)), LoraConfig(r=8, target_modules=["0"])).base_model.model[0]


def decode_step_times(layers: dict[str, nn.Module], d: int, calls: int, rounds: int) -> dict[str, float]:
    """{name: fastest microseconds per eval forward of one token (batch 1, no_grad, H cached)}, rounds interleaved."""
    x = torch.randn(1, 1, d)
    best = {name: float("inf") for name in layers}
    with torch.no_grad():
        for layer in layers.values():
            layer.eval()
            layer(x)
        for _ in range(rounds):
            for name, layer in layers.items():
                start = time.process_time()
                for _ in range(calls):
                    layer(x)
                best[name] = min(best[name], (time.process_time() - start) / calls * 1e6)
    return best


def measure(layer: nn.Module, library: str) -> dict[str, int]:
    x = torch.randn(1, 64)
    layer.train()
    layer(x)
    frames = frames_at_first_matmul(layer, x, library)
    train_own, train_all = python_calls(layer, x, library)
    layer.eval()
    with torch.no_grad():
        layer(x)  # fills the cache
        hit_own, hit_all = python_calls(layer, x, library)
    return {"frames to the matmul": frames, "calls train (lib/all)": f"{train_own}/{train_all}",
            "calls cache hit (lib/all)": f"{hit_own}/{hit_all}"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-src", type=Path, help="also count the neat_peft package under this src/ directory")
    parser.add_argument("--time", type=int, default=0, metavar="D",
                        help="also time one decoding step (batch 1, one token, cached H) of a D x D layer, "
                             "process CPU time, fastest of --rounds interleaved rounds of --calls calls")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    import neat_peft

    torch.set_num_threads(1)
    packages = {"neat": neat_peft}
    if args.compare_src:
        from benchmarks.speed_measure import load_compare_package

        packages["neat_compare"] = load_compare_package(args.compare_src)
    rows = {name: measure(neat_layer(package), "/neat_peft/") for name, package in packages.items()}
    rows["lora (peft)"] = measure(lora_layer(), "/peft/")
    if args.time:
        layers = {name: neat_layer(package, args.time) for name, package in packages.items()}
        layers["lora (peft)"] = lora_layer(args.time)
        times = decode_step_times(layers, args.time, args.calls, args.rounds)
        for name, us in times.items():
            rows[name][f"us/step d={args.time}"] = f"{us:.2f}"
            rows[name]["step/lora"] = f"{us / times['lora (peft)']:.3f}"
    print(f"  {'':<14}" + "".join(f"{k:>28}" for k in next(iter(rows.values()))))
    for name, row in rows.items():
        print(f"  {name:<14}" + "".join(f"{v:>28}" for v in row.values()))
    return rows


if __name__ == "__main__":
    main()
