"""Fetch peft's own test suite for the installed peft version, outside the repository, at test time.

peft's tests are not shipped in its wheel, so the sdist of exactly the installed version is downloaded with pip
(`pip download --no-deps --no-binary :all: peft==<version>`) into a cache directory, and its `tests/` folder is
unpacked next to it as the package `peft_upstream_tests` (peft ships the folder without an `__init__.py`; its modules
use relative imports, so one is added). Nothing of peft's test code is ever written into this repository.

Cache: $NEAT_PEFT_CACHE, else ~/.cache/neat-peft  (sdist in peft-sdist/, unpacked tests in peft-tests-<version>/).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path
from typing import Optional

PACKAGE = "peft_upstream_tests"


def cache_dir() -> Path:
    return Path(os.environ.get("NEAT_PEFT_CACHE", Path.home() / ".cache" / "neat-peft"))


def _download_sdist(version: str, sdist_dir: Path) -> Path:
    tarball = sdist_dir / f"peft-{version}.tar.gz"
    if tarball.is_file():
        return tarball
    sdist_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "--quiet", f"peft=={version}", "-d", str(sdist_dir)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LookupError(f"`{' '.join(cmd)}` did not finish ({e})") from None
    if result.returncode != 0 or not tarball.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LookupError(f"could not download the peft {version} sdist (offline?): {tail[0]}")
    return tarball


def _unpack_tests(tarball: Path, version: str, target: Path) -> None:
    """Extract peft-<version>/tests/ into target/PACKAGE, atomically (a half-unpacked cache is never used)."""
    member_prefix = f"peft-{version}/tests/"
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target, prefix=".unpack-"))
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(member_prefix) and (m.isfile() or m.isdir())]
            if not any(m.name.endswith("/test_custom_models.py") for m in members):
                raise LookupError(f"{tarball} has no tests/test_custom_models.py")
            for m in members:
                m.name = m.name[len(member_prefix):] or "."
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **kwargs)
        (staging / "__init__.py").write_text("# added by neat-peft: peft ships tests/ without it\n")
        os.replace(staging, target / PACKAGE)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _stub_missing_optional_imports() -> Optional[types.ModuleType]:
    """testing_common.py imports diffusers at module level for its Stable Diffusion tests, which are not run here.
    Returns the stub put into sys.modules (None if diffusers is installed), to be taken out after the import:
    left there, other libraries' `find_spec("diffusers")` (optimum-quanto's) raise on it."""
    try:
        import diffusers  # noqa: F401
        return None
    except ImportError:
        stub = types.ModuleType("diffusers")

        class StableDiffusionPipeline:  # never instantiated by the tests collected here
            pass

        stub.StableDiffusionPipeline = StableDiffusionPipeline
        sys.modules["diffusers"] = stub
        return stub


def import_peft_test_module(name: str = "test_custom_models"):
    """Import `peft_upstream_tests.<name>` for the installed peft. Raises LookupError (with the reason) if the
    tests cannot be obtained."""
    import peft

    version = peft.__version__
    root = cache_dir() / f"peft-tests-{version}"
    if not (root / PACKAGE / "test_custom_models.py").is_file():
        tarball = _download_sdist(version, cache_dir() / "peft-sdist")
        if (root / PACKAGE).exists():
            shutil.rmtree(root / PACKAGE)
        _unpack_tests(tarball, version, root)
    stub = _stub_missing_optional_imports()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import importlib

    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    finally:
        if stub is not None and sys.modules.get("diffusers") is stub:
            del sys.modules["diffusers"]
