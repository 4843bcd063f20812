"""The fine-tuning sweep protocol (grid, one lr past an edge, more seeds at the best), run reuse.

:func:`sweep_jobs` only decides which runs to do, through an ``execute``
callback, so the protocol is tested without training anything;
:func:`load_reusable` finds finished runs in earlier result files, so an
interrupted sweep resumes and a new one reuses what is already measured.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.family import shift

Execute = Callable[[str, float, int, int], dict]
"""``execute(optimizer, lr, seed, eval_every)``: one finished run."""


def sweep_jobs(
    names: Sequence[str],
    lrs: dict[str, list[float]],
    seeds: Sequence[int],
    grid_eval_every: int,
    eval_every: int,
    execute: Execute,
) -> None:
  """The tuning protocol, the same for every method, phase by phase so partial results are useful.

  1. every method's grid on ``seeds[0]``, evaluated every ``grid_eval_every``
     steps (final accuracy does not depend on it);
  2. for each method whose best ``seeds[0]`` lr is at an edge of its grid,
     one more lr past that edge (:func:`beyond_edge`), once;
  3. ``seeds[1:]`` at each method's best ``seeds[0]`` lr, evaluated every
     ``eval_every`` steps for the curves.
  """
  first = {n: {lr: execute(n, lr, seeds[0], grid_eval_every) for lr in lrs[n]} for n in names}
  best = lambda n: max(first[n], key=lambda lr: first[n][lr]["final_accuracy"])
  for n in names:
    if len(lrs[n]) > 1 and best(n) in (min(lrs[n]), max(lrs[n])):
      lr = beyond_edge(best(n), up=best(n) == max(lrs[n]))
      first[n][lr] = execute(n, lr, seeds[0], grid_eval_every)
  for n in names:
    for seed in seeds[1:]:
      execute(n, best(n), seed, eval_every)


def beyond_edge(lr: float, up: bool) -> float:
  """The rung of the 1-3-10 ladder (:data:`benchmarks.family.LADDER`) next to ``lr``, above or below."""
  return shift(lr, 1 if up else -1)


RUN_FIELDS = ("optimizer", "lr", "seed", "steps", "batch", "warmup_steps", "lora_rank")


def run_key(r: dict) -> tuple:
  """What two runs must share to be interchangeable (eval frequency aside)."""
  return (*(r[k] for k in RUN_FIELDS), r.get("train", "lora"), r["eval_examples"])


def load_reusable(paths: Sequence[Path], weight_decay: float) -> dict[tuple, dict]:
  """Runs of earlier ``finetune.json`` files (same weight decay) by :func:`run_key`; first wins."""
  found = {}
  for path in paths:
    saved = json.loads(path.read_text())
    if saved["weight_decay"] != weight_decay:
      raise SystemExit(f"{path}: weight decay {saved['weight_decay']} != {weight_decay}")
    for r in saved["runs"]:
      found.setdefault(run_key(r), {**r, "source": r.get("source", str(path))})
  return found
