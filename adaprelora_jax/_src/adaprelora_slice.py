"""AdaPreLoRA's update of one slice, top to bottom.

A slice is a pair ``A (m, r)``, ``B (r, n)`` of ``ΔW = s · A B`` with its
factor gradients ``g_A = s G Bᵀ`` and ``g_B = s Aᵀ G``. :func:`update` runs,
in this order (``docs/derivation.md`` has the math):

1. **scale**: factors and gradients are brought to unit size by powers of two
   (exact), so nothing below overflows on inputs anywhere in the float
   range;
2. **Grams and frames**: the ``2r × 2r`` Grams of ``[A, g_A]`` and
   ``[B; g_B]``, and from them the damped orthonormal frames of ``A``'s
   columns and ``B``'s rows;
3. **statistics**: row and column mean squares of the W-gradient, given
   (``full``) or of its tangent part (``tangent``), from the Grams;
4. **second moments**: Adafactor's ``v_row``, ``v_col`` and the metric
   ``H(X) = diag(ℓ) X diag(ρ)`` they define;
5. **momentum** (optional): a running mean of the W-gradient's frame
   coordinates, mapped back to factor gradients;
6. **solve**: the minimal-imbalance factor step whose W-step is the
   ``H``-projection of Adafactor's direction, with update clipping of that
   W-step's RMS, brought back from unit scale (:func:`solve`, which
   ``adaprelora_jax.functional.solve_factor_update`` runs too);
7. **control**: a gauge term that pulls ``AᵀA`` and ``BBᵀ`` towards balance
   without changing the W-step, and a bound on each factor's step RMS, so
   that the learning rate controls how far each factor moves.

Where a result is not representable, or a hyperparameter given as an array
(``optax.inject_hyperparams``) is out of range, the result is not finite, so
the plumbing skips the slice's step, keeps its state and counts the skip.

Everything is ``O((m + n) r²)`` products and ``r × r`` algebra; nothing
``m × n`` is formed. Functions take one slice (no batch axes). Every product
asks for float32 on every backend (``dot``).

The ``r × r`` decompositions come in two stages, and the plumbing runs each
stage as one solver call for every role and layer
(:mod:`~adaprelora_jax._src.solver_batching`):

* stage 1, from the Grams alone: the eigendecomposition of ``AᵀA`` and
  ``BBᵀ`` (step 2's frames) and of the balancing matrix (step 7);
* stage 2, from the metric: the Cholesky factorizations of the weighted
  Grams ``P`` and ``Q`` (step 6).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from adaprelora_jax._src import linalg
from adaprelora_jax._src.base import Array, PairState, dot
from adaprelora_jax._src.hyperparams import Hyperparams, in_range


class Slice(NamedTuple):
  """One slice's factors and factor gradients."""

  a: Array       # (m, r)
  b: Array       # (r, n)
  grad_a: Array  # (m, r)
  grad_b: Array  # (r, n)


def init(m: int, n: int, rank: int, dtype: jnp.dtype, with_momentum: bool) -> PairState:
  """The zero state of one slice."""
  zeros = lambda *shape: jnp.zeros(shape, dtype)
  return PairState(v_row=zeros(m), v_col=zeros(n),
                   mu_a=zeros(m, rank) if with_momentum else None,
                   mu_b=zeros(rank, n) if with_momentum else None)


# 1. Scale ------------------------------------------------------------------


class Exponents(NamedTuple):
  """Powers of two: ``A = 2^a · A'``, ``B = 2^b · B'``, ``s G = 2^g · G'``."""

  a: Array
  b: Array
  g: Array


_NO_EXPONENT = -(2**12)  # far below any float's


def _pow2(exponent: Array) -> Array:
  """``2^e`` exactly, as a float32 built from its bits, for ``-126 <= e <= 127``."""
  return jax.lax.bitcast_convert_type((exponent.astype(jnp.int32) + 127) << 23, jnp.float32)


def times_pow2(x: Array, exponent: Array) -> Array:
  """``x · 2^e``, exact unless it under- or overflows, for ``|e| <= 500``.

  Four multiplications by in-range powers of two, which fuse into one pass;
  ``jnp.ldexp`` handles subnormals bit by bit instead.
  """
  exponent = jnp.clip(exponent, -500, 500)
  for _ in range(3):
    part = jnp.clip(exponent, -126, 127)
    x, exponent = x * _pow2(part).astype(x.dtype), exponent - part
  return x * _pow2(jnp.clip(exponent, -126, 127)).astype(x.dtype)


def _exponent(x: Array, if_zero: int) -> Array:
  """``e`` with ``max |x| < 2^e``, or ``if_zero`` for an all-zero ``x``."""
  largest = jnp.max(jnp.abs(x))
  return jnp.where(largest > 0, jnp.frexp(largest)[1], if_zero)


def normalize(raw: Slice) -> tuple[Slice, Exponents]:
  """The slice at unit scale, and the exponents that undo it.

  ``A``, ``B`` and ``s G`` are divided by powers of two, so the unit-scale
  slice is a LoRA pair of scale 1 whose factor gradients are those of
  ``G' = s G / 2^g``: ``g_A' = G' B'ᵀ = g_A / 2^(g + b)``, and alike for ``B``.
  """
  exp_a, exp_b = _exponent(raw.a, 0), _exponent(raw.b, 0)
  exp_g = jnp.maximum(_exponent(raw.grad_a, _NO_EXPONENT) - exp_b,
                      _exponent(raw.grad_b, _NO_EXPONENT) - exp_a)
  exp_g = jnp.where(exp_g < _NO_EXPONENT // 2, 0, exp_g)  # both gradients zero
  unit = Slice(times_pow2(raw.a, -exp_a), times_pow2(raw.b, -exp_b),
               times_pow2(raw.grad_a, -(exp_g + exp_b)), times_pow2(raw.grad_b, -(exp_g + exp_a)))
  return unit, Exponents(exp_a, exp_b, exp_g)


def to_true_scale(y: Array, power: int, exponents: Exponents, lora_scale: float | Array
                  ) -> Array:
  """A quantity of ``G'`` of degree ``power`` as the same quantity of ``G``.

  ``s G = 2^g G'``, so it carries ``(2^g / s)^power``.
  """
  return times_pow2(y, power * exponents.g) / lora_scale**power


def to_unit_scale(y: Array, power: int, exponents: Exponents, lora_scale: float | Array
                  ) -> Array:
  """The inverse of :func:`to_true_scale`."""
  return times_pow2(y * lora_scale**power, -power * exponents.g)


# 2. Grams and frames -------------------------------------------------------


class Grams(NamedTuple):
  """The Grams a slice's update is assembled from.

  Attributes:
    a_with_grad: ``[A, g_A]ᵀ[A, g_A]``, ``2r × 2r``.
    b_with_grad: ``[B; g_B][B; g_B]ᵀ``, ``2r × 2r``.
  """

  a_with_grad: Array
  b_with_grad: Array

  @property
  def rank(self) -> int:
    return self.a_with_grad.shape[-1] // 2

  @property
  def gram_a(self) -> Array:  # AᵀA
    return self.a_with_grad[:self.rank, :self.rank]

  @property
  def gram_b(self) -> Array:  # BBᵀ
    return self.b_with_grad[:self.rank, :self.rank]

  @property
  def a_t_grad_a(self) -> Array:  # Aᵀ g_A
    return self.a_with_grad[:self.rank, self.rank:]


def _stacked_gram(left: Array, right: Array) -> Array:
  """``[left, right]ᵀ[left, right]`` for two ``(d, r)`` stacks, without concatenating them."""
  cross = dot(left.T, right)
  return jnp.block([[dot(left.T, left), cross], [cross.T, dot(right.T, right)]])


def slice_grams(unit: Slice) -> Grams:
  return Grams(_stacked_gram(unit.a, unit.grad_a), _stacked_gram(unit.b.T, unit.grad_b.T))


class Frames(NamedTuple):
  """Damped orthonormal frames ``Â = A L_A⁻ᵀ`` and ``B̂ = L_B⁻¹ B`` of a unit-scale slice.

  ``L_A = (AᵀA + δ)^½`` and ``L_B = (BBᵀ + δ)^½``. A W-gradient ``G`` has
  coordinates ``Ŷ = G P_B B̂ᵀ = g_A @ grad_a_to_b_frame`` in ``B``'s frame
  and ``X̂ = Âᵀ P_A G = grad_b_to_a_frame @ g_B`` in ``A``'s. The trailing
  Gram factor of ``grad_a_to_b_frame`` (``B̂B̂ᵀ``) drops any part of a factor
  gradient that no W-gradient produces (weight decay added before the
  optimizer while ``B = 0``, say).
  """

  root_a: Array             # L_A
  root_b: Array             # L_B
  inv_root_a: Array         # L_A⁻¹
  inv_root_b: Array         # L_B⁻¹
  grad_a_to_b_frame: Array  # L_B⁻ᵀ B̂B̂ᵀ
  grad_b_to_a_frame: Array  # ÂᵀÂ L_A⁻¹


def damped_frames(grams: Grams, damping: Array | float) -> Frames:
  # Both roots from one batched eigendecomposition: one solver call, not two.
  (root_a, root_b), (inv_root_a, inv_root_b) = linalg.damped_sqrt(
      jnp.stack([grams.gram_a, grams.gram_b]), damping)
  frame_gram_a = dot(inv_root_a, grams.gram_a, inv_root_a.T)  # ÂᵀÂ
  frame_gram_b = dot(inv_root_b, grams.gram_b, inv_root_b.T)  # B̂B̂ᵀ
  return Frames(root_a, root_b, inv_root_a, inv_root_b,
                grad_a_to_b_frame=dot(inv_root_b.T, frame_gram_b),
                grad_b_to_a_frame=dot(frame_gram_a, inv_root_a))


# 3. Statistics -------------------------------------------------------------


def _row_quadratic_forms(stack: Array, form: Array) -> Array:
  """``diag(stack form stackᵀ)`` for an ``(d, r)`` stack."""
  return jnp.sum(stack * dot(stack, form), axis=1)


def tangent_mean_squares(unit: Slice, exponents: Exponents, grams: Grams, frames: Frames,
                         lora_scale: float | Array) -> tuple[Array, Array]:
  """Row and column mean squares of ``S = P_A G + G P_B − P_A G P_B``, for the true ``G``.

  ``S = Â X̃ + Ŷ B̂`` with ``X̃ = X̂ − (ÂᵀŶ) B̂``, the part of ``X̂`` outside
  ``B``'s row space. The rows of ``Â X̃`` and ``Ŷ B̂`` are orthogonal, and so
  are the columns of ``Â X̂`` and ``(Ŷ − Â ÂᵀŶ) B̂``. So each row's (column's)
  sum of squares is a quadratic form in that row of ``A`` plus one in that
  row of ``g_A`` (column of ``B``, ``g_B``), with ``r × r`` forms made from
  the Grams. The cross terms vanish for exact projections and are left out:
  under damping they are ``O(δ)``.
  """
  both_frames = dot(frames.inv_root_a, grams.a_t_grad_a, frames.grad_a_to_b_frame)  # ÂᵀŶ
  # S = [A, g_A] C [B; g_B] with the block matrix
  # C = [[a_b_block, a_grad_b_block], [grad_a_b_block, 0]].
  a_b_block = -dot(frames.inv_root_a.T, both_frames, frames.inv_root_b)
  a_grad_b_block = dot(frames.inv_root_a.T, frames.grad_b_to_a_frame)
  grad_a_b_block = dot(frames.grad_a_to_b_frame, frames.inv_root_b)
  # Â X̃ = A outside_b [B; g_B] and (Ŷ − ÂÂᵀŶ) B̂ = [A, g_A] outside_a B.
  outside_b = jnp.concatenate([a_b_block, a_grad_b_block], axis=1)
  outside_a = jnp.concatenate([a_b_block, grad_a_b_block], axis=0)
  rows = (_row_quadratic_forms(unit.a, dot(outside_b, grams.b_with_grad, outside_b.T))
          + _row_quadratic_forms(unit.grad_a, dot(grad_a_b_block, grams.gram_b,
                                                  grad_a_b_block.T)))
  cols = (_row_quadratic_forms(unit.b.T, dot(outside_a.T, grams.a_with_grad, outside_a))
          + _row_quadratic_forms(unit.grad_b.T, dot(a_grad_b_block.T, grams.gram_a,
                                                    a_grad_b_block)))
  # Sums of squares: clamp the quadratic forms' rounding error at 0.
  mean_squares = (jnp.maximum(rows, 0.0) / unit.b.shape[1],
                  jnp.maximum(cols, 0.0) / unit.a.shape[0])
  return tuple(to_true_scale(y, 2, exponents, lora_scale) for y in mean_squares)


# 4. Second moments ---------------------------------------------------------


def decay(count: Array, hyper: Hyperparams) -> Array:
  """``β̂_t = 1 − (t+1)^(−decay_rate)`` (Adafactor), or the constant ``b2``."""
  if hyper.b2 is None:
    return 1.0 - (count + 1.0) ** (-hyper.decay_rate)
  return jnp.asarray(hyper.b2, jnp.float32)


def second_moments(v_row: Array, v_col: Array, stats: tuple[Array, Array], count: Array,
                   hyper: Hyperparams) -> tuple[Array, Array]:
  """``v ← β̂ v + (1 − β̂)(mean S² + ε)`` for the rows and the columns."""
  beta = decay(count, hyper)
  return (beta * v_row + (1.0 - beta) * (stats[0] + hyper.eps),
          beta * v_col + (1.0 - beta) * (stats[1] + hyper.eps))


def metric(v_row: Array, v_col: Array, count: Array, hyper: Hyperparams
           ) -> tuple[Array, Array]:
  """The metric's diagonals ``ℓ = (v_row / mean v_row)^½`` and ``ρ = v_col^½``.

  ``ℓ`` is scale-free (divided by the largest entry first, so the mean
  cannot overflow), and bias correction of a constant ``b2`` only touches
  ``ρ``. ``ℓ_i ρ_j`` is ``optax.scale_by_factored_rms``'s inverse scaling.
  """
  v_row = v_row / jnp.max(v_row)
  row = jnp.sqrt(v_row / jnp.mean(v_row))
  if hyper.b2 is not None:
    v_col = v_col / (1.0 - jnp.asarray(hyper.b2, v_col.dtype) ** (count + 1.0))
  return row, jnp.sqrt(v_col)


# 5. Momentum ---------------------------------------------------------------


class FactorGradients(NamedTuple):
  """Factor gradients in product form: ``g_A = base_a @ coef_a``, ``g_B = coef_b @ base_b``.

  Without momentum the bases are this step's gradients; with it, the running
  means of their frame coordinates.
  """

  base_a: Array      # (m, r)
  coef_a: Array      # (r, r)
  base_b: Array      # (r, n)
  coef_b: Array      # (r, r)
  a_t_base_a: Array  # Aᵀ base_a, (r, r)


def plain_gradients(unit: Slice, grams: Grams) -> FactorGradients:
  """The factor gradients as they are."""
  eye = jnp.eye(unit.a.shape[1], dtype=unit.a.dtype)
  return FactorGradients(unit.grad_a, eye, unit.grad_b, eye, grams.a_t_grad_a)


def tangent_gradients(unit: Slice, grams: Grams, frames: Frames) -> FactorGradients:
  """This step's factor gradients, restricted to the tangent space (see :class:`Frames`)."""
  return FactorGradients(unit.grad_a, dot(frames.grad_a_to_b_frame, frames.root_b.T),
                         unit.grad_b, dot(frames.root_a, frames.grad_b_to_a_frame),
                         grams.a_t_grad_a)


def momentum(mu_a: Array, mu_b: Array, unit: Slice, grams: Grams, frames: Frames,
             b1: float | Array, count: Array) -> tuple[FactorGradients, Array, Array]:
  """EMA of the frame coordinates ``(Ŷ, X̂)`` of the W-gradient, mapped back to the factors.

  The coordinates do not change when the factors are rescaled, unlike
  factor gradients (O(lr) right after ``B = 0``) or factor directions
  (O(1/lr) there). The bias-corrected means are mapped back at the current
  factors (``Ŷ̄ L_Bᵀ``, ``L_A X̂̄``), so the W-step stays the exact
  ``H``-projection of an Adafactor direction, of ``G``'s running mean.

  Returns:
    The factor gradients for the solve and the new buffers ``(mu_a, mu_b)``.
  """
  new_a = b1 * mu_a + (1.0 - b1) * dot(unit.grad_a, frames.grad_a_to_b_frame)
  new_b = b1 * mu_b + (1.0 - b1) * dot(frames.grad_b_to_a_frame, unit.grad_b)
  debias = 1.0 - b1 ** (count + 1.0)
  a_t_mean_a = (b1 * dot(unit.a.T, mu_a)
                + (1.0 - b1) * dot(grams.a_t_grad_a, frames.grad_a_to_b_frame)) / debias
  return (FactorGradients(new_a / debias, frames.root_b.T, new_b / debias, frames.root_a,
                          a_t_mean_a), new_a, new_b)


# 6. Solve, clip and unscale ------------------------------------------------


def w_step_rms_from_grams(gram_a: Array, gram_b: Array, da_da: Array, da_a: Array,
                          db_db: Array, db_b: Array, m: int, n: int) -> Array:
  """RMS of the first-order W-step ``dA B + A dB`` of one ``m × n`` slice of scale 1.

  ``‖dA B + A dB‖² = tr(dAᵀdA BBᵀ) + tr(AᵀA dB dBᵀ) + 2 tr(dAᵀA dB Bᵀ)``,
  with ``da_da = dAᵀdA``, ``da_a = dAᵀA``, ``db_db = dB dBᵀ``, ``db_b = dB Bᵀ``.
  """
  sq = jnp.sum(da_da * gram_b) + jnp.sum(gram_a * db_db) + 2.0 * jnp.sum(da_a * db_b.T)
  # A norm that overflowed (inf − inf) reads as infinite.
  sq = jnp.where(jnp.isnan(sq), jnp.inf, jnp.maximum(sq, 0.0))
  return jnp.sqrt(sq / (m * n))


class ProductForm(NamedTuple):
  """A factor step ``dA = F_A C_A + A C_0``, ``dB = C_B F_B + C_0 B`` of a unit-scale slice.

  ``F_A (m, r)`` and ``F_B (r, n)`` are the preconditioned gradient bases;
  the ``r × r`` coefficients are all that update clipping rescales.
  """

  precond_a: Array  # F_A
  precond_b: Array  # F_B
  coef_a: Array     # C_A
  coef_b: Array     # C_B
  coef_0: Array     # C_0

  def w_step_rms(self, unit: Slice, grams: Grams) -> Array:
    """RMS of the W-step ``dA B + A dB``, from ``r × r`` Grams alone."""
    precond_a_t_a = dot(self.precond_a.T, unit.a)    # F_Aᵀ A
    precond_b_b_t = dot(self.precond_b, unit.b.T)    # F_B Bᵀ
    # C_Aᵀ F_Aᵀ A C_0 and its transpose are dAᵀdA's cross terms; alike for dB dBᵀ.
    cross_a = dot(self.coef_a.T, precond_a_t_a, self.coef_0)
    cross_b = dot(self.coef_b, precond_b_b_t, self.coef_0.T)
    return w_step_rms_from_grams(
        grams.gram_a, grams.gram_b,
        da_da=(dot(self.coef_a.T, dot(self.precond_a.T, self.precond_a), self.coef_a)
               + cross_a + cross_a.T + dot(self.coef_0.T, grams.gram_a, self.coef_0)),
        da_a=dot(self.coef_a.T, precond_a_t_a) + dot(self.coef_0.T, grams.gram_a),
        db_db=(dot(self.coef_b, dot(self.precond_b, self.precond_b.T), self.coef_b.T)
               + cross_b + cross_b.T + dot(self.coef_0, grams.gram_b, self.coef_0.T)),
        db_b=dot(self.coef_b, precond_b_b_t) + dot(self.coef_0, grams.gram_b),
        m=unit.a.shape[0], n=unit.b.shape[1])

  def scaled(self, factor: Array) -> ProductForm:
    return self._replace(coef_a=self.coef_a * factor, coef_b=self.coef_b * factor,
                         coef_0=self.coef_0 * factor)

  def steps(self, unit: Slice) -> tuple[Array, Array]:
    return (dot(self.precond_a, self.coef_a) + dot(unit.a, self.coef_0),
            dot(self.coef_b, self.precond_b) + dot(self.coef_0, unit.b))


def solve(unit: Slice, exponents: Exponents, factor_grads: FactorGradients, row: Array,
          col: Array, grams: Grams, *, lora_scale: float | Array, damping: float | Array,
          clipping_threshold: float | Array | None) -> tuple[Array, Array]:
  """The minimal-imbalance factor step, clipped, at the slice's true scale.

  At unit scale, ``dA = [g_A/ℓ − ½ A P⁻¹K] Q⁻¹`` and
  ``dB = P⁻¹ [g_B/ρ − ½ K Q⁻¹ B]`` with ``P = Aᵀ diag(ℓ) A``,
  ``Q = B diag(ρ) Bᵀ`` and ``K = Aᵀ g_A``, kept in :class:`ProductForm`
  until the last two products. Update clipping scales the coefficients so
  that the W-step's RMS is at most the threshold.

  Args:
    unit: the slice at unit scale (:func:`normalize`).
    exponents: the powers of two that undo it.
    factor_grads: the factor gradients at unit scale, in product form.
    row: the metric's row diagonal ``ℓ``.
    col: the metric's column diagonal ``ρ``, for the true ``G``.
    grams: the unit slice's Grams.
    lora_scale: ``s``.
    damping: relative damping of the ``r × r`` Cholesky factorizations.
    clipping_threshold: bound on the W-step's RMS, or ``None``.

  Returns:
    ``(dA, dB)`` for the slice as stored.
  """
  col = to_unit_scale(col, 1, exponents, lora_scale)
  inv_p, inv_q = linalg.cholesky_inverse(
      jnp.stack([dot((unit.a * row[:, None]).T, unit.a), dot(unit.b * col[None, :], unit.b.T)]),
      damping)
  form = ProductForm(
      precond_a=factor_grads.base_a / row[:, None],
      precond_b=factor_grads.base_b / col[None, :],
      coef_a=dot(factor_grads.coef_a, inv_q),
      coef_b=dot(inv_p, factor_grads.coef_b),
      coef_0=-0.5 * dot(inv_p, dot(factor_grads.a_t_base_a, factor_grads.coef_a), inv_q))
  if clipping_threshold is not None:
    rms = form.w_step_rms(unit, grams)
    form = form.scaled(1.0 / jnp.maximum(1.0, rms / clipping_threshold))
  delta_a, delta_b = form.steps(unit)
  # A = 2^a A' and B = 2^b B' at scale s: dA = dA' / (s 2^b), dB = dB' / (s 2^a).
  return (times_pow2(delta_a, -exponents.b) / lora_scale,
          times_pow2(delta_b, -exponents.a) / lora_scale)


# 7. Control ---------------------------------------------------------------


def balancing_gauge(grams: Grams, exponents: Exponents, rate: float | Array) -> Array:
  """``Ω = rate · (M + 10⁻⁶ t)⁻¹ E`` with ``M = AᵀA + BBᵀ``, ``E = AᵀA − BBᵀ``, ``t = tr M / r``.

  The factor step ``(A Ω, −Ω B)`` moves no ``W`` (it spans the Jacobian's
  null space) and shrinks the larger of ``AᵀA`` and ``BBᵀ`` towards the
  other, per direction by ``rate (a² − b²)/(a² + b²) ∈ [−rate, rate]``. Zero on
  balanced factors. Both Grams are brought to the larger one's power of two
  (``A = 2^a A'``), so neither overflows.
  """
  top = jnp.maximum(exponents.a, exponents.b)
  gram_a = times_pow2(grams.gram_a, 2 * (exponents.a - top))
  gram_b = times_pow2(grams.gram_b, 2 * (exponents.b - top))
  total = gram_a + gram_b
  mean_eig = jnp.trace(total) / total.shape[-1] + jnp.finfo(total.dtype).tiny
  return rate * dot(linalg.damped_inverse(total / mean_eig, 1e-6), (gram_a - gram_b) / mean_eig)


def _rms(x: Array) -> Array:
  """``sqrt(mean x²)``, scaled by the largest entry first so that the squares cannot overflow."""
  largest = jnp.max(jnp.abs(x))
  unit = x / jnp.where(largest > 0, largest, 1.0)
  return largest * jnp.sqrt(jnp.mean(unit * unit))


def clip_factor(delta: Array, threshold: float | Array) -> Array:
  """``delta`` scaled down so that its RMS is at most ``threshold``."""
  rms = _rms(delta)
  return delta / jnp.maximum(1.0, jnp.where(jnp.isnan(rms), jnp.inf, rms) / threshold)


# The whole update ----------------------------------------------------------


def update(hyper: Hyperparams, raw: Slice, state: PairState, stats: tuple[Array, Array] | None,
           count: Array) -> tuple[Array, Array, PairState]:
  """``(dA, dB, new_state)`` of one slice at step ``count`` (the module docstring's steps).

  Args:
    hyper: the hyperparameters.
    raw: the slice as stored (any finite scale).
    state: the slice's :class:`~adaprelora_jax.PairState`.
    stats: the W-gradient's row and column mean squares (``full``), or
      ``None`` for the tangent statistics.
    count: the step number, from 0.
  """
  unit, exponents = normalize(raw)
  grams = slice_grams(unit)
  frames = damped_frames(grams, hyper.damping)
  if stats is None:
    stats = tangent_mean_squares(unit, exponents, grams, frames, hyper.lora_scale)
  else:
    stats = tuple(jnp.maximum(s, 0.0) for s in stats)
  v_row, v_col = second_moments(state.v_row, state.v_col, stats, count, hyper)
  row, col = metric(v_row, v_col, count, hyper)
  mu_a, mu_b = state.mu_a, state.mu_b
  if hyper.b1 is None:
    factor_grads = tangent_gradients(unit, grams, frames)
  else:
    # The buffers hold coordinates of G, the solve takes those of G'.
    unit_scale = lambda y: to_unit_scale(y, 1, exponents, hyper.lora_scale)
    factor_grads, mu_a, mu_b = momentum(unit_scale(mu_a), unit_scale(mu_b), unit, grams,
                                        frames, hyper.b1, count)
    mu_a, mu_b = (to_true_scale(y, 1, exponents, hyper.lora_scale) for y in (mu_a, mu_b))
  delta_a, delta_b = solve(unit, exponents, factor_grads, row, col, grams,
                           lora_scale=hyper.lora_scale, damping=hyper.damping,
                           clipping_threshold=hyper.clipping_threshold)
  if hyper.balancing is not None:
    omega = balancing_gauge(grams, exponents, hyper.balancing)
    delta_a = delta_a + times_pow2(dot(unit.a, omega), exponents.a)
    delta_b = delta_b - times_pow2(dot(omega, unit.b), exponents.b)
  if hyper.factor_clipping is not None:
    delta_a = clip_factor(delta_a, hyper.factor_clipping)
    delta_b = clip_factor(delta_b, hyper.factor_clipping)
  # An out-of-range traced hyperparameter makes the step not finite: skipped and counted.
  delta_a = jnp.where(in_range(hyper), delta_a, jnp.nan)
  return delta_a, delta_b, PairState(v_row, v_col, mu_a, mu_b)
