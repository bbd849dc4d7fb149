"""peft's own generic test matrix (tests/test_custom_models.py of the installed peft version), run against NEAT.

The suite is fetched at test time (see peft_upstream.py), its case lists are pointed at NEAT cases, its test classes
are subclassed here, and conftest.py keeps only the items parametrised with NEAT (the rest of peft's matrix is
peft's business). Failures that are properties of NEAT rather than bugs are skipped in SKIPS with the reason.
"""

import pytest

pytest.importorskip("peft")

from neat_peft import register_with_peft  # noqa: E402

from peft_upstream import import_peft_test_module  # noqa: E402

try:
    upstream = import_peft_test_module("test_custom_models")
except LookupError as e:
    pytest.skip(f"peft's test suite is not available: {e}", allow_module_level=True)

NeatPeftConfig = register_with_peft()

# (test name, model id of peft's MockTransformerWrapper, config class, config kwargs)
NEAT_TEST_CASES = [
    ("Vanilla MLP 1 NEAT", "MLP", NeatPeftConfig, {"target_modules": "lin0", "r": 2}),
    ("Vanilla MLP 2 NEAT depth 1 gelu dropout modules_to_save", "MLP", NeatPeftConfig,
     {"target_modules": ["lin0"], "r": 2, "depth": 1, "act_fn": "gelu", "dropout": 0.1, "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 3 NEAT axis in normalize_weight", "MLP", NeatPeftConfig,
     {"target_modules": ["lin0", "lin1"], "r": 2, "axis": "in", "normalize_weight": True}),
    ("Embedding + transformers Conv1D 1 NEAT", "EmbConv1D", NeatPeftConfig,
     {"target_modules": ["emb", "conv1d"], "r": 2}),
    ("Embedding + transformers Conv1D 2 NEAT axis in normalize_weight", "EmbConv1D", NeatPeftConfig,
     {"target_modules": ["conv1d"], "r": 2, "axis": "in", "normalize_weight": True}),
    ("Conv2d 1 NEAT", "Conv2d", NeatPeftConfig, {"target_modules": ["conv2d"], "r": 2}),
    ("Conv2d 2 NEAT depth 1 axis in", "Conv2d", NeatPeftConfig,
     {"target_modules": ["conv2d", "lin0"], "r": 2, "depth": 1, "axis": "in"}),
]

# (test name, tuner method, config class, kwargs of adapter 1, kwargs of adapter 2); the model is peft's MLP
NEAT_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("NEAT Same", "neat", NeatPeftConfig,
     {"target_modules": ["lin0"], "r": 2, "depth": 1, "init_weights": False},
     {"target_modules": ["lin0"], "r": 2, "depth": 1, "init_weights": False}),
    ("NEAT Different", "neat", NeatPeftConfig,
     {"target_modules": ["lin0"], "r": 2, "init_weights": False},
     {"target_modules": ["lin1"], "r": 2, "axis": "in", "init_weights": False}),
]

NEAT_MIXED_ADAPTER_TEST_CASES = [
    ("NEAT mixed adapter",
     NeatPeftConfig(target_modules=["lin0"], r=2, init_weights=False),
     NeatPeftConfig(target_modules=["lin0"], r=4, depth=1, axis="in", init_weights=False)),
]

# Point peft's case lists at NEAT. The parametrize marks hold these very list objects and read them at collection.
upstream.TEST_CASES[:] = NEAT_TEST_CASES
upstream.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES[:] = NEAT_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES
upstream.MIXED_ADAPTER_TEST_CASES[:] = NEAT_MIXED_ADAPTER_TEST_CASES
upstream.ALL_PEFT_CONFIG_CLASSES[:] = [NeatPeftConfig]


class TestNeatCustomModel(upstream.TestPeftCustomModel):
    pass


class TestNeatMultipleActiveAdapters(upstream.TestMultipleActiveAdapters):
    pass


class TestNeatMixedAdapterBatches(upstream.TestMixedAdapterBatches):
    pass


class TestNeatRequiresGrad(upstream.TestRequiresGrad):
    pass


# (test function name, test case name or None for every case) -> why NEAT cannot pass that upstream check
SKIPS: dict[tuple[str, str | None], str] = {
    ("test_only_params_are_updated", "Embedding + transformers Conv1D 1 NEAT"): (
        "NEAT property, not a bug: A's gradient is proportional to |W0| and to B (zero at init). The Conv1D has "
        "GPT-2's std-0.02 weights and is also the only path from the embedding to the loss, so in peft's 3 SGD "
        "steps both A's move by ~2e-5, under the test's 1e-4 threshold (B's move by ~3e-3). The same Conv1D with "
        "normalize_weight=True ('... 2 NEAT axis in normalize_weight') passes: A moves by ~0.1."
    ),
}
