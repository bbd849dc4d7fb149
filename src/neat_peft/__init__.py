"""neat-peft: NEAT adapters (arXiv 2410.01870) for any PyTorch model, at LoRA's cost, convertible to LoRA."""

from ._version import __version__
from .config import NeatConfig
from .layers import BASE_ONLY, NeatLayer
from .model import NeatModel, count_adapter_parameters, get_neat_model, match_lora_budget


def register_with_peft(*, allow_untested_peft: bool = False):
    """Make NEAT a peft method (peft_type "NEAT") and return its config class, `NeatPeftConfig`.

    Imports peft only when called (the core never needs it). See `neat_peft.peft_plugin`.
    """
    from .peft_plugin import register_with_peft as register

    return register(allow_untested_peft=allow_untested_peft)


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
