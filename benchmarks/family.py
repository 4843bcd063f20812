"""The LoRA-optimizer family the benchmarks compare, the one lr grid and the one schedule.

Every benchmark builds its optimizers from :data:`FAMILY`: a factory taking
the learning-rate schedule and the decoupled weight decay, so every method
trains under the same schedule and decay and only the peak learning rate is
swept. Every swept lr is a point of :data:`GRID`; a task or a method sweeps a
window of it (:func:`window`), and a sweep that finds its best at a window's
edge extends it by the next point (:func:`neighbour`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import optax

from adaprelora_jax import CHUNKED, adaprelora
from adaprelora_jax import with_decay_and_learning_rate
from adaprelora_jax.baselines import lora_plus, lora_pro, lora_rite, scaled_adamw

Factory = Callable[[optax.ScalarOrSchedule, float], optax.GradientTransformation]

EXACT: dict[str, None] = dict(balancing=None, factor_clipping=None)
"""AdaPreLoRA's arguments for the paper's rule: no balancing term, no bound on the factor steps."""

FAMILY: dict[str, Factory] = {
    "adamw": lambda lr, wd: optax.adamw(lr, weight_decay=wd),
    # Optax's Adafactor direction (factored for dims >= 128, update clipping)
    # with the same decoupled decay as the others; no relative step size, so
    # that `lr` means what it means for them.
    "adafactor": lambda lr, wd: with_decay_and_learning_rate(
        optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0)), lr, wd
    ),
    "lora_plus": lambda lr, wd: lora_plus(lr, weight_decay=wd),
    "scaled_adamw": lambda lr, wd: scaled_adamw(lr, weight_decay=wd),
    "lora_pro": lambda lr, wd: lora_pro(lr, variant="efficient", weight_decay=wd),
    "lora_pro_full": lambda lr, wd: lora_pro(lr, variant="full", weight_decay=wd),
    "lora_rite": lambda lr, wd: lora_rite(lr, weight_decay=wd),
    "adaprelora": lambda lr, wd: adaprelora(lr, weight_decay=wd),
    "adaprelora_b1": lambda lr, wd: adaprelora(lr, b1=0.9, weight_decay=wd),
    # The paper's rule exactly, without the factor-step control.
    "adaprelora_exact": lambda lr, wd: adaprelora(lr, weight_decay=wd, **EXACT),
    # The same updates, laid out for XLA's CPU runtime (pairs alone, in chunks).
    "adaprelora_chunked": lambda lr, wd: adaprelora(lr, layout=CHUNKED, weight_decay=wd),
}
"""Name -> ``factory(learning_rate, weight_decay)``."""

METHODS: dict[str, Factory] = {
    **FAMILY,
    # What `adaprelora_b1` was before the factor-step control (results measured then).
    "adaprelora_exact_b1": lambda lr, wd: adaprelora(lr, b1=0.9, weight_decay=wd, **EXACT),
}
""":data:`FAMILY` and the variants some results were measured with; :func:`select` picks from it."""

GRID: tuple[float, ...] = tuple(float(f"{k}e{e}") for e in range(-5, 1) for k in (1, 3))[1:]
"""Every peak lr a benchmark sweeps: the 1-3-10 points from 3e-5 to 3 (the real tasks' window
is 3e-4 … 3e-2, the unit-scaled controlled problems' 0.01 … 3)."""


def _index(lr: float) -> int:
  """The position of ``lr`` in :data:`GRID`; an error for an lr off the grid."""
  i = min(range(len(GRID)), key=lambda j: abs(math.log(GRID[j] / lr)))
  if not math.isclose(GRID[i], lr, rel_tol=1e-6):
    raise ValueError(f"lr {lr:g} is not a point of the grid {GRID}")
  return i


def neighbour(lr: float, steps: int) -> float:
  """The grid point ``steps`` points above ``lr`` (below for a negative count)."""
  i = _index(lr) + steps
  if not 0 <= i < len(GRID):
    raise ValueError(f"{steps:+d} points from lr {lr:g} leaves the grid {GRID[0]:g}..{GRID[-1]:g}")
  return GRID[i]


def window(low: float, count: int) -> tuple[float, ...]:
  """``count`` consecutive points of :data:`GRID`, from ``low`` up."""
  return tuple(neighbour(low, k) for k in range(count))


WARMUP_FRAC = 0.1
"""The one warmup rule: a linear warmup over this fraction of the steps (at least one)."""


def warmup_steps(steps: int) -> int:
  """Length of the linear warmup: :data:`WARMUP_FRAC` of the steps, at least one."""
  return max(1, round(WARMUP_FRAC * steps))


def warmup_cosine(peak_lr: float, steps: int) -> optax.Schedule:
  """The schedule every swept run trains under: linear warmup from 0, then cosine to 0."""
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps(steps), steps)


def eval_schedule(steps: int, every: int) -> set[int]:
  """The steps after which held-out quality is measured: every ``every`` steps, and the last."""
  return set(range(every, steps + 1, every)) | {steps}


def select(names: list[str] | None) -> dict[str, Factory]:
  """The named subset of :data:`METHODS` (all of :data:`FAMILY` for ``None``), in the given order."""
  if names is None:
    return dict(FAMILY)
  unknown = sorted(set(names) - set(METHODS))
  if unknown:
    raise SystemExit(f"unknown optimizers {unknown}; choose from {sorted(METHODS)}")
  return {name: METHODS[name] for name in names}
