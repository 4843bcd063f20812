"""AdaPreLoRA's per-slice math, written as Gram matrices and ``r × r`` algebra.

One slice is a pair ``A (m, r)``, ``B (r, n)`` with factor gradients. Every
quantity the optimizer needs (the factors' frames, the tangent statistics of
SPEC §4, the closed-form solve of SPEC §3, the W-step's RMS) is a product
``[m-side stack] @ (r × r coefficients)`` or a quadratic form in Gram matrices
of such stacks. So each slice costs a handful of wide matrix products, each
``O((m + n) r²)``, and ``r × r`` eigendecompositions; nothing ``m × n`` is
ever formed.

Frames (SPEC §5 damping ``δ``): with the symmetric roots
``L_A = (AᵀA + δ)^½`` and ``L_B = (BBᵀ + δ)^½``, ``Â = A L_A⁻ᵀ`` and ``B̂ = L_B⁻¹ B`` span ``A``'s
column space and ``B``'s row space, orthonormally up to ``δ``
(``ÂᵀÂ = L_A⁻¹ AᵀA L_A⁻ᵀ`` has eigenvalues ``σ²/(σ²+δ)``). The damped
projections are ``P_A = ÂÂᵀ``, ``P_B = B̂ᵀB̂``, and a W-gradient ``G`` (seen as
``grad_a = s G Bᵀ``, ``grad_b = s Aᵀ G``) has frame coordinates

  ``Ŷ = G P_B B̂ᵀ = grad_a · L_B⁻ᵀ (B̂B̂ᵀ) / s``,
  ``X̂ = Âᵀ P_A G = (ÂᵀÂ) L_A⁻¹ / s · grad_b``.

The trailing Gram factor drops any part of a factor gradient that no
W-gradient produces (weight decay chained before the optimizer while
``B = 0``, say); for autodiff gradients it changes nothing up to ``δ``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class DampedEigh(NamedTuple):
  """``M + δ I = vecs diag(vals) vecsᵀ`` for an ``r × r`` Gram matrix ``M``."""

  vals: Array
  vecs: Array


def damped_eigh(gram: Array, damping: Array | float) -> DampedEigh:
  """Eigensystem of ``gram + δ I``, ``δ = damping · tr(gram)/r + tiny`` (SPEC §5).

  The shift is relative, so SPEC §3's scale invariance holds up to
  ``damping``; ``tiny`` keeps an all-zero factor invertible. The Gram of a
  rank-deficient factor (``B`` one step after ``B = 0``, on a rank-one
  gradient) comes out of float32 rounding indefinite by about
  ``√n ε tr(gram)``, more than ``δ`` covers, and a Cholesky factorisation
  then returns NaN; clamping the eigenvalues at 0 first restores the PSD
  matrix the rounding perturbed.
  """
  r = gram.shape[-1]
  vals, vecs = jnp.linalg.eigh(gram)
  delta = damping * jnp.trace(gram) / r + jnp.sqrt(jnp.finfo(gram.dtype).tiny)
  return DampedEigh(jnp.maximum(vals, 0.0) + delta, vecs)


def damped_inverse(gram: Array, damping: Array | float) -> Array:
  """``(gram + δ I)⁻¹`` of an ``r × r`` Gram matrix."""
  eig = damped_eigh(gram, damping)
  return (eig.vecs / eig.vals) @ eig.vecs.T


def damped_sqrt(gram: Array, damping: Array | float) -> tuple[Array, Array]:
  """``(L, L⁻¹)`` for the symmetric square root ``L = (gram + δ I)^½``.

  The symmetric root, unlike an eigenvector basis, is continuous in
  ``gram`` (it is unique), so frame coordinates built from it vary smoothly
  from step to step, which momentum kept in those coordinates relies on.
  """
  eig = damped_eigh(gram, damping)
  root = jnp.sqrt(eig.vals)
  return (eig.vecs * root) @ eig.vecs.T, (eig.vecs / root) @ eig.vecs.T


class Frames(NamedTuple):
  """The ``r × r`` description of a slice's frames (see the module docstring)."""

  root_a: Array  # L_A
  root_b: Array  # L_B
  inv_a: Array   # L_A⁻¹
  inv_b: Array   # L_B⁻¹
  to_y: Array    # Ŷ = grad_a @ to_y
  to_x: Array    # X̂ = to_x @ grad_b


def frames(gram_a: Array, gram_b: Array, damping: Array | float,
           scale: Array | float) -> Frames:
  """Frames from ``AᵀA`` and ``BBᵀ``."""
  root_a, inv_a = damped_sqrt(gram_a, damping)
  root_b, inv_b = damped_sqrt(gram_b, damping)
  hat_a = inv_a @ gram_a @ inv_a.T  # ÂᵀÂ
  hat_b = inv_b @ gram_b @ inv_b.T  # B̂B̂ᵀ
  return Frames(root_a, root_b, inv_a, inv_b,
                to_y=inv_b.T @ hat_b / scale, to_x=hat_a @ inv_a / scale)


def stacked_gram(x: Array, y: Array) -> Array:
  """``[x, y]ᵀ[x, y]`` for two ``(m, r)`` stacks, without concatenating them.

  For the ``n`` side pass ``B.T`` and ``grad_b.T``: the transposes fold into
  the products.
  """
  xy = x.T @ y
  return jnp.block([[x.T @ x, xy], [xy.T, y.T @ y]])


class SliceGrams(NamedTuple):
  """The Grams a slice's update is assembled from, and the frames they give.

  Attributes:
    m: ``[A, grad_a]ᵀ[A, grad_a]`` (:func:`stacked_gram`), ``2r × 2r``.
    n: ``[B; grad_b][B; grad_b]ᵀ``, ``2r × 2r``.
    frames: the :class:`Frames` of ``AᵀA`` and ``BBᵀ``.
  """

  m: Array
  n: Array
  frames: Frames

  @property
  def gram_a(self) -> Array:  # AᵀA
    return self.m[:self.rank, :self.rank]

  @property
  def gram_b(self) -> Array:  # BBᵀ
    return self.n[:self.rank, :self.rank]

  @property
  def a_grad_a(self) -> Array:  # Aᵀ grad_a
    return self.m[:self.rank, self.rank:]

  @property
  def rank(self) -> int:
    return self.m.shape[-1] // 2


def slice_grams(a, b, grad_a, grad_b, damping: Array | float,
                scale: Array | float) -> SliceGrams:
  """:class:`SliceGrams` of one slice, from its factors and factor gradients."""
  gram_m = stacked_gram(a, grad_a)
  gram_n = stacked_gram(b.T, grad_b.T)
  r = a.shape[1]
  return SliceGrams(gram_m, gram_n,
                    frames(gram_m[:r, :r], gram_n[:r, :r], damping, scale))


def small_matmul(x: Array, y: Array, unrolled: bool) -> Array:
  """``x @ y`` over a short contracted axis (the rank ``r``).

  ``unrolled`` writes it as ``r`` broadcast multiply-adds instead of a dot.
  XLA's CPU backend fuses those with the element-wise work around them into
  one pass, which for large slices at ``r ≤ 16`` is faster than a skinny dot
  and its temporaries, at the price of compile time (``transform`` decides;
  ``benchmarks/RESULTS.md``).
  """
  if not unrolled:
    return x @ y
  return sum(x[:, k, None] * y[None, k] for k in range(x.shape[1]))


def _triangular_quadratic_form(x: Array, form: Array) -> Array:
  """``diag(xᵀ form x)`` for an ``(r, n)`` stack ``x`` and a symmetric ``form``.

  Written as ``Σ_k x_k (form_kk x_k + Σ_{l<k} 2 form_lk x_l)`` over the rows
  ``x_k``: the upper triangle only, ``r (r + 1) / 2`` multiply-adds per
  column, element-wise on contiguous rows, which XLA's CPU backend fuses
  into one pass with no reduction.
  """
  rows, twice = jnp.unstack(x, axis=0), 2.0 * form
  total = jnp.zeros((), x.dtype)
  for k, x_k in enumerate(rows):
    inner = form[k, k] * x_k
    for l in range(k):
      inner = inner + twice[l, k] * rows[l]
    total = total + x_k * inner
  return total


def _quadratic_forms(x: Array, y: Array, form_x: Array, form_y: Array, *, axis: int,
                     unrolled: bool) -> Array:
  """``diag(x form_x xᵀ) + diag(y form_y yᵀ)`` for stacks along ``axis``.

  ``x`` and ``y`` are ``(m, r)`` stacks read row by row (``axis=1``) or
  ``(r, n)`` stacks read column by column (``axis=0``); the forms are
  symmetric ``r × r``. ``unrolled`` (see :func:`small_matmul`) writes the
  ``m`` side's products as broadcast multiply-adds, an ``r``-long row being
  one vector register, and the ``n`` side by
  :func:`_triangular_quadratic_form` (``benchmarks/RESULTS.md``). With dots,
  the two halves are summed by one two-operand reduction: XLA's CPU backend
  hands a plain sum to YNNPACK, which cannot take in the products, so they
  would be written out first (about 5 % of the update's op time at 7B
  shapes).
  """
  if unrolled:
    if axis == 1:
      return jnp.sum(x * small_matmul(x, form_x, True) + y * small_matmul(y, form_y, True),
                     axis=1)
    return _triangular_quadratic_form(x, form_x) + _triangular_quadratic_form(y, form_y)
  if axis == 0:  # the dots take in the transposes
    x, y = x.T, y.T
  zero = jnp.zeros((), x.dtype)
  x_half, y_half = jax.lax.reduce(
      (x * (x @ form_x), y * (y @ form_y)), (zero, zero),
      lambda u, v: (u[0] + v[0], u[1] + v[1]), (1,))
  return x_half + y_half


def tangent_mean_squares(a, b, grad_a, grad_b, grams: SliceGrams, *,
                         unrolled: bool = False) -> tuple[Array, Array]:
  """Row and column mean squares of ``S = P_A G + G P_B − P_A G P_B``.

  ``S = Â X̃ + Ŷ B̂`` with ``X̃ = X̂ − (ÂᵀŶ) B̂``, the part of ``X̂`` outside
  ``B``'s row space. The rows of ``Â X̃`` and ``Ŷ B̂`` are orthogonal, and so
  are the columns of ``Â X̂`` and ``(Ŷ − Â ÂᵀŶ) B̂``, another split of ``S``.
  So each row's (column's) sum of squares is a sum of two quadratic forms,
  one in the row of ``A`` (column of ``B``) and one in that of ``grad_a``
  (``grad_b``), with ``r × r`` forms assembled from the Grams ``grams.m`` of
  ``U = [A, grad_a]`` and ``grams.n`` of ``V = [B; grad_b]``. The cross terms
  are zero for exact projections and factor gradients of one W-gradient, so
  they are left out: under damping (SPEC §5) they would be ``O(δ)``, and for
  gradients no W-gradient produces (weight decay added before the
  optimizer, say) the statistic is the sum of the two parts' squares.

  Args:
    unrolled: see :func:`small_matmul`.
  """
  fr = grams.frames
  z = fr.inv_a @ grams.a_grad_a @ fr.to_y  # ÂᵀŶ
  # S = U C V with C = [[b_on_a, g_on_a], [b_on_g, 0]]: A's and grad_a's
  # coefficients of B and grad_b.
  b_on_a = -fr.inv_a.T @ z @ fr.inv_b
  g_on_a = fr.inv_a.T @ fr.to_x
  b_on_g = fr.to_y @ fr.inv_b
  on_a = jnp.concatenate([b_on_a, g_on_a], axis=1)  # Â X̃ = A on_a V
  on_b = jnp.concatenate([b_on_a, b_on_g], axis=0)  # (Ŷ − Â ÂᵀŶ) B̂ = U on_b B
  rows = _quadratic_forms(a, grad_a, on_a @ grams.n @ on_a.T,
                          b_on_g @ grams.gram_b @ b_on_g.T, axis=1, unrolled=unrolled)
  cols = _quadratic_forms(b, grad_b, on_b.T @ grams.m @ on_b,
                          g_on_a.T @ grams.gram_a @ g_on_a, axis=0, unrolled=unrolled)
  # Sums of squares: clamp the rounding error of the quadratic forms at 0.
  return (jnp.maximum(rows, 0.0) / b.shape[1],
          jnp.maximum(cols, 0.0) / a.shape[0])


def w_step_rms_from_grams(gram_a: Array, gram_b: Array, da_da: Array, da_a: Array,
                          db_db: Array, db_b: Array, m: int, n: int, scale) -> Array:
  """RMS of the first-order W-step ``s (dA B + A dB)`` of one ``m × n`` slice.

  ``‖dA B + A dB‖² = tr(dAᵀdA BBᵀ) + tr(AᵀA dB dBᵀ) + 2 tr(dAᵀA dB Bᵀ)``.

  Args:
    gram_a, gram_b: ``AᵀA`` and ``BBᵀ``.
    da_da, da_a: ``dAᵀdA`` and ``dAᵀA``.
    db_db, db_b: ``dB dBᵀ`` and ``dB Bᵀ``.
  """
  sq = (jnp.sum(da_da * gram_b) + jnp.sum(gram_a * db_db)
        + 2.0 * jnp.sum(da_a * db_b.T))
  # A norm that overflowed (inf − inf) reads as infinite, so clipping drops it.
  sq = jnp.where(jnp.isnan(sq), jnp.inf, jnp.maximum(sq, 0.0))
  return scale * jnp.sqrt(sq / (m * n))


class Clipping(NamedTuple):
  """Update clipping inside :func:`solve`: bound the W-step's RMS by ``threshold``."""

  threshold: Array | float
  gram_a: Array  # AᵀA
  gram_b: Array  # BBᵀ


def solve(a, b, eff_a, map_a, eff_b, map_b, a_eff_a, row, col, *, scale,
          damping, clipping: Clipping | None = None, unrolled: bool = False
          ) -> tuple[Array, Array]:
  """SPEC §3 for one slice with factor gradients ``E_A map_a`` and ``map_b E_B``.

  ``dA = s⁻² [g_A/ℓ − ½ A P⁻¹K] Q⁻¹`` and
  ``dB = s⁻² P⁻¹ [g_B/ρ − ½ K Q⁻¹ B]`` with ``g_A = E_A map_a``,
  ``g_B = map_b E_B`` and ``K = Aᵀ g_A = (Aᵀ E_A) map_a``, kept in the
  product form ``dA = F X + A Y``, ``dB = X' F' + Y B`` (``F = E_A/ℓ``,
  ``F' = E_B/ρ``, ``r × r`` coefficients) until the last two products.
  With ``clipping``, the W-step's RMS comes from the ``r × r`` Grams of that
  form, and the shrink factor scales the coefficients, not the steps.

  Args:
    a_eff_a: ``Aᵀ E_A``.
    unrolled: see :func:`small_matmul`.

  Returns:
    ``(dA, dB)``.
  """
  inv_p = damped_inverse((a * row[:, None]).T @ a, damping)
  inv_q = damped_inverse((b * col[None, :]) @ b.T, damping)
  inv_s2 = 1.0 / (scale * scale)
  cross = -0.5 * inv_s2 * (inv_p @ (a_eff_a @ map_a) @ inv_q)  # Y
  lead_a, lead_b = inv_s2 * map_a @ inv_q, inv_s2 * inv_p @ map_b  # X, X'
  scaled_a, scaled_b = eff_a / row[:, None], eff_b / col[None, :]  # F, F'
  if clipping is not None:
    ft_a, ft_b = scaled_a.T @ a, scaled_b @ b.T  # FᵀA, F'Bᵀ
    mixed_a = lead_a.T @ ft_a @ cross  # XᵀFᵀA Y, and its transpose, in dAᵀdA
    mixed_b = lead_b @ ft_b @ cross.T
    gram_a, gram_b = clipping.gram_a, clipping.gram_b
    rms = w_step_rms_from_grams(
        gram_a, gram_b,
        da_da=(lead_a.T @ (scaled_a.T @ scaled_a) @ lead_a + mixed_a + mixed_a.T
               + cross.T @ gram_a @ cross),
        da_a=lead_a.T @ ft_a + cross.T @ gram_a,
        db_db=(lead_b @ (scaled_b @ scaled_b.T) @ lead_b.T + mixed_b + mixed_b.T
               + cross @ gram_b @ cross.T),
        db_b=lead_b @ ft_b + cross @ gram_b,
        m=a.shape[0], n=b.shape[1], scale=scale)
    shrink = 1.0 / jnp.maximum(1.0, rms / clipping.threshold)
    lead_a, lead_b, cross = lead_a * shrink, lead_b * shrink, cross * shrink
  return (small_matmul(scaled_a, lead_a, unrolled) + small_matmul(a, cross, unrolled),
          small_matmul(lead_b, scaled_b, unrolled) + small_matmul(cross, b, unrolled))


def w_step_rms(a: Array, b: Array, delta_a: Array, delta_b: Array,
               gram_a: Array, gram_b: Array, scale) -> Array:
  """RMS of the first-order W-step ``s (dA B + A dB)`` of one slice.

  Args:
    gram_a, gram_b: ``AᵀA`` and ``BBᵀ``.
  """
  return w_step_rms_from_grams(
      gram_a, gram_b, delta_a.T @ delta_a, delta_a.T @ a, delta_b @ delta_b.T,
      delta_b @ b.T, a.shape[0], b.shape[1], scale)
