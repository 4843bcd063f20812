#!/usr/bin/env bash
# Creates .venv/ and installs the project with what the main job needs
# (`setup.sh main`) or what the tests need too (`setup.sh test`), plus the
# offline model and data (benchmarks/assets.py). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="bench"
[ "${1:-main}" = "test" ] && extras="bench,test"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c scripts/constraints.txt -e ".[${extras}]"
.venv/bin/python -m benchmarks.assets
