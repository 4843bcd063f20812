"""Adafactor's factored second moments of the W-gradient (SPEC §2).

Per LoRA pair, ``v_row (…, m)`` and ``v_col (…, n)`` track the row and column
mean squares of the statistic source ``S``. They define the diagonal W-space
metric ``H(X) = diag(ℓ) X diag(ρ)`` that AdaPreLoRA preconditions with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def decay_rate(count: Array, *, decay_rate: float | Array,
               b2: float | Array | None) -> Array:
  """The EMA coefficient ``β̂_t`` for step ``count`` (counted from 0).

  Adafactor's schedule ``1 − (t+1)^(−decay_rate)`` when ``b2`` is ``None``,
  else the constant ``b2`` (paired with bias correction in :func:`scalings`).
  """
  if b2 is None:
    return 1.0 - (count + 1.0) ** (-decay_rate)
  return jnp.asarray(b2, jnp.float32)


def update_moments(v_row: Array, v_col: Array, row_ms: Array, col_ms: Array,
                   beta: Array, eps: float | Array) -> tuple[Array, Array]:
  """``v ← β v + (1 − β)(mean S² + ε)`` for the row and column statistics."""
  new_row = beta * v_row + (1.0 - beta) * (row_ms + eps)
  new_col = beta * v_col + (1.0 - beta) * (col_ms + eps)
  return new_row, new_col


def scalings(v_row: Array, v_col: Array, count: Array,
             b2: float | Array | None) -> tuple[Array, Array]:
  """The metric's diagonals ``ℓ = (v_row / mean v_row)^½`` and ``ρ = v_col^½``.

  ``ℓ`` is scale-free, so bias correction (for a constant ``b2``) only touches
  ``ρ``. The product ``ℓ_i ρ_j`` equals ``optax.scale_by_factored_rms``'s
  inverse scaling, whichever axis that library normalises.
  """
  row = jnp.sqrt(v_row / jnp.mean(v_row, axis=-1, keepdims=True))
  if b2 is not None:
    v_col = v_col / (1.0 - jnp.asarray(b2, v_col.dtype) ** (count + 1.0))
  return row, jnp.sqrt(v_col)
