#!/usr/bin/env bash
# Creates a virtual environment and installs the project with what the main job
# needs (`setup.sh main`) or what the tests need too (`setup.sh test`), plus the
# offline model and data (benchmarks/assets.py). Safe to run again.
#
#   bash scripts/setup.sh [--which] [main|test] [oldest|newest]
#
# The second word picks one of the two tested sets:
#   oldest  Python 3.11, jax 0.9.2, flax 0.12.6, in .venv/; `test` adds the
#           [tunix] and [torch-reference] extras (they resolve only here).
#   newest  Python 3.12 or 3.13, jax 0.12, flax 0.12.12, in .venv-newest/.
# Without it, the set follows the Python found, in .venv/ either way (so the
# README's `.venv/bin/python ...` works on any machine): Python 3.11 -> oldest
# (preferred when present); else 3.12 or 3.13 -> newest. When .venv/ already
# exists, its Python decides. scripts/constraints-<set>.txt holds every version
# of the set. VENV=<dir> installs into another folder, PYTHON=<interpreter>
# overrides the search (and, with no set named, picks the set by its version).
# --which prints the choice (set, python, venv) and stops before installing.
set -euo pipefail
cd "$(dirname "$0")/.."
which_only=0
if [ "${1:-}" = --which ]; then which_only=1; shift; fi
job="${1:-main}"
set_name="${2:-}"
die() { echo "scripts/setup.sh: $*" >&2; exit 1; }

case "$job" in
  main) extras="bench" ;;
  test) extras="bench,test" ;;
  *) die "unknown job '$job' (use: main or test)" ;;
esac

# The Pythons each set is tested on, in order of preference.
versions_of() {
  case "$1" in
    oldest) echo 3.11 ;;
    newest) echo 3.12 3.13 ;;
    *) die "unknown set '$1' (use: oldest or newest)" ;;
  esac
}
set_of() {
  case "$1" in
    3.11) echo oldest ;;
    3.12|3.13) echo newest ;;
    *) return 1 ;;
  esac
}

minor() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

tried=()
# The first interpreter that runs and reports minor version $1: pythonX.Y on
# PATH (a pyenv shim fails when X.Y is not selected, so each one is run),
# pyenv's own versions, then python3. Sets $found (empty when there is none).
find_version() {
  local version="$1" candidate root
  local -a candidates=()
  candidate=$(command -v "python$version" 2>/dev/null) && candidates+=("$candidate")
  if command -v pyenv >/dev/null 2>&1 && root=$(pyenv root 2>/dev/null); then
    for candidate in $(ls -d "$root/versions/$version".*/bin/"python$version" 2>/dev/null | sort -V -r); do
      candidates+=("$candidate")
    done
  fi
  candidate=$(command -v python3 2>/dev/null) && candidates+=("$candidate")
  found=""
  for candidate in ${candidates[@]+"${candidates[@]}"}; do
    case " ${tried[*]:-} " in *" $candidate "*) ;; *) tried+=("$candidate") ;; esac
    if [ "$(minor "$candidate")" = "$version" ]; then
      found="$candidate"
      return
    fi
  done
}

# Picks $set_name (when not named), $python and $venv.
python=""
if [ -n "$set_name" ]; then
  versions=$(versions_of "$set_name")
  [ "$set_name" = oldest ] && venv="${VENV:-.venv}" || venv="${VENV:-.venv-newest}"
  how="named"
else
  versions="3.11 3.12 3.13"
  venv="${VENV:-.venv}"
  how="chosen by the Python found"
fi
if [ -x "$venv/bin/python" ]; then
  python="$venv/bin/python"
  have=$(minor "$python")
  if [ -z "$set_name" ]; then
    set_name=$(set_of "$have") || die "$venv has Python $have; the tested sets need 3.11 (oldest) or 3.12/3.13 (newest): remove $venv or pick another folder with VENV=<dir>."
    how="chosen by $venv's Python"
  fi
  case " $(versions_of "$set_name") " in
    *" $have "*) ;;
    *) die "$venv has Python $have, the $set_name set needs $(versions_of "$set_name" | sed 's/ / or /'): remove $venv or pick another folder with VENV=<dir>." ;;
  esac
elif [ -n "${PYTHON:-}" ]; then
  have=$(minor "$PYTHON") || die "PYTHON=$PYTHON does not run."
  if [ -z "$set_name" ]; then
    set_name=$(set_of "$have") || die "PYTHON=$PYTHON is Python $have; the tested sets need 3.11 (oldest) or 3.12/3.13 (newest)."
  fi
  case " $versions " in
    *" $have "*) ;;
    *) die "PYTHON=$PYTHON is Python $have, the $set_name set needs $(echo "$versions" | sed 's/ / or /')." ;;
  esac
  python="$PYTHON"
else
  for version in $versions; do
    find_version "$version"
    python="$found"
    if [ -n "$python" ]; then
      have="$version"
      break
    fi
  done
  if [ -z "$python" ]; then
    if [ -n "$set_name" ]; then
      need="the $set_name set needs Python $(echo "$versions" | sed 's/ / or /')"
    else
      need="the tested sets need Python 3.11 (oldest set) or 3.12/3.13 (newest set)"
    fi
    die "$need, and none was found (tried: ${tried[*]:-nothing}).
Install one (e.g. 'apt-get install python3.12 python3.12-venv' or 'pyenv install 3.12'),
or name one with PYTHON=/path/to/python3.X."
  fi
  [ -n "$set_name" ] || set_name=$(set_of "$have")
fi
[ "$set_name" = oldest ] && [ "$job" = test ] && extras="$extras,tunix,torch-reference"
constraints="scripts/constraints-$set_name.txt"

echo "scripts/setup.sh: Python $have found: using the $set_name set ($constraints, $how) in $venv"
if [ "$which_only" = 1 ]; then
  echo "set=$set_name"
  echo "python=$python"
  echo "venv=$venv"
  echo "extras=$extras"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "scripts/setup.sh: creating $venv with $python"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c "$constraints" -e ".[$extras]"
"$venv/bin/python" -m benchmarks.assets
