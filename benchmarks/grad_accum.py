"""Does computing NEAT's H once per optimizer step pay off under gradient accumulation?

H = act(W0^T A^T) depends only on W0 and the adapter weights, which do not change between the micro-batches of
one optimizer step. Two ways to train with K micro-batches per step:

  recompute  (what NeatLayer does)  every micro-batch computes H and backpropagates through it:
             K x (forward W0^T A^T + its backward for A), ~4 d_in d_out r FLOPs each, per adapted layer.
  once       H is computed once per step; the micro-batches use a detached copy H' (a leaf) and accumulate
             dL/dH' into H'.grad; at the end of the step one backward pushes H'.grad through the real H graph.
             The gradients are the same sum (the chain rule is linear in dL/dH).

Saving: (K-1)/K of the H work, which is ~r/N of the frozen layers' work for N tokens per micro-batch. This script
measures both on a BERT-shaped random model, side by side in one run (interleaved repeats; the fastest of each
is reported, the least disturbed by other processes on a shared machine), checks that
both give the same adapter weights after a step, and prints the ratios.

    PYTHONPATH=src python -m benchmarks.grad_accum                       # defaults: d=768, 4 layers, q+v, r=8, K=4
    PYTHONPATH=src python -m benchmarks.grad_accum --shapes 8x128 1x16 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch


def build(hidden: int, layers: int, r: int, seed: int = 0):
    import transformers

    from neat_peft import NeatConfig, get_neat_model

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                                     max_position_embeddings=512, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    base = transformers.BertModel(config, add_pooling_layer=False)
    # B != 0 so that every adapter tensor gets a gradient from the first step on, like mid-training.
    return get_neat_model(base, NeatConfig(r=r, target_modules=["query", "value"], init_weights=False))


@contextlib.contextmanager
def factors_once_per_step(model):
    """Inside the block every NeatLayer uses (down, up) computed once, as leaves that accumulate their gradient;
    on leaving it, one backward sends the accumulated gradient through the real factors to the adapter weights."""
    pending = []  # (factor with a graph, its detached leaf)
    patched = []
    for _, layer in model.neat_layers():
        fixed = {}
        for name in layer.active_adapters:
            factors = layer.factors(name)
            leaves = tuple(f.detach().requires_grad_() if f.grad_fn is not None else f for f in factors)
            pending += [(f, leaf) for f, leaf in zip(factors, leaves) if leaf is not f]
            fixed[name] = leaves
        layer.factors = fixed.__getitem__  # an instance attribute shadows the method (the forward calls factors(name))
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.factors
    with_grad = [(f, leaf.grad) for f, leaf in pending if leaf.grad is not None]
    if with_grad:
        torch.autograd.backward([f for f, _ in with_grad], [g for _, g in with_grad])


def optimizer_step(model, optimizer, micro_batches, once: bool) -> None:
    optimizer.zero_grad(set_to_none=True)
    context = factors_once_per_step(model) if once else contextlib.nullcontext()
    with context:
        for input_ids, probe in micro_batches:
            hidden = model(input_ids=input_ids).last_hidden_state
            ((hidden @ probe).pow(2).mean() / len(micro_batches)).backward()
    optimizer.step()


def time_factors(model, repeats: int) -> float:
    """Fastest seconds of computing every adapted layer's H and backpropagating into the adapter weights: the work
    'once' saves K-1 times per optimizer step. Measured alone, it is far less noisy than the step difference."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        total = sum(layer.factors(name)[0].sum() for _, layer in model.neat_layers() for name in layer.active_adapters)
        total.backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return min(times[1:])


def make_batches(accum: int, batch: int, seq: int, hidden: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 1000, (batch, seq), generator=generator), torch.randn(hidden, generator=generator))
            for _ in range(accum)]


def gradient_difference(hidden, layers, r, accum) -> tuple[float, float]:
    """(max |difference|, max |value|) of the accumulated adapter gradients of one step done both ways."""
    results = []
    for once in (False, True):
        model = build(hidden, layers, r)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        optimizer_step(model, optimizer, make_batches(accum, 2, 16, hidden, seed=1), once)
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    difference = max((results[0][n] - results[1][n]).abs().max().item() for n in results[0])
    return difference, max(g.abs().max().item() for g in results[0].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step (K)")
    parser.add_argument("--shapes", nargs="+", default=["8x128", "2x32", "1x8"],
                        help="micro-batch shapes BATCHxSEQ")
    parser.add_argument("--repeats", type=int, default=3, help="timed optimizer steps per method and shape")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; BERT-shaped random model d={args.hidden}, "
          f"{args.layers} layers, NEAT r={args.r} on query+value, K={args.accum} micro-batches per optimizer step")
    difference, scale = gradient_difference(args.hidden, args.layers, args.r, args.accum)
    print(f"same gradients both ways: max |difference| {difference:.1e} (max |gradient| {scale:.1e})")

    model = build(args.hidden, args.layers, args.r)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    h_seconds = time_factors(model, max(args.repeats, 5))
    print(f"H forward+backward, all {sum(1 for _ in model.neat_layers())} adapted layers: {1e3 * h_seconds:.1f} ms "
          f"per micro-batch")
    print(f"{'micro-batch':>12} {'tokens':>7} {'recompute ms':>13} {'once ms':>9} {'once/recompute':>15} "
          f"{'expected from H':>16}")
    for shape in args.shapes:
        batch, seq = (int(v) for v in shape.split("x"))
        batches = make_batches(args.accum, batch, seq, args.hidden, seed=2)
        for once in (False, True):  # warm-up
            optimizer_step(model, optimizer, batches, once)
        times = {False: [], True: []}
        for repeat in range(args.repeats):
            for once in ((False, True) if repeat % 2 == 0 else (True, False)):  # interleaved, alternating order
                start = time.perf_counter()
                optimizer_step(model, optimizer, batches, once)
                times[once].append(time.perf_counter() - start)
        recompute, once = min(times[False]), min(times[True])
        expected = 1 - (args.accum - 1) * h_seconds / recompute  # the ratio if only H's work were saved
        print(f"{shape:>12} {batch * seq:>7} {1e3 * recompute:>13.1f} {1e3 * once:>9.1f} {once / recompute:>15.3f} "
              f"{expected:>16.3f}")


if __name__ == "__main__":
    main()
