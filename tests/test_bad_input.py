"""Bad input: a clear error that says what is wrong, and the user's model and files left exactly as they were."""

import copy
import json

import pytest
import torch
from torch import nn

from neat_testing import (
    TinyEncoder,
    TinyMLP,
    assert_state_equal,
    dir_snapshot,
    state_snapshot,
    structure,
)
from neat_peft import NeatConfig, NeatModel, get_neat_model


@pytest.fixture
def saved_adapter(tmp_path):
    """A NEAT adapter for TinyEncoder saved to disk, and the base it was trained on."""
    base = TinyEncoder()
    model = get_neat_model(copy.deepcopy(base), NeatConfig(r=2, target_modules=["query", "value"],
                                                           modules_to_save=["classifier"], init_weights=False))
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return path, base


class Unchanged:
    """Context manager: the model's state_dict (bit-exact), module structure and training flags must not change."""

    def __init__(self, *modules):
        self.modules = modules

    def __enter__(self):
        self.before = [(state_snapshot(m), structure(m), [x.training for x in m.modules()],
                        [p.requires_grad for p in m.parameters()]) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for m, (state, struct, training, grads) in zip(self.modules, self.before):
            assert structure(m) == struct, "the module structure changed"
            assert_state_equal(m, state)
            assert [x.training for x in m.modules()] == training
            assert [p.requires_grad for p in m.parameters()] == grads
        return False


# --- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), r"NeatConfig\.r must be a positive integer, got 0"),
        (dict(r=-3), r"NeatConfig\.r must be a positive integer, got -3"),
        (dict(r=2.5), r"NeatConfig\.r must be a positive integer, got 2\.5"),
        (dict(r=True), r"NeatConfig\.r must be a positive integer"),
        (dict(depth=-1), r"NeatConfig\.depth must be an integer >= 0 \(at most 1024\), got -1"),
        (dict(depth=10**9), r"NeatConfig\.depth must be an integer >= 0 \(at most 1024\), got 1000000000"),
        (dict(act_fn="relux"), r"NeatConfig\.act_fn: Unknown act_fn 'relux'. Choose one of: \[.*'relu'"),
        (dict(act_fn=None), r"NeatConfig\.act_fn must be an activation name"),
        (dict(dropout=-0.1), r"NeatConfig\.dropout must be in \[0, 1\), got -0\.1"),
        (dict(dropout=1.0), r"NeatConfig\.dropout must be in \[0, 1\), got 1\.0"),
        (dict(axis="rows"), r"NeatConfig\.axis must be 'out' or 'in', got 'rows'"),
        (dict(scaling=float("nan")), r"NeatConfig\.scaling must be a finite number"),
        (dict(scaling=float("inf")), r"NeatConfig\.scaling must be a finite number"),
        (dict(scaling="1"), r"NeatConfig\.scaling must be a finite number.*, got '1'"),
        (dict(layers_pattern="layers"), r"layers_pattern needs layers_to_transform"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeatConfig(target_modules=["fc1"], **kwargs)


def test_config_must_be_a_neat_config():
    base = TinyMLP()
    with Unchanged(base):
        with pytest.raises(TypeError, match="config must be a NeatConfig, got dict"):
            get_neat_model(base, {"r": 2})


# --- targets --------------------------------------------------------------------------------------------------
def test_targets_matching_nothing_list_existing_modules():
    base = TinyEncoder()
    with Unchanged(base):
        with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\] matched no module.*"
                                             r"'layers\.0\.query'.*Pass names or suffixes"):
            get_neat_model(base, NeatConfig(r=2, target_modules=["q_proj"]))
        with pytest.raises(ValueError, match="matched no module"):
            get_neat_model(base, NeatConfig(r=2, target_modules=["query"], layers_to_transform=[7]))


def test_no_default_targets_for_unknown_model():
    base = TinyMLP()
    with Unchanged(base):
        with pytest.raises(ValueError, match="target_modules is None and there is no default"):
            get_neat_model(base, NeatConfig(r=2))


@pytest.mark.parametrize(
    "module, message",
    [
        (nn.LayerNorm(5), r"Cannot adapt module 'norm' of type LayerNorm: NEAT supports nn\.Linear"),
        (nn.Conv2d(4, 4, 3, groups=4), r"Cannot adapt Conv2d 'norm': groups=4"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), r"padding_mode='reflect'"),
        (nn.Conv1d(4, 4, 3), r"of type Conv1d"),
    ],
)
def test_unsupported_layer_type(module, message):
    base = TinyMLP()
    base.norm = module
    with Unchanged(base):
        # fc1 comes first and is supported: it must not be wrapped when a later target fails
        with pytest.raises(ValueError, match=message):
            get_neat_model(base, NeatConfig(r=2, target_modules=["fc1", "norm"]))


def test_modules_to_save_matching_nothing():
    base = TinyMLP()
    with Unchanged(base):
        with pytest.raises(ValueError, match=r"modules_to_save entries \['classifier'\] match no module. "
                                             r"Top-level modules: \['fc1', 'fc2', 'head'\]"):
            get_neat_model(base, NeatConfig(r=2, target_modules=["fc1"], modules_to_save=["classifier"]))


# --- adapter names --------------------------------------------------------------------------------------------
def test_adding_an_existing_adapter_name():
    model = get_neat_model(TinyMLP(), NeatConfig(r=2, target_modules=["fc1"], init_weights=False))
    with Unchanged(model):
        with pytest.raises(ValueError, match="An adapter named 'default' exists already"):
            model.add_adapter("default", NeatConfig(r=3, target_modules=["fc2"]))
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("name", ["", "__base__", "a.b"])
def test_reserved_or_malformed_adapter_names(name):
    model = get_neat_model(TinyMLP(), NeatConfig(r=2, target_modules=["fc1"]))
    with Unchanged(model):
        with pytest.raises(ValueError, match="cannot name an adapter"):
            model.add_adapter(name, NeatConfig(r=2, target_modules=["fc2"]))


def test_add_adapter_with_bad_targets_leaves_wrapped_model_unchanged():
    model = get_neat_model(TinyMLP(), NeatConfig(r=2, target_modules=["fc1"], init_weights=False))
    with Unchanged(model):
        with pytest.raises(ValueError, match="matched no module"):
            model.add_adapter("b", NeatConfig(r=2, target_modules=["nope"]))
    assert list(model.peft_config) == ["default"]


def test_unknown_adapter_names_in_calls():
    model = get_neat_model(TinyMLP(), NeatConfig(r=2, target_modules=["fc1"], init_weights=False))
    with Unchanged(model):
        for call in (lambda: model.set_adapter("x"), lambda: model.delete_adapter("x"),
                     lambda: model.merge_adapter(["x"]), lambda: model.save_pretrained("unused", ["x"]),
                     lambda: model.export_lora("unused", "x")):
            with pytest.raises(ValueError, match="No adapter named"):
                call()


def test_safe_merge_refuses_inf():
    model = get_neat_model(TinyMLP(), NeatConfig(r=2, target_modules=["fc1", "fc2"], init_weights=False))
    with torch.no_grad():
        model.base_model.fc2.neat_B["default"].weight.fill_(float("inf"))
    with Unchanged(model):
        with pytest.raises(ValueError, match=r"would put NaN/inf into the weights; nothing was merged"):
            model.merge_adapter(safe_merge=True)
    assert not any(layer.merged for _, layer in model.neat_layers())


# --- loading ----------------------------------------------------------------------------------------------------
def check_load_refused(path, base, message, exc=ValueError):
    """from_pretrained into a fresh base and load_adapter into a wrapped model must both refuse, changing nothing."""
    files = dir_snapshot(path) if path.exists() else None
    with Unchanged(base):
        with pytest.raises(exc, match=message):
            NeatModel.from_pretrained(base, path)
    wrapped = get_neat_model(copy.deepcopy(base), NeatConfig(r=2, target_modules=["ffn"], init_weights=False))
    with Unchanged(wrapped):
        with pytest.raises(exc, match=message):
            wrapped.load_adapter(path, "loaded")
    assert list(wrapped.peft_config) == ["default"]
    if files is not None:
        assert dir_snapshot(path) == files


def test_load_into_model_with_other_shapes(saved_adapter):
    path, _ = saved_adapter
    check_load_refused(path, TinyEncoder(d=6), r"does not fit this model \(.*shape mismatches, e\.g\. .*"
                                               r"'base_model\.model\.layers\.0\.query\.peanut_A\.weight: "
                                               r"file \(2, 8\), "
                                               r"model needs \(2, 6\)'.*different base model\?")


def test_load_into_model_without_the_target_names(saved_adapter):
    path, _ = saved_adapter
    other = TinyEncoder()
    other.layers = other.layers[:1]  # the adapter also names layers.1.*
    check_load_refused(path, other, r"does not fit this model")


def test_load_into_model_without_the_saved_module(saved_adapter):
    path, _ = saved_adapter
    other = TinyEncoder()
    other.head = other.classifier
    del other.classifier
    check_load_refused(path, other, r"does not fit this model: modules_to_save entries \['classifier'\]")


def test_missing_and_extra_tensors(saved_adapter):
    from safetensors.torch import load_file, save_file

    path, base = saved_adapter
    tensors = load_file(path / "adapter_model.safetensors")
    dropped = {k: v for k, v in tensors.items() if "layers.1.value.peanut_B" not in k}
    save_file(dropped, path / "adapter_model.safetensors")
    check_load_refused(path, base,
                       r"missing 1 tensors, e\.g\. \['base_model\.model\.layers\.1\.value\.peanut_B\.weight'\]")
    save_file(tensors | {"base_model.model.layers.0.ffn.peanut_A.weight": torch.zeros(2, 8)},
              path / "adapter_model.safetensors")
    check_load_refused(path, base, r"1 tensors for modules this model lacks, e\.g\. "
                                   r"\['base_model\.model\.layers\.0\.ffn\.peanut_A\.weight'\]")


def test_missing_directory_and_config(tmp_path, saved_adapter):
    _, base = saved_adapter
    check_load_refused(tmp_path / "nowhere", base, "does not exist", FileNotFoundError)
    (tmp_path / "empty").mkdir()
    check_load_refused(tmp_path / "empty", base, "adapter_config.json' is missing", FileNotFoundError)


def test_missing_weights_file(saved_adapter):
    path, base = saved_adapter
    (path / "adapter_model.safetensors").unlink()
    check_load_refused(path, base, r"adapter_model\.safetensors' is missing", FileNotFoundError)


@pytest.mark.parametrize("keep", [0, 7, 100, -20])
def test_truncated_weights_file(saved_adapter, keep):
    path, base = saved_adapter
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[:keep] if keep >= 0 else data[:keep])
    check_load_refused(path, base, r"is not a readable safetensors file \(truncated or corrupt\?\)")


def test_corrupt_config(saved_adapter):
    path, base = saved_adapter
    (path / "adapter_config.json").write_text('{"peft_type": "PEANUT", "r": ')
    check_load_refused(path, base, r"adapter_config\.json' is not valid JSON")


def test_config_with_invalid_values(saved_adapter):
    path, base = saved_adapter
    data = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(data | {"r": 0}))
    check_load_refused(path, base, r"adapter_config\.json': NeatConfig\.r must be a positive integer, got 0")
    (path / "adapter_config.json").write_text(json.dumps(data | {"use_dora": True}))
    check_load_refused(path, base, r"fields NEAT does not know: \['use_dora'\]")


def test_config_of_another_method(tmp_path, saved_adapter):
    path, base = saved_adapter
    model = NeatModel.from_pretrained(copy.deepcopy(base), path)
    model.export_lora(tmp_path / "lora")
    check_load_refused(tmp_path / "lora", base, r"describes a 'LORA' adapter, not NEAT/PEANuT.*"
                                                r"load it with peft\.PeftModel\.from_pretrained")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    check_load_refused(tmp_path / "ia3", base, r"describes a 'IA3' adapter")


def test_pickle_only_adapter_is_refused_without_unpickling(saved_adapter, monkeypatch):
    from safetensors.torch import load_file

    path, base = saved_adapter
    tensors = load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")

    def no_pickle(*args, **kwargs):
        raise AssertionError("a pickle file was opened")

    monkeypatch.setattr(torch, "load", no_pickle)
    check_load_refused(path, base, r"Found \['adapter_model\.bin'\]: pickle files are never loaded",
                       FileNotFoundError)


def test_save_into_a_file_path(tmp_path):
    model = get_neat_model(TinyMLP(), NeatConfig(r=2, target_modules=["fc1"]))
    target = tmp_path / "file.txt"
    target.write_text("user data")
    with Unchanged(model):
        with pytest.raises(ValueError, match="it is a file, not a directory"):
            model.save_pretrained(target)
        with pytest.raises(ValueError, match="it is a file, not a directory"):
            model.export_lora(target)
    assert target.read_text() == "user data"


def test_multihead_attention_projection_is_refused():
    """nn.MultiheadAttention reads out_proj.weight instead of calling out_proj: an adapter there would do nothing."""
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.fc = nn.Linear(8, 8)

    base = WithMHA()
    with Unchanged(base):
        with pytest.raises(ValueError, match=r"Cannot adapt 'attn\.out_proj': nn\.MultiheadAttention uses its "
                                             r"out_proj's weight directly"):
            get_neat_model(base, NeatConfig(r=2, target_modules=["fc", "out_proj"]))


# --- hostile or careless config values, directly and from a file ----------------------------------------------
HOSTILE_VALUES = [
    (dict(target_modules=123), r"NeatConfig\.target_modules must be a list of module names, a regex string, or None, "
                               r"got 123"),
    (dict(target_modules="["), r"NeatConfig\.target_modules: the regex '\[' is refused: it is not a valid regular "
                               r"expression"),
    (dict(target_modules=[1, 2]), r"NeatConfig\.target_modules must be a list of module names.*got \[1, 2\]"),
    (dict(target_modules="(.|.)*z"), r"NeatConfig\.target_modules: the regex '\(\.\|\.\)\*z' is refused: it has an "
                                     r"alternation inside a repeat"),
    (dict(exclude_modules="(a+)+"), r"NeatConfig\.exclude_modules: .*a repeat inside a repeat"),
    (dict(modules_to_save=["(.|.)*z"]), r"NeatConfig\.modules_to_save: the regex '\(\.\|\.\)\*z' is refused"),
    (dict(modules_to_save="classifier"), r"NeatConfig\.modules_to_save must be a list of module names or None"),
    (dict(layers_to_transform="abc"), r"NeatConfig\.layers_to_transform must be a block index.*got 'abc'"),
    (dict(layers_to_transform=[0, -1]), r"NeatConfig\.layers_to_transform must be a block index"),
    (dict(layers_to_transform=[True]), r"NeatConfig\.layers_to_transform must be a block index"),
    (dict(layers_to_transform=[0], layers_pattern="(xx|x)+"), r"NeatConfig\.layers_pattern: .*alternation inside"),
    (dict(normalize_weight="false"), r"NeatConfig\.normalize_weight must be true or false \(a boolean\), got 'false'"),
    (dict(inference_mode="false"), r"NeatConfig\.inference_mode must be true or false \(a boolean\), got 'false'"),
    (dict(init_weights="false"), r"NeatConfig\.init_weights must be true or false \(a boolean\), got 'false'"),
    (dict(init_weights=0), r"NeatConfig\.init_weights must be true or false"),
    (dict(scaling=1e39), r"NeatConfig\.scaling must be a finite number within float32's range.*got 1e\+39"),
    (dict(dropout=True), r"NeatConfig\.dropout must be in \[0, 1\)"),
    (dict(task_type=["SEQ_CLS"]), r"NeatConfig\.task_type must be a string or None"),
    (dict(modules_to_save=["x"] * 65), r"NeatConfig\.modules_to_save has 65 entries \(at most 64\)"),
    (dict(depth=10**9), r"NeatConfig\.depth must be an integer >= 0 \(at most 1024\)"),
]


@pytest.mark.parametrize("kwargs, message", HOSTILE_VALUES, ids=range(len(HOSTILE_VALUES)))
def test_hostile_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeatConfig(**{"target_modules": ["query"], **kwargs})


@pytest.mark.parametrize("kwargs, message", HOSTILE_VALUES, ids=range(len(HOSTILE_VALUES)))
def test_hostile_config_values_in_a_file(saved_adapter, kwargs, message):
    """Saved with a matching hash (as a hostile tool would): the field checks refuse it, naming file and field."""
    from neat_peft.formats import read_adapter, write_adapter

    path, base = saved_adapter
    config, tensors = read_adapter(path)
    write_adapter(path, config | kwargs, tensors)
    check_load_refused(path, base, rf"adapter_config\.json': {message}")


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", r"must hold a JSON object \(\{\.\.\.\}\) of adapter fields, but its top level is list"),
    ("null", r"must hold a JSON object .* but its top level is null"),
    ('"NEAT"', r"must hold a JSON object .* but its top level is str"),
    ("[" * 200_000 + "]" * 200_000, r"is nested too deeply to be an adapter config"),
    ('{"peft_type": "NEAT", "peft_type": "PEANUT"}',
     r"is not valid JSON \(the keys \['peft_type'\] appear more than once"),
    ('{"peft_type": ["NEAT"]}', r"describes a \['NEAT'\] adapter"),
])
def test_config_file_that_is_no_adapter_config(saved_adapter, text, message):
    path, base = saved_adapter
    (path / "adapter_config.json").write_text(text)
    check_load_refused(path, base, rf"adapter_config\.json' {message}")


# --- adapter names and loaded tensors (checks model.py calls) ---------------------------------------------------
@pytest.mark.parametrize("name, why", [
    ("", "it is empty"), ("__base__", "'__base__' is reserved"), ("a/b", "it contains '/'"),
    ("..", "it contains '.'"), ("../../etc", "it contains './'"), ("a\\b", r"it contains '\\\\'"),
    ("/abs", "it contains '/'"), ("C:x", "it contains ':'"), ("a\x00b", r"it contains '\\x00'"),
])
def test_check_adapter_name_refuses_names_that_leave_the_directory(name, why):
    from neat_peft.formats import check_adapter_name

    with pytest.raises(ValueError, match=rf"cannot name an adapter: {why}"):
        check_adapter_name(name, reserved=["__base__"])


def test_check_adapter_name_accepts_plain_names():
    from neat_peft.formats import check_adapter_name

    for name in ("default", "b", "my-adapter_2", "Ünïcode", "with space"):
        check_adapter_name(name)
    with pytest.raises(ValueError, match="must be a string, got 3"):
        check_adapter_name(3)


def test_validate_adapter_tensors():
    from neat_peft.formats import validate_adapter_tensors

    key = "base_model.model.fc.peanut_A.weight"
    good = {key: torch.ones(2, 3), "base_model.model.bn.num_batches_tracked": torch.tensor(4)}
    shapes = {key: (2, 3), "base_model.model.bn.num_batches_tracked": ()}
    ints = {"base_model.model.bn.num_batches_tracked": torch.int64}
    out = validate_adapter_tensors(good, shapes, "f.safetensors", ints)
    assert out.keys() == good.keys() and all(torch.equal(out[k], v) for k, v in good.items())
    neat_named = {key.replace("peanut_", "neat_"): torch.ones(2, 3)}
    assert list(validate_adapter_tensors(neat_named, {key: (2, 3)}, "f.safetensors")) == [key]
    cases = [
        ({key: torch.ones(2, 3, dtype=torch.int64)}, r"'f\.safetensors' holds tensors of the wrong dtype, e\.g\. "
                                                     r"\['base_model\.model\.fc\.peanut_A\.weight: torch\.int64'\]"),
        ({key: torch.ones(2, 3, dtype=torch.complex64)}, r"wrong dtype.*complex64"),
        ({key: torch.ones(2, 3, dtype=torch.bool)}, r"wrong dtype.*torch\.bool"),
        ({key: torch.ones(3, 2)}, r"The adapter in 'f\.safetensors' does not fit this model \(1 shape mismatches"),
        ({key: torch.ones(2, 3), **neat_named},
         r"'f\.safetensors': Two tensors, 'base_model\.model\.fc\.peanut_A\.weight' and "
         r"'base_model\.model\.fc\.neat_A\.weight', are the same adapter tensor"),
        ({key: torch.tensor([[1.0, float("nan"), 0], [0, 0, 0]])}, r"'f\.safetensors' holds NaN or inf in 1 tensors"),
        ({key: torch.full((2, 3), float("-inf"), dtype=torch.bfloat16)}, r"holds NaN or inf"),
    ]
    for tensors, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_adapter_tensors(tensors, {key: (2, 3)}, "f.safetensors")
    with pytest.raises(ValueError, match=r"wrong dtype.*num_batches_tracked: torch\.float32"):
        validate_adapter_tensors(good | {"base_model.model.bn.num_batches_tracked": torch.tensor(4.0)}, shapes,
                                 "f.safetensors", ints)
    inf = {key: torch.full((2, 3), float("inf"))}
    assert torch.equal(validate_adapter_tensors(inf, {key: (2, 3)}, "f", allow_nonfinite=True)[key], inf[key])
