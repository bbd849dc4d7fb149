"""What every benchmark records about the machine and the software it ran on (one place for these keys)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

from neat_peft.cli.compare import load_average  # 1, 5 and 15 minute load averages: how busy the machine was

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "numpy")
COMMIT_ENV = "NEAT_PEFT_COMMIT"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def machine_info() -> dict[str, Any]:
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "load_average": load_average()}


def versions() -> dict[str, Optional[str]]:
    """Library versions, neat_peft's and the git commit of the benchmark's checkout."""
    out: dict[str, Optional[str]] = {}
    for name in LIBRARIES:
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    try:
        from importlib.metadata import version

        out["neat_peft"] = version("neat-peft")
    except Exception:  # not installed as a distribution (a bare PYTHONPATH checkout)
        out["neat_peft"] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                           capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # an exported copy (git archive): the exporter says which
        out["git_commit"] = os.environ.get(COMMIT_ENV)
    return out
