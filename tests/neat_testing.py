"""Shared test helpers (imported by the tests; fixtures live in conftest.py): tiny models with every supported layer kind, and an independent reference for NEAT's update.

The reference below is written from the paper (arXiv 2410.01870) and peft's PEANuT structure, *not* from
neat_peft.functional, so tests compare the library against a second, materialised implementation:

    axis "out": X = W0^T (d_in x d_out)   H = net(X) (d_in x r)    dW = s * (H B^T)^T       (d_out x d_in)
    axis "in":  X = W0   (d_out x d_in)   G = net(X) (d_out x r)   dW = s * G B^T           (d_out x d_in)
    net(X): h = act(X A^T); for i < k: save h, h = act(h enc_i^T); for i < k: h = act(h dec_i^T) + saved[k-1-i]

and the adapted layer is the base layer with W0 replaced by W0 + dW (in the layer's stored layout).
"""

from __future__ import annotations

import copy
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)  # the machine is shared; tiny tensors gain nothing from threads

# Activations as the paper / torch define them, looked up independently of neat_peft's table.
REFERENCE_ACTIVATIONS = {
    "relu": lambda t: torch.clamp(t, min=0),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / 2**0.5)),
    "tanh": torch.tanh,
    "sin": torch.sin,
    "identity": lambda t: t,
    "silu": lambda t: t * torch.sigmoid(t),
    "sigmoid": torch.sigmoid,
}


def reference_network(X, A, encoders, decoders, act):
    """Run every row of X through NEAT's network, spelt out with explicit matrix products."""
    h = act(X @ A.t())
    saved = []
    for enc in encoders:
        saved.append(h)
        h = act(h @ enc.t())
    k = len(decoders)
    for i, dec in enumerate(decoders):
        h = act(h @ dec.t()) + saved[k - 1 - i]
    return h


def reference_delta_weight(W0, A, B, encoders, decoders, act_name, axis, scaling):
    """dW (d_out x d_in, nn.Linear layout) materialised from the pristine W0 (d_out x d_in)."""
    act = REFERENCE_ACTIVATIONS[act_name]
    if axis == "out":
        H = reference_network(W0.t(), A, encoders, decoders, act)  # d_in x r
        return scaling * (H @ B.t()).t()
    G = reference_network(W0, A, encoders, decoders, act)  # d_out x r
    return scaling * (G @ B.t())


def linear_layout(kind, weight):
    """W0 in nn.Linear layout (d_out x d_in) from a layer's stored weight."""
    if kind == "linear":
        return weight
    if kind == "conv2d":
        return weight.reshape(weight.shape[0], -1)
    return weight.t()  # conv1d (d_in x d_out) and embedding (n_tokens x dim)


def stored_layout(kind, delta, weight_shape):
    if kind == "linear":
        return delta
    if kind == "conv2d":
        return delta.reshape(weight_shape)
    return delta.t()


def reference_layer_output(kind, base_layer, weight, x):
    """The base layer's own operation, run with `weight` in place of its weight (bias etc. unchanged)."""
    if kind == "linear":
        return F.linear(x, weight, base_layer.bias)
    if kind == "conv1d":
        return x @ weight + base_layer.bias
    if kind == "embedding":
        return F.embedding(x, weight, base_layer.padding_idx)
    return F.conv2d(x, weight, base_layer.bias, base_layer.stride, base_layer.padding, base_layer.dilation)


def adapter_tensors(layer, name="default"):
    """(A, B, encoders, decoders) of one adapter of a NeatLayer, as tensors."""
    return (
        layer.neat_A[name].weight,
        layer.neat_B[name].weight,
        [m.weight for m in layer.neat_encoders[name]],
        [m.weight for m in layer.neat_decoders[name]],
    )


# --- tiny models -----------------------------------------------------------------------------------------
class TinyMLP(nn.Module):
    """Two hidden Linear layers and a head (d: 6 -> 5 -> 4 -> 3)."""

    def __init__(self, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(6, 5, bias=bias)
        self.fc2 = nn.Linear(5, 4, bias=bias)
        self.head = nn.Linear(4, 3, bias=bias)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.ffn = nn.Linear(d, d)

    def forward(self, x):
        return x + self.ffn(torch.tanh(self.query(x) * self.value(x)))


class TinyEncoder(nn.Module):
    """Embedding, a stack of blocks (`layers.<i>.query/value/ffn`), a classifier head."""

    def __init__(self, vocab=13, d=8, n_layers=2, n_classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.classifier = nn.Linear(d, n_classes)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.layers:
            h = block(h)
        return self.classifier(h.mean(dim=1))


class Single(nn.Module):
    """Wraps one layer under the name `layer`, so target_modules=["layer"] selects it."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def make_layer(kind, conv_kwargs=None):
    """A small base layer of `kind` with a non-trivial bias."""
    if kind == "linear":
        layer = nn.Linear(7, 5)
    elif kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(5, 7)  # nf=5 outputs, nx=7 inputs; weight stored 7 x 5
        nn.init.normal_(layer.weight, std=0.3)
        nn.init.normal_(layer.bias, std=0.3)
    elif kind == "embedding":
        layer = nn.Embedding(9, 5)
    elif kind == "conv2d":
        layer = nn.Conv2d(3, 4, kernel_size=3, **(conv_kwargs or {}))
    else:
        raise AssertionError(kind)
    return layer


def make_input(kind, batch=3, generator=None):
    g = generator
    if kind in ("linear", "conv1d"):
        return torch.randn(batch, 2, 7, generator=g)
    if kind == "embedding":
        return torch.randint(0, 9, (batch, 4), generator=g)
    return torch.randn(batch, 3, 8, 8, generator=g)


def state_snapshot(module):
    """Deep copy of a module's state_dict (values) for bit-exact before/after comparisons."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(module, snapshot):
    now = module.state_dict()
    assert list(now) == list(snapshot), "the module's parameter/buffer names changed"
    for k, v in snapshot.items():
        assert now[k].dtype == v.dtype and now[k].shape == v.shape, k
        torch.testing.assert_close(now[k], v, rtol=0, atol=0, equal_nan=True, msg=f"{k} changed")


def structure(module):
    """Names and types of every submodule (to check nothing was wrapped or replaced)."""
    return [(n, type(m).__name__) for n, m in module.named_modules()]


def probed_weight(module: nn.Module, d_in: int) -> torch.Tensor:
    """W0 (d_out x d_in) as the layer's forward computes with it: layer(I) - layer(0), transposed. The probe
    requires grad, so it runs the training kernels (and never triggers bitsandbytes' eval-time repacking)."""
    eye = torch.eye(d_in, requires_grad=True)
    zero = torch.zeros(1, d_in, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized layers warn about fp32 inputs
        return (module(eye) - module(zero)).detach().t().contiguous()


def tagged_adapter(seed: int, size: int = 64):
    """A (config dict, tensors by file key) pair for formats.write_adapter whose every value tells which it is."""
    g = torch.Generator().manual_seed(seed)
    config = {"peft_type": "NEAT", "r": 4, "scaling": float(seed), "target_modules": [f"layer{seed}"]}
    return config, {f"base_model.model.m{i}.neat_A.weight": torch.randn(size, size, generator=g) for i in range(4)}


def dir_snapshot(path):
    """{relative file name: bytes} of a directory tree (to check files were left untouched)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def materialised_reference(neat_model, adapter_names):
    """A plain copy of the wrapped model in which every NeatLayer is replaced by its base layer with
    W0 + sum of the named adapters' reference dW (each from the pristine W0), and every ModulesToSave by
    the first named adapter's copy. Built with the reference formula above, not with the library's math."""
    from neat_peft.layers import ModulesToSave, NeatLayer

    plain = copy.deepcopy(neat_model.base_model)
    def put(path, module):
        parent_path, _, child = path.rpartition(".")
        setattr(plain.get_submodule(parent_path) if parent_path else plain, child, module)

    wrappers = [(p, m) for p, m in plain.named_modules() if isinstance(m, (NeatLayer, ModulesToSave))]
    for path, module in wrappers:
        if isinstance(module, NeatLayer):
            assert not module.merged, "build the reference from an unmerged model"
            base = module.base_layer
            W0 = linear_layout(module.kind.name, base.weight.detach())
            total = base.weight.detach().clone()
            for name in adapter_names:
                if name not in module.adapter_configs:
                    continue
                cfg = module.adapter_configs[name]
                A, B, encs, decs = (t.detach() if torch.is_tensor(t) else [e.detach() for e in t]
                                    for t in adapter_tensors(module, name))
                dW = reference_delta_weight(W0, A, B, encs, decs, cfg.act_fn, cfg.axis, cfg.scaling)
                total = total + stored_layout(module.kind.name, dW, total.shape)
            with torch.no_grad():
                base.weight.copy_(total)
            put(path, base)
        elif isinstance(module, ModulesToSave):
            chosen = next((module.copies[n] for n in adapter_names if n in module.copies), module.original_module)
            put(path, chosen)
    return plain
