"""Adam on a slice's two factor directions, shared by the per-slice baselines.

LoRA+ and ScaledAdamW both run Adam, factor by factor, on a per-slice
direction (the raw factor gradients, or their Riemannian-preconditioned
versions). This module turns such a direction into the ``slice_init`` /
``slice_update`` pair that
:func:`~adaprelora_jax.pairwise.pairwise_transformation` expects, reusing
``optax.scale_by_adam`` for the moments and the bias correction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
Direction = Callable[[Array, Array, Array, Array], tuple[Array, Array]]
"""``(a, b, grad_a, grad_b) -> (dir_a, dir_b)`` for one slice."""


class FactorMoments(NamedTuple):
  """Adam's moments of one slice's directions (the plumbing keeps the count).

  Attributes:
    mu: first moments of the ``A`` and ``B`` directions, ``(m, r)``, ``(r, n)``.
    nu: second moments, same shapes.
  """

  mu: tuple[Array, Array]
  nu: tuple[Array, Array]


def adam_slice_rule(direction: Direction, b1: float, b2: float, eps: float):
  """``(slice_init, slice_update)``: ``scale_by_adam`` of ``direction``."""
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def slice_init(m: int, n: int, rank: int, dtype) -> FactorMoments:
    zeros = (jnp.zeros((m, rank), dtype), jnp.zeros((rank, n), dtype))
    return FactorMoments(mu=zeros, nu=zeros)

  def slice_update(a, b, grad_a, grad_b, state: FactorMoments, extra, count):
    del extra
    inner = optax.ScaleByAdamState(count=count, mu=state.mu, nu=state.nu)
    (delta_a, delta_b), inner = adam.update(direction(a, b, grad_a, grad_b),
                                            inner)
    return delta_a, delta_b, FactorMoments(mu=inner.mu, nu=inner.nu)

  return slice_init, slice_update
