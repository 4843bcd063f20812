"""Type checks of the float hyperparameters that every optimizer here takes."""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Any

import jax
import numpy as np


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


def check_floats(where: str, *, optional: Collection[str] = (),
                 schedules: Collection[str] = (), **values: Any) -> None:
  """Raises a ``TypeError`` naming the first of ``values`` that is not a float.

  Args:
    where: the function taking them, for the message.
    optional: the names that may be ``None``.
    schedules: the names that may be an Optax schedule (``learning_rate``).
    **values: the hyperparameters by name.
  """
  for name, value in values.items():
    if value is None and name in optional or callable(value) and name in schedules:
      continue
    expected = ("a float" + (" or a schedule" if name in schedules else "")
                + (" or None" if name in optional else ""))
    is_number(where, name, value, expected)
