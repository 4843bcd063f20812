"""The closed-form factor-space solve of AdaPreLoRA (SPEC §3) and its helpers.

Everything here acts on one LoRA pair in Flax layout, ``ΔW = s · A @ B`` with
``A (m, r)`` and ``B (r, n)``, and is vectorised over any leading batch axes
(stacked layers, experts) with :func:`jax.numpy.vectorize`. Nothing here ever
builds an ``m × n`` array: all work is ``O((m + n) r² + r³)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

Array = jax.Array


def compute_dtype(*dtypes: jnp.dtype) -> jnp.dtype:
  """The dtype the solve runs in: float32, or wider if an input is wider."""
  return jnp.result_type(jnp.float32, *dtypes)


def damped_cholesky(gram: Array, damping: Array | float) -> tuple[Array, bool]:
  """Cholesky factor of ``gram + δ I`` with ``δ = damping · tr(gram)/r + tiny``.

  The relative shift keeps the solve invariant to rescaling the factors (up
  to ``damping``); ``tiny`` keeps an all-zero factor (``B = 0`` at init)
  invertible without overflowing later products.
  """
  r = gram.shape[-1]
  tiny = jnp.sqrt(jnp.finfo(gram.dtype).tiny)
  delta = damping * jnp.trace(gram) / r + tiny
  return cho_factor(gram + delta * jnp.eye(r, dtype=gram.dtype), lower=True)


def _solve_left(chol: tuple[Array, bool], rhs: Array) -> Array:
  """``M⁻¹ rhs`` for a Cholesky-factored SPD ``M``."""
  return cho_solve(chol, rhs)


def _solve_right(lhs: Array, chol: tuple[Array, bool]) -> Array:
  """``lhs M⁻¹`` for a Cholesky-factored SPD ``M`` (uses ``M = Mᵀ``)."""
  return cho_solve(chol, lhs.T).T


def _solve_2d(a, b, grad_a, grad_b, row, col, *, scale, damping):
  """SPEC §3 for one slice: ``a (m,r)``, ``b (r,n)``, ``row (m,)``, ``col (n,)``."""
  p = damped_cholesky(a.T @ (row[:, None] * a), damping)
  q = damped_cholesky((b * col[None, :]) @ b.T, damping)
  k = a.T @ grad_a
  inv_s2 = 1.0 / (scale * scale)
  delta_a = _solve_right(grad_a / row[:, None] - 0.5 * a @ _solve_left(p, k), q)
  delta_b = _solve_left(p, grad_b / col[None, :] - 0.5 * _solve_right(k, q) @ b)
  return delta_a * inv_s2, delta_b * inv_s2


def solve_factor_update(
    a: Array,
    b: Array,
    grad_a: Array,
    grad_b: Array,
    row: Array,
    col: Array,
    *,
    scale: float | Array = 1.0,
    damping: float | Array = 0.0,
) -> tuple[Array, Array]:
  r"""AdaPreLoRA's closed-form factor directions for ``ΔW = s · A B``.

  With the diagonal metric ``H(X) = diag(row) X diag(col)`` on W-space, and the
  W-gradient ``G`` seen only through ``grad_a = s G Bᵀ`` and
  ``grad_b = s Aᵀ G``, this returns the unique pair ``(dA, dB)`` such that

  * ``s (dA B + A dB)`` is the ``H``-orthogonal projection of
    ``D = H⁻¹(G)`` onto the tangent space ``{X B + A Y}``, and
  * among all pairs with that W-step (they differ by ``(AΩ, −ΩB)``), the
    contributions ``C_A = s dA B`` and ``C_B = s A dB`` have minimal
    ``‖C_A − C_B‖_H``.

  In closed form, with ``P = Aᵀ diag(row) A``, ``Q = B diag(col) Bᵀ`` and
  ``K = Aᵀ grad_a``::

    dA = s⁻² [diag(row)⁻¹ grad_a − ½ A P⁻¹ K] Q⁻¹
    dB = s⁻² P⁻¹ [grad_b diag(col)⁻¹ − ½ K Q⁻¹ B]

  The ``r × r`` solves use ``M + δ I`` with ``δ = damping · tr(M)/r + tiny``,
  so zero or rank-deficient factors give finite directions.

  Args:
    a: ``A``, shape ``(..., m, r)``.
    b: ``B``, shape ``(..., r, n)``.
    grad_a: ``∂L/∂A``, shape of ``a``.
    grad_b: ``∂L/∂B``, shape of ``b``.
    row: positive row scaling ``ℓ``, shape ``(..., m)``.
    col: positive column scaling ``ρ``, shape ``(..., n)``.
    scale: the LoRA scale ``s``.
    damping: relative damping of the ``r × r`` solves (``0`` for the exact
      solve, which needs full-rank factors).

  Returns:
    ``(dA, dB)``, the descent directions (the update is ``−lr · (dA, dB)``),
    in the solve's dtype (float32, or wider if an input is wider).

  References:
    Liu, Bian & Cai, `AdaPreLoRA: Adafactor Preconditioned Low-Rank Adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.
  """
  dtype = compute_dtype(a.dtype, b.dtype, grad_a.dtype, grad_b.dtype)
  solve = jnp.vectorize(
      functools.partial(_solve_2d, scale=scale, damping=damping),
      signature="(m,r),(r,n),(m,r),(r,n),(m),(n)->(m,r),(r,n)",
  )
  return solve(*(x.astype(dtype) for x in (a, b, grad_a, grad_b, row, col)))


class LowRank(NamedTuple):
  """A matrix ``left @ right`` kept in factored form (``(m, k) @ (k, n)``).

  Its sums of squares are computed from ``k × k`` Gram matrices after moving
  the scale of each column of ``left`` onto ``right``, so that a huge column
  facing a zero row gives 0, not ``inf · 0``.
  """

  left: Array
  right: Array

  def _balanced(self) -> tuple[Array, Array]:
    peak = jnp.max(jnp.abs(self.left), axis=-2)
    peak = jnp.where(peak > 0, peak, 1.0)
    return self.left / peak, self.right * peak[:, None]

  def row_sq_sums(self) -> Array:
    """``Σ_j X_ij²`` for each row, in ``O((m + n) k²)``."""
    left, right = self._balanced()
    return jnp.sum((left @ (right @ right.T)) * left, axis=-1)

  def col_sq_sums(self) -> Array:
    """``Σ_i X_ij²`` for each column, in ``O((m + n) k²)``."""
    left, right = self._balanced()
    return jnp.sum(((left.T @ left) @ right) * right, axis=-2)

  def sq_norm(self) -> Array:
    """``‖X‖_F²``."""
    left, right = self._balanced()
    return jnp.sum((left.T @ left) * (right @ right.T))


def tangent_gradient(a, b, grad_a, grad_b, *, scale, damping) -> LowRank:
  """The minimum-norm W-gradient consistent with the factor gradients.

  ``S = P_A G + G P_B − P_A G P_B`` (Frobenius projections onto the column
  space of ``A`` and the row space of ``B``) is determined by
  ``G Bᵀ = grad_a / s`` and ``Aᵀ G = grad_b / s`` alone. It is returned as
  ``[A, Y] @ [X − Z B; B]`` of rank ``≤ 2r`` for one slice ``a (m, r)``.
  """
  g_bt = grad_a / scale  # G Bᵀ
  at_g = grad_b / scale  # Aᵀ G
  gram_a = damped_cholesky(a.T @ a, damping)
  gram_b = damped_cholesky(b @ b.T, damping)
  x = _solve_left(gram_a, at_g)  # (AᵀA)⁻¹ Aᵀ G
  y = _solve_right(g_bt, gram_b)  # G Bᵀ (BBᵀ)⁻¹
  z = _solve_left(gram_a, a.T @ y)  # (AᵀA)⁻¹ Aᵀ G Bᵀ (BBᵀ)⁻¹
  return LowRank(
      jnp.concatenate([a, y], axis=-1), jnp.concatenate([x - z @ b, b], axis=-2)
  )


def w_step(a, b, delta_a, delta_b, *, scale) -> LowRank:
  """The first-order W-space step ``s (dA B + A dB)`` of a factor step."""
  return LowRank(
      jnp.concatenate([scale * delta_a, scale * a], axis=-1),
      jnp.concatenate([b, delta_b], axis=-2),
  )


@functools.partial(jnp.vectorize, signature="(m,r),(r,n),(m,r),(r,n)->(m),(n)",
                   excluded={4, 5})
def _tangent_mean_squares(a, b, grad_a, grad_b, scale, damping):
  s = tangent_gradient(a, b, grad_a, grad_b, scale=scale, damping=damping)
  return s.row_sq_sums() / b.shape[-1], s.col_sq_sums() / a.shape[-2]


def tangent_mean_squares(a: Array, b: Array, grad_a: Array, grad_b: Array, *,
                         scale: float | Array, damping: float | Array
                         ) -> tuple[Array, Array]:
  """Row and column mean squares of :func:`tangent_gradient` (SPEC §4).

  Shapes: ``a (..., m, r)``, ``b (..., r, n)`` → ``(..., m)``, ``(..., n)``.
  """
  return _tangent_mean_squares(a, b, grad_a, grad_b, scale, damping)


@functools.partial(jnp.vectorize, signature="(m,r),(r,n),(m,r),(r,n)->()",
                   excluded={4})
def _w_step_rms(a, b, delta_a, delta_b, scale):
  sq = w_step(a, b, delta_a, delta_b, scale=scale).sq_norm()
  return jnp.sqrt(sq / (a.shape[-2] * b.shape[-1]))


def w_step_rms(a: Array, b: Array, delta_a: Array, delta_b: Array, *,
               scale: float | Array) -> Array:
  """RMS of the first-order W-step ``s (dA B + A dB)``, per batch slice."""
  return _w_step_rms(a, b, delta_a, delta_b, scale)
