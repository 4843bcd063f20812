"""The one task interface: every benchmark task trains one optimizer at one peak lr and seed.

A :class:`Task` is ``run(factory, lr, seed, size) -> Run``
(:class:`benchmarks.record.Run`) with what the driver needs around it: its
metric, its sizes, its methods (a name -> a factory and what the method
changes in the size, e.g. MiniLM's reference lines train without adapters),
its default lr window per method and its reference line. The task modules
define them; :func:`get` finds one by name.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from benchmarks.family import Factory
from benchmarks.record import Run
from benchmarks.report import Metric

Size = Mapping[str, Any]


class Method(NamedTuple):
  """An optimizer as a task trains it: its factory, and the size entries it sets."""

  factory: Factory
  overrides: Mapping[str, Any] = {}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  metric: Metric
  sizes: Mapping[str, Size]
  run: Callable[..., Run]
  """``run(factory, lr, seed, size, *, progress=True) -> Run``."""
  methods: Mapping[str, Method]
  window: Callable[[str], tuple[float, ...]]
  """A method's default lrs: a window of :data:`benchmarks.family.GRID`."""
  reference: Callable[[Size], tuple[str, float]] | None = None
  """The reference line (its label and value) of a size, if the task has one."""


MODULES = {
    "minilm": "benchmarks.minilm_wordnet",
    "smollm2": "benchmarks.smollm2_fortunes",
    "lora_regression": "benchmarks.controlled",
    "matrix_sensing": "benchmarks.controlled",
    "factor_control": "benchmarks.factor_control",
}
"""Task name -> the module whose ``TASKS`` holds it (imported on demand: the models are heavy)."""


def get(name: str) -> Task:
  if name not in MODULES:
    raise SystemExit(f"unknown task {name!r}; choose from {sorted(MODULES)}")
  return importlib.import_module(MODULES[name]).TASKS[name]
