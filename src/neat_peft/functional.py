"""The NEAT math, in one place.

NEAT (arXiv 2410.01870) adapts a frozen weight W0 (nn.Linear layout: d_out x d_in) with a small network
that reads W0 itself. Every row of the network's input matrix X goes through

    h = act(x A^T);   k residual pairs:  for i < k: save h, h = act(enc_i h)
                                         for i < k: h = act(dec_i h) + saved[k-1-i]

and the update is the rank-r product

    axis "out":  X = W0^T (d_in rows of length d_out),  H = net(W0^T) in R^{d_in x r},  B in R^{d_out x r}
                 dW = s * B H^T                          (peft's PEANuT and the authors' GLUE/ViT code)
    axis "in":   X = W0   (d_out rows of length d_in),  G = net(W0)   in R^{d_out x r}, B in R^{d_in x r}
                 dW = s * G B^T                          (the authors' LLM code)

Both are written as dW = s * up @ down^T with down in R^{d_in x r} and up in R^{d_out x r}, so a layer
only ever computes s * (x @ down) @ up^T: the d_out x d_in matrix dW is never built in the forward pass.
The same pair is an exact rank-r LoRA: lora_A = down^T, lora_B = s * up, scaling 1.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# Activations that need no third-party package. Anything else is looked up in transformers' ACT2FN.
_BUILTIN_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU, the same function as transformers' ACT2FN["gelu"]
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda t: t,
    "linear": lambda t: t,
    "sin": torch.sin,  # the sinusoid the paper also tried
}

# Built-in names that transformers' ACT2FN lacks: peft's PeanutConfig refuses them, so an adapter using one
# is not written in peft's format. (Every other built-in name is the same function as ACT2FN's.)
NON_ACT2FN_ACTIVATIONS = frozenset({"identity", "sin"})


def known_activation_names() -> list[str]:
    """Activation names accepted by `get_activation`."""
    names = set(_BUILTIN_ACTIVATIONS)
    try:
        from transformers.activations import ACT2FN

        names |= set(ACT2FN)
    except ImportError:
        pass
    return sorted(names)


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the activation function called `name` (raises ValueError for an unknown name)."""
    if name in _BUILTIN_ACTIVATIONS:
        return _BUILTIN_ACTIVATIONS[name]
    try:
        from transformers.activations import ACT2FN
    except ImportError:
        raise ValueError(
            f"Unknown act_fn {name!r}. Built in: {sorted(_BUILTIN_ACTIVATIONS)}; install transformers for the "
            "names of transformers.activations.ACT2FN."
        ) from None
    if name not in ACT2FN:
        raise ValueError(f"Unknown act_fn {name!r}. Choose one of: {known_activation_names()}.")
    return ACT2FN[name]


def weight_network(
    rows: torch.Tensor,
    A: torch.Tensor,
    encoders: Sequence[torch.Tensor],
    decoders: Sequence[torch.Tensor],
    act: Callable[[torch.Tensor], torch.Tensor],
    on_columns: bool = False,
) -> torch.Tensor:
    """Pass each row of `rows` (n x m) through NEAT's network; A is r x m, encoders/decoders are r x r.

    The network is row-wise, so net(rows)[i] depends on rows[i] alone (used to adapt an embedding
    by running only the looked-up rows). With on_columns=True, `rows` is m x n (one input per column)
    and the result is r x n: weight_network(X.t()).t(), computed as W @ h so X is read as stored.
    """
    h = act(A @ rows if on_columns else F.linear(rows, A))
    saved = []
    for enc in encoders:
        saved.append(h)
        h = act(enc @ h if on_columns else F.linear(h, enc))
    for i, dec in enumerate(decoders):
        h = act(dec @ h if on_columns else F.linear(h, dec)) + saved[len(decoders) - 1 - i]
    return h


def low_rank_factors(
    W0: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    encoders: Sequence[torch.Tensor],
    decoders: Sequence[torch.Tensor],
    act: Callable[[torch.Tensor], torch.Tensor],
    axis: str,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (down, up), d_in x r and d_out x r, with dW = scaling * up @ down^T.

    W0 is d_out x d_in. It is cast to A's dtype, so a bf16 base with fp32 adapters computes in fp32.
    normalize=True divides W0 by its root-mean-square first (see NeatConfig.normalize_weight).
    """
    W0 = W0.to(A.dtype)
    if normalize:
        W0 = normalize_weight(W0)
    if axis == "out":
        # net(W0^T)^T computed as act(A @ W0): W0 is read as stored. A matmul with the transposed view W0.t() ran
        # several times slower on CPU, in the forward and in A's gradient (benchmarks/speed.py, profile table).
        return weight_network(W0, A, encoders, decoders, act, on_columns=True).t(), B
    if axis == "in":
        return B, weight_network(W0, A, encoders, decoders, act)
    raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")


def rms(W0: torch.Tensor) -> torch.Tensor:
    """Root-mean-square of W0's entries (a constant: no gradient flows through it)."""
    return W0.detach().pow(2).mean().sqrt().clamp_min(torch.finfo(W0.dtype).tiny)


def normalize_weight(W0: torch.Tensor) -> torch.Tensor:
    """W0 / rms(W0): the network then sees inputs of unit scale whatever the layer's init."""
    return W0 / rms(W0)


def delta_weight(down: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
    """The materialised d_out x d_in update. Only merging and tests should need it."""
    return scaling * (up @ down.t())


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """PyTorch's default nn.Linear init (Kaiming uniform, a = sqrt(5)), as peft's PEANuT uses."""
    return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
