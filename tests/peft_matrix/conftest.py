"""Keep only the NEAT-parametrised items of peft's test matrix, and apply the documented skips."""

import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# peft's tests build their models locally; without this, every save looks the model id up on the Hub first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _uses_neat(item) -> bool:
    from neat_peft.peft_plugin import NeatPeftConfig

    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    for value in callspec.params.values():
        if value is NeatPeftConfig or isinstance(value, NeatPeftConfig):
            return True
    return False


def _case_name(item):
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("test_name") if callspec else None


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if HERE in Path(str(item.fspath)).parents]
    if not ours:
        return
    module = ours[0].module
    skips = getattr(module, "SKIPS", {})
    deselected = [item for item in ours if not _uses_neat(item)]
    for item in ours:
        if item in deselected:
            continue
        reason = skips.get((item.originalname, _case_name(item))) or skips.get((item.originalname, None))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
    if deselected:
        dropped = set(map(id, deselected))
        items[:] = [item for item in items if id(item) not in dropped]
        config.hook.pytest_deselected(items=deselected)
