"""Adapter files: peft's PEANuT format (read and written), NEAT's superset of it, and LoRA export.

A directory holds `adapter_config.json` and `adapter_model.safetensors`, exactly as peft writes them.
Keys are `base_model.model.<module path>.peanut_A.weight` (r x m), `.peanut_B.weight`, and
`.peanut_encoders.<i>.weight` / `.peanut_decoders.<i>.weight`; a module trained in full is stored
under its own path. An adapter peft's PEANuT computes identically (axis "out", no dropout, no
normalising, nn.Linear targets only) is written with peft_type "PEANUT" and loads in peft; any other
is written with peft_type "NEAT", which a peft without neat-peft's plugin refuses rather than
silently computing something else. As in every peft method, a type's keys carry its own prefix: NEAT
files name the same tensors `.neat_A.weight`, `.neat_B.weight`, `.neat_encoders.<i>.weight`, ...
(peft's plugin and transformers' `load_adapter` find adapter tensors by that prefix). Both namings are read.

Loads read safetensors only (never pickle), and check what they read: see `read_adapter` and
`validate_adapter_tensors`. A directory's config and weights are replaced together: see `write_adapter`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .config import PEANUT_IMPLIED, NeatConfig
from .tensors import CONTAINERS, FILE_PREFIX

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
READABLE_TYPES = ("PEANUT", "NEAT")
# A save stages its pair in <directory>/.neat-peft-save-<random>/ (only entries with this prefix are ever cleaned).
STAGING_PREFIX = ".neat-peft-save-"
# Safetensors metadata key: `config_hash` of the adapter_config.json saved together with these weights.
CONFIG_HASH_KEY = "neat_peft.config_sha256"
# Fields that describe an adapter without changing what it computes: a user may edit them by hand.
DESCRIPTIVE_FIELDS = ("base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
                      "auto_mapping", "neat_peft")
# A reader that finds a pair from two saves retries: a save may be between its two renames, unlocked (no file locks
# there, or the save could not take its lock).
_UNLOCKED_READ_ATTEMPTS = 20


def rename_key_prefix(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """Rename the adapter containers in file keys, e.g. old='peanut_', new='neat_':
    '...q.peanut_A.weight' -> '...q.neat_A.weight'. Other keys (modules_to_save) are kept as they are."""
    renamed, sources = {}, {}
    for key, value in tensors.items():
        new_key = _rename_key(key, old, new)
        if new_key in renamed:
            raise ValueError(f"Two tensors, {sources[new_key]!r} and {key!r}, are the same adapter tensor {new_key!r} "
                             f"under two namings; keep one of them.")
        renamed[new_key], sources[new_key] = value, key
    return renamed


def _rename_key(key: str, old: str, new: str) -> str:
    for container in CONTAINERS:
        head, sep, tail = key.rpartition(f".{old}{container}.")
        if sep:
            return f"{head}.{new}{container}.{tail}"
    return key


def module_to_save_key(path: str, param_name: str) -> str:
    return f"{FILE_PREFIX}{path}.{param_name}"


def config_to_json(config_dict: dict[str, Any], peft_compatible: bool, version: str) -> dict[str, Any]:
    data = dict(config_dict)
    if peft_compatible:
        data["peft_type"] = "PEANUT"
        for name in PEANUT_IMPLIED:  # peft would warn about fields it lacks; their values are implied
            data.pop(name, None)
    else:
        data["peft_type"] = "NEAT"
        data["neat_peft"] = {"version": version}  # the marker: which library reads this type
    return data


def atomic_write(path: Path, write) -> None:
    """Call write(tmp) on a temporary file beside `path`, fsync it, rename it over `path`, then fsync the folder
    (so the rename survives a power cut). One file; an adapter's config and weights are replaced together by
    write_adapter. An OSError is raised again naming `path` and saying whether `path` was replaced."""
    replaced = False
    try:
        # Not mkstemp: its files are 0600, so every file written this way would turn private. Created like
        # open(path, "w") would: a new file by the umask, a replaced one keeping its mode.
        tmp = str(path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp")  # named as leftovers() finds it
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            replaced = True
        except BaseException:
            with contextlib.suppress(OSError):  # a failing cleanup must not hide why the write failed
                os.remove(tmp)
            raise
        _fsync(path.parent)
    except OSError as e:
        state = ("it holds the new content, which may not survive a power cut" if replaced
                 else "it was left as it was")
        raise _failed(e, f"Could not write {str(path)!r}", state) from e


def leftovers(folder: Path, name: str) -> list[Path]:
    """The temporary files that atomic_write of folder/name left when killed (SIGKILL, power cut) mid-write.
    Only a caller that knows no write of `name` is running (it holds the folder's lock) may remove them."""
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{12}}\.tmp")
    return sorted(p for p in Path(folder).iterdir() if pattern.fullmatch(p.name))


def _failed(error: BaseException, what: str, state: str) -> OSError:
    """`error` (an OSError, or safetensors' error on a full disk) as an OSError saying what failed, on which file
    (fsync's errors name none) and what is on disk now; errno is kept (e.g. ENOSPC, a PermissionError stays one)."""
    code = getattr(error, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    reason = str(error) if not isinstance(error, OSError) or error.strerror is None else (
        error.strerror + "".join(f" ({f!r})" for f in (error.filename, error.filename2) if f is not None))
    message = f"{what}: {reason}. {state[0].upper()}{state[1:]}."
    return OSError(code, message) if code is not None else OSError(message)


def write_adapter(directory: str | os.PathLike, config_json: dict[str, Any], tensors: dict[str, torch.Tensor],
                  weights_name: str = WEIGHTS_NAME) -> None:
    """Replace the adapter pair (config + weights) in `directory` as a whole; nothing else there is touched.

    The pair is written into a staging directory inside `directory` (STAGING_PREFIX), fsynced, then renamed
    into place: weights first, then config. The weights' safetensors metadata holds a hash of the config they
    were saved with (CONFIG_HASH_KEY, see `config_hash`), so a pair that does not belong together is
    recognised on load. A save holds an exclusive lock (flock) on `directory` from start to end and loads hold
    a shared one, so a reader never sees the moment between the two renames. If the process dies there, the
    new weights sit beside the old config while the new config is still staged: loads then take the staged
    config (the new adapter) and the next save renames it into place. If the second rename raises, the old
    weights are put back and the save raises: the old adapter is left. The next save removes what a killed
    save left (entries named STAGING_PREFIX*). Other files and subdirectories (e.g. the other adapters
    save_pretrained writes into `directory/<name>`) are never touched. An OSError (or safetensors' error on
    a full disk) is raised as an OSError naming `directory` and saying which adapter the directory holds now.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"Cannot save the adapter into {str(directory)!r}: it is a file, not a directory.")
    text = (json.dumps(config_json, indent=2, sort_keys=True, default=_json_default) + "\n").encode()
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    for name in (weights_name, CONFIG_NAME):
        if (directory / name).exists() and not (directory / name).is_file():
            raise ValueError(f"Cannot save the adapter into {str(directory)!r}: {name} there is not a regular file "
                             "(a directory?). Move it away or save elsewhere.")
    state = "nothing in it was changed"  # what the directory holds if the save fails now
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory, exclusive=True):
            _finish_or_clean(directory, weights_name)
            stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
            try:
                save_file(contiguous, stage / weights_name,
                          metadata={"format": "pt", CONFIG_HASH_KEY: config_hash(text)})
                (stage / CONFIG_NAME).write_bytes(text)
                # safetensors writes 0600; give the weights the mode the umask gave the config, as any file gets
                os.chmod(stage / weights_name, stat.S_IMODE(os.stat(stage / CONFIG_NAME).st_mode))
                for path in (stage / weights_name, stage / CONFIG_NAME, stage):
                    _fsync(path)
                _swap_in(directory, stage, weights_name)
                state = "the new adapter is in place, but may not survive a power cut: save again"
            finally:
                if _staged_config(stage, *_live_state(directory, weights_name)) is None:  # else needed to finish
                    shutil.rmtree(stage, ignore_errors=True)
                else:  # _swap_in could not put the old weights back
                    state = ("the new weights are in place with the new config staged beside them: loads read the "
                             "new adapter, and the next save into this directory completes it")
            _fsync(directory)
    except (OSError, SafetensorError) as e:
        raise _failed(e, f"Could not save the adapter into {str(directory)!r}", state) from e


def config_hash(config_text: bytes) -> Optional[str]:
    """sha256 of what an adapter_config.json says about the computation: its canonical JSON without the
    DESCRIPTIVE_FIELDS a user may edit by hand (base_model_name_or_path, ...). None if it is no JSON object."""
    try:
        data = json.loads(config_text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    kept = {k: v for k, v in data.items() if k not in DESCRIPTIVE_FIELDS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _swap_in(directory: Path, stage: Path, weights_name: str) -> None:
    live = directory / weights_name
    backup = stage / f"previous-{weights_name}"
    existed = live.exists()
    if existed:
        with contextlib.suppress(OSError):  # a file system without hard links: no way back, only forward
            os.link(live, backup)
    os.replace(stage / weights_name, live)  # from here the new adapter is committed (see write_adapter)
    try:
        os.replace(stage / CONFIG_NAME, directory / CONFIG_NAME)
    except BaseException:
        with contextlib.suppress(OSError):  # if this fails too, the staged config completes the save on load
            if backup.exists():
                os.replace(backup, live)
            elif not existed:
                live.unlink()
        raise


def _finish_or_clean(directory: Path, weights_name: str) -> None:
    """Finish a save that died between its two renames, then remove every leftover staging entry of ours."""
    for entry in directory.iterdir():
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
            staged = _staged_config(entry, *_live_state(directory, weights_name))
            if staged is not None:
                os.replace(staged, directory / CONFIG_NAME)
                _fsync(directory)
            shutil.rmtree(entry, ignore_errors=True)
        elif (entry.name.startswith((f".{CONFIG_NAME}.", f".{weights_name}.")) and entry.name.endswith(".tmp")
              and entry.is_file()):
            entry.unlink()  # atomic_write's temporary files: earlier versions saved the two files apart


def _live_state(directory: Path, weights_name: str) -> tuple[Optional[str], Optional[str]]:
    """(config hash the weights in place were saved with, or None; config hash of the config in place, or None)."""
    try:
        config = _read_or_none(directory / CONFIG_NAME)
    except ValueError:  # not a regular file or unreadable: it matches no hash
        config = None
    head = b""
    with contextlib.suppress(OSError):
        info = os.stat(directory / weights_name)
        if stat.S_ISREG(info.st_mode):  # never block on a FIFO
            with open(directory / weights_name, "rb") as f:  # the header is enough
                head = f.read(8)
                head += f.read(min(int.from_bytes(head, "little"), info.st_size))
    return _saved_config_hash(head), config_hash(config) if config is not None else None


def _staged_config(stage: Path, wanted: Optional[str], live: Optional[str]) -> Optional[Path]:
    """stage's config if it is the one the weights in place were saved with (hash `wanted`) and the config in
    place (hash `live`) is another: the state a save leaves when it dies between its two renames."""
    if wanted is None or live == wanted:
        return None
    staged = stage / CONFIG_NAME
    try:
        if not staged.is_symlink() and config_hash(staged.read_bytes()) == wanted:
            return staged
    except OSError:  # not there (an incomplete stage), or removed meanwhile by a save (a reader without locks)
        pass
    return None


@contextlib.contextmanager
def _locked(directory: Path, exclusive: bool):
    """flock on the directory itself (no lock file left behind), where one can be had: not on Windows (no fcntl),
    on file systems without locks, or when the directory cannot be opened; readers retry there (see _read_pair)."""
    try:
        import fcntl
        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        fd = None
    if fd is None:  # (outside the except: the caller's errors are not raised "while handling" this one)
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.name == "nt" and path.is_dir():  # a directory on Windows cannot be opened: its renames are durable
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return sorted(value)
    raise TypeError(f"Cannot write {type(value).__name__} to adapter_config.json")


# --- reading -------------------------------------------------------------------------------------------------
def read_adapter(directory: str | os.PathLike, readable_types: Iterable[str] = READABLE_TYPES,
                 weights_name: str = WEIGHTS_NAME) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, tensors by file key) of the adapter in `directory`, both from one save.

    Raises FileNotFoundError or ValueError naming the file: the directory or a file is missing; the config is
    not a JSON object (or is nested too deeply, has a key twice, or holds NaN/Infinity); its peft_type is not
    readable; the weights are not safetensors; or the weights were saved with another config (they carry its
    hash) and no interrupted save explains it. Field values are checked by NeatConfig.from_dict, the tensors
    against the model by `validate_adapter_tensors`.
    """
    directory = Path(directory)
    _, data, weights_path, weights = _read_pair(directory, weights_name, readable_types)
    if weights is None:
        raise _missing_weights(directory, weights_path)
    return data, _parse_weights(weights_path, weights)


def rebind_adapter(directory: str | os.PathLike) -> None:
    """Accept a hand-edited adapter_config.json: save the weights again, bound to the config now in `directory`.
    Both files are read and checked as a load reads them, except for the check that they were saved together."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    data = _parse_config(directory, config_path, _read_or_none(config_path), READABLE_TYPES)
    weights = _read_or_none(weights_path)
    if weights is None:
        raise _missing_weights(directory, weights_path)
    write_adapter(directory, data, _parse_weights(weights_path, weights))


def _read_pair(directory: Path, weights_name: str, readable_types: Optional[Iterable[str]]
               ) -> tuple[Path, dict[str, Any], Path, Optional[bytes]]:
    """(config path, parsed config, weights path, weights bytes or None if missing) of one save."""
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {str(directory)!r} does not exist.")
    config_path, weights_path = directory / CONFIG_NAME, directory / weights_name
    for _ in range(_UNLOCKED_READ_ATTEMPTS):
        with _locked(directory, exclusive=False):
            config, weights = _read_or_none(config_path), _read_or_none(weights_path)
            wanted = _saved_config_hash(weights) if weights is not None else None
            live = config_hash(config) if config is not None else None
            if wanted is None or live == wanted:
                return config_path, _parse_config(directory, config_path, config, readable_types), weights_path, weights
            for stage in sorted(directory.glob(f"{STAGING_PREFIX}*")):  # a save that died between its renames
                staged = _staged_config(stage, wanted, live)
                raw = _read_or_none(staged) if staged is not None else None
                if raw is not None:
                    return staged, _parse_config(directory, staged, raw, readable_types), weights_path, weights
        time.sleep(0.01)  # a save without the lock (see _UNLOCKED_READ_ATTEMPTS) may be between its two renames
    data = _parse_config(directory, config_path, config, readable_types)
    if data.get("peft_type") in READABLE_TYPES:  # a wrong field value says more than "not saved together"
        try:
            NeatConfig.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{str(config_path)!r}: {e}") from None
    raise ValueError(
        f"{str(config_path)!r} and {str(weights_path)!r} were not saved together: the weights were saved with "
        "another adapter_config.json (its hash is in their metadata), so this pair would compute neither adapter. "
        "Another tool's save was interrupted, or the config was edited by hand. Save the adapter again; or, if you "
        f"edited the config on purpose, accept it with neat_peft.formats.rebind_adapter({str(directory)!r})."
    )


def _read_or_none(path: Path) -> Optional[bytes]:
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the read, /dev/zero never end it
            raise ValueError(f"{str(path)!r} is not a regular file.")
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:  # no permission, an I/O error
        raise ValueError(f"Cannot read {str(path)!r}: {e}") from None


def _saved_config_hash(weights: bytes) -> Optional[str]:
    """CONFIG_HASH_KEY from a safetensors file's header (`weights` is the file or its first bytes), or None:
    peft's files and older saves lack it, and a header too broken to read here is reported by the full parse."""
    if len(weights) < 8:
        return None
    size = int.from_bytes(weights[:8], "little")
    if size > len(weights) - 8:
        return None
    try:
        header = json.loads(weights[8:8 + size])
    except (ValueError, RecursionError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    value = metadata.get(CONFIG_HASH_KEY) if isinstance(metadata, dict) else None
    return value if isinstance(value, str) else None


def _parse_config(directory: Path, path: Path, raw: Optional[bytes],
                  readable_types: Optional[Iterable[str]]) -> dict[str, Any]:
    if raw is None:
        raise FileNotFoundError(f"{str(path)!r} is missing: {str(directory)!r} is not an adapter directory "
                                "(it needs adapter_config.json and adapter_model.safetensors).")
    try:
        data = json.loads(raw, object_pairs_hook=_object_without_repeated_keys, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError(f"{str(path)!r} is nested too deeply to be an adapter config.") from None
    except ValueError as e:  # also UnicodeDecodeError and Python's limit on the digits of an integer
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object ({{...}}) of adapter fields, but its top level is "
                         f"{'null' if data is None else type(data).__name__}.")
    peft_type = data.get("peft_type")
    readable_types = None if readable_types is None else list(readable_types)
    if readable_types is not None and (not isinstance(peft_type, str) or peft_type not in readable_types):
        hint = (" It is a LoRA adapter: load it with peft.PeftModel.from_pretrained." if peft_type == "LORA" else "")
        raise ValueError(f"{str(path)!r} describes a {peft_type!r} adapter, not NEAT/PEANuT "
                         f"(expected peft_type in {readable_types}).{hint}")
    return data


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        counts = collections.Counter(key for key, _ in pairs)
        raise ValueError(f"the keys {sorted(k for k, n in counts.items() if n > 1)} appear more than once, so which "
                         "value is meant is unclear")
    return data


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _parse_weights(path: Path, raw: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(raw)
    except Exception as e:  # untrusted bytes: safetensors' own errors, and dtypes/shapes torch cannot hold
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _missing_weights(directory: Path, path: Path) -> FileNotFoundError:
    pickled = [p.name for p in directory.glob("*.bin")]
    extra = (f" Found {pickled}: pickle files are never loaded (they can run code); re-save the adapter "
             "with safetensors." if pickled else "")
    return FileNotFoundError(f"{str(path)!r} is missing.{extra}")


# --- checks for the model's side ----------------------------------------------------------------------------
def validate_adapter_tensors(tensors: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, Sequence[int]],
                             path: str | os.PathLike, non_float_dtypes: Optional[Mapping[str, torch.dtype]] = None,
                             allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """Check the tensors read from the file `path` against what the model needs; return them under peft's
    'peanut_' naming (a file may use either naming, not both for one tensor).

    tensors: file key -> tensor, as read. expected_shapes: 'peanut_'-named key -> shape, for every tensor the
    model will copy from the file. non_float_dtypes: the keys whose model tensor is not floating point (a
    BatchNorm's num_batches_tracked in modules_to_save) and the dtype they must have; every other tensor must be
    floating point (no integer, bool or complex data, which a copy would silently convert). Finite values only,
    unless allow_nonfinite (an adapter with NaN/inf outputs NaN/inf). Raises ValueError naming the file and the
    keys; changes nothing.
    """
    path = str(path)
    try:
        canonical = rename_key_prefix(dict(tensors), "neat_", "peanut_")
    except ValueError as e:
        raise ValueError(f"{path!r}: {e}") from None
    non_float_dtypes = dict(non_float_dtypes or {})
    missing = sorted(set(expected_shapes) - set(canonical))
    unexpected = sorted(set(canonical) - set(expected_shapes))
    wrong = [f"{k}: file {tuple(canonical[k].shape)}, model needs {tuple(shape)}"
             for k, shape in sorted(expected_shapes.items()) if k in canonical and canonical[k].shape != tuple(shape)]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors for modules this model lacks, e.g. {unexpected[:3]}")
        if wrong:
            problems.append(f"{len(wrong)} shape mismatches, e.g. {wrong[:3]}")
        raise ValueError(f"The adapter in {path!r} does not fit this model ({'; '.join(problems)}). "
                         "Was it trained on a different base model?")
    bad_dtypes = [f"{k}: {t.dtype}" for k, t in sorted(canonical.items())
                  if (t.dtype != non_float_dtypes[k] if k in non_float_dtypes else not t.is_floating_point())]
    if bad_dtypes:
        raise ValueError(f"{path!r} holds tensors of the wrong dtype, e.g. {bad_dtypes[:3]}: adapter weights are "
                         "floating point (float32, float16, bfloat16). Save the adapter again from its model.")
    if not allow_nonfinite:
        nonfinite = [k for k, t in sorted(canonical.items())
                     if t.is_floating_point() and not bool(torch.isfinite(t.float()).all())]
        if nonfinite:
            raise ValueError(f"{path!r} holds NaN or inf in {len(nonfinite)} tensors, e.g. {nonfinite[:3]}: the "
                             "adapter's outputs would be NaN/inf. Use an earlier checkpoint (the training diverged?), "
                             "or load with allow_nonfinite=True to inspect it anyway.")
    return canonical


def check_adapter_name(name: Any, reserved: Iterable[str] = ()) -> None:
    """Refuse an adapter name that could not be a module key and a single directory name (save_pretrained writes
    adapter <name> into <save_directory>/<name>): empty, reserved, or holding '.', a path separator ('/' '\\'),
    ':' (a Windows drive or stream) or a control character; so '..' or '/etc' can never write outside."""
    if not isinstance(name, str):
        raise ValueError(f"An adapter name must be a string, got {name!r}.")
    bad = sorted({c for c in name if c in "./\\:" or ord(c) < 32 or ord(c) == 127})
    if not name or name in set(reserved) or bad:
        why = ("it is empty" if not name else f"{name!r} is reserved" if not bad
               else f"it contains {''.join(bad)!r}")
        raise ValueError(f"{name!r} cannot name an adapter: {why}. Adapter names become module keys and directory "
                         "names (non-default adapters are saved in <save_directory>/<name>); use letters, digits, "
                         "'-' and '_'.")


def lora_config_json(neat_config: dict[str, Any], r: int, target_names: list[str],
                     fan_in_fan_out: bool) -> dict[str, Any]:
    """A peft LoRA config whose adapter computes lora_B @ lora_A exactly (lora_alpha = r: scaling 1)."""
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted(target_names),  # full module names: peft matches exactly these
        "modules_to_save": neat_config.get("modules_to_save"),
        "task_type": neat_config.get("task_type"),
        "base_model_name_or_path": neat_config.get("base_model_name_or_path"),
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
