"""Types and helpers every module of the package shares; imports nothing else from it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
PyTree = Any
Axes = tuple[str, ...]
"""A state buffer's axes after the pair's batch axes, each ``"m"``, ``"n"`` or ``"r"``."""


class WeightStats(NamedTuple):
  """Mean squares of the full W-gradient ``G`` of one pair (``docs/derivation.md``, statistics).

  Attributes:
    row: ``mean_j G_ij²``, shape ``(*batch, m)``.
    col: ``mean_i G_ij²``, shape ``(*batch, n)``.
  """

  row: Array
  col: Array


class PairState(NamedTuple):
  """AdaPreLoRA's per-pair state, in float32 (or the factors' dtype if wider).

  Attributes:
    v_row: row second moments ``(*batch, m)``.
    v_col: column second moments ``(*batch, n)``.
    mu_a: running mean of ``G B̂ᵀ``, the W-gradient's coordinates in ``B``'s
      row frame, ``(*batch, m, r)`` (``None`` without momentum).
    mu_b: running mean of ``Âᵀ G``, ``(*batch, r, n)``.
  """

  v_row: Array
  v_col: Array
  mu_a: Array | None
  mu_b: Array | None

  def axes(self) -> PairState:
    """Each buffer's axes, for :mod:`adaprelora_jax._src.sharding`."""
    with_momentum = self.mu_a is not None
    return PairState(("m",), ("n",), ("m", "r") if with_momentum else None,
                     ("r", "n") if with_momentum else None)


def dot(*factors: Array) -> Array:
  """``x @ y @ …`` (left to right) to float32 accuracy on every backend.

  Unless a product asks for ``HIGHEST``, a GPU rounds float32 operands to
  TF32 and a TPU to bfloat16, whatever the inputs' dtype. The ``r × r``
  algebra inverts Grams whose condition number is the factors' squared, so
  every product of an optimizer update asks for it (``docs/derivation.md``,
  precision).
  """
  return functools.reduce(lambda x, y: jnp.matmul(x, y, precision=lax.Precision.HIGHEST),
                          factors)


def compute_dtype(*dtypes: jnp.dtype) -> jnp.dtype:
  """The dtype the optimizers compute in: float32, or wider if an input is."""
  return jnp.result_type(jnp.float32, *dtypes)


def vectorized(fn: Callable[..., Any], signature: str) -> Callable[..., Any]:
  """``fn`` over leading batch axes (``jnp.vectorize``), its inputs cast to :func:`compute_dtype`."""
  batched = jnp.vectorize(fn, signature=signature)

  def call(*arrays: Array) -> Any:
    dtype = compute_dtype(*(jnp.asarray(x).dtype for x in arrays))
    return batched(*(jnp.asarray(x, dtype) for x in arrays))

  return call
