"""neat-peft: NEAT adapters (arXiv 2410.01870) for any PyTorch model, at LoRA's cost, convertible to LoRA.

peft is optional and never imported here. Where it is installed, NEAT joins it without a call (see `_peft_view`):
the first `NeatConfig(...)` imports peft and returns a config that is also a `peft.PeftConfig`, and a process that
imports peft after neat_peft (transformers' `from_pretrained(adapter_dir)`, `AutoPeftModel*`) finds NEAT registered.
"""

import importlib.abc
import importlib.util
import sys
import threading
import warnings

from ._version import __version__
from .config import PEFT_REGISTRATION, NeatConfig
from .layers import BASE_ONLY, NeatLayer
from .model import NeatModel, count_adapter_parameters, get_neat_model, match_lora_budget


def register_with_peft(*, allow_untested_peft: bool = False):
    """Make NEAT a peft method (peft_type "NEAT") and return `NeatPeftConfig`, the class `NeatConfig(...)` builds
    where peft is importable. Done automatically when peft is importable; call it to see why it was refused, or
    with `allow_untested_peft=True` for a peft outside the tested range. See `neat_peft.peft_plugin`.
    """
    from .peft_plugin import register_with_peft as register

    return register(allow_untested_peft=allow_untested_peft)


def _peft_importable() -> bool:
    try:
        return importlib.util.find_spec("peft") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["peft"] is None (import blocked)
        return False


_warned: set = set()


def _peft_view():
    """peft's subclass of NeatConfig, after registering NEAT with peft; None where peft is not importable, or refused
    the plugin (then the core's plain NeatConfig is used, with one warning that says why)."""
    if not _peft_importable():
        return None
    try:
        from .peft_plugin import IncompatiblePeftError, NeatPeftConfig, is_registered
    except ImportError as e:  # peft installed but broken, or its internals moved (IncompatiblePeftError)
        _warn_once(str(e))
        return None
    if not is_registered():
        try:
            register_with_peft()
        except IncompatiblePeftError as e:
            _warn_once(str(e))
            return None
    return NeatPeftConfig


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"NeatConfig stays a plain dataclass, not a peft.PeftConfig: {reason}", stacklevel=3)


class _RegisterWhenPeftImports(importlib.abc.MetaPathFinder):
    """Registers NEAT with peft right after peft is first imported, so a fresh process that imported neat_peft loads
    NEAT directories through `PeftModel.from_pretrained` / `AutoPeftModel*` / transformers without a call. It finds
    nothing itself: it wraps the found loader's exec_module once, then leaves sys.meta_path."""

    _lock = threading.Lock()

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        with self._lock:
            if self not in sys.meta_path:
                return None
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec("peft")
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            del loader.exec_module  # back to the loader's own method
            exec_module(module)
            _peft_view()

        loader.exec_module = exec_then_register
        return spec


if "peft" in sys.modules:
    _peft_view()
elif _peft_importable():
    sys.meta_path.insert(0, _RegisterWhenPeftImports())
PEFT_REGISTRATION["config_class"] = _peft_view

__all__ = [
    "BASE_ONLY",
    "NeatConfig",
    "NeatLayer",
    "NeatModel",
    "__version__",
    "count_adapter_parameters",
    "get_neat_model",
    "match_lora_budget",
    "register_with_peft",
]
