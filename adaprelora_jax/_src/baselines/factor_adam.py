"""Adam on per-slice arrays, shared by the baselines that run Adam on a LoRA direction.

LoRA+, ScaledAdamW and LoRA-Pro run Adam on a per-slice direction (the raw
factor gradients, their Riemannian-preconditioned versions, LoRA-Pro's
adjusted gradients or its ``m × n`` equivalent gradient). :func:`adam_step`
is ``optax.scale_by_adam`` on such arrays with the plumbing's step count, and
:func:`adam_slice_functions` turns a factor direction into the ``slice_init`` /
``slice_update`` pair :func:`~adaprelora_jax.pairwise_transformation`
expects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

from adaprelora_jax._src.base import Array, PyTree

Direction = Callable[[Array, Array, Array, Array], tuple[Array, Array]]
"""``(a, b, grad_a, grad_b) -> (dir_a, dir_b)`` for one slice."""


class FactorMoments(NamedTuple):
  """Adam's moments of one slice's directions (the plumbing keeps the count).

  Attributes:
    mu: first moments, shaped like the direction (``((m, r), (r, n))`` for
      factor directions).
    nu: second moments, same shapes.
  """

  mu: Any
  nu: Any

  def axes(self) -> FactorMoments:
    """Each buffer's axes, for :mod:`adaprelora_jax._src.sharding`."""
    def of(x):
      return (("m", "r"), ("r", "n")) if isinstance(x, tuple) else ("m", "n")
    return FactorMoments(of(self.mu), of(self.nu))


def adam_step(direction: PyTree, moments: FactorMoments, count: Array,
              adam: optax.GradientTransformation) -> tuple[PyTree, FactorMoments]:
  """``adam.update`` (a ``scale_by_adam``) of ``direction`` at step ``count``."""
  inner = optax.ScaleByAdamState(count=count, mu=moments.mu, nu=moments.nu)
  out, inner = adam.update(direction, inner)
  return out, FactorMoments(mu=inner.mu, nu=inner.nu)


def adam_slice_functions(direction: Direction, b1: float, b2: float, eps: float):
  """``(slice_init, slice_update)``: ``scale_by_adam`` of ``direction``."""
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def slice_init(m: int, n: int, rank: int, dtype) -> FactorMoments:
    zeros = (jnp.zeros((m, rank), dtype), jnp.zeros((rank, n), dtype))
    return FactorMoments(mu=zeros, nu=zeros)

  def slice_update(a, b, grad_a, grad_b, state: FactorMoments, extra, count):
    del extra
    (delta_a, delta_b), state = adam_step(direction(a, b, grad_a, grad_b), state, count, adam)
    return delta_a, delta_b, state

  return slice_init, slice_update
