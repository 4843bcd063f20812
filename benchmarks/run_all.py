"""Regenerates every file in ``benchmarks/results/``, each by a named entry::

  python -m benchmarks.run_all --list                      # which entry writes which file
  python -m benchmarks.run_all                             # every entry (many hours on 2 cores)
  python -m benchmarks.run_all --only factor_control controlled_lora_regression
  python -m benchmarks.run_all --only minilm_family --dry-run

Each entry runs in its own process (a fresh JAX runtime, so one benchmark's
memory does not slow the next one's timings) writing into a scratch folder;
the files it is listed with are then copied to ``--results``. Sweeps resume
from the result file already there, so an entry whose file is complete
recomputes nothing: pass ``--fresh`` to start them from scratch.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

RESULTS = Path(__file__).parent / "results"

FAMILY = ("adamw", "adafactor", "lora_plus", "scaled_adamw", "lora_pro", "lora_pro_full",
          "lora_rite", "adaprelora", "adaprelora_b1", "adaprelora_exact")
ABLATIONS = ("adaprelora", "full_stats", "b1=0.9", "no_clipping", "damping=1e-6", "damping=1e-2",
             "b2=0.999", "balanced_init")
# The MiniLM family sweep and the 40-step SmolLM2 sweep ran before the factor-step control,
# when `adaprelora` was the paper's rule: they name it `adaprelora_exact` (and `_exact_b1`).
MINILM_FAMILY = ("adamw", "adaprelora_exact", "adafactor", "lora_pro_full", "lora_rite",
                 "head_only_adamw", "full_ft_adamw", "adaprelora_exact_b1", "scaled_adamw",
                 "lora_pro", "lora_plus")
COST_FAMILY = ("adamw", "adafactor", "lora_plus", "scaled_adamw", "lora_pro", "lora_rite",
               "adaprelora", "adaprelora_b1", "lora_pro_full")
LAYOUTS = ("adamw", "adaprelora", "adaprelora_chunked")
SMOLLM2_40_STEPS = ("adamw=3e-3,1e-2", "lora_plus=3e-4,1e-3", "scaled_adamw=3e-3,1e-2",
                    "lora_rite=1e-3,3e-3", "adaprelora_exact=1e-3,3e-3", "adafactor=1e-3,3e-3",
                    "lora_pro=3e-3,1e-2", "lora_pro_full=1e-3,3e-3", "adaprelora_exact_b1=1e-3,3e-3")


class Entry(NamedTuple):
  """A module of ``benchmarks``, its arguments (``{out}``: the scratch folder) and the files
  ``benchmarks/results/`` keeps: their names there -> the names the module writes."""

  module: str
  args: tuple[str, ...]
  files: dict[str, str]


def _same(*names: str) -> dict[str, str]:
  return {name: name for name in names}


def _sweep(name: str, task: str, *args: str) -> Entry:
  """A :mod:`benchmarks.sweep` entry writing ``<name>.json`` and ``<name>.png``."""
  return Entry("sweep", (task, *args, "--no-progress", "--out", f"{{out}}/{name}.json"),
               _same(f"{name}.json", f"{name}.png"))


def _names(names: Sequence[str]) -> tuple[str, ...]:
  return ("--optimizers", *names)


ENTRIES: dict[str, Entry] = {
    "finetune_main": Entry("finetune", ("--out", "{out}"),
                           {"finetune_main.json": "finetune.json", "finetune_main.png": "finetune.png"}),
    "factor_control": Entry("factor_control", ("--out", "{out}/factor_control.json"),
                            _same("factor_control.json")),
    **{f"controlled_{p}": _sweep(f"controlled_{p}", p, *_names(FAMILY), "--seeds", "0", "1", "2")
       for p in ("lora_regression", "matrix_sensing")},
    **{f"ablations_{p}": _sweep(f"ablations_{p}", p, *_names(ABLATIONS), "--seeds", "0", "1", "2")
       for p in ("lora_regression", "matrix_sensing")},
    "minilm_family": _sweep("minilm_family", "minilm", *_names(MINILM_FAMILY), "--past-edge",
                            "--best-seeds", "1", "2", "--paired-with", "adaprelora_exact"),
    "minilm_before_control": _sweep(
        "minilm_before_control", "minilm", "--optimizers", "adaprelora_exact", "adamw",
        "--seeds", "0", "1", "2"),
    "minilm_after_control": _sweep("minilm_after_control", "minilm", "--optimizers", "adaprelora",
                                   "--seeds", "0", "1", "2"),
    "minilm_full_stats": _sweep("minilm_full_stats", "minilm", "--optimizers",
                                "adaprelora_exact_full", "--lrs", "3e-3", "--seeds", "0", "1", "2"),
    "smollm2_control": _sweep("smollm2_control", "smollm2", "--optimizers", "adaprelora", "adamw",
                              "adafactor", "adaprelora_exact", "--best-seeds", "1", "2"),
    "smollm2_family_40_steps": _sweep(
        "smollm2_family_40_steps", "smollm2", *_names([n.split("=")[0] for n in SMOLLM2_40_STEPS]), "--lrs", *SMOLLM2_40_STEPS,
        "--past-edge", "--set", "steps=40", "eval_every=10"),
    "control_sensitivity": Entry("control_sensitivity", ("--results", "{out}", "--out", "{out}"),
                                 _same("control_sensitivity.png")),
    "compile_time": Entry("compile_time", ("--optimizers", "adamw", "adaprelora", "--out", "{out}"),
                          _same("compile_time.json")),
    "compile_time_7b": Entry(
        "compile_time", ("--decoder", "7b", "--layers", "8", "32", "--repeats", "2",
                         "--optimizers", "adamw", "adaprelora", "--out", "{out}"),
        _same("compile_time_7b.json")),
    "compile_time_7b_layouts": Entry(
        "compile_time", ("--decoder", "7b", "--layers", "32", "--optimizers", "adaprelora",
                         "adaprelora_chunked", "--layouts", "unscanned", "--out", "{out}"),
        {"compile_time_7b_layouts.json": "compile_time_7b.json"}),
    "update_cost": Entry(
        "update_cost", ("--optimizers", *COST_FAMILY, "--out", "{out}"),
        _same("update_cost.json", "update_cost.png")),
    "update_cost_layouts": Entry(
        "update_cost", ("--optimizers", *LAYOUTS, "adaprelora_exact", "adaprelora_b1",
                        "--no-scaling", "--out", "{out}"),
        {"update_cost_layouts.json": "update_cost.json"}),
    "update_cost_layouts_8": Entry(
        "update_cost", ("--optimizers", *LAYOUTS, "--no-scaling", "--layers", "8", "--out", "{out}"),
        {"update_cost_layouts_8.json": "update_cost.json"}),
    "full_stats_cost": Entry("full_stats_cost", (), {}),
    "accelerator_model": Entry("accelerator_model", ("--out", "{out}"),
                               _same("accelerator_model.json")),
    "precision_error": Entry("precision_error", ("--out", "{out}/precision_error.json"),
                             _same("precision_error.json")),
}
"""Entry name -> what it runs and the result files it writes, in the order :func:`main` runs them."""

NEEDS = {"control_sensitivity": ("minilm_before_control", "minilm_after_control", "smollm2_control")}
"""Entries that read other entries' files (copied into the scratch folder first)."""


def listing() -> str:
  """One line per entry: its name, its command and the files it writes."""
  return "\n".join(
      f"{name}: python -m benchmarks.{e.module} {' '.join(e.args)}\n    writes "
      + (", ".join(e.files) or "nothing (prints its table)")
      for name, e in ENTRIES.items()
  )


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--list", action="store_true", help="which entry writes which file")
  parser.add_argument("--only", nargs="+", help="a subset of the entries")
  parser.add_argument("--results", type=Path, default=RESULTS)
  parser.add_argument("--fresh", action="store_true", help="sweeps start from scratch")
  parser.add_argument("--dry-run", action="store_true", help="print the commands only")
  args = parser.parse_args(argv)
  if args.list:
    print(listing())
    return
  selected = args.only or list(ENTRIES)
  unknown = sorted(set(selected) - set(ENTRIES))
  if unknown:
    raise SystemExit(f"unknown entries {unknown}; see --list")
  for name in selected:
    entry = ENTRIES[name]
    with tempfile.TemporaryDirectory() as scratch:
      resumed = {} if args.fresh or entry.module not in ("sweep", "finetune") else entry.files
      needed = {f: f for need in NEEDS.get(name, ()) for f in ENTRIES[need].files}
      for kept, written in {**resumed, **needed}.items():
        if (args.results / kept).exists() and kept.endswith(".json"):
          shutil.copy(args.results / kept, Path(scratch) / written)
      command = [sys.executable, "-m", f"benchmarks.{entry.module}",
                 *(a.replace("{out}", scratch) for a in entry.args)]
      print(f"# {name}\n$ {' '.join(command[1:])}", flush=True)
      if args.dry_run:
        continue
      subprocess.run(command, check=True)
      args.results.mkdir(parents=True, exist_ok=True)
      for kept, written in entry.files.items():
        shutil.copy(Path(scratch) / written, args.results / kept)


if __name__ == "__main__":
  main()
