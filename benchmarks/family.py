"""The LoRA-optimizer family the benchmarks compare, with one tuning budget for all.

Every benchmark builds its optimizers from :data:`FAMILY`: a factory taking
the learning-rate schedule and the decoupled weight decay, so every method
trains under the same schedule and decay and only the peak learning rate is
swept. :data:`GRID` is that sweep, the same five points for every method, so
no method gets more tuning than another. It is the one grid of the benchmarks:
every other lr list (a method's window of it, a reference line's, the toy
problems') is a run of rungs of the same 1-3-10 :data:`LADDER`, built with
:func:`rungs` and :func:`shift`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import optax

from adaprelora_jax import CHUNKED, adaprelora
from adaprelora_jax.chain import with_decay_and_learning_rate
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

LADDER: tuple[float, ...] = tuple(float(f"{k}e{e}") for e in range(-7, 2) for k in (1, 3))
"""The 1-3-10 rungs, 1e-7 to 30: every benchmark's learning rates are rungs of it."""


def _rung(lr: float) -> int:
  """The index of ``lr`` in :data:`LADDER`; an error for an lr off the ladder."""
  i = min(range(len(LADDER)), key=lambda j: abs(math.log(LADDER[j] / lr)))
  if not math.isclose(LADDER[i], lr, rel_tol=1e-6):
    raise ValueError(f"lr {lr:g} is not a rung of the 1-3-10 ladder {LADDER}")
  return i


def shift(lr: float, rungs_up: int) -> float:
  """The rung ``rungs_up`` steps above ``lr`` (below for a negative count)."""
  i = _rung(lr) + rungs_up
  if not 0 <= i < len(LADDER):
    raise ValueError(
        f"{rungs_up:+d} rungs from lr {lr:g} leaves the ladder {LADDER[0]:g}..{LADDER[-1]:g}"
    )
  return LADDER[i]


def rungs(low: float, count: int) -> tuple[float, ...]:
  """``count`` consecutive rungs of :data:`LADDER`, from ``low`` up."""
  return tuple(shift(low, k) for k in range(count))


GRID: tuple[float, ...] = rungs(3e-4, 5)
"""The peak learning rates swept for every method: 3e-4, 1e-3, 3e-3, 1e-2, 3e-2."""


def warmup_steps(warmup_frac: float, steps: int) -> int:
  """Length of the linear warmup: ``warmup_frac`` of the steps, at least one."""
  return max(1, round(warmup_frac * steps))


def warmup_cosine(peak_lr: float, steps: int, warmup_frac: float) -> optax.Schedule:
  """The schedule the real-model benchmarks train under: linear warmup from 0, then cosine to 0."""
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps(warmup_frac, steps), steps)


def eval_schedule(steps: int, every: int) -> set[int]:
  """The steps after which held-out quality is measured: every ``every`` steps, and the last."""
  return set(range(every, steps + 1, every)) | {steps}


def select(names: list[str] | None) -> dict[str, Factory]:
  """The named subset of :data:`FAMILY` (all of it for ``None``), in the given order."""
  if names is None:
    return dict(FAMILY)
  unknown = sorted(set(names) - set(FAMILY))
  if unknown:
    raise SystemExit(f"unknown optimizers {unknown}; choose from {sorted(FAMILY)}")
  return {name: FAMILY[name] for name in names}
