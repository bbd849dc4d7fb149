"""Run by tests/test_peft_plugin.py in a fresh interpreter: registering with peft changes process-wide state, so
the refusals and the rollback are checked here, before any registration, in one process.

Usage: python peft_registration_script.py <scratch dir>. Prints one line per check and 'ALL OK' at the end; on
failure an AssertionError ends the process with a traceback. Prints peft's own error for an unregistered NEAT
file as 'UNKNOWN TYPE ERROR: <type>: <message>' (quoted in docs/peft_plugin.md).
"""

import sys
import warnings
from pathlib import Path

scratch = Path(sys.argv[1])

# 1. Importing the core never imports peft, and a missing peft gives an install hint.
import neat_peft  # noqa: E402

assert "peft" not in sys.modules, "importing neat_peft imported peft"
sys.modules["peft"] = None  # what Python does for a package that is not installed: import raises ImportError
try:
    neat_peft.register_with_peft()
except ImportError as e:
    assert "pip install" in str(e) and "peft" in str(e), e
    print("peft missing ->", e)
else:
    raise AssertionError("register_with_peft() without peft did not raise")

# 2. A NEAT-typed file, written by the core while peft is missing, opened by a peft that has no plugin: peft's own
# unknown-type error. (neat_peft registers itself when peft is imported after it; that hook is removed here to see
# peft alone, as in a process that never imported neat_peft.)
import torch  # noqa: E402
from torch import nn  # noqa: E402


def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


neat_dir = scratch / "neat_adapter"
neat_peft.get_neat_model(base(), neat_peft.NeatConfig(r=2, axis="in", target_modules=["0"])).save_pretrained(neat_dir)
del sys.modules["peft"]
sys.modules.pop("neat_peft.peft_plugin", None)
hooks = [f for f in sys.meta_path if isinstance(f, neat_peft._RegisterWhenPeftImports)]
assert len(hooks) == 1, sys.meta_path
sys.meta_path.remove(hooks[0])
import peft  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.utils import PeftType  # noqa: E402
import peft.mapping as mapping  # noqa: E402


def peft_state():
    return (list(PeftType.__members__), "NEAT" in PeftType.__dict__, dict(mapping.PEFT_TYPE_TO_CONFIG_MAPPING),
            dict(mapping.PEFT_TYPE_TO_TUNER_MAPPING), dict(mapping.PEFT_TYPE_TO_PREFIX_MAPPING),
            dict(mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING))


untouched = peft_state()
try:
    PeftModel.from_pretrained(base(), neat_dir)
except Exception as e:  # noqa: BLE001 - the point is to see what peft raises
    print(f"UNKNOWN TYPE ERROR: {type(e).__name__}: {e}")
    assert isinstance(e, KeyError) and "NEAT" in str(e), repr(e)
else:
    raise AssertionError("peft without the plugin loaded a NEAT file")
assert peft_state() == untouched

# 3. An untested peft version is refused with the tested range, and peft is left as it was.
import neat_peft.peft_plugin as plugin  # noqa: E402

real_version = plugin._PEFT_VERSION
for fake in ("0.22.0", "0.22.0.dev0", "0.20.1", "not-a-version"):
    plugin._PEFT_VERSION = fake
    for attempt in (lambda: neat_peft.register_with_peft(), lambda: plugin.NeatPeftConfig(r=2)):
        try:
            attempt()
        except plugin.IncompatiblePeftError as e:
            assert plugin.TESTED_PEFT in str(e) and "peft was not modified" in str(e), e
            message = str(e)
        else:
            raise AssertionError(f"peft {fake} was not refused")
    assert peft_state() == untouched, f"peft {fake}: peft was modified"
print("untested version ->", message)

# 3b. Meanwhile NeatConfig(...) warns and stays the core's plain dataclass (the core keeps working).
plugin._PEFT_VERSION = "0.22.0"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    plain = neat_peft.NeatConfig(r=2, target_modules=["0"])
assert type(plain) is neat_peft.NeatConfig and not isinstance(plain, peft.PeftConfig), type(plain)
assert any("not a peft.PeftConfig" in str(w.message) and plugin.TESTED_PEFT in str(w.message) for w in caught), \
    [str(w.message) for w in caught]
assert peft_state() == untouched
print("untested version, NeatConfig(...) -> plain dataclass with a warning")

# 4. allow_untested_peft=True registers with a warning; undoing it restores peft exactly.
plugin._PEFT_VERSION = "0.22.0"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert neat_peft.register_with_peft(allow_untested_peft=True) is plugin.NeatPeftConfig
assert any("not 0.22.0" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert plugin.is_registered()
plugin._unregister(PeftType.NEAT)
assert peft_state() == untouched and not plugin.is_registered()
plugin._PEFT_VERSION = real_version
print("allow_untested_peft -> registered with a warning, then undone")

# 5. A missing peft feature is refused before anything changes.
from peft.tuners.tuners_utils import BaseTuner  # noqa: E402

saved = BaseTuner.__dict__["_remove_adapter_name_from_key"]
del BaseTuner._remove_adapter_name_from_key
try:
    neat_peft.register_with_peft()
except plugin.IncompatiblePeftError as e:
    assert "BaseTuner._remove_adapter_name_from_key" in str(e), e
    print("missing feature ->", e)
else:
    raise AssertionError("a peft without BaseTuner._remove_adapter_name_from_key was not refused")
finally:
    BaseTuner._remove_adapter_name_from_key = saved
assert peft_state() == untouched

# 6. The prefix "neat_" owned by another peft type is refused.
mapping.PEFT_TYPE_TO_PREFIX_MAPPING["SOMEONE_ELSE"] = "neat_"
try:
    neat_peft.register_with_peft()
except plugin.IncompatiblePeftError as e:
    assert "neat_" in str(e) and "SOMEONE_ELSE" in str(e), e
else:
    raise AssertionError("a taken prefix was not refused")
del mapping.PEFT_TYPE_TO_PREFIX_MAPPING["SOMEONE_ELSE"]
assert peft_state() == untouched

# 7. If peft's register_peft_method fails half-way, the enum member and any mapping entries are removed again.
real_register = plugin.register_peft_method


def half_register(*, name, config_cls, model_cls, prefix=None, is_mixed_compatible=False):
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.NEAT] = prefix
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.NEAT] = config_cls
    raise KeyError("simulated failure inside register_peft_method")


plugin.register_peft_method = half_register
try:
    neat_peft.register_with_peft()
except KeyError as e:
    assert "simulated" in str(e)
else:
    raise AssertionError("the simulated failure was swallowed")
finally:
    plugin.register_peft_method = real_register
assert peft_state() == untouched, "a failed registration left peft half-registered"
print("failed registration -> rolled back")

# 8. Registering works, twice is a no-op, and the file from step 2 now loads with the core's outputs.
config_cls = neat_peft.register_with_peft()
after_first = peft_state()
assert neat_peft.register_with_peft() is config_cls and peft_state() == after_first
assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["NEAT"] is plugin.NeatPeftModel
x = torch.randn(5, 6)
with torch.no_grad():
    expected = neat_peft.NeatModel.from_pretrained(base(), neat_dir)(x)
    actual = PeftModel.from_pretrained(base(), neat_dir)(x)
assert torch.equal(expected, actual)
config = peft.PeftConfig.from_pretrained(str(neat_dir))  # peft's generic loader picks the NEAT class
assert type(config) is config_cls and isinstance(config, neat_peft.NeatConfig) and config.axis == "in"
assert type(neat_peft.NeatConfig(r=2)) is config_cls
print("registered; second call is a no-op; the NEAT file loads through peft")
print("ALL OK")
