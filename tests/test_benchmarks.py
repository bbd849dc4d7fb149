"""benchmarks/speed.py: its --quick run (structure, and values checked against what they are computed from, never
timings), its memory method, and the factor layout that keeps NEAT's forward as cheap as LoRA's (found with
that benchmark). benchmarks/llm.py (the GPU benchmark): its --device cpu --tiny run, the same code path."""

from __future__ import annotations

import json
import math
import operator
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neat_peft import NeatConfig, get_neat_model
from benchmarks import llm, speed, speed_measure
from cli_helpers import make_tiny_llama, needs_corpus, needs_minilm
from neat_peft.functional import get_activation, weight_network

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 2


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--quick", "--d", "64", "--warmup", "1", "--repeats", str(REPEATS),
         "--threads", "1", "--profile", "--json", str(out / "speed.json"), "--markdown", str(out / "speed.md")],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "speed.json").read_text()), out


def test_quick_run_prints_tables_ratios_and_targets(quick_run):
    stdout, _, _ = quick_run
    assert "=== d=64: 2 layers" in stdout
    for method in ("floor", "lora", "peanut", "neat"):
        assert f"\n  {method} " in stdout
    for text in ("neat/lora", "peanut/neat", "neat/floor", "lora/floor", "inference batch 1:", "inference batch 4:",
                 "profile of one adapted 64x64 layer",
                 "targets:", "train time NEAT/LoRA <= 1.03", "peak memory NEAT/LoRA (step) <= 1.05",
                 "cached unmerged inference NEAT/LoRA, batch 1 <= 1.05", "merged NEAT = base model + dW"):
        assert text in stdout



def test_printed_targets_are_the_json_rows(quick_run):
    stdout, report, _ = quick_run
    printed = re.findall(r"^  \[(PASS|MISS)\] (.+): ", stdout, flags=re.M)
    rows = [(row["status"], row["target"]) for res in report["results"] for row in res["targets"]]
    assert printed == rows and len(rows) >= 6


def test_target_statuses_follow_their_thresholds(quick_run):
    """Each row's PASS/MISS recomputed from its value and the threshold written in its name."""
    _, report, _ = quick_run
    ops = {"<=": operator.le, ">=": operator.ge}
    checked = 0
    for res in report["results"]:
        for row in res["targets"]:
            m = re.search(r" (<=|>=) ([0-9.]+)$", row["target"])
            if m is None:  # the merge-equality row: a tolerance check, judged below
                continue
            expected = "PASS" if ops[m.group(1)](row["value"], float(m.group(2))) else "MISS"
            assert row["status"] == expected, row
            checked += 1
        merge = next(r for r in res["targets"] if r["target"].startswith("merged NEAT = base"))
        assert merge["value"] == max(b["merged_vs_unmerged_max_abs_diff"] for b in res["infer"]["batches"].values())
    assert checked >= 5


def test_quick_run_json_structure_and_sane_values(quick_run):
    _, report, _ = quick_run
    machine, versions = report["machine"], report["versions"]
    import peft

    assert versions["torch"] == torch.__version__ and versions["peft"] == peft.__version__
    assert machine["cores"] == os.cpu_count() and machine["torch_threads"] == 1 and machine["cpu"]
    assert len(machine["load_average"]) == 3 and len(machine["load_average_end"]) == 3
    assert report["settings"]["repeats"] == REPEATS and report["settings"]["quick"] is True
    (result,) = report["results"]
    plan, train, infer = result["plan"], result["train"], result["infer"]
    assert plan["d"] == 64 and plan["heads"] == 1 and plan["intermediate"] == 256

    # Equal budgets: LoRA r(d_in + d_out) = NEAT 2 r d_out = PEANuT on q and v; the floor trains the head and
    # the q and v biases.
    head = 64 * 2 + 2
    adapters = plan["layers"] * 2 * (8 * (64 + 64))
    assert train["trainable_params"] == {"floor": head + plan["layers"] * 2 * 64, "lora": head + adapters,
                                         "peanut": head + adapters, "neat": head + adapters}

    for method, t in train["time"].items():
        assert len(t["all_ms"]) == REPEATS and all(ms > 0 for ms in t["all_ms"])
        assert (t["min_ms"], t["median_ms"], t["max_ms"]) == (min(t["all_ms"]), statistics.median(t["all_ms"]),
                                                              max(t["all_ms"]))
        assert t["cpu_median_ms"] > 0  # a training step spends CPU time in this process
        mem = train["memory"][method]
        assert mem["step_peak_mb"] > 0 and mem["resident_mb"] > 0
        assert mem["total_peak_mb"] == pytest.approx(mem["step_peak_mb"] + mem["resident_mb"])
    # Ratios are what they claim to be: ratios of the medians printed beside them.
    times = {m: statistics.median(t["all_ms"]) for m, t in train["time"].items()}
    for key, entry in train["ratios"].items():
        num, den = key.split("/")
        assert entry["ratio"] == pytest.approx(times[num] / times[den])
        assert entry["per_round_min"] <= entry["per_round_max"]
    mem = train["memory"]
    assert train["memory_ratios"]["neat/lora (step)"] == pytest.approx(
        mem["neat"]["step_peak_mb"] / mem["lora"]["step_peak_mb"])

    assert sorted(infer["batches"]) == ["1", "4"]
    assert "neat_nocache" in infer["batches"]["1"]["time"]  # what the eval cache saves, at batch 1
    for batch in infer["batches"].values():
        assert set(batch["time"]) >= {"base", "lora", "peanut", "neat", "neat_merged"}
        assert batch["merged_vs_unmerged_max_abs_diff"] < 1e-4
        assert batch["unmerged_vs_base_max_abs_diff"] > 1e-4  # the update is not trivially zero
    merge = infer["merge"]
    assert merge["merged_is_plain_base"] and merge["cache_filled"]
    assert merge["merged_weight_vs_formula_max_abs_diff"] < 1e-5

    # The FLOP model: PEANuT computes x dW^T (as much as the frozen layer) on top of what NEAT computes.
    flops = train["matmul_flops"]
    assert flops["floor"] < flops["lora"] < flops["neat"] < flops["peanut"]

    profile = result["layer_profile"]
    for method in ("lora", "peanut", "neat"):
        own = [row["self_ms_per_iter"] for row in profile[method]]
        assert own == sorted(own, reverse=True)  # the costliest ops first
        assert sum(own) <= profile[method + "_total_ms_per_iter"] * (1 + 1e-6)  # a part of the total
        assert any(row["op"] in ("aten::mm", "aten::addmm", "aten::bmm") for row in profile[method])

    statuses = {row["target"]: row["status"] for row in result["targets"]}
    assert not any("PEANuT/NEAT" in t for t in statuses)  # those targets are for d = 768 and 2048 only
    merged_rows = [s for t, s in statuses.items() if t.startswith("merged NEAT = base")]
    assert merged_rows == ["PASS"]


def test_markdown_is_generated_from_the_json(quick_run, tmp_path):
    _, report, out = quick_run
    page = (out / "speed.md").read_text()
    neat_ms = report["results"][0]["train"]["time"]["neat"]["median_ms"]
    assert "## d = 64" in page and report["command"] in page and report["date"] in page
    assert f"| neat | {neat_ms:.1f} |" in page
    assert "Quick mode" in page
    regenerated = tmp_path / "again.md"
    speed.main(["--from-json", str(out / "speed.json"), "--markdown", str(regenerated)])
    again = regenerated.read_text().splitlines()
    data_lines = [i for i, line in enumerate(again) if line.startswith("- Data: ")]
    assert len(data_lines) == 1 and str(out / "speed.json") in again[data_lines[0]]  # where the figures come from
    del again[data_lines[0]]
    assert again == page.splitlines()  # otherwise the same page


def test_allocator_peak_counts_what_the_function_allocates():
    mib = 2**20

    def allocate():
        a = torch.ones(mib // 4)  # 1 MiB of float32
        b = torch.ones(2 * mib // 4)  # 2 MiB: both alive, 3 MiB
        del a, b
        c = torch.ones(mib // 4)  # after the frees: 1 MiB
        return c.sum()

    peak = speed_measure.allocator_peak_bytes(allocate)
    assert 3 * mib <= peak < 3 * mib + 64 * 1024


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("act", ["relu", "gelu", "sin"])
def test_network_on_columns_is_the_network_on_rows_transposed(depth, act):
    g = torch.Generator().manual_seed(depth)
    columns = torch.randn(12, 7, generator=g, dtype=torch.float64)
    A = torch.randn(3, 12, generator=g, dtype=torch.float64)
    encoders = [torch.randn(3, 3, generator=g, dtype=torch.float64) for _ in range(depth)]
    decoders = [torch.randn(3, 3, generator=g, dtype=torch.float64) for _ in range(depth)]
    fn = get_activation(act)
    expected = weight_network(columns.t().contiguous(), A, encoders, decoders, fn).t()
    torch.testing.assert_close(weight_network(columns, A, encoders, decoders, fn, on_columns=True), expected)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_factored_forward_uses_lora_matmul_layouts(axis):
    """The benchmark's finding as an invariant (no timing here): on CPU, skinny matmuls with a transposed
    operand ran several times slower, so NEAT reads W0 as stored (A @ W0, not W0^T A^T) and forms the
    gradient of its first factor as g^T x (as LoRA does for lora_A), not x^T g."""
    d_in, d_out, r, n = 16, 24, 4, 5
    torch.manual_seed(0)
    model = get_neat_model(torch.nn.Sequential(torch.nn.Linear(d_in, d_out)),
                           NeatConfig(r=r, target_modules=["0"], axis=axis))
    down, up = model.base_model[0].factors("default")
    assert down.shape == (d_in, r) and up.shape == (d_out, r)
    x = torch.randn(n, d_in, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        y = model(x)
        y.backward(torch.randn_like(y))
    mm_shapes = [e.input_shapes[:2] for e in prof.events() if e.name == "aten::mm"]
    assert [[r, n], [n, d_in]] in mm_shapes and [[d_in, n], [n, r]] not in mm_shapes, mm_shapes
    if axis == "out":
        assert down.t().is_contiguous()
        assert [[r, d_out], [d_out, d_in]] in mm_shapes and [[d_in, d_out], [d_out, r]] not in mm_shapes, mm_shapes


def test_floor_backward_reaches_the_first_layer_and_leaves_the_shared_base_alone():
    args = speed.parse_args(["--quick", "--d", "64"])
    plan = speed_measure.plan_for(64, args)
    base = speed_measure.make_base(plan, seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = speed_measure.build_train_model("floor", base, torch.nn.Linear(64, 2), seed=1)
    optimizer = torch.optim.AdamW(speed_measure.trainable_parameters(model), lr=1e-2)
    batch = speed_measure.make_batch(plan, 2, 16, seed=2)
    model(**batch).sum().backward()
    first_query = model.encoder.encoder.layer[0].attention.self.query
    assert first_query.bias.grad is not None and first_query.bias.grad.abs().sum() > 0
    assert first_query.weight.grad is None  # frozen: no weight gradient computed
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not any(p.requires_grad for p in base.parameters())


# --- benchmarks/llm.py: the GPU benchmark's CPU mode (the same code path, bf16 and nf4, tiny shapes) ----------

@pytest.fixture(scope="module")
def llm_tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm") / "llm.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.llm", "--device", "cpu", "--tiny", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_llm_tiny_run_measures_every_group_with_finite_ratios(llm_tiny_run):
    _, report = llm_tiny_run
    (entry,) = report["shapes"]
    assert entry["shape"] == "tiny" and entry["layers"] == 2 and report["device"] == "cpu"
    assert report["settings"]["batch"] == 2 and report["settings"]["seq"] == 16
    assert sorted(entry["groups"]) == ["bf16", "nf4"]
    for precision, groups in entry["groups"].items():
        assert [(g["targets"], g["r"]) for g in groups] == [("qv", 1), ("qv", 32), ("all", 1), ("all", 32)]
        methods = ["lora", "peanut", "neat"] if precision == "bf16" else ["lora", "neat"]  # no PEANuT on nf4
        for g in groups:
            assert list(g["time"]) == methods and list(g["memory"]) == methods and g["tokens_per_step"] == 32
            for t in g["time"].values():
                assert len(t["all_ms"]) == 2 and t["median_ms"] == pytest.approx(statistics.median(t["all_ms"]))
                assert t["min_ms"] == pytest.approx(min(t["all_ms"]))
                assert t["tokens_per_s"] == pytest.approx(32 / (t["median_ms"] / 1000))
            for m in g["memory"].values():
                assert m["step_peak_mb"] > 0 and m["resident_mb"] > 0
                assert m["total_peak_mb"] == pytest.approx(m["step_peak_mb"] + m["resident_mb"])
            ratios = g["ratios"]
            tok = ratios["lora/neat time (= NEAT/LoRA tokens/s)"]
            assert tok["median"] == pytest.approx(g["time"]["neat"]["tokens_per_s"] / g["time"]["lora"]["tokens_per_s"])
            assert ratios["neat/lora total peak memory"] == pytest.approx(
                g["memory"]["neat"]["total_peak_mb"] / g["memory"]["lora"]["total_peak_mb"])
            assert ("peanut/neat time" in ratios) == (precision == "bf16")
            values = [tok["median"], tok["min"], *tok["per_round"], ratios["neat/lora total peak memory"],
                      ratios["neat/lora step peak memory"]]
            if "peanut/neat time" in ratios:
                values += [ratios["peanut/neat time"]["median"], ratios["peanut/neat total peak memory"]]
            assert all(math.isfinite(v) and v > 0 for v in values), values


def test_llm_tiny_run_correctness_checks_passed(llm_tiny_run):
    _, report = llm_tiny_run
    checks = report["shapes"][0]["checks"]
    linears = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for precision in ("bf16", "nf4"):
        assert checks[precision]["passed"] is True
        assert set(checks[precision]["layers"]) == linears
        for c in checks[precision]["layers"].values():
            assert 0 < c["output_rel_err"] < llm.LAYER_TOL and 0 < c["update_rel_err"] < llm.LAYER_TOL
    bf16 = checks["bf16"]
    assert bf16["unmerge_restores_exactly"] is True and bf16["merged_weight_rel_err"] < llm.LAYER_TOL
    assert bf16["adapter_change_of_logits_rel"] > 0.01  # the update is far from zero, so the comparisons mean something
    assert bf16["merged_vs_unmerged_logits"] < llm.LOGITS_TOL and bf16["exported_lora_vs_neat_logits"] < llm.LOGITS_TOL


def test_llm_tiny_run_targets_follow_thresholds_and_are_printed(llm_tiny_run):
    stdout, report = llm_tiny_run
    ops = {"<=": operator.le, ">=": operator.ge}
    rows = report["targets"]
    assert len(rows) == 8 * 2 + 4  # tokens/s and memory per group, PEANuT/NEAT on the bf16 groups
    for row in rows:
        op, threshold = re.search(r" (<=|>=) ([0-9.]+)$", row["target"]).groups()
        assert row["status"] == ("PASS" if ops[op](row["value"], float(threshold)) else "MISS"), row
    printed = re.findall(r"^  \[(PASS|MISS)\] tiny (\w+) (\w+) r=(\d+): (.+): ", stdout, flags=re.M)
    assert printed == [(r["status"], r["precision"], r["targets"], str(r["r"]), r["target"]) for r in rows]
    assert "checks bf16: PASS" in stdout and "checks nf4: PASS" in stdout


def test_llm_layer_check_catches_a_wrong_formula():
    """The formula check can fail: an adapter whose activation is not the reference's relu is caught."""
    base = llm.build_base("tiny", 1, "cpu", 16)
    for act, caught in [("relu", False), ("gelu", True)]:
        model = get_neat_model(speed_measure.shared_clone(base), NeatConfig(r=8, target_modules=["q_proj"],
                                                                              act_fn=act))
        llm.randomize_neat_b(model)
        (check,) = llm.layer_checks(model, 64, "cpu").values()
        assert (check["update_rel_err"] > 0.1) is caught, (act, check)


def test_quantized_benchmark_quick_run(tmp_path):
    """benchmarks/quantized.py (issue 11's CPU and GPU benchmark; GPU_SCRIPT.sh quantized) still runs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quantized", "--quick", "--backends", "nf4",
                           "--targets", "qv", "--json", str(tmp_path / "q.json")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "q.json").read_text())["rows"]
    assert (row["d"], row["targets"], row["backend"]) == (128, "qv", "nf4")
    assert row["time_ratio"] == pytest.approx(row["neat_ms"] / row["lora_ms"])
    assert f"| 128 | qv | nf4 | {row['neat_ms']:.0f} | {row['lora_ms']:.0f} |" in proc.stdout


# --- benchmarks/decode.py and benchmarks/hot_path.py: their CPU modes, so they cannot rot ----------------------
def test_decode_benchmark_tiny_mode_decodes_like_the_merged_model(capsys):
    """The cached unmerged NEAT model decodes exactly the tokens of the same adapter merged into the weights (an
    independent route: W0 + dW in one matmul), and the run prints its side-by-side ratios."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from benchmarks import decode

    result = decode.main(["--tiny", "--tokens", "6", "--rounds", "1"])
    assert "cpu/lora" in capsys.readouterr().out
    assert set(result["times"]) == {"base", "lora", "neat"}
    neat = result["models"]["neat"]
    import neat_peft.layers as layers_module

    computed = []
    original = layers_module.low_rank_factors
    layers_module.low_rank_factors = lambda *args, **kwargs: computed.append(1) or original(*args, **kwargs)
    try:
        again = decode.decode(neat, result["prompt"], 6)
    finally:
        layers_module.low_rank_factors = original
    assert torch.equal(again, result["outputs"]["neat"])
    assert len(computed) == 0  # the eval cache held H across the whole decode (filled during the timed runs)
    merged = neat.merge_and_unload()
    expected = decode.decode(merged, result["prompt"], 6)
    assert expected.shape == (1, result["prompt"].shape[1] + 6)
    assert torch.equal(result["outputs"]["neat"], expected)


def test_hot_path_counts_frames_and_calls():
    """NeatLayer's forward reaches the adapter's first matmul within 5 library frames, and an eval forward on a
    cache hit makes no more Python calls than peft's LoRA layer (counted, not timed)."""
    pytest.importorskip("peft")
    from benchmarks import hot_path

    rows = hot_path.main([])
    assert rows["neat"]["frames to the matmul"] <= 5
    neat_hit = int(rows["neat"]["calls cache hit (lib/all)"].split("/")[1])
    lora_hit = int(rows["lora (peft)"]["calls cache hit (lib/all)"].split("/")[1])
    assert neat_hit <= lora_hit


@needs_minilm
@needs_corpus
def test_logits_to_keep_benchmark_runs_both_settings_on_the_clis_batches(tmp_path, capsys):
    """benchmarks/logits_to_keep.py on a tiny random Llama: both settings timed, equal losses, fewer positions."""
    from benchmarks import logits_to_keep

    out = tmp_path / "keep.json"
    assert logits_to_keep.main(["--model", str(make_tiny_llama(tmp_path / "llama")), "--batch", "2", "--warmup", "0",
                                "--repeats", "2", "--threads", "1", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["loss"]["labels"] == pytest.approx(row["loss"]["all"], rel=1e-6)
    assert 0 < row["kept_positions"] < row["padded_length"]
    assert all(len(row["wall_seconds"][k]) == 2 and row["peak_bytes"][k] > 0 for k in ("all", "labels"))
    assert row["speedup"] == pytest.approx(row["median_seconds"]["all"] / row["median_seconds"]["labels"])
    assert f"{row['speedup']:.2f}x" in capsys.readouterr().out
