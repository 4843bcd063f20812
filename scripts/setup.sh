#!/usr/bin/env bash
# Creates a virtual environment and installs the project with what the main job
# needs (`setup.sh main`) or what the tests need too (`setup.sh test`), plus the
# offline model and data (benchmarks/assets.py). Safe to run again.
#
#   bash scripts/setup.sh [main|test] [oldest|newest]
#
# The second word picks one of the two tested sets (default: oldest):
#   oldest  Python 3.11, jax 0.9.2, flax 0.12.6, in .venv/; `test` adds the
#           [tunix] and [torch-reference] extras (they resolve only here).
#   newest  Python 3.12, jax 0.12, flax 0.12.12, in .venv-newest/.
# scripts/constraints-<set>.txt holds every version of the set. VENV=<dir>
# installs into another folder, PYTHON=<interpreter> overrides the search.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-main}"
set_name="${2:-oldest}"
die() { echo "scripts/setup.sh: $*" >&2; exit 1; }

case "$job" in
  main) extras="bench" ;;
  test) extras="bench,test" ;;
  *) die "unknown job '$job' (use: main or test)" ;;
esac
case "$set_name" in
  oldest) version=3.11 venv="${VENV:-.venv}"
          [ "$job" = test ] && extras="$extras,tunix,torch-reference" ;;
  newest) version=3.12 venv="${VENV:-.venv-newest}" ;;
  *) die "unknown set '$set_name' (use: oldest or newest)" ;;
esac

minor() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

# The first interpreter that runs and reports this minor version: $PYTHON,
# pythonX.Y on PATH (a pyenv shim fails when X.Y is not selected, so each one
# is run), pyenv's own versions, then python3.
find_python() {
  local candidate root
  local -a candidates=()
  [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
  candidate=$(command -v "python$version" 2>/dev/null) && candidates+=("$candidate")
  if command -v pyenv >/dev/null 2>&1; then
    root=$(pyenv root)
    for candidate in $(ls -d "$root/versions/$version".*/bin/"python$version" 2>/dev/null | sort -V -r); do
      candidates+=("$candidate")
    done
  fi
  candidate=$(command -v python3 2>/dev/null) && candidates+=("$candidate")
  for candidate in "${candidates[@]}"; do
    if [ "$(minor "$candidate")" = "$version" ]; then
      echo "$candidate"
      return
    fi
  done
  die "the $set_name set needs Python $version, and none was found (tried: ${candidates[*]:-nothing}).
Install it (e.g. 'apt-get install python$version python$version-venv' or 'pyenv install $version'),
or name one with PYTHON=/path/to/python$version."
}

if [ -x "$venv/bin/python" ]; then
  have=$(minor "$venv/bin/python")
  [ "$have" = "$version" ] || die "$venv has Python $have, the $set_name set needs $version: remove $venv or pick another folder with VENV=<dir>."
else
  python=$(find_python)
  echo "scripts/setup.sh: creating $venv with $python ($set_name set)"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c "scripts/constraints-$set_name.txt" -e ".[$extras]"
"$venv/bin/python" -m benchmarks.assets
