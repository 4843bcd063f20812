"""Regenerates every benchmark result, one after another, into ``--out``::

  python -m benchmarks.run_all                 # CPU sizes: several hours on 2 cores
  python -m benchmarks.run_all --size gpu      # every benchmark at its GPU size
  python -m benchmarks.run_all --only controlled ablations --dry-run

Each benchmark runs in its own process (a fresh JAX runtime, so one
benchmark's memory does not slow the next one's timings) with its own
defaults, writing to ``--out/<name>``. ``benchmarks/results/`` holds the
copies that RESULTS.md quotes.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

BENCHMARKS: dict[str, list[str]] = {
    "controlled": [],
    "ablations": [],
    "compile_time": [],
    "update_cost": [],
    "full_stats_cost": [],
    "finetune": ["--sweep"],
    "causal_lm": [],
}
"""Module name in ``benchmarks`` -> its arguments besides ``--size`` and ``--out``."""

PRINT_ONLY = ("full_stats_cost",)
"""Benchmarks that print their table and write no files (no ``--out``)."""


def commands(size: str, out: pathlib.Path, only: list[str] | None) -> list[list[str]]:
  """The command line of each selected benchmark."""
  selected = only or list(BENCHMARKS)
  unknown = sorted(set(selected) - set(BENCHMARKS))
  if unknown:
    raise SystemExit(f"unknown benchmarks {unknown}; choose from {sorted(BENCHMARKS)}")
  runs = []
  for name in selected:
    extra = [*BENCHMARKS[name], "--size", size]
    if name not in PRINT_ONLY:
      extra += ["--out", str(out / name)]
    runs.append([sys.executable, "-m", f"benchmarks.{name}", *extra])
  return runs


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument("--only", nargs="+", help=f"a subset of {list(BENCHMARKS)}")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out/all"))
  parser.add_argument("--dry-run", action="store_true", help="print the commands only")
  args = parser.parse_args(argv)
  for command in commands(args.size, args.out, args.only):
    print("$", " ".join(command[1:]), flush=True)
    if not args.dry_run:
      subprocess.run(command, check=True)


if __name__ == "__main__":
  main()
