"""The record every benchmark task returns for one training run, and the result file that holds them.

A task (:mod:`benchmarks.tasks`) trains one optimizer at one peak lr and seed
and returns a :class:`Run`; :mod:`benchmarks.sweep` collects runs into a
result file::

  {"task": ..., "metric": {"name": ..., "higher_is_better": ...},
   "reference": {"label": ..., "value": ...} or null,
   "runs": [Run, ...], "summary": {...}}

Non-finite numbers are stored as ``null`` (JSON has no NaN).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LOSS_WINDOW = 5
DIVERGED_FACTOR = 1.5  # above the train loss's noise at init, below a blown-up run's loss


def finite_or_none(x: float | None) -> float | None:
  """``x`` as a float, ``None`` where it is missing or not finite."""
  return float(x) if x is not None and math.isfinite(x) else None


@dataclasses.dataclass
class Run:
  """One training run of one optimizer at one peak lr and seed.

  ``settings`` are the task's size and settings the run trained under (two
  runs with equal settings, optimizer, lr and seed are interchangeable);
  ``losses`` the train loss per step run; ``values`` the task's metric at
  ``eval_steps``; ``final`` the metric after the last step (``None`` when
  training stopped at a non-finite loss); ``best`` the best of ``values``;
  ``diverged`` the task's divergence rule; ``extra`` task-specific
  measurements; the rest wall-clock seconds (``None`` where not measured).
  """

  optimizer: str
  lr: float
  seed: int
  settings: dict[str, Any]
  losses: list[float | None]
  eval_steps: list[int]
  values: list[float | None]
  final: float | None
  best: float | None
  diverged: bool
  wall_s: float | None = None
  first_step_s: float | None = None
  train_s: float | None = None
  eval_s: float | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def key(self) -> tuple:
    """What the driver resumes by: same optimizer, lr, seed and settings."""
    return self.optimizer, self.lr, self.seed, json.dumps(self.settings, sort_keys=True)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> Run:
    return cls(**d)


def make_run(
    optimizer: str,
    lr: float,
    seed: int,
    settings: dict[str, Any],
    losses: Sequence[float],
    eval_steps: Sequence[int],
    values: Sequence[float],
    *,
    higher_is_better: bool,
    stopped: bool,
    diverged: bool,
    **rest: Any,
) -> Run:
  """A :class:`Run` from a loop's plain lists: non-finite numbers to ``None``, final and best filled.

  ``stopped``: training ended early at a non-finite loss (no final value).
  """
  finite = [v for v in values if math.isfinite(v)]
  pick = max if higher_is_better else min
  return Run(
      optimizer=optimizer,
      lr=float(lr),
      seed=int(seed),
      settings=settings,
      losses=[finite_or_none(v) for v in losses],
      eval_steps=list(eval_steps),
      values=[finite_or_none(v) for v in values],
      final=None if stopped or not values else finite_or_none(values[-1]),
      best=pick(finite) if finite else None,
      diverged=bool(diverged),
      **rest,
  )


def loss_diverged(losses: Sequence[float]) -> bool:
  """The loss part of every task's divergence rule: a non-finite loss, or the mean of the last
  :data:`LOSS_WINDOW` losses above :data:`DIVERGED_FACTOR` times the first (the init's)."""
  if not len(losses) or not np.all(np.isfinite(losses)):
    return True
  return bool(np.mean(losses[-LOSS_WINDOW:]) > DIVERGED_FACTOR * losses[0])


def read(path: Path) -> dict[str, Any]:
  """A result file, its runs as :class:`Run` s."""
  saved = json.loads(path.read_text())
  saved["runs"] = [Run.from_json(r) for r in saved["runs"]]
  return saved


def write(saved: dict[str, Any], path: Path) -> None:
  """``saved`` (runs as :class:`Run` s) as JSON; written whole, so an interrupted job leaves a valid file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  out = {**saved, "runs": [r.to_json() for r in saved["runs"]]}
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(out, allow_nan=False))
  tmp.replace(path)
