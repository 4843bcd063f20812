"""scripts/setup.sh's choice of set, interpreter and venv (`--which`: no install).

Each case runs the script with a PATH that holds only the tools it needs and
the Pythons the case names (as `python3`, or `python3.X` symlinks), and a
PYENV_ROOT that is empty, so no other Python on this machine leaks in.
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"
TOOLS = ("bash", "dirname", "ls", "sort", "sed")
BASH = shutil.which("bash") or "/bin/bash"


def _interpreter(version: str) -> str | None:
  """A real Python `version` on this machine (pyenv's, or on PATH)."""
  roots = [os.environ.get("PYENV_ROOT"), os.path.expanduser("~/.pyenv")]
  for root in filter(None, roots):
    found = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"))
    if found:
      return found[-1]
  return shutil.which(f"python{version}")


PYTHONS = {v: _interpreter(v) for v in ("3.11", "3.12", "3.13")}


def _need(*versions: str) -> None:
  missing = [v for v in versions if not PYTHONS[v]]
  if missing:
    pytest.skip(f"needs Python {', '.join(missing)} on this machine")


@pytest.fixture
def repo(tmp_path: pathlib.Path) -> pathlib.Path:
  """A copy of the script in a folder of its own: no .venv/ there."""
  (tmp_path / "repo" / "scripts").mkdir(parents=True)
  shutil.copy(SETUP, tmp_path / "repo" / "scripts" / "setup.sh")
  return tmp_path / "repo"


def run(repo: pathlib.Path, *args: str, pythons: dict[str, str] = {},
        env: dict[str, str] = {}) -> subprocess.CompletedProcess[str]:
  """setup.sh --which ARGS, with PATH = the tools and `pythons` (name -> version)."""
  bin_dir = repo.parent / "bin"
  shutil.rmtree(bin_dir, ignore_errors=True)
  bin_dir.mkdir()
  for tool in TOOLS:
    path = shutil.which(tool)
    assert path, f"{tool} is not on this machine's PATH"
    (bin_dir / tool).symlink_to(path)
  for name, version in pythons.items():
    _need(version)
    (bin_dir / name).symlink_to(PYTHONS[version])
  (repo.parent / "pyenv").mkdir(exist_ok=True)
  full_env = {"PATH": str(bin_dir), "HOME": str(repo.parent),
              "PYENV_ROOT": str(repo.parent / "pyenv"), **env}
  return subprocess.run(
      [BASH, str(repo / "scripts" / "setup.sh"), "--which", *args],
      env=full_env, capture_output=True, text=True, timeout=60, check=False)


def choice(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
  assert result.returncode == 0, result.stderr + result.stdout
  return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line
              and not line.startswith("scripts/setup.sh"))


@pytest.mark.parametrize("version, expected", [
    ("3.11", "oldest"), ("3.12", "newest"), ("3.13", "newest")])
def test_the_only_python_picks_its_set_and_venv_is_dot_venv(repo, version, expected):
  result = run(repo, "test", pythons={"python3": version})
  got = choice(result)
  assert got["set"] == expected
  assert got["python"] == str(repo.parent / "bin" / "python3")
  assert got["venv"] == ".venv"   # the README's `.venv/bin/python ...` follows
  assert (f"scripts/setup.sh: Python {version} found: using the {expected} set "
          f"(scripts/constraints-{expected}.txt") in result.stdout
  tunix = "tunix,torch-reference"
  assert (tunix in got["extras"]) == (expected == "oldest"), got["extras"]


def test_main_job_has_only_the_bench_extra(repo):
  assert choice(run(repo, "main", pythons={"python3": "3.12"}))["extras"] == "bench"


def test_python311_is_preferred_when_present(repo):
  got = choice(run(repo, "test", pythons={"python3.13": "3.13", "python3.11": "3.11"}))
  assert (got["set"], got["python"]) == ("oldest", str(repo.parent / "bin" / "python3.11"))


def test_python312_before_313_for_the_newest_set(repo):
  got = choice(run(repo, "main", pythons={"python3": "3.13", "python3.12": "3.12"}))
  assert (got["set"], got["python"]) == ("newest", str(repo.parent / "bin" / "python3.12"))


def test_named_newest_set_on_313_only_uses_venv_newest(repo):
  got = choice(run(repo, "test", "newest", pythons={"python3": "3.13"}))
  assert (got["set"], got["venv"]) == ("newest", ".venv-newest")


def test_named_set_and_venv(repo):
  got = choice(run(repo, "test", "newest", pythons={"python3": "3.13"},
                   env={"VENV": ".venv-py313"}))
  assert (got["set"], got["venv"]) == ("newest", ".venv-py313")
  got = choice(run(repo, "main", "oldest", pythons={"python3": "3.11"}))
  assert (got["set"], got["venv"]) == ("oldest", ".venv")


def test_python_overrides_the_search(repo):
  _need("3.13")
  got = choice(run(repo, "test", pythons={"python3": "3.11"},
                   env={"PYTHON": PYTHONS["3.13"]}))
  assert (got["set"], got["python"]) == ("newest", PYTHONS["3.13"])


def test_named_oldest_set_without_311_says_what_to_install(repo):
  result = run(repo, "test", "oldest", pythons={"python3": "3.13"})
  assert result.returncode == 1
  assert "the oldest set needs Python 3.11, and none was found" in result.stderr


def test_no_python_at_all_says_what_to_install(repo):
  result = run(repo, "main")
  assert result.returncode == 1
  assert "need Python 3.11 (oldest set) or 3.12/3.13 (newest set)" in result.stderr
  assert "pyenv install" in result.stderr


def test_existing_venv_decides_when_no_set_is_named(repo):
  _need("3.12")
  (repo / ".venv" / "bin").mkdir(parents=True)
  (repo / ".venv" / "bin" / "python").symlink_to(PYTHONS["3.12"])
  got = choice(run(repo, "test", pythons={"python3": "3.11"}))
  assert (got["set"], got["venv"]) == ("newest", ".venv")
  result = run(repo, "test", "oldest", pythons={"python3": "3.11"})
  assert result.returncode == 1 and ".venv has Python 3.12" in result.stderr
