#!/usr/bin/env bash
# Runs the README's two set-up commands from a fresh clone on a PATH whose only
# Python is the one given, and prints each command's time:
#
#   bash scripts/one_python_check.sh /path/to/python3.12 [clone-dir]
#
# The PATH holds links to every program of /usr/local/bin, /usr/bin and /bin
# except Pythons, pips and pyenv, plus python3 and pythonX.Y for the one
# given; PYENV_ROOT points nowhere. The clone is of this checkout's HEAD.
set -euo pipefail
python=${1:?usage: one_python_check.sh PYTHON [CLONE_DIR]}
repo=$(cd "$(dirname "$0")/.." && pwd)
clone=${2:-$(mktemp -d)/adaprelora_jax}
minor=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

bin=$(mktemp -d)
for dir in /usr/local/bin /usr/bin /bin; do
  for program in "$dir"/*; do
    name=$(basename "$program")
    case "$name" in python*|*-python3*|pip*|pyenv*|idle*|pydoc*|2to3*) continue ;; esac
    [ -e "$bin/$name" ] || ln -s "$program" "$bin/$name"
  done
done
ln -s "$python" "$bin/python3"
ln -s "$python" "$bin/python$minor"

git clone --quiet "$repo" "$clone"
cd "$clone"
timed() {
  local start=$SECONDS
  env -i HOME="$HOME" PATH="$bin" PYENV_ROOT=/nonexistent LANG=C.UTF-8 bash -c "$1" \
    > "$2" 2>&1 || { echo "failed: $1 (log: $clone/$2)"; exit 1; }
  echo "$(( SECONDS - start )) s  $1"
}
echo "clone: $clone ($(git log --oneline -1)); Python $minor only"
timed "bash scripts/setup.sh main" setup_main.log
timed ".venv/bin/python -m benchmarks.finetune" finetune.log
timed "bash scripts/setup.sh test" setup_test.log
timed ".venv/bin/python -m pytest -q" pytest.log
grep "setup.sh: Python" setup_main.log
tail -n 1 pytest.log
