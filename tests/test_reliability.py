"""Adapter directories under crashes, concurrent writers and hostile bytes: a directory always reads as one
complete adapter, and anything else is a clear error naming the file."""

import copy
import dataclasses
import json
import os
import random
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neat_peft.formats as formats
from neat_testing import TinyEncoder, dir_snapshot
from neat_testing import tagged_adapter as adapter
from neat_peft import NeatConfig, NeatModel, get_neat_model
from neat_peft.formats import CONFIG_NAME, STAGING_PREFIX, WEIGHTS_NAME, read_adapter, rebind_adapter, write_adapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked saving processes (POSIX only)")


def which(directory, pairs) -> int:
    """Index of the pair `directory` reads as, exactly (config and every tensor bit for bit); fails otherwise."""
    data, tensors = read_adapter(directory)
    for i, (config, expected) in enumerate(pairs):
        if data == config and tensors.keys() == expected.keys() and all(torch.equal(tensors[k], v)
                                                                         for k, v in expected.items()):
            return i
    raise AssertionError(f"{directory} reads as neither adapter: {data}")


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def forked(body) -> int:
    """Run body() in a forked child that exits with os._exit (0 when body returns), and return its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


# --- crashes -----------------------------------------------------------------------------------------------------
@needs_fork
def test_saves_killed_at_random_moments_leave_one_complete_adapter(tmp_path):
    pairs = [adapter(1), adapter(2)]
    write_adapter(tmp_path, *pairs[0])
    rng = random.Random(0)
    seen, kills, deadline, hard_deadline = set(), 0, time.monotonic() + 3.0, time.monotonic() + 20.0

    def save_forever():
        while True:
            write_adapter(tmp_path, *pairs[1])
            write_adapter(tmp_path, *pairs[0])

    while (time.monotonic() < deadline or kills < 10) and time.monotonic() < hard_deadline:  # a loaded machine
        pid = forked(save_forever)
        time.sleep(rng.uniform(0.0, 0.2))  # a save takes ~10-50 ms here (fsyncs)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.add(which(tmp_path, pairs))
        kills += 1
    assert kills >= 10 and seen == {0, 1}, (kills, seen)  # both states were hit: the kills landed mid-loop
    write_adapter(tmp_path, *pairs[1])  # the next save cleans whatever the killed ones left
    assert listing(tmp_path) == [CONFIG_NAME, WEIGHTS_NAME] and which(tmp_path, pairs) == 1


@needs_fork
def test_save_killed_between_its_two_renames_reads_as_the_new_adapter(tmp_path, monkeypatch):
    old, new, third = adapter(1), adapter(2), adapter(3)
    write_adapter(tmp_path, *old)
    real_replace = os.replace

    def die_after_the_weights(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(WEIGHTS_NAME):
            os._exit(9)  # SIGKILL-like: no cleanup runs

    def crashing_save():
        monkeypatch.setattr(formats.os, "replace", die_after_the_weights)
        write_adapter(tmp_path, *new)

    pid = forked(crashing_save)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 9
    # On disk: the new weights beside the old config, and the new config still staged.
    assert json.loads((tmp_path / CONFIG_NAME).read_text()) == old[0]
    assert any(name.startswith(STAGING_PREFIX) for name in listing(tmp_path))
    assert which(tmp_path, [old, new]) == 1
    # The next save finishes the interrupted one first: even if it then fails, the directory holds `new` alone.
    monkeypatch.setattr(formats, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_adapter(tmp_path, *third)
    monkeypatch.undo()
    assert listing(tmp_path) == [CONFIG_NAME, WEIGHTS_NAME]
    assert json.loads((tmp_path / CONFIG_NAME).read_text()) == new[0] and which(tmp_path, [old, new]) == 1


@pytest.mark.parametrize("first_save", [False, True])
def test_io_error_between_the_two_renames_leaves_the_old_adapter(tmp_path, monkeypatch, first_save):
    old, new = adapter(1), adapter(2)
    if not first_save:
        write_adapter(tmp_path, *old)
    before = dir_snapshot(tmp_path)
    real_replace = os.replace

    def failing_config_rename(src, dst):
        if str(dst).endswith(CONFIG_NAME) and STAGING_PREFIX in str(src):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(formats.os, "replace", failing_config_rename)
    with pytest.raises(OSError, match="Input/output error"):
        write_adapter(tmp_path, *new)
    monkeypatch.undo()
    assert dir_snapshot(tmp_path) == before  # bit-identical, no staging left
    if not first_save:
        assert which(tmp_path, [old, new]) == 0


def test_saves_keep_other_adapters_and_user_files(tmp_path):
    model = get_neat_model(TinyEncoder(), NeatConfig(r=2, target_modules=["query"], init_weights=False))
    model.add_adapter("b", NeatConfig(r=2, target_modules=["value"], init_weights=False))
    model.save_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".adapter_model.safetensors.bak").write_text("mine too")
    (tmp_path / "b" / "README.md").write_text("about b")
    leftover = tmp_path / f"{STAGING_PREFIX}dead"  # what a killed save leaves, and an old-style temp file
    leftover.mkdir()
    (leftover / WEIGHTS_NAME).write_bytes(b"half")
    (tmp_path / f".{WEIGHTS_NAME}.x1y2.tmp").write_bytes(b"half")
    b_files = dir_snapshot(tmp_path / "b")
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    assert listing(tmp_path) == [".adapter_model.safetensors.bak", CONFIG_NAME, WEIGHTS_NAME, "b", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine" and dir_snapshot(tmp_path / "b") == b_files
    model.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "README.md").read_text() == "about b"


# --- concurrency -------------------------------------------------------------------------------------------------
@needs_fork
@pytest.mark.parametrize("reader_locks", [True, False], ids=["locking-reader", "reader-without-locks"])
def test_reader_never_sees_a_mixed_pair_during_two_concurrent_writers(tmp_path, monkeypatch, reader_locks):
    pairs = [adapter(1, 64), adapter(2, 64)]
    write_adapter(tmp_path, *pairs[0])
    stop = time.monotonic() + 1.5

    def save_until_stop(pair):
        while time.monotonic() < stop:
            write_adapter(tmp_path, *pair)

    writers = [forked(lambda pair=pair: save_until_stop(pair)) for pair in pairs]
    if not reader_locks:  # as on a file system without flock: the reader must detect and retry
        monkeypatch.setattr(formats, "_locked", lambda directory, exclusive: _no_lock())
    counts = [0, 0]
    while time.monotonic() < stop:
        counts[which(tmp_path, pairs)] += 1
    for pid in writers:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert min(counts) > 0, counts  # the reader saw both writers' adapters
    assert listing(tmp_path) == [CONFIG_NAME, WEIGHTS_NAME]


class _no_lock:
    def __enter__(self):
        return False

    def __exit__(self, *exc):
        return False


# --- pairs that do not belong together ----------------------------------------------------------------------------
def test_hand_edits(tmp_path):
    old = adapter(1)
    write_adapter(tmp_path, *old)
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps(old[0] | {"base_model_name_or_path": "/my/local/copy"}))  # descriptive: accepted
    assert read_adapter(tmp_path)[0]["base_model_name_or_path"] == "/my/local/copy"
    path.write_text(json.dumps(old[0] | {"scaling": 7.0}))  # changes the computation: not this file's config
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}' and '.*{WEIGHTS_NAME}' were not saved together.*"
                                         r"rebind_adapter\("):
        read_adapter(tmp_path)
    rebind_adapter(tmp_path)
    assert read_adapter(tmp_path)[0]["scaling"] == 7.0


def test_files_without_the_binding_load(tmp_path):
    """peft's own saves (and older neat-peft ones) carry no config hash: they load as before."""
    from safetensors.torch import save_file

    config, tensors = adapter(1)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    save_file(tensors, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    assert which(tmp_path, [(config, tensors)]) == 0


# --- property: hostile files give clear errors, quickly ------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_adapter(tmp_path_factory):
    base = TinyEncoder()
    model = get_neat_model(copy.deepcopy(base), NeatConfig(r=2, target_modules=["query", "value"],
                                                           modules_to_save=["classifier"], init_weights=False))
    path = tmp_path_factory.mktemp("hostile") / "adapter"
    model.save_pretrained(path)
    return path, base, dir_snapshot(path)


FIELDS = [f.name for f in dataclasses.fields(NeatConfig)] + ["peft_type", "neat_peft", "revision", "unknown_field"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
CLEAR_ERRORS = (ValueError, FileNotFoundError)


def load_changes_nothing_or_fails_clearly(path, base, names_in_message):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    start = time.monotonic()
    try:
        NeatModel.from_pretrained(copy.deepcopy(base), path)
    except CLEAR_ERRORS as e:
        assert any(name in str(e) for name in names_in_message), str(e)
    assert time.monotonic() - start < 2.0
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("field", FIELDS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values, bound=st.booleans())
def test_random_config_values_give_clear_errors(hostile_adapter, field, value, bound):
    path, base, files = hostile_adapter
    config, tensors = read_adapter(path)
    try:
        changed = config | {field: value}
        if bound:  # saved with a matching hash, as a hostile tool would: the field checks must catch it
            write_adapter(path, changed, tensors)
        else:  # edited by hand: the hash no longer matches (or the field check speaks first)
            (path / CONFIG_NAME).write_text(json.dumps(changed))
        load_changes_nothing_or_fails_clearly(path, base, [str(path)])
    finally:
        for name, data in files.items():
            (path / name).write_bytes(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.one_of(
    st.binary(max_size=64),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4).map(lambda d: json.dumps(d).encode()),
    st.builds(lambda dtype, shape, lo, hi: json.dumps({"t": {"dtype": dtype, "shape": shape,
                                                             "data_offsets": [lo, hi]}}).encode(),
              st.sampled_from(["F32", "F16", "BF16", "I64", "C64", "BOOL", "F8_E4M3", "U8", "XX", ""]),
              st.lists(st.integers(-2, 2**40), max_size=4), st.integers(-2, 2**40), st.integers(-2, 2**40)),
), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)), tail=st.binary(max_size=32))
def test_random_safetensors_headers_give_clear_errors(hostile_adapter, header, length, tail):
    path, base, files = hostile_adapter
    size = len(header) if length is None else length
    try:
        (path / WEIGHTS_NAME).write_bytes(size.to_bytes(8, "little") + header + tail)
        load_changes_nothing_or_fails_clearly(path, base, [f"{WEIGHTS_NAME}'", str(path)])
    finally:
        for name, data in files.items():
            (path / name).write_bytes(data)


def test_regex_bombs_and_deep_nesting_are_refused_quickly(hostile_adapter):
    path, base, files = hostile_adapter
    config = json.loads(files[CONFIG_NAME])
    cases = [
        (json.dumps(config | {"target_modules": "(.|.)*z"}), r"NeatConfig\.target_modules: the regex '\(\.\|\.\)\*z' "
                                                            r"is refused: it has an alternation inside a repeat"),
        (json.dumps(config | {"modules_to_save": ["(a+)+b"]}), r"NeatConfig\.modules_to_save: .* a repeat inside a"),
        (json.dumps(config | {"exclude_modules": ".*.*.*.*.*z"}), r"NeatConfig\.exclude_modules: .* 5 repeats"),
        ("[" * 200_000 + "]" * 200_000, r"is nested too deeply"),
        ('{"peft_type": "NEAT", "r": 2, "r": 8}', r"keys \['r'\] appear more than once"),
        ('{"peft_type": "NEAT", "scaling": NaN}', r"NaN is not a JSON number"),
        ('{"peft_type": "NEAT", "r": ' + "9" * 5000 + "}", r"is not valid JSON"),
    ]
    try:
        for text, message in cases:
            (path / CONFIG_NAME).write_text(text)
            start = time.monotonic()
            with pytest.raises(ValueError, match=rf"{CONFIG_NAME}'.*{message}"):
                NeatModel.from_pretrained(copy.deepcopy(base), path)
            assert time.monotonic() - start < 1.0
    finally:
        (path / CONFIG_NAME).write_bytes(files[CONFIG_NAME])
    assert dir_snapshot(path) == files



@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files")
@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
@pytest.mark.parametrize("kind", ["fifo", "directory", "link-to-dev-zero"])
def test_special_files_are_refused_without_reading_them(tmp_path, name, kind):
    """A FIFO would block a read forever and /dev/zero never ends: both are refused before reading."""
    write_adapter(tmp_path, *adapter(1))
    (tmp_path / name).unlink()
    {"fifo": lambda p: os.mkfifo(p), "directory": lambda p: p.mkdir(),
     "link-to-dev-zero": lambda p: p.symlink_to("/dev/zero")}[kind](tmp_path / name)
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"'{tmp_path / name}' is not a regular file"):
        read_adapter(tmp_path)
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_save_over_a_directory_named_like_an_adapter_file_is_refused_before_writing(tmp_path, name):
    write_adapter(tmp_path, *adapter(1))
    (tmp_path / name).unlink()
    (tmp_path / name).mkdir()
    before = (listing(tmp_path), dir_snapshot(tmp_path))
    with pytest.raises(ValueError, match=rf"Cannot save the adapter into '{tmp_path}': {name} there is not a regular"):
        write_adapter(tmp_path, *adapter(2))
    assert (listing(tmp_path), dir_snapshot(tmp_path)) == before
