"""The hyperparameters: AdaPreLoRA's with their defaults, and every range checked here.

One definition serves every optimizer of the package:

* :class:`Hyperparams` names AdaPreLoRA's hyperparameters and their
  defaults; :func:`~adaprelora_jax.scale_by_adaprelora` takes its defaults
  from :data:`DEFAULTS`, and :func:`~adaprelora_jax.adaprelora` forwards its
  options to it unchanged;
* :data:`RANGES` holds the valid range of every float hyperparameter name
  used here (the baselines' ``b1`` is Adam's and has the same range);
  :func:`check` tests concrete numbers against it at construction, and
  :func:`in_range` tests injected (traced) values inside the update.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Hyperparams(NamedTuple):
  """AdaPreLoRA's hyperparameters and defaults (see :func:`~adaprelora_jax.scale_by_adaprelora`)."""

  b1: float | Array | None = None
  decay_rate: float | Array = 0.8
  b2: float | Array | None = None
  eps: float | Array = 1e-30
  damping: float | Array = 1e-4
  lora_scale: float | Array = 1.0
  clipping_threshold: float | Array | None = 1.0
  balancing: float | Array | None = 1.0
  factor_clipping: float | Array | None = 3.0


DEFAULTS = Hyperparams()

OPTIONAL = frozenset({"b1", "b2", "clipping_threshold", "balancing", "factor_clipping"})
"""AdaPreLoRA's hyperparameters that ``None`` turns off."""


class Range(NamedTuple):
  """A test that works on numbers and arrays alike, and the range it accepts in words."""

  test: Callable[[Any], Any]
  words: str


# Plain comparisons: a Python number gives a bool (even inside a trace), an array an array.
UNIT = Range(lambda v: (v >= 0.0) & (v < 1.0), "in [0, 1)")
NONNEGATIVE = Range(lambda v: (v >= 0.0) & (v < math.inf), "finite and >= 0")
POSITIVE = Range(lambda v: (v > 0.0) & (v < math.inf), "finite and > 0")

RANGES: dict[str, Range] = {
    "b1": UNIT, "b2": UNIT, "decay_rate": NONNEGATIVE, "eps": NONNEGATIVE,
    "damping": NONNEGATIVE, "lora_scale": POSITIVE, "clipping_threshold": POSITIVE,
    "balancing": NONNEGATIVE, "factor_clipping": POSITIVE, "lr_ratio": POSITIVE,
}
"""The range of every float hyperparameter name of the package (others are only type-checked)."""


def in_range(hyper: Hyperparams) -> Array:
  """Whether every hyperparameter is in range (numbers are checked at construction, arrays here)."""
  return functools.reduce(jnp.logical_and, [RANGES[name].test(value) for name, value
                                            in hyper._asdict().items() if value is not None])


def is_number(where: str, name: str, value: Any, expected: str) -> bool:
  """Whether ``value`` is a concrete real number, whose range the caller checks.

  A JAX or NumPy array gives ``False``: under ``optax.inject_hyperparams`` the
  hyperparameters arrive as arrays, traced inside ``update``.

  Raises:
    TypeError: naming ``where`` and ``name``, if ``value`` is a bool (a bool
      array included), a callable such as a schedule, or anything else that is
      neither a real number nor an array.
  """
  hint = ""
  if isinstance(value, bool) or getattr(value, "dtype", None) == np.bool_:
    kind = "a bool"
  elif callable(value):
    kind, hint = "a callable", " (for a schedule, wrap the optimizer in optax.inject_hyperparams)"
  elif isinstance(value, numbers.Real):
    return True
  elif isinstance(value, (jax.Array, np.ndarray)):
    return False
  else:
    kind = f"a {type(value).__name__}"
  raise TypeError(f"{where}: {name}={value!r} is {kind}; expected {expected}{hint}.")


def check(where: str, *, optional: Collection[str] = (), schedules: Collection[str] = (),
          **values: Any) -> None:
  """Raises for the first of ``values`` that is not a float in its :data:`RANGES` range.

  Args:
    where: the function taking them, for the message.
    optional: the names that may be ``None``.
    schedules: the names that may be an Optax schedule (``learning_rate``).
    **values: the hyperparameters by name.

  Raises:
    TypeError: for a value that is not a float (see :func:`is_number`).
    ValueError: for a number outside its range, naming it and the range.
  """
  for name, value in values.items():
    if value is None and name in optional or callable(value) and name in schedules:
      continue
    bounds = RANGES.get(name)
    expected = ("a float" + (f" {bounds.words}" if bounds else "")
                + (" or a schedule" if name in schedules else "")
                + (" or None" if name in optional else ""))
    if is_number(where, name, value, expected) and bounds and not bool(bounds.test(value)):
      raise ValueError(f"{where}: {name}={value!r}; expected {expected}.")
