"""The tensors of one NEAT adapter: the single list of their roles, shapes, module names and file keys.

For a layer with W0 of d_out x d_in and an adapter of rank r and depth k, the network reads rows of length
m = d_out (axis "out") or d_in (axis "in") and B writes rows of the same length:

  role          module attribute (in memory)           file key (peft's PEANuT naming)              shape
  A             neat_A.<adapter>.weight                 base_model.model.<path>.peanut_A.weight          r x m
  B             neat_B.<adapter>.weight                 base_model.model.<path>.peanut_B.weight          m x r
  encoders.i    neat_encoders.<adapter>.<i>.weight      base_model.model.<path>.peanut_encoders.<i>.weight  r x r
  decoders.i    neat_decoders.<adapter>.<i>.weight      base_model.model.<path>.peanut_decoders.<i>.weight  r x r

Files written as peft_type "NEAT" carry the prefix `neat_` instead of `peanut_` (formats.rename_key_prefix).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

FILE_PREFIX = "base_model.model."
CONTAINERS = ("A", "B", "encoders", "decoders")


@dataclass(frozen=True)
class AdapterTensor:
    container: str            # one of CONTAINERS
    index: Optional[int]      # position in encoders/decoders, None for A and B
    shape: tuple[int, int]

    @property
    def role(self) -> str:
        return self.container if self.index is None else f"{self.container}.{self.index}"

    def module_key(self, adapter_name: str) -> str:
        """Name relative to the NeatLayer, as in its state_dict."""
        index = "" if self.index is None else f".{self.index}"
        return f"neat_{self.container}.{adapter_name}{index}.weight"

    def file_key(self, path: str, prefix: str = "peanut_") -> str:
        """Key in adapter_model.safetensors for the layer at `path` (relative to the wrapped model)."""
        index = "" if self.index is None else f".{self.index}"
        return f"{FILE_PREFIX}{path}.{prefix}{self.container}{index}.weight"


@functools.lru_cache(maxsize=1024)  # layers ask on every forward; the answer is immutable
def adapter_tensors(r: int, depth: int, axis: str, d_out: int, d_in: int) -> tuple[AdapterTensor, ...]:
    """Every tensor of an adapter with rank r and `depth` residual pairs on a d_out x d_in weight, in order."""
    m = d_out if axis == "out" else d_in
    return (
        AdapterTensor("A", None, (r, m)),
        AdapterTensor("B", None, (m, r)),
        *(AdapterTensor("encoders", i, (r, r)) for i in range(depth)),
        *(AdapterTensor("decoders", i, (r, r)) for i in range(depth)),
    )
