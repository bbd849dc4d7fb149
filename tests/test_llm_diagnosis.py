"""benchmarks/llm_diagnosis.py: its per-step figures checked against values computed independently from the model
(the materialised update, the activation's zeros, the parameters' own change), and its tiny end-to-end mode."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import llm_diagnosis


def _tiny(method, *extra):
    args = llm_diagnosis.parse_args(["--tiny", "--method", method, "--steps", "2", "--validation", "4", *extra])
    model, train, validation, collate = llm_diagnosis.tiny_data(args)
    return args, llm_diagnosis.wrap(model, args), train, collate


@pytest.mark.parametrize("method,extra", [("neat", []), ("neat", ["--r", "3", "--scaling", "0.5"]),
                                          ("neat", ["--axis", "in"]), ("lora", [])])
def test_recorded_figures_equal_the_materialised_update(method, extra):
    args, model, train, collate = _tiny(method, *extra)
    factors = llm_diagnosis.Factors(model, args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(2):  # the second step: B is no longer zero, so A has a gradient and H moves
        model(**collate(train[step * 8:(step + 1) * 8])).loss.backward()
        before = factors.snapshot()
        optimizer.step()
        rec = factors.record(before)
        optimizer.zero_grad()
    assert len(rec["dW_rel"]) == len(factors.layers) == 4  # q_proj and v_proj of 2 layers
    for i, (name, module, A, B, s) in enumerate(factors.layers):
        W0 = module.base_layer.weight.detach()
        if method == "neat" and "in" in extra:
            G = torch.relu(W0 @ A.detach().t())  # d_out x r: the network reads W0's rows
            dW = s * G @ B.detach().t()
            assert rec["zeroed"][i] == pytest.approx(float((G == 0).float().mean()))
        elif method == "neat":
            H = torch.relu(W0.t() @ A.detach().t())  # d_in x r: the formula, written out
            dW = s * B.detach() @ H.t()
            assert rec["zeroed"][i] == pytest.approx(float((H == 0).float().mean()))
            moved = (H - torch.relu(W0.t() @ before[i][0].t())).norm()
            assert moved > 0
        else:
            dW = s * B.detach() @ A.detach()
        assert dW.shape == W0.shape
        assert rec["dW_rel"][i] == pytest.approx(float(dW.norm() / W0.norm()), rel=1e-4)
        assert rec["step_A"][i] == pytest.approx(float((A.detach() - before[i][0]).norm()), rel=1e-6)
        assert rec["step_B"][i] == pytest.approx(float((B.detach() - before[i][1]).norm()), rel=1e-6)
        assert rec["dW_rel"][i] > 0 and rec["down_moved"][i] > 0


def test_tiny_run_writes_curves_and_plots(tmp_path):
    out = tmp_path / "neat.json"
    assert llm_diagnosis.main(["--tiny", "--method", "neat", "--steps", "3", "--eval-every", "2",
                               "--validation", "4", "--out", str(out)]) == 0
    run = json.loads(out.read_text())
    assert [s["step"] for s in run["steps"]] == [1, 2, 3]
    assert [c["step"] for c in run["validation_curve"]] == [0, 2, 3] and run["complete"]
    assert {"dW_rel_q", "dW_rel_v", "zeroed_q"} <= set(run["steps"][0])
    assert all(c["loss"] > 0 for c in run["validation_curve"])
    assert run["layers"][0]["W0_rms"] > 0
    assert llm_diagnosis.main(["--tiny", "--method", "lora", "--steps", "3", "--validation", "4",
                               "--out", str(tmp_path / "lora.json")]) == 0
    assert llm_diagnosis.main(["--plot", str(tmp_path / "plots"), str(out), str(tmp_path / "lora.json")]) == 0
    assert (tmp_path / "plots" / "dynamics.png").stat().st_size > 10_000


def test_reach_against_closed_forms():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(6, 5, generator=g, dtype=torch.float64)
    square = torch.randn(5, 5, generator=g, dtype=torch.float64)
    out = llm_diagnosis.reach(G[:5], square, starts=8, iters=200)
    top = float(torch.linalg.matrix_norm(G[:5], ord=2) / G[:5].norm())
    # a full-rank square W0: its row space is everything, so the identity network reaches LoRA's best direction
    assert out["lora"] == pytest.approx(top) and out["neat_identity"] == pytest.approx(top)
    assert out["neat_relu"] <= out["lora"] + 1e-9 and out["nonneg"] <= out["lora"] + 1e-9
    # a wide W0 (2 x 5) reads a 2-dimensional row space: sigma_1 of G restricted to it, computed here by SVD
    wide = torch.randn(2, 5, generator=g, dtype=torch.float64)
    basis = torch.linalg.svd(wide, full_matrices=False).Vh.t()  # 5 x 2, orthonormal
    restricted = float(torch.linalg.matrix_norm(G[:2] @ basis, ord=2) / G[:2].norm())
    assert llm_diagnosis.reach(G[:2], wide, starts=4, iters=50)["neat_identity"] == pytest.approx(restricted)
    # G whose best input direction is elementwise non-negative: a non-negative h reaches it, ReLU-NEAT too
    v = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    rank1 = torch.randn(5, 1, generator=g, dtype=torch.float64) @ v[None]
    out = llm_diagnosis.reach(rank1, torch.eye(5, dtype=torch.float64), starts=4, iters=300)
    assert out["nonneg"] == pytest.approx(1.0, abs=1e-3) and out["neat_relu"] == pytest.approx(1.0, abs=1e-3)
    # ... and one whose best direction has mixed signs: no non-negative h reaches it (v = (1, -1)/sqrt2 in 2-D:
    # the best non-negative h is a coordinate axis, with |<h, v>| = 1/sqrt2)
    mixed = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    out = llm_diagnosis.reach(mixed, torch.tensor([[1.0, 0.5]], dtype=torch.float64), starts=8, iters=300)
    assert out["lora"] == pytest.approx(1.0) and out["nonneg"] == pytest.approx(2 ** -0.5, abs=1e-3)


def test_reach_of_axis_in_reads_the_column_space():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(2, 5, generator=g, dtype=torch.float64)
    wide = torch.randn(2, 5, generator=g, dtype=torch.float64)  # full column space R^2: axis in is unconstrained
    out = llm_diagnosis.reach(G, wide, starts=8, iters=300)
    assert out["neat_in_identity"] == pytest.approx(out["lora"])
    assert out["neat_in_relu"] <= out["lora"] + 1e-9
    tall = torch.randn(5, 2, generator=g, dtype=torch.float64)  # a 2-dimensional column space of R^5
    G5 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    basis = torch.linalg.svd(tall, full_matrices=False).U  # 5 x 2
    expected = float(torch.linalg.matrix_norm(basis.t() @ G5, ord=2) / G5.norm())
    assert llm_diagnosis.reach(G5, torch.cat([tall, torch.zeros(5, 1, dtype=torch.float64)], 1), starts=2,
                               iters=10)["neat_in_identity"] == pytest.approx(expected)
