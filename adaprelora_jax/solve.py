"""The closed-form factor-space solve of AdaPreLoRA (SPEC §3).

Everything here acts on LoRA pairs in Flax layout, ``ΔW = s · A @ B`` with
``A (m, r)`` and ``B (r, n)``, vectorised over any leading batch axes
(stacked layers, experts). Nothing here builds an ``m × n`` array: the work is
``O((m + n) r² + r³)`` per slice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from adaprelora_jax import gram
from adaprelora_jax.pairwise import compute_dtype

Array = jax.Array


def solve_2d(a, b, grad_a, grad_b, row, col, *, scale, damping):
  """SPEC §3 for one slice: ``a (m,r)``, ``b (r,n)``, ``row (m,)``, ``col (n,)``."""
  eye = jnp.eye(a.shape[1], dtype=a.dtype)
  return gram.solve(a, b, grad_a, eye, grad_b, eye, a.T @ grad_a, row, col,
                    scale=scale, damping=damping)


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
    in float32, or wider if an input is wider.

  References:
    Liu, Bian & Cai, `AdaPreLoRA: Adafactor Preconditioned Low-Rank Adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.
  """
  dtype = compute_dtype(a.dtype, b.dtype, grad_a.dtype, grad_b.dtype)
  solve = jnp.vectorize(
      functools.partial(solve_2d, scale=scale, damping=damping),
      signature="(m,r),(r,n),(m,r),(r,n),(m),(n)->(m,r),(r,n)")
  return solve(*(x.astype(dtype) for x in (a, b, grad_a, grad_b, row, col)))


def tangent_mean_squares(a: Array, b: Array, grad_a: Array, grad_b: Array, *,
                         scale: float | Array = 1.0, damping: float | Array = 0.0
                         ) -> tuple[Array, Array]:
  """Row and column mean squares of ``P_T(G)`` from the factor gradients.

  ``P_T(G) = P_A G + G P_B − P_A G P_B`` (Frobenius projections onto ``A``'s
  column space and ``B``'s row space) is the minimum-norm W-gradient
  consistent with ``grad_a = s G Bᵀ`` and ``grad_b = s Aᵀ G`` (SPEC §4
  ``tangent``). It has rank ``≤ 2r`` and is never formed: the sums of squares
  are quadratic forms in the ``2r × 2r`` Grams of ``[A, grad_a]`` and
  ``[B; grad_b]``.

  Args:
    a: ``A``, shape ``(..., m, r)``.
    b: ``B``, shape ``(..., r, n)``.
    grad_a: ``∂L/∂A``, shape of ``a``.
    grad_b: ``∂L/∂B``, shape of ``b``.
    scale: the LoRA scale ``s``.
    damping: relative damping of the projections (SPEC §5); ``0`` is exact
      for full-rank factors.

  Returns:
    ``(row, col)``: ``mean_j P_T(G)_ij²`` of shape ``(..., m)`` and
    ``mean_i P_T(G)_ij²`` of shape ``(..., n)``.

  References:
    Liu, Bian & Cai, `AdaPreLoRA: Adafactor Preconditioned Low-Rank Adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.
  """
  def one(a, b, grad_a, grad_b):
    grams = gram.slice_grams(a, b, grad_a, grad_b, damping, scale)
    return gram.tangent_mean_squares(a, b, grad_a, grad_b, grams)
  return jnp.vectorize(one, signature="(m,r),(r,n),(m,r),(r,n)->(m),(n)")(
      a, b, grad_a, grad_b)


def w_step_rms(a: Array, b: Array, delta_a: Array, delta_b: Array, *,
               scale: float | Array = 1.0) -> Array:
  """RMS of the first-order W-step ``s (dA B + A dB)``, per batch slice.

  ``‖dA B + A dB‖²`` is assembled from ``r × r`` Grams, so nothing ``m × n``
  is formed. AdaPreLoRA's update clipping bounds this RMS, the W-space
  counterpart of Adafactor's ``clip_by_block_rms``.

  Args:
    a: ``A``, shape ``(..., m, r)``.
    b: ``B``, shape ``(..., r, n)``.
    delta_a: a step of ``A``, shape of ``a``.
    delta_b: a step of ``B``, shape of ``b``.
    scale: the LoRA scale ``s``.

  Returns:
    ``sqrt(mean_ij (s (dA B + A dB))_ij²)``, shape ``(...)``.
  """
  def one(a, b, delta_a, delta_b):
    return gram.w_step_rms(a, b, delta_a, delta_b, a.T @ a, b @ b.T, scale)
  return jnp.vectorize(one, signature="(m,r),(r,n),(m,r),(r,n)->()")(
      a, b, delta_a, delta_b)
