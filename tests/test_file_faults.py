"""The file layer under injected faults: every write, fsync, rename, link, mkdir, open and unlink a save makes is
made to fail in turn (an OSError as the OS would raise it), while a reader thread loads the directory again and again.

Writers: formats.write_adapter, NeatModel.save_pretrained (two adapters, two directories), export_lora, and
atomic_write (the CLI's run-directory files). A clean save's calls are counted and numbered, then each case fails
call k (CI: every k once, and k together with k+1; long mode adds random sets of 1-3 calls). After every case:
  - a save that returned left the new version, and fsynced every file before renaming it into place and the
    directory after its last rename (else a power cut could lose what it reported saved);
  - a save that raised raised the injected error (or one caused by it) naming the directory, and left the old
    version or the new one, complete (loaded tensors compared bit for bit with both references);
  - nothing is left but the adapter's files, unless a cleanup call was the one that failed; then the next save
    removes what is left;
  - every load of the reader thread, during all of it, saw one complete version.
Long mode: NEAT_PROPERTY_LONG=<seconds> (shared with test_state_machine), split among the writers, adds random cases:
`NEAT_PROPERTY_LONG=240 pytest -s tests/test_file_faults.py` prints how many cases each writer ran.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fnmatch
import itertools
import os
import pathlib
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors import SafetensorError

import neat_peft.formats as formats
from neat_testing import TinyEncoder, tagged_adapter
from neat_peft import NeatConfig, NeatModel, get_neat_model
from neat_peft.cli.rundir import atomic_write_text
from neat_peft.formats import CONFIG_NAME, STAGING_PREFIX, WEIGHTS_NAME, read_adapter, write_adapter

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names fsync'd files via /proc")]
LONG = float(os.environ.get("NEAT_PROPERTY_LONG", "0"))
CLEANUP_FUNCTIONS = {"rmtree", "_rmtree_safe_fd", "_rmtree_unsafe"}


@dataclass
class Call:
    op: str
    path: str               # real path (the source, for a rename or link)
    target: Optional[str]   # a rename's destination
    cleanup: bool           # made while removing temporary files (shutil.rmtree, or an unlink)
    failed: bool = False    # the injected fault
    ok: bool = False        # returned


class Faults:
    """Numbers the file-system calls this thread makes on paths under `root` and raises an OSError, as the OS
    would, at the numbers in `fail_at`. Other threads (the reader) are left alone."""

    PATH_CALLS = {"mkdir": errno.ENOSPC, "open": errno.EMFILE, "link": errno.EPERM, "replace": errno.EIO,
                  "rename": errno.EIO, "unlink": errno.EBUSY, "remove": errno.EBUSY, "rmdir": errno.EBUSY}

    def __init__(self, monkeypatch, root: Path, fail_at=()):
        self.root, self.fail_at = os.path.realpath(root), set(fail_at)
        self.calls: list[Call] = []
        self.injected: list[BaseException] = []
        self.thread = threading.get_ident()
        for name, code in self.PATH_CALLS.items():
            monkeypatch.setattr(os, name, self._path_call(name, getattr(os, name), code))
        monkeypatch.setattr(os, "fsync", self._fsync(os.fsync))
        monkeypatch.setattr(formats, "open", self._path_call("open", open, errno.EMFILE), raising=False)
        monkeypatch.setattr(formats, "save_file", self._write(formats.save_file, "safetensors"))
        monkeypatch.setattr(pathlib.Path, "write_bytes", self._write(pathlib.Path.write_bytes, "bytes"))
        monkeypatch.setattr(pathlib.Path, "write_text", self._write(pathlib.Path.write_text, "text"))

    def _mine(self, path) -> Optional[str]:
        """The real path if this thread touches something under root, else None."""
        if threading.get_ident() != self.thread or path is None:
            return None
        path = os.path.realpath(os.fspath(path))
        return path if path == self.root or path.startswith(self.root + os.sep) else None

    def _record(self, op, path, target=None) -> Call:
        cleanup = op in ("unlink", "remove", "rmdir") or any(
            sys._getframe(i).f_code.co_name in CLEANUP_FUNCTIONS for i in range(2, 7))
        call = Call(op, path, target, cleanup)
        self.calls.append(call)
        if len(self.calls) - 1 in self.fail_at:
            call.failed = True
        return call

    def _raise(self, error: BaseException):
        self.injected.append(error)
        raise error

    def _path_call(self, op, real, code):
        def call(path, *args, **kwargs):
            if kwargs.get("dir_fd") is not None:  # shutil.rmtree works relative to a directory's fd
                if threading.get_ident() != self.thread:
                    return real(path, *args, **kwargs)
                mine = self._mine(os.path.join(os.readlink(f"/proc/self/fd/{kwargs['dir_fd']}"), path))
            else:
                mine = None if isinstance(path, int) else self._mine(path)
            if mine is None:
                return real(path, *args, **kwargs)
            target = os.path.realpath(os.fspath(args[0])) if op in ("replace", "rename", "link") else None
            record = self._record(op, mine, target)
            if record.failed:
                more = (None, os.fspath(args[0])) if target else ()
                self._raise(OSError(code, os.strerror(code), os.fspath(path), *more))
            result = real(path, *args, **kwargs)
            record.ok = True
            return result
        return call

    def _fsync(self, real):
        def fsync(fd):
            fd = fd if isinstance(fd, int) else fd.fileno()
            try:
                mine = self._mine(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                mine = None
            if mine is None:
                return real(fd)
            record = self._record("fsync", mine)
            if record.failed:
                self._raise(OSError(errno.EIO, os.strerror(errno.EIO)))  # fsync's errors name no file
            real(fd)
            record.ok = True
        return fsync

    def _write(self, real, kind):
        """A failing write leaves a partial file and raises what the real writer raises on a full disk."""
        def write(*args, **kwargs):
            path = args[1] if kind == "safetensors" else args[0]
            mine = self._mine(path)
            if mine is None:
                return real(*args, **kwargs)
            record = self._record("write", mine)
            if record.failed:
                with open(path, "wb") as f:
                    f.write(b"partial")
                self._raise(SafetensorError("Error while serializing: I/O error: No space left on device (os error "
                                            "28)") if kind == "safetensors"
                            else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            result = real(*args, **kwargs)
            record.ok = True
            return result
        return write

    def check_durable(self):
        """Every file renamed into place was fsynced before, and its directory after the last rename into it."""
        renames = [c for c in self.calls if c.op in ("replace", "rename") and c.ok]
        assert renames, "the save renamed nothing into place"
        synced = set()
        for i, call in enumerate(self.calls):
            if call.op == "fsync" and call.ok:
                synced.add(call.path)
            elif call in renames and os.path.isfile(call.target):
                assert call.path in synced, f"{call.path} was renamed into place without an fsync: {self.trace()}"
        for directory in {os.path.dirname(c.target) for c in renames}:
            last = max(i for i, c in enumerate(self.calls) if c in renames and os.path.dirname(c.target) == directory)
            assert any(c.op == "fsync" and c.ok and c.path == directory for c in self.calls[last:]), \
                f"{directory} was not fsynced after the rename into it (lost on a power cut): {self.trace()}"

    def cleanup_failed(self) -> bool:
        return any(c.failed and c.cleanup for c in self.calls)

    def trace(self) -> str:
        return "; ".join(f"{i}:{c.op}({os.path.relpath(c.path, self.root)})" + ("!" if c.failed else "")
                         for i, c in enumerate(self.calls))


# --- writers: each saves version 0 or 1 into a directory and tells which version a directory holds ------------------
@dataclass
class Writer:
    name: str
    save: Callable[[Path, int], None]
    version: Callable[[Path], tuple]   # per part (an adapter directory, a file): 0, 1, or None if absent
    listing: list                      # what a clean save leaves
    next_save_cleans: bool = True      # else leftovers are removed as rundir.discard does (--overwrite)


def _tensors_version(tensors, references) -> int:
    for i, expected in enumerate(references):
        if tensors.keys() == expected.keys() and all(torch.equal(tensors[k], v) for k, v in expected.items()):
            return i
    raise AssertionError(f"the loaded tensors are neither version: {sorted(tensors)[:3]}")


def _absent(directory: Path, *names) -> bool:
    return not any((directory / n).exists() for n in names)


def raw_writer() -> Writer:
    pairs = [tagged_adapter(1), tagged_adapter(2)]

    def version(d):
        if _absent(d, CONFIG_NAME, WEIGHTS_NAME):
            return (None,)
        config, tensors = read_adapter(d)
        v = _tensors_version(tensors, [t for _, t in pairs])
        assert config == pairs[v][0], f"the config of version {v} came with other weights"
        return (v,)

    return Writer("write_adapter", lambda d, v: write_adapter(d, *pairs[v]), version, [CONFIG_NAME, WEIGHTS_NAME])


def _models():
    """Two versions of one model with adapters 'default' and 'b' (all-nonzero weights)."""
    torch.manual_seed(0)
    base = TinyEncoder()
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_neat_model(copy.deepcopy(base), NeatConfig(r=2, target_modules=["query", "ffn"],
                                                                init_weights=False))
        model.add_adapter("b", NeatConfig(r=3, target_modules=["value"], depth=1, init_weights=False))
        models.append(model)
    return base, models


def model_writer() -> Writer:
    base, models = _models()
    references = {name: [{k: v.detach().clone() for k, v in m._adapter_tensors(name)[0].items()} for m in models]
                  for name in ("default", "b")}

    def version(d):
        parts = []
        for name, folder in (("default", d), ("b", d / "b")):
            if _absent(folder, CONFIG_NAME, WEIGHTS_NAME):
                parts.append(None)
                continue
            loaded = NeatModel.from_pretrained(copy.deepcopy(base), folder, adapter_name=name)
            parts.append(_tensors_version(loaded._adapter_tensors(name)[0], references[name]))
        return tuple(parts)

    return Writer("save_pretrained", lambda d, v: models[v].save_pretrained(d), version,
                  [CONFIG_NAME, WEIGHTS_NAME, "b"])


def lora_writer(tmp_path) -> Writer:
    _, models = _models()
    references = []
    for i, model in enumerate(models):  # exported without faults, read back: what each version's file holds
        model.export_lora(tmp_path / f"reference-{i}")
        references.append(read_adapter(tmp_path / f"reference-{i}", readable_types=("LORA",)))

    def version(d):
        if _absent(d, CONFIG_NAME, WEIGHTS_NAME):
            return (None,)
        config, tensors = read_adapter(d, readable_types=("LORA",))
        v = _tensors_version(tensors, [t for _, t in references])
        assert config == references[v][0]
        return (v,)

    return Writer("export_lora", lambda d, v: models[v].export_lora(d), version, [CONFIG_NAME, WEIGHTS_NAME])


def text_writer() -> Writer:
    texts = ['{"accuracy": 0.25}\n', '{"accuracy": 0.75, "loss": 1.5}\n' * 50]

    def version(d):
        path = d / "metrics.json"
        return (texts.index(path.read_text()) if path.exists() else None,)

    return Writer("atomic_write", lambda d, v: atomic_write_text(d / "metrics.json", texts[v]), version,
                  ["metrics.json"], next_save_cleans=False)  # it cannot tell a dead write's file from a live one's


WRITERS = {"write_adapter": lambda tmp: raw_writer(), "save_pretrained": lambda tmp: model_writer(),
           "export_lora": lora_writer, "atomic_write": lambda tmp: text_writer()}


# --- the property ---------------------------------------------------------------------------------------------------
class Reader(threading.Thread):
    """Loads the directory again and again; every load must be one complete version of each part."""

    def __init__(self, writer: Writer, directory: Path):
        super().__init__(daemon=True)
        self.writer, self.directory = writer, directory
        self.loads, self.errors, self.stop, self.case = 0, [], threading.Event(), None

    def run(self):
        while not self.stop.is_set():
            try:
                with formats._locked(self.directory, exclusive=False):  # an absent adapter is absent for the read
                    self.writer.version(self.directory)
                self.loads += 1
                time.sleep(0.01)  # leave the saving thread most of the interpreter
            except BaseException as e:  # noqa: BLE001 - reported by the test thread
                self.errors.append(f"{e!r} during {self.case}")
                return


def run_case(monkeypatch, writer: Writer, directory: Path, before: Optional[int], fail_at) -> Faults:
    """Save version 1 over `before` (None: a first save) with the calls in fail_at failing; check the property."""
    if before is not None:
        writer.save(directory, before)
    with monkeypatch.context() as mp:
        faults = Faults(mp, directory, fail_at)
        try:
            writer.save(directory, 1)
            error = None
        except (OSError, SafetensorError) as e:
            error = e
    case = f"{writer.name}, before={before}, failing {sorted(fail_at)} of: {faults.trace()}"
    after = writer.version(directory)
    if error is None:
        assert not faults.injected or any(c.failed for c in faults.calls), case
        assert set(after) == {1}, f"the save returned but left {after}: {case}"
        faults.check_durable()
    else:
        causes, e = [], error
        while e is not None:
            causes.append(e)
            e = e.__cause__ or e.__context__
        assert any(c is i for c in causes for i in faults.injected), f"not an injected error: {error!r}; {case}"
        cause = error.__cause__ if error.__cause__ is not None else error
        assert not any(cause.__context__ is i for i in faults.injected), \
            f"a failing cleanup hid the first error: {error!r} from {cause.__context__!r}; {case}"
        assert isinstance(error, OSError) and str(directory) in str(error), \
            f"the error does not say which save failed: {error!r}; {case}"
        assert set(after) <= {before, 1}, f"left {after}: {case}"
    names = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    leftovers = [n for n in names if n not in writer.listing]
    # One failure leaves nothing behind, unless it was a cleanup's; a second one (say, putting the old weights
    # back) may leave a staged config, which loads read and the next save completes.
    assert not leftovers or faults.cleanup_failed() or len(faults.injected) > 1, f"left {leftovers}: {case}"
    assert all(n.startswith((STAGING_PREFIX, ".")) for n in leftovers), f"left {leftovers}: {case}"
    if leftovers and not writer.next_save_cleans:
        assert all(fnmatch.fnmatch(n, f".{name}.*.tmp") for n in leftovers for name in writer.listing), leftovers
        for n in leftovers:  # what rundir.discard removes
            (directory / n).unlink()
    elif leftovers:
        writer.save(directory, 1)  # a clean save removes whatever a failed cleanup left
        assert sorted(p.name for p in directory.iterdir()) == writer.listing, case
    return faults


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_fault_of_a_save_leaves_one_complete_version(tmp_path, monkeypatch, name):
    # The disk is not flushed (fast): what survives a power cut is decided by the order of the calls, checked here.
    monkeypatch.setattr(os, "fsync", lambda fd: os.fstat(fd) and None)
    writer = WRITERS[name](tmp_path)
    target = tmp_path / "out"
    writer.save(target, 0)
    with monkeypatch.context() as mp:  # count the calls of a clean save
        clean = Faults(mp, target)
        writer.save(target, 1)
    clean.check_durable()
    n = len(clean.calls)
    assert n >= 5, clean.trace()
    # Every call fails once; then with the call after it (the cleanup of a failure failing too). A first save
    # (before=None) fails in the same calls: CI tries it on the one-directory writers.
    firsts = (0,) if name == "save_pretrained" and not LONG else (0, None)
    cases = [(before, {k}) for k in range(n) for before in firsts] + [(0, {k, k + 1}) for k in range(n)]
    deadline, rng = time.monotonic() + LONG / len(WRITERS), random.Random(0)

    def random_cases():  # long mode: 1-3 failing calls anywhere, over any starting state
        while time.monotonic() < deadline:
            yield rng.choice([0, 1, None]), set(rng.sample(range(n + 4), rng.randint(1, 3)))

    reader = Reader(writer, target)
    reader.start()
    count = 0
    try:
        for before, fail_at in itertools.chain(cases, random_cases()):
            count += 1
            reader.case = (before, fail_at)
            if before is None:
                _remove(target)
            run_case(monkeypatch, writer, target, before, fail_at)
            assert not reader.errors, reader.errors
    finally:
        reader.stop.set()
        reader.join()
    assert not reader.errors, reader.errors
    assert reader.loads > 0
    if LONG:
        print(f"\n{name}: {count} fault cases ({n} calls in a clean save), {reader.loads} concurrent loads")


def _remove(directory: Path):
    """Empty `directory` (kept: the reader thread may be in it) as one step for a reader that takes the lock."""
    with formats._locked(directory, exclusive=True):
        for entry in directory.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def test_a_locking_reader_retries_when_a_save_could_not_lock(tmp_path, monkeypatch):
    """A reader holding its lock read the old config; a save that could not take its lock (the directory could
    not be opened) then replaced the pair; the reader reads the new weights. It must retry, not report a pair
    that was "not saved together". (Found by the fault test: the reader trusted its own lock.)"""
    old, new = tagged_adapter(1), tagged_adapter(2)
    write_adapter(tmp_path, *old)
    read, locked, saved = formats._read_or_none, formats._locked, []

    def read_then_save(path):
        data = read(path)
        if path.name == CONFIG_NAME and not saved:
            saved.append(True)
            with monkeypatch.context() as mp:  # the save cannot open the directory for its lock
                mp.setattr(formats, "_locked", lambda directory, exclusive: contextlib.nullcontext()
                           if exclusive else locked(directory, exclusive))
                write_adapter(tmp_path, *new)
        return data

    monkeypatch.setattr(formats, "_read_or_none", read_then_save)
    config, tensors = read_adapter(tmp_path)
    assert saved and config == new[0] and all(torch.equal(tensors[k], v) for k, v in new[1].items())


# --- file modes -----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_writes_create_files_by_the_umask_and_keep_a_replaced_files_mode(tmp_path):
    """A temporary file from mkstemp is 0600: renamed into place it would make every run file and compare.json
    private. Written files get what open(path, "w") gives: the umask for a new file, the old mode for a replaced one."""
    old_mask = os.umask(0o022)
    try:
        new = tmp_path / "metrics.json"
        atomic_write_text(new, "{}")
        assert new.stat().st_mode & 0o777 == 0o644
        mine = tmp_path / "notes.json"
        mine.write_text("old")
        mine.chmod(0o640)
        atomic_write_text(mine, "new")
        assert mine.read_text() == "new" and mine.stat().st_mode & 0o777 == 0o640
        os.umask(0o077)
        private = tmp_path / "private.json"
        atomic_write_text(private, "{}")
        assert private.stat().st_mode & 0o777 == 0o600
        os.umask(0o022)
        model = get_neat_model(TinyEncoder(), NeatConfig(r=2, target_modules=["query"]))
        model.save_pretrained(str(tmp_path / "adapter"))
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "adapter").rglob("*") if p.is_file()}
        assert modes and set(modes.values()) == {0o644}, modes
    finally:
        os.umask(old_mask)
