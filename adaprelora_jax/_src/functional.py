"""AdaPreLoRA's closed-form solve and its pieces as plain functions of arrays.

For users who want the math without the optimizer: each function takes a
LoRA pair in Flax layout, ``ΔW = s · A @ B`` with ``A (..., m, r)`` and
``B (..., r, n)``, vectorised over any leading batch axes, and computes in
float32 or wider. Nothing ``m × n`` is formed. The math is in
``docs/derivation.md``; :mod:`adaprelora_jax._src.adaprelora_slice` holds the implementation,
which the optimizer runs too: the slice is brought to unit scale by powers
of two first, so no input in the float range overflows an intermediate.
"""

from __future__ import annotations

from adaprelora_jax._src import adaprelora_slice as one_slice
from adaprelora_jax._src.base import Array, dot, vectorized


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
  def one(a, b, grad_a, grad_b, row, col):
    unit, exponents = one_slice.normalize(one_slice.Slice(a, b, grad_a, grad_b))
    grams = one_slice.slice_grams(unit)
    return one_slice.solve(unit, exponents, one_slice.plain_gradients(unit, grams), row,
                           col, grams, lora_scale=scale, damping=damping,
                           clipping_threshold=None)

  return vectorized(one, "(m,r),(r,n),(m,r),(r,n),(m),(n)->(m,r),(r,n)")(
      a, b, grad_a, grad_b, row, col)


def tangent_mean_squares(a: Array, b: Array, grad_a: Array, grad_b: Array, *,
                         scale: float | Array = 1.0, damping: float | Array = 0.0
                         ) -> tuple[Array, Array]:
  """Row and column mean squares of ``P_T(G)`` from the factor gradients.

  ``P_T(G) = P_A G + G P_B − P_A G P_B`` (Frobenius projections onto ``A``'s
  column space and ``B``'s row space) is the minimum-norm W-gradient
  consistent with ``grad_a = s G Bᵀ`` and ``grad_b = s Aᵀ G``
  (``docs/derivation.md``, statistics). It has rank ``≤ 2r`` and is never
  formed: the sums of squares are quadratic forms in the ``2r × 2r`` Grams
  of ``[A, grad_a]`` and ``[B; grad_b]``.

  Args:
    a: ``A``, shape ``(..., m, r)``.
    b: ``B``, shape ``(..., r, n)``.
    grad_a: ``∂L/∂A``, shape of ``a``.
    grad_b: ``∂L/∂B``, shape of ``b``.
    scale: the LoRA scale ``s``.
    damping: relative damping of the projections; ``0`` is exact for
      full-rank factors.

  Returns:
    ``(row, col)``: ``mean_j P_T(G)_ij²`` of shape ``(..., m)`` and
    ``mean_i P_T(G)_ij²`` of shape ``(..., n)``.
  """
  def one(a, b, grad_a, grad_b):
    unit, exponents = one_slice.normalize(one_slice.Slice(a, b, grad_a, grad_b))
    grams = one_slice.slice_grams(unit)
    return one_slice.tangent_mean_squares(unit, exponents, grams,
                                          one_slice.damped_frames(grams, damping), scale)

  return vectorized(one, "(m,r),(r,n),(m,r),(r,n)->(m),(n)")(a, b, grad_a, grad_b)


def w_step_rms(a: Array, b: Array, delta_a: Array, delta_b: Array, *,
               scale: float | Array = 1.0) -> Array:
  """RMS of the first-order W-step ``s (dA B + A dB)``, per batch slice.

  ``‖dA B + A dB‖²`` is assembled from ``r × r`` Grams. AdaPreLoRA's update
  clipping bounds this RMS, the W-space counterpart of Adafactor's
  ``clip_by_block_rms``.

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
    return scale * one_slice.w_step_rms_from_grams(
        dot(a.T, a), dot(b, b.T), dot(delta_a.T, delta_a), dot(delta_a.T, a),
        dot(delta_b, delta_b.T), dot(delta_b, b.T), a.shape[0], b.shape[1])

  return vectorized(one, "(m,r),(r,n),(m,r),(r,n)->()")(a, b, delta_a, delta_b)
