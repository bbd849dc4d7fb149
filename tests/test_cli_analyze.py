"""`neat-peft analyze`: the update of a NEAT run and of a LoRA run on the same tiny model, checked against dW
rebuilt independently from the adapter files and the base model's weights."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import TINY_RUN, cli, make_tiny_bert, needs_corpus, needs_minilm

pytestmark = [needs_minilm, needs_corpus]
R = 2
TRAIN = [*TINY_RUN, "train.lr=0.02", f"method.r={R}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    model = make_tiny_bert(root / "tiny_bert")
    neat, lora = root / "neat", root / "lora"
    assert cli("train", "-o", neat, f"model.name={model}", "method.name=neat", *TRAIN) == (0, "", "")
    assert cli("train", "-o", lora, f"model.name={model}", "method.name=lora", *TRAIN) == (0, "", "")
    out = root / "out"
    assert cli("analyze", neat, "--compare", lora, "--out", out)[0] == 0
    return model, neat, lora, json.loads((out / "analysis.json").read_text()), out


def _base_weights(model_dir):
    from safetensors.torch import load_file

    return {k: v.double() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def _independent_neat(neat_dir, model_dir):
    """dW = s * B relu(A W0) per layer (axis out, depth 0), from the adapter file and the pristine base weights."""
    from safetensors.torch import load_file

    tensors = {k: v.double() for k, v in load_file(str(neat_dir / "adapter" / "adapter_model.safetensors")).items()}
    config = json.loads((neat_dir / "adapter" / "adapter_config.json").read_text())
    base = _base_weights(model_dir)
    out = {}
    for key, A in tensors.items():
        if not key.endswith(".peanut_A.weight"):
            continue
        path = key[len("base_model.model."):-len(".peanut_A.weight")]
        B = tensors[key.replace("peanut_A", "peanut_B")]
        W0 = base[f"{path}.weight"]
        out[path] = (config["scaling"] * B @ torch.relu(A @ W0), W0)
    return out


def _independent_lora(lora_dir, model_dir):
    from safetensors.torch import load_file

    tensors = {k: v.double() for k, v in load_file(str(lora_dir / "adapter" / "adapter_model.safetensors")).items()}
    config = json.loads((lora_dir / "adapter" / "adapter_config.json").read_text())
    base = _base_weights(model_dir)
    out = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            path = key[len("base_model.model."):-len(".lora_A.weight")]
            B = tensors[key.replace("lora_A", "lora_B")]
            out[path] = (config["lora_alpha"] / config["r"] * B @ A, base[f"{path}.weight"])
    return out


def test_neat_layers_match_an_independent_dw(runs):
    model, neat, _, report, _ = runs
    expected = _independent_neat(neat, model)
    layers = report["analysis"]["layers"]
    assert set(layers) == set(expected) and len(expected) == 4  # query and value of 2 layers
    moved = 0
    for name, (delta, W0) in expected.items():
        s = layers[name]
        assert s["shape"] == list(delta.shape)
        assert s["relative_norm"] == pytest.approx(float(delta.norm() / W0.norm()), rel=1e-5)
        sv = torch.linalg.svdvals(delta)
        assert torch.allclose(torch.tensor(s["singular_values"][:R], dtype=torch.float64), sv[:R], rtol=1e-4,
                              atol=1e-9)
        assert s["numerical_rank"] <= R and s["effective_rank"] <= R + 1e-9
        moved += s["relative_norm"] > 0
    assert moved == len(expected)  # training changed every adapted layer: the check is not on zeros
    assert report["analysis"]["run"]["method"] == "neat" and report["analysis"]["run"]["r"] == R


def test_lora_side_by_side_and_pair_statistics(runs):
    model, neat, lora, report, out = runs
    neat_dw = _independent_neat(neat, model)
    lora_dw = _independent_lora(lora, model)
    layers = report["compare"]["layers"]
    assert report["compare"]["run"]["method"] == "lora" and set(layers) == set(lora_dw) == set(report["pairs"])
    for name, (delta, W0) in lora_dw.items():
        assert layers[name]["relative_norm"] == pytest.approx(float(delta.norm() / W0.norm()), rel=1e-5)
        assert layers[name]["numerical_rank"] <= R
        a = neat_dw[name][0]
        cosine = float((a * delta).sum() / (a.norm() * delta.norm()))
        assert report["pairs"][name]["cosine"] == pytest.approx(cosine, abs=1e-6)
        assert 0.0 <= report["pairs"][name]["left_overlap"] <= 1.0 + 1e-9
    # Energy in W0's top-k input directions: recomputed for one layer.
    name, (delta, W0) = next(iter(lora_dw.items()))
    k = layers[name]["w0_subspace_energy"]["k"]
    Vh = torch.linalg.svd(W0, full_matrices=False)[2]
    share = float((delta @ Vh[:k].T).pow(2).sum() / delta.pow(2).sum())
    assert layers[name]["w0_subspace_energy"]["right"] == pytest.approx(share, rel=1e-6)
    for png in ("spectra.png", "summary.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_refuses_runs_without_an_adapter(runs, tmp_path, capsys):
    model = runs[0]
    head = tmp_path / "head"
    assert cli("train", "-o", head, f"model.name={model}", "method.name=head-only", *TINY_RUN)[0] == 0
    capsys.readouterr()
    code, _, err = cli("analyze", head, capsys=capsys)
    err = " ".join(err.split())
    assert code == 2 and "method.name=head-only run" in err and "method.name=lora" in err
    code, _, err = cli("analyze", tmp_path / "nothing", capsys=capsys)
    err = " ".join(err.split())
    assert code == 2 and "not a neat-peft run directory" in err
    assert not (tmp_path / "nothing-analysis").exists() and not (tmp_path / "head-analysis").exists()
