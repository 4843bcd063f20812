"""The alias shape every optimizer of this package shares, as in ``optax.adamw``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from adaprelora_jax._src import hyperparams

Mask = Any | Callable[[optax.Params], Any] | None


def with_decay_and_learning_rate(
    direction: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    mask: Mask = None,
) -> optax.GradientTransformationExtraArgs:
  """``chain(direction, add_decayed_weights, scale_by_learning_rate)``.

  A direction in Optax's sign convention, then decoupled weight decay on the
  leaves ``mask`` selects, then ``-learning_rate``.
  """
  hyperparams.check("with_decay_and_learning_rate", schedules=("learning_rate", "weight_decay"),
                    learning_rate=learning_rate, weight_decay=weight_decay)
  return optax.chain(direction, optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))
