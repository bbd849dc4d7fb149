"""A stateful property test: seeded random walks over NeatModel's public API (and peft's, with NEAT registered),
checked against a reference.

The model: Embedding -> Linear -> tanh -> transformers' Conv1D -> Conv2d, in fp32, fp16 or bf16. Each walk adds /
sets / deletes adapters, merges (all, some, safe), unmerges, enters disable_adapter, switches train()/eval(), changes
adapter weights in place (an optimizer step), saves and loads (into this model under a new name and into a fresh
model), runs mixed-adapter batches and bf16 autocast, exports LoRA (read back by peft), casts the whole model
(.to(dtype), .half(), .bfloat16(), .float()), and ends with merge_and_unload or unload. QuantizedWalk runs it on a
bitsandbytes nf4 layer (reference: the probed fp32 twin), PeftWalk through peft's API.
The walk keeps its own account of what the API promises -- which adapters exist (with a copy of their tensors),
which are active, merged, the mode -- and after every step compares the model's output, with and without autograd,
to a reference computed from scratch in fp32: the pristine base layers (a deep copy taken before wrapping) with
W0 + sum of dW over the adapters that should count, dW materialised by neat_testing's formula (written from the
paper, not from neat_peft.functional); with autograd, one A/B gradient too, against autograd through that formula.
A step the API refuses must raise a ValueError and change nothing.

CI runs a few short walks with fixed seeds (seconds). NEAT_PROPERTY_LONG=<seconds> runs random walks for that long
and prints how many steps it ran.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import tempfile
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from neat_testing import adapter_tensors, assert_state_equal, probed_weight, reference_delta_weight, state_snapshot
from neat_peft import BASE_ONLY, NeatConfig, NeatModel, get_neat_model

LAYERS = ["embed", "fc", "proj", "conv"]
VOCAB, BATCH, SEQ = 11, 4, 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.fc = nn.Linear(6, 5)
        self.proj = Conv1D(4, 5)  # weight stored d_in x d_out
        nn.init.normal_(self.proj.weight, std=0.4)
        nn.init.normal_(self.proj.bias, std=0.4)
        self.conv = nn.Conv2d(1, 2, kernel_size=2)  # over the (seq x 4) map of each sample

    def forward(self, ids):
        return self.conv(self.proj(torch.tanh(self.fc(self.embed(ids)))).unsqueeze(1))


def linear_w0(name, layer):
    """W0 in nn.Linear layout (d_out x d_in) from a pristine layer's stored weight, in fp32 (the reference's dtype)."""
    weight = layer.weight.detach().float()
    if name == "conv":
        return weight.reshape(weight.shape[0], -1)  # the kernel as d_out x (d_in * kh * kw)
    return weight if name == "fc" else weight.t()


def reference_forward(pristine: Net, ids, deltas_per_sample):
    """The base network with W0 + sum(dW) per layer; deltas_per_sample[i]: {layer: dW (linear layout)} for sample i."""
    outs = []
    for i in range(ids.shape[0]):
        W = {n: linear_w0(n, getattr(pristine, n)) + deltas_per_sample[i].get(n, 0) for n in LAYERS}
        h = F.embedding(ids[i:i + 1], W["embed"].t())
        h = torch.tanh(F.linear(h, W["fc"], pristine.fc.bias.float()))
        h = h @ W["proj"].t() + pristine.proj.bias.float()
        outs.append(F.conv2d(h.unsqueeze(1), W["conv"].reshape(pristine.conv.weight.shape), pristine.conv.bias.float()))
    return torch.cat(outs)


# fp32 walks check to 1e-4; half-precision bases (adapters stay fp32, the base computes in fp16/bf16) against the
# fp32 reference to their rounding, which still sees any adapter missing or counted twice (differences ~0.1-1).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


class Walk:
    def __init__(self, seed: int, dtype: torch.dtype = torch.float32):
        self.rng = random.Random(seed)
        torch.manual_seed(seed)
        self.tol = TOLERANCE[dtype]
        self.pristine = self.reference_base(dtype)
        self.model = self.wrap(self.fresh_base(), self.random_config())
        self.adapters: dict[str, dict] = {}  # name -> {"config", "tensors": {layer: (A, B, encs, decs)}}
        self.record("default")
        self.active = ["default"]
        self.merged: list[str] = []
        self.training = True
        self.count = 0
        self.gradients = 0  # gradients checked
        self.ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
        self.tmp = tempfile.TemporaryDirectory()
        self.log: list[str] = []

    MERGE_AND_UNLOAD: dict = {}
    LOAD_ADAPTER_KEEPS_MODE = True
    ADD_UNMERGES = False
    DISABLE_UNMERGES = False
    SET_UNMERGES = False  # only when the merged set differs from the new active set
    UNLOAD_KEEPS_MERGES = False
    PEFT_DELETE = False  # the core: re-activates the remaining active ones (or the first), refuses the last one
    ACTIONS = ["add", "set", "delete", "merge_all", "merge_some", "unmerge", "disable", "mode", "train_step",
               "save_load_same", "save_load_fresh", "mixed", "autocast", "export_lora", "cast"]

    def reference_base(self, dtype) -> Net:
        """The pristine base the reference computes with (W0 and biases, read in fp32)."""
        return Net().to(dtype)

    def fresh_base(self) -> nn.Module:
        """A new copy of the base to wrap (at the start, and for loads into a fresh model)."""
        return copy.deepcopy(self.pristine)

    # the API under test: NeatModel's (PeftWalk: peft's, with NEAT registered as a peft method)
    def wrap(self, base, config):
        return get_neat_model(base, config)

    def load_fresh(self, base, directory):
        return NeatModel.from_pretrained(base, directory)

    def choose_active(self, names) -> list[str]:
        return self.rng.sample(names, self.rng.randint(1, len(names)))

    def activate(self, chosen: list[str]) -> None:
        self.model.set_adapter(chosen)

    # --- the walk's own account --------------------------------------------------------------------
    def random_config(self) -> NeatConfig:
        r = self.rng
        return NeatConfig(r=r.randint(1, 3), depth=r.randint(0, 1), axis=r.choice(["out", "in"]),
                          act_fn=r.choice(["tanh", "relu", "sin"]), scaling=r.choice([0.5, 1.0, 2.0]),
                          target_modules=r.sample(LAYERS, r.randint(1, 3)), init_weights=False)

    def record(self, name, model=None):
        """Copy the adapter's tensors as they are now (the walk's own copy from then on)."""
        model = model or self.model
        tensors = {}
        for layer_name in LAYERS:
            layer = getattr(model.base_model, layer_name)
            if hasattr(layer, "adapter_configs") and name in layer.adapter_configs:
                A, B, encs, decs = adapter_tensors(layer, name)
                copy_ = lambda t: t.detach().float().clone()  # noqa: E731 - the reference computes in fp32
                tensors[layer_name] = (copy_(A), copy_(B), [copy_(e) for e in encs], [copy_(d) for d in decs])
        self.adapters[name] = {"config": model.peft_config[name], "tensors": tensors}

    def deltas(self, names, leaf=None) -> dict[str, torch.Tensor]:
        """{layer: sum of dW}; leaf=(adapter, layer, (A, B, encs, decs)) replaces those tensors (for gradients)."""
        out: dict[str, torch.Tensor] = {}
        for name in names:
            cfg = self.adapters[name]["config"]
            for layer_name, (A, B, encs, decs) in self.adapters[name]["tensors"].items():
                if leaf is not None and leaf[:2] == (name, layer_name):
                    A, B, encs, decs = leaf[2]
                W0 = linear_w0(layer_name, getattr(self.pristine, layer_name))
                dW = reference_delta_weight(W0, A, B, encs, decs, cfg.act_fn, cfg.axis, cfg.scaling)
                out[layer_name] = out.get(layer_name, 0) + dW
        return out

    def counted(self) -> list[str]:
        """The adapters whose updates the output holds: the merged ones and the active ones."""
        return list(dict.fromkeys([*self.merged, *self.active]))

    def expected(self, per_sample=None, disabled=False):
        if disabled:
            sets = [[]] * BATCH
        elif per_sample is not None:
            sets = [[] if n == BASE_ONLY else n if isinstance(n, list) else [n] for n in per_sample]
        else:
            sets = [self.counted()] * BATCH
        with torch.no_grad():
            return reference_forward(self.pristine, self.ids, [self.deltas(s) for s in sets])

    def check_gradient(self, what, out):
        """One adapter tensor's gradient of sum(out * weights) against autograd through the reference formula.
        The tensor: A or B of an active, unmerged, trainable adapter on a random layer (merged ones have no gradient,
        and one loaded with is_trainable=False is frozen)."""
        trainable = [(n, layer) for n in self.active if n not in self.merged  # loaded for inference: frozen
                     and not self.model.peft_config[n].inference_mode for layer in self.adapters[n]["tensors"]]
        if not trainable:
            return
        name, layer_name = self.rng.choice(trainable)
        role = self.rng.choice(["A", "B"])
        param = getattr(getattr(self.model.base_model, layer_name), f"neat_{role}")[name].weight
        assert param.requires_grad, f"{what}: {name}.{layer_name}.{role} of an active adapter is frozen\nsteps: {self.log}"
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(len(self.log)))
        self.model.zero_grad(set_to_none=True)
        (out.float() * weights).sum().backward()
        self.gradients += 1
        A, B, encs, decs = self.adapters[name]["tensors"][layer_name]
        A, B = A.clone(), B.clone()
        leaf = (A if role == "A" else B).requires_grad_()
        deltas = self.deltas(self.counted(), leaf=(name, layer_name, (A, B, encs, decs)))
        reference = reference_forward(self.pristine, self.ids, [deltas] * BATCH)
        (expected,) = torch.autograd.grad((reference * weights).sum(), leaf)
        assert param.grad is not None, f"{what}: no gradient for {name}.{layer_name}.{role}\nsteps: {self.log}"
        tol = self.tol * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(param.grad.float(), expected, rtol=self.tol, atol=tol,
                                   msg=lambda m: f"{what}: gradient of {name}.{layer_name}.{role}: {m}\n"
                                                 f"steps: {self.log}")
        self.model.zero_grad(set_to_none=True)

    def check(self, what, **kwargs):
        expected = self.expected(**kwargs)
        tol = self.tol * max(1.0, expected.abs().max().item())  # half-precision rounding grows with the outputs
        call = {"adapter_names": kwargs["per_sample"]} if kwargs.get("per_sample") else {}
        assert self.model.training == self.training, f"{what}: mode"
        assert list(self.model.active_adapters) == self.active, f"{what}: active adapters"
        with torch.no_grad():
            torch.testing.assert_close(self.model(self.ids, **call).float(), expected, rtol=self.tol, atol=tol,
                                       msg=lambda m: f"{what} (no_grad): {m}\nsteps: {self.log}")
        out = self.model(self.ids, **call)
        torch.testing.assert_close(out.detach().float(), expected, rtol=self.tol, atol=tol,
                                   msg=lambda m: f"{what} (autograd): {m}\nsteps: {self.log}")
        if not call and out.requires_grad:
            self.check_gradient(what, out)

    def refused(self, step, match):
        """The API must refuse this step with a clear ValueError and change nothing."""
        before = state_snapshot(self.model)
        with pytest.raises(ValueError, match=match):
            step()
        assert_state_equal(self.model, before)

    # --- the steps ------------------------------------------------------------------------------------
    def step(self):
        r = self.rng
        names = list(self.adapters)
        action = r.choice(self.ACTIONS)
        self.log.append(action)
        if action == "add" and len(names) < 4:
            name = f"a{self.count}"
            self.count += 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft: "Unmerging the model first"
                self.model.add_adapter(name, self.random_config())
            self.record(name)
            if self.ADD_UNMERGES:
                self.merged = []
        elif action == "set":
            chosen = self.choose_active(names)
            self.log[-1] += f"{chosen}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "merged; unmerging them" is expected
                self.activate(chosen)
            if self.merged and (self.SET_UNMERGES or sorted(self.merged) != sorted(chosen)):
                self.merged = []
            self.active = chosen
        elif action == "delete":
            name = r.choice(names)
            self.log[-1] += f"({name})"
            if self.PEFT_DELETE and len(names) == 1:  # peft deletes the last adapter too: the walk would end
                return
            if len(names) == 1:
                return self.refused(lambda: self.model.delete_adapter(name), "only adapter")
            if name in self.merged:
                return self.refused(lambda: self.model.delete_adapter(name), "merged")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model.delete_adapter(name)
            del self.adapters[name]
            if name in self.active and self.PEFT_DELETE:
                # peft picks the next active adapter itself (among those on the first adapted layer); the output
                # checks that every layer follows that choice
                self.active = list(self.model.active_adapters)
            elif name in self.active:  # re-activates through set_adapter, which unmerges if the merged set differs
                self.active = [n for n in self.active if n != name] or [next(iter(self.adapters))]
                if self.merged and sorted(self.merged) != sorted(self.active):
                    self.merged = []
        elif action == "merge_all":
            self.model.merge_adapter(safe_merge=r.random() < 0.5)
            self.merged += [n for n in self.active if n not in self.merged]
        elif action == "merge_some":
            chosen = r.sample(names, r.randint(1, len(names)))
            self.log[-1] += f"{chosen}"
            self.model.merge_adapter(chosen, safe_merge=r.random() < 0.5)
            self.merged += [n for n in chosen if n not in self.merged]
        elif action == "unmerge":
            self.model.unmerge_adapter()
            self.merged = []
        elif action == "disable":
            before = state_snapshot(self.model)
            with self.model.disable_adapter():
                self.check("inside disable_adapter", disabled=True)
            if self.DISABLE_UNMERGES:
                self.merged = []
            else:
                assert_state_equal(self.model, before)
        elif action == "mode":
            self.training = r.random() < 0.5
            self.model.train(self.training)
        elif action == "train_step" and not self.merged:
            name = r.choice(names)
            self.log[-1] += f"({name})"
            with torch.no_grad():  # an optimizer step: in place, bumps the version counters
                for layer_name in self.adapters[name]["tensors"]:
                    layer = getattr(self.model.base_model, layer_name)
                    layer.neat_B[name].weight.add_(0.1)
                    layer.neat_A[name].weight.mul_(1.1)
            self.record(name)
        elif action == "save_load_same" and len(names) < 4:
            name = r.choice(names)
            new = f"a{self.count}"
            self.count += 1
            self.log[-1] += f"({name}->{new})"
            directory = os.path.join(self.tmp.name, new)
            self.model.save_pretrained(directory, selected_adapters=[name])
            self.model.load_adapter(os.path.join(directory, "" if name == "default" else name), new)
            self.training = self.training and self.LOAD_ADAPTER_KEEPS_MODE
            if self.ADD_UNMERGES:  # load_adapter adds the adapter first
                self.merged = []
            self.adapters[new] = {"config": self.model.peft_config[new], "tensors": self.adapters[name]["tensors"]}
        elif action == "save_load_fresh":
            name = r.choice(names)
            self.log[-1] += f"({name})"
            directory = os.path.join(self.tmp.name, f"fresh{self.count}")
            self.count += 1
            self.model.save_pretrained(directory, selected_adapters=[name])
            fresh = self.load_fresh(self.fresh_base(),
                                              os.path.join(directory, "" if name == "default" else name))
            with torch.no_grad():
                expected = reference_forward(self.pristine, self.ids, [self.deltas([name])] * BATCH)
                torch.testing.assert_close(fresh(self.ids).float(), expected, rtol=self.tol, atol=self.tol,
                                           msg=lambda m: f"fresh load of {name}: {m}\nsteps: {self.log}")
        elif action == "mixed":
            per_sample = [r.choice([*names, BASE_ONLY]) for _ in range(BATCH)]
            self.log[-1] += f"{per_sample}"
            if self.training:
                return self.refused(lambda: self.model(self.ids, adapter_names=per_sample), "training mode")
            if self.merged:
                return self.refused(lambda: self.model(self.ids, adapter_names=per_sample), "merged")
            self.check("mixed batch", per_sample=per_sample)
        elif action == "autocast":  # bf16 compute, then (self.check below) fp32 again: no stale half-precision H
            expected = self.expected()  # the reference outside autocast: fp32
            # bf16 rounding through four layers and up to four adapters grows with the outputs' scale
            loose = max(self.tol, 0.05, 0.03 * expected.abs().max().item())
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                out = self.model(self.ids).float()
            torch.testing.assert_close(out, expected, rtol=loose, atol=loose,
                                       msg=lambda m: f"under autocast: {m}\nsteps: {self.log}")
        elif action == "cast":  # the whole model, adapters included; the reference's W0 and tensors round alike
            dtype, how = r.choice([(torch.float32, "float"), (torch.float32, "to"), (torch.float16, "half"),
                                   (torch.float16, "to"), (torch.bfloat16, "bfloat16"), (torch.bfloat16, "to")])
            self.log[-1] += f"({how}:{dtype})"
            self.model = self.model.to(dtype) if how == "to" else getattr(self.model, how)()
            assert all(p.dtype == dtype for p in self.model.parameters()), f"{self.log[-1]}: a parameter kept its dtype"
            self.pristine = self.pristine.to(dtype)
            for name in list(self.adapters):
                self.record(name)
            self.tol = max(self.tol, TOLERANCE[dtype])  # what a round trip through half precision lost stays lost
        elif action == "export_lora":  # the LoRA file, read by peft itself into a fresh base, computes dW exactly
            from peft import PeftModel

            name = r.choice(names)
            self.log[-1] += f"({name})"
            directory = os.path.join(self.tmp.name, f"lora{self.count}")
            self.count += 1
            self.model.export_lora(directory, name)
            lora = PeftModel.from_pretrained(self.fresh_base(), directory).eval()
            with torch.no_grad():
                expected = reference_forward(self.pristine, self.ids, [self.deltas([name])] * BATCH)
                torch.testing.assert_close(lora(self.ids).float(), expected, rtol=self.tol, atol=self.tol,
                                           msg=lambda m: f"exported LoRA of {name}: {m}\nsteps: {self.log}")
        self.check(self.log[-1])

    def finish(self):
        """The walk's last step: the plain model left behind computes what the API promised."""
        merge = self.rng.random() < 0.5
        self.log.append("merge_and_unload" if merge else "unload")
        if merge:
            expected = self.expected()
        elif self.UNLOAD_KEEPS_MERGES:
            expected = self.expected(per_sample=[self.merged] * BATCH)
        else:
            expected = self.expected(disabled=True)
        plain = self.model.merge_and_unload(**self.MERGE_AND_UNLOAD) if merge else self.model.unload()
        assert not any(type(m).__module__.startswith("neat_peft") for m in plain.modules()), "NEAT layers left"
        with torch.no_grad():
            torch.testing.assert_close(plain(self.ids).float(), expected, rtol=self.tol, atol=self.tol,
                                       msg=lambda m: f"{self.log[-1]}: {m}\nsteps: {self.log}")


class QuantizedWalk(Walk):
    """The same walk with `fc` a bitsandbytes nf4 Linear4bit (fp32 compute, on CPU). The reference is the fp32 twin:
    the float Net whose fc weight is the W0 the 4-bit layer's forward computes with, read off by probing it with the
    identity (neat_testing.probed_weight), not through neat_peft's dequantization. Merges (which requantize
    W0 + dW: no float reference reproduces the rounding; tests/test_quantized.py bounds it) and casts are left out.
    """

    ACTIONS = [a for a in Walk.ACTIONS if a not in ("merge_all", "merge_some", "unmerge", "cast")]
    MERGE_AND_UNLOAD = {"dequantize": True}  # a float model holding W0 + dW: the reference exactly

    def reference_base(self, dtype) -> Net:
        import bitsandbytes as bnb

        net = Net()
        fc = bnb.nn.Linear4bit(6, 5, compute_dtype=torch.float32, quant_type="nf4")
        fc.weight = bnb.nn.Params4bit(net.fc.weight.detach().clone(), requires_grad=False, quant_type="nf4")
        fc.bias = nn.Parameter(net.fc.bias.detach().clone(), requires_grad=False)
        fc = fc.to("cpu")  # quantizes
        fc.support_avx512bf16_for_cpu = False  # the probe below reads the layout NEAT keeps (docs/quantized.md)
        twin = copy.deepcopy(net)
        with torch.no_grad():
            twin.fc.weight.copy_(probed_weight(fc, 6))
        net.fc = fc
        self.quantized = net
        return twin

    def fresh_base(self) -> nn.Module:
        return copy.deepcopy(self.quantized)


class PeftWalk(Walk):
    """The same walk through peft's API: get_peft_model(base, NeatConfig), PeftModel.add_adapter / set_adapter (one
    name: peft's PeftModel takes one) / delete_adapter / merge_adapter / unmerge_adapter / disable_adapter /
    save_pretrained / load_adapter, PeftModel.from_pretrained, merge_and_unload / unload. export_lora is the core's
    (peft's plugin converts with convert_to_lora, tested in test_peft_plugin.py). peft's own rules, where they differ
    from the core's, are walked as peft states them (the class attributes below)."""

    ACTIONS = [a for a in Walk.ACTIONS if a != "export_lora"]
    LOAD_ADAPTER_KEEPS_MODE = False  # peft's load_adapter(is_trainable=False) switches the model to eval mode
    ADD_UNMERGES = True  # peft's add_adapter unmerges every layer first (with a warning); the core keeps merges
    DISABLE_UNMERGES = True  # peft's rule: a forward with adapters disabled unmerges (the core puts merges back)
    SET_UNMERGES = True  # peft's set_adapter unmerges whenever something is merged
    PEFT_DELETE = True
    UNLOAD_KEEPS_MERGES = True  # peft's unload() drops the modules without unmerging (LoRA alike); the core unmerges

    def wrap(self, base, config):
        import peft

        return peft.get_peft_model(base, config)

    def load_fresh(self, base, directory):
        import peft

        return peft.PeftModel.from_pretrained(base, directory)

    def choose_active(self, names) -> list[str]:
        return [self.rng.choice(names)]

    def activate(self, chosen: list[str]) -> None:
        self.model.set_adapter(chosen[0])


def walk(seed, steps, dtype=torch.float32, kind=Walk) -> Walk:
    w = kind(seed, dtype)
    try:
        w.check("start")
        for _ in range(steps):
            w.step()
        w.finish()
    finally:
        w.tmp.cleanup()
    return w


@pytest.mark.parametrize("seed", range(6))
def test_random_walk(seed):
    assert walk(seed, 25).gradients > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(2))
def test_random_walk_half_precision_base(seed, dtype):
    assert walk(100 + seed, 25, dtype).gradients > 0


@pytest.mark.parametrize("seed", range(2))
def test_random_walk_4bit_base(seed):
    pytest.importorskip("bitsandbytes")
    w = walk(200 + seed, 25, kind=QuantizedWalk)
    assert w.gradients > 0 and not any(s.startswith(("merge_all", "merge_some", "cast")) for s in w.log)


@pytest.mark.parametrize("seed", range(2))
def test_random_walk_through_peft(seed):
    pytest.importorskip("peft")
    assert walk(300 + seed, 25, kind=PeftWalk).gradients > 0


@pytest.mark.skipif(not os.environ.get("NEAT_PROPERTY_LONG"), reason="long mode: NEAT_PROPERTY_LONG=<seconds>")
def test_random_walks_long_mode():
    deadline = time.monotonic() + float(os.environ["NEAT_PROPERTY_LONG"])
    seed, steps, gradients, kinds = 1000, 0, 0, {}
    while time.monotonic() < deadline:
        kind, dtype = [(Walk, torch.float32), (Walk, torch.float32), (Walk, torch.float16), (Walk, torch.bfloat16),
                       (QuantizedWalk, torch.float32), (PeftWalk, torch.float32)][seed % 6]
        if kind is QuantizedWalk and not importlib.util.find_spec("bitsandbytes"):
            kind = Walk
        w = walk(seed, 40, dtype, kind)
        kinds[kind.__name__] = kinds.get(kind.__name__, 0) + 1
        steps, gradients, seed = steps + len(w.log), gradients + w.gradients, seed + 1
    print(f"\nlong mode: {seed - 1000} walks ({kinds}), {steps} steps, {gradients} gradients, all matched the reference")
