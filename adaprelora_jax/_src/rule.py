"""AdaPreLoRA's rule for one slice, top to bottom.

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
   W-step's RMS;
7. **unscale**;
8. **control**: a gauge term that pulls ``AᵀA`` and ``BBᵀ`` towards balance
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
  ``BBᵀ`` (step 2's frames) and of the balancing matrix (step 8);
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
  """Powers of two: ``A = 2^a · a'``, ``B = 2^b · b'``, ``s G = 2^g · G'``."""

  a: Array
  b: Array
  g: Array


_NO_EXPONENT = -(2**12)  # far below any float's


def _pow2(e: Array) -> Array:
  """``2^e`` exactly, as a float32 built from its bits, for ``-126 <= e <= 127``."""
  return jax.lax.bitcast_convert_type((e.astype(jnp.int32) + 127) << 23, jnp.float32)


def times_pow2(x: Array, e: Array) -> Array:
  """``x · 2^e``, exact unless it under- or overflows, for ``|e| <= 500``.

  Four multiplications by in-range powers of two, which fuse into one pass;
  ``jnp.ldexp`` handles subnormals bit by bit instead.
  """
  e = jnp.clip(e, -500, 500)
  for _ in range(3):
    part = jnp.clip(e, -126, 127)
    x, e = x * _pow2(part).astype(x.dtype), e - part
  return x * _pow2(jnp.clip(e, -126, 127)).astype(x.dtype)


def _exponent(x: Array, if_zero: int) -> Array:
  """``e`` with ``max |x| < 2^e``, or ``if_zero`` for an all-zero ``x``."""
  largest = jnp.max(jnp.abs(x))
  return jnp.where(largest > 0, jnp.frexp(largest)[1], if_zero)


def normalize(x: Slice) -> tuple[Slice, Exponents]:
  """The slice at unit scale, and the exponents that undo it.

  ``A``, ``B`` and ``s G`` are divided by powers of two, so the unit-scale
  slice is a LoRA pair of scale 1 whose factor gradients are those of
  ``G' = s G / 2^g``: ``g_A' = G' B'ᵀ = g_A / 2^(g + b)``, and alike for ``B``.
  """
  ea, eb = _exponent(x.a, 0), _exponent(x.b, 0)
  eg = jnp.maximum(_exponent(x.grad_a, _NO_EXPONENT) - eb,
                   _exponent(x.grad_b, _NO_EXPONENT) - ea)
  eg = jnp.where(eg < _NO_EXPONENT // 2, 0, eg)  # both gradients zero
  return Slice(times_pow2(x.a, -ea), times_pow2(x.b, -eb), times_pow2(x.grad_a, -(eg + eb)),
               times_pow2(x.grad_b, -(eg + ea))), Exponents(ea, eb, eg)


# 2. Grams and frames -------------------------------------------------------


class Grams(NamedTuple):
  """The Grams a slice's update is assembled from.

  Attributes:
    m: ``[A, g_A]ᵀ[A, g_A]``, ``2r × 2r``.
    n: ``[B; g_B][B; g_B]ᵀ``, ``2r × 2r``.
  """

  m: Array
  n: Array

  @property
  def rank(self) -> int:
    return self.m.shape[-1] // 2

  @property
  def gram_a(self) -> Array:  # AᵀA
    return self.m[:self.rank, :self.rank]

  @property
  def gram_b(self) -> Array:  # BBᵀ
    return self.n[:self.rank, :self.rank]

  @property
  def a_grad_a(self) -> Array:  # Aᵀ g_A
    return self.m[:self.rank, self.rank:]


def _stacked_gram(x: Array, y: Array) -> Array:
  """``[x, y]ᵀ[x, y]`` for two ``(d, r)`` stacks, without concatenating them."""
  xy = dot(x.T, y)
  return jnp.block([[dot(x.T, x), xy], [xy.T, dot(y.T, y)]])


def grams(x: Slice) -> Grams:
  return Grams(_stacked_gram(x.a, x.grad_a), _stacked_gram(x.b.T, x.grad_b.T))


class Frames(NamedTuple):
  """Damped orthonormal frames ``Â = A L_A⁻ᵀ`` and ``B̂ = L_B⁻¹ B`` of a unit-scale slice.

  ``L_A = (AᵀA + δ)^½`` and ``L_B = (BBᵀ + δ)^½``. A W-gradient ``G`` has
  frame coordinates ``Ŷ = G P_B B̂ᵀ = g_A @ to_y`` and
  ``X̂ = Âᵀ P_A G = to_x @ g_B``; the trailing Gram factor in ``to_y``
  (``B̂B̂ᵀ``) drops any part of a factor gradient that no W-gradient
  produces (weight decay added before the optimizer while ``B = 0``, say).
  """

  root_a: Array  # L_A
  root_b: Array  # L_B
  inv_a: Array   # L_A⁻¹
  inv_b: Array   # L_B⁻¹
  to_y: Array    # L_B⁻ᵀ B̂B̂ᵀ
  to_x: Array    # ÂᵀÂ L_A⁻¹


def frames(g: Grams, damping: Array | float) -> Frames:
  # Both roots from one batched eigendecomposition: one solver call, not two.
  (root_a, root_b), (inv_a, inv_b) = linalg.damped_sqrt(jnp.stack([g.gram_a, g.gram_b]),
                                                        damping)
  hat_a = dot(inv_a, g.gram_a, inv_a.T)  # ÂᵀÂ
  hat_b = dot(inv_b, g.gram_b, inv_b.T)  # B̂B̂ᵀ
  return Frames(root_a, root_b, inv_a, inv_b, to_y=dot(inv_b.T, hat_b), to_x=dot(hat_a, inv_a))


# 3. Statistics -------------------------------------------------------------


def _row_quadratic_forms(x: Array, form: Array) -> Array:
  """``diag(x form xᵀ)`` for an ``(d, r)`` stack."""
  return jnp.sum(x * dot(x, form), axis=1)


def tangent_mean_squares(x: Slice, g: Grams, fr: Frames) -> tuple[Array, Array]:
  """Row and column mean squares of ``S = P_A G + G P_B − P_A G P_B``.

  ``S = Â X̃ + Ŷ B̂`` with ``X̃ = X̂ − (ÂᵀŶ) B̂``, the part of ``X̂`` outside
  ``B``'s row space. The rows of ``Â X̃`` and ``Ŷ B̂`` are orthogonal, and so
  are the columns of ``Â X̂`` and ``(Ŷ − Â ÂᵀŶ) B̂``. So each row's (column's)
  sum of squares is a quadratic form in that row of ``A`` plus one in that
  row of ``g_A`` (column of ``B``, ``g_B``), with ``r × r`` forms made from
  the Grams. The cross terms vanish for exact projections and are left out:
  under damping they are ``O(δ)``.
  """
  z = dot(fr.inv_a, g.a_grad_a, fr.to_y)  # ÂᵀŶ
  # S = U C V with U = [A, g_A], V = [B; g_B], C = [[b_on_a, g_on_a], [b_on_g, 0]].
  b_on_a = -dot(fr.inv_a.T, z, fr.inv_b)
  g_on_a = dot(fr.inv_a.T, fr.to_x)
  b_on_g = dot(fr.to_y, fr.inv_b)
  on_a = jnp.concatenate([b_on_a, g_on_a], axis=1)  # Â X̃ = A on_a V
  on_b = jnp.concatenate([b_on_a, b_on_g], axis=0)  # (Ŷ − Â ÂᵀŶ) B̂ = U on_b B
  rows = (_row_quadratic_forms(x.a, dot(on_a, g.n, on_a.T))
          + _row_quadratic_forms(x.grad_a, dot(b_on_g, g.gram_b, b_on_g.T)))
  cols = (_row_quadratic_forms(x.b.T, dot(on_b.T, g.m, on_b))
          + _row_quadratic_forms(x.grad_b.T, dot(g_on_a.T, g.gram_a, g_on_a)))
  # Sums of squares: clamp the quadratic forms' rounding error at 0.
  return jnp.maximum(rows, 0.0) / x.b.shape[1], jnp.maximum(cols, 0.0) / x.a.shape[0]


# 4. Second moments ---------------------------------------------------------


def decay(count: Array, hp: Hyperparams) -> Array:
  """``β̂_t = 1 − (t+1)^(−decay_rate)`` (Adafactor), or the constant ``b2``."""
  if hp.b2 is None:
    return 1.0 - (count + 1.0) ** (-hp.decay_rate)
  return jnp.asarray(hp.b2, jnp.float32)


def second_moments(v_row: Array, v_col: Array, stats: tuple[Array, Array], count: Array,
                   hp: Hyperparams) -> tuple[Array, Array]:
  """``v ← β̂ v + (1 − β̂)(mean S² + ε)`` for the rows and the columns."""
  beta = decay(count, hp)
  return (beta * v_row + (1.0 - beta) * (stats[0] + hp.eps),
          beta * v_col + (1.0 - beta) * (stats[1] + hp.eps))


def metric(v_row: Array, v_col: Array, count: Array, hp: Hyperparams) -> tuple[Array, Array]:
  """The metric's diagonals ``ℓ = (v_row / mean v_row)^½`` and ``ρ = v_col^½``.

  ``ℓ`` is scale-free (divided by the largest entry first, so the mean
  cannot overflow), and bias correction of a constant ``b2`` only touches
  ``ρ``. ``ℓ_i ρ_j`` is ``optax.scale_by_factored_rms``'s inverse scaling.
  """
  v_row = v_row / jnp.max(v_row)
  row = jnp.sqrt(v_row / jnp.mean(v_row))
  if hp.b2 is not None:
    v_col = v_col / (1.0 - jnp.asarray(hp.b2, v_col.dtype) ** (count + 1.0))
  return row, jnp.sqrt(v_col)


# 5. Momentum ---------------------------------------------------------------


class FactorGradients(NamedTuple):
  """Factor gradients in product form: ``g_A = e_a @ map_a``, ``g_B = map_b @ e_b``.

  ``a_e_a = Aᵀ e_a``. Without momentum ``e`` are this step's gradients; with
  it, the running means of their frame coordinates.
  """

  e_a: Array
  map_a: Array
  e_b: Array
  map_b: Array
  a_e_a: Array


def current_gradients(x: Slice, g: Grams, fr: Frames) -> FactorGradients:
  """This step's factor gradients, restricted to the tangent space (see :class:`Frames`)."""
  return FactorGradients(x.grad_a, dot(fr.to_y, fr.root_b.T), x.grad_b, dot(fr.root_a, fr.to_x),
                         g.a_grad_a)


def momentum(mu_a: Array, mu_b: Array, x: Slice, g: Grams, fr: Frames, b1: float | Array,
             count: Array) -> tuple[FactorGradients, Array, Array]:
  """EMA of the frame coordinates ``(Ŷ, X̂)`` of the W-gradient, mapped back to the factors.

  The coordinates do not change when the factors are rescaled, unlike
  factor gradients (O(lr) right after ``B = 0``) or factor directions
  (O(1/lr) there). The bias-corrected means are mapped back at the current
  factors (``Ŷ̄ L_Bᵀ``, ``L_A X̂̄``), so the W-step stays the exact
  ``H``-projection of an Adafactor direction, of ``G``'s running mean.

  Returns:
    The factor gradients for the solve and the new buffers ``(mu_a, mu_b)``.
  """
  new_a = b1 * mu_a + (1.0 - b1) * dot(x.grad_a, fr.to_y)
  new_b = b1 * mu_b + (1.0 - b1) * dot(fr.to_x, x.grad_b)
  debias = 1.0 - b1 ** (count + 1.0)
  a_mean = (b1 * dot(x.a.T, mu_a) + (1.0 - b1) * dot(g.a_grad_a, fr.to_y)) / debias
  return (FactorGradients(new_a / debias, fr.root_b.T, new_b / debias, fr.root_a, a_mean),
          new_a, new_b)


# 6. Solve and clip ---------------------------------------------------------


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


def solve(x: Slice, fg: FactorGradients, row: Array, col: Array, g: Grams, hp: Hyperparams
          ) -> tuple[Array, Array]:
  """The minimal-imbalance factor step of a unit-scale slice, clipped.

  ``dA = [g_A/ℓ − ½ A P⁻¹K] Q⁻¹`` and ``dB = P⁻¹ [g_B/ρ − ½ K Q⁻¹ B]`` with
  ``P = Aᵀ diag(ℓ) A``, ``Q = B diag(ρ) Bᵀ``, ``K = Aᵀ g_A``, kept in the
  product form ``dA = F X + A Y``, ``dB = X' F' + Y B`` (``F = e_a/ℓ``,
  ``F' = e_b/ρ``, ``r × r`` coefficients) until the last two products.
  Update clipping scales the coefficients so that the W-step's RMS, read
  from ``r × r`` Grams of that form, is at most the threshold.
  """
  inv_p, inv_q = linalg.cholesky_inverse(
      jnp.stack([dot((x.a * row[:, None]).T, x.a), dot(x.b * col[None, :], x.b.T)]), hp.damping)
  cross = -0.5 * dot(inv_p, dot(fg.a_e_a, fg.map_a), inv_q)  # Y
  lead_a, lead_b = dot(fg.map_a, inv_q), dot(inv_p, fg.map_b)    # X, X'
  scaled_a, scaled_b = fg.e_a / row[:, None], fg.e_b / col[None, :]  # F, F'
  if hp.clipping_threshold is not None:
    ft_a, ft_b = dot(scaled_a.T, x.a), dot(scaled_b, x.b.T)  # FᵀA, F'Bᵀ
    mixed_a = dot(lead_a.T, ft_a, cross)  # XᵀFᵀA Y, and its transpose, in dAᵀdA
    mixed_b = dot(lead_b, ft_b, cross.T)
    rms = w_step_rms_from_grams(
        g.gram_a, g.gram_b,
        da_da=(dot(lead_a.T, dot(scaled_a.T, scaled_a), lead_a) + mixed_a + mixed_a.T
               + dot(cross.T, g.gram_a, cross)),
        da_a=dot(lead_a.T, ft_a) + dot(cross.T, g.gram_a),
        db_db=(dot(lead_b, dot(scaled_b, scaled_b.T), lead_b.T) + mixed_b + mixed_b.T
               + dot(cross, g.gram_b, cross.T)),
        db_b=dot(lead_b, ft_b) + dot(cross, g.gram_b),
        m=x.a.shape[0], n=x.b.shape[1])
    shrink = 1.0 / jnp.maximum(1.0, rms / hp.clipping_threshold)
    lead_a, lead_b, cross = lead_a * shrink, lead_b * shrink, cross * shrink
  return dot(scaled_a, lead_a) + dot(x.a, cross), dot(lead_b, scaled_b) + dot(cross, x.b)


# 8. Control ---------------------------------------------------------------


def balancing_gauge(g: Grams, e: Exponents, rate: float | Array) -> Array:
  """``Ω = rate · (M + 10⁻⁶ t)⁻¹ E`` with ``M = AᵀA + BBᵀ``, ``E = AᵀA − BBᵀ``, ``t = tr M / r``.

  The factor step ``(A Ω, −Ω B)`` moves no ``W`` (it spans the Jacobian's
  null space) and shrinks the larger of ``AᵀA`` and ``BBᵀ`` towards the
  other, per direction by ``rate (a² − b²)/(a² + b²) ∈ [−rate, rate]``. Zero on
  balanced factors. Both Grams are brought to the larger one's power of two
  (``A = 2^a A'``), so neither overflows.
  """
  top = jnp.maximum(e.a, e.b)
  gram_a, gram_b = times_pow2(g.gram_a, 2 * (e.a - top)), times_pow2(g.gram_b, 2 * (e.b - top))
  total = gram_a + gram_b
  t = jnp.trace(total) / total.shape[-1] + jnp.finfo(total.dtype).tiny
  return rate * dot(linalg.damped_inverse(total / t, 1e-6), (gram_a - gram_b) / t)


def _rms(x: Array) -> Array:
  """``sqrt(mean x²)``, scaled by the largest entry first so that the squares cannot overflow."""
  largest = jnp.max(jnp.abs(x))
  unit = x / jnp.where(largest > 0, largest, 1.0)
  return largest * jnp.sqrt(jnp.mean(unit * unit))


def clip_factor(delta: Array, threshold: float | Array) -> Array:
  """``delta`` scaled down so that its RMS is at most ``threshold``."""
  rms = _rms(delta)
  return delta / jnp.maximum(1.0, jnp.where(jnp.isnan(rms), jnp.inf, rms) / threshold)


# The whole rule ------------------------------------------------------------


def update(hp: Hyperparams, raw: Slice, state: PairState, stats: tuple[Array, Array] | None,
           count: Array) -> tuple[Array, Array, PairState]:
  """``(dA, dB, new_state)`` of one slice at step ``count`` (the module docstring's steps).

  Args:
    hp: the hyperparameters.
    raw: the slice as stored (any finite scale).
    state: the slice's :class:`~adaprelora_jax.PairState`.
    stats: the W-gradient's row and column mean squares (``full``), or
      ``None`` for the tangent statistics.
    count: the step number, from 0.
  """
  x, e = normalize(raw)
  # s G = 2^g G', so statistics and moments of G carry 4^g / s², and the
  # unit-scale metric for G' is ρ' = ρ s / 2^g.
  to_true = lambda y, power: times_pow2(y, power * e.g) / hp.lora_scale ** power
  to_unit = lambda y, power: times_pow2(y * hp.lora_scale ** power, -power * e.g)
  gr = grams(x)
  fr = frames(gr, hp.damping)
  if stats is None:
    stats = tuple(to_true(s, 2) for s in tangent_mean_squares(x, gr, fr))
  else:
    stats = tuple(jnp.maximum(s, 0.0) for s in stats)
  v_row, v_col = second_moments(state.v_row, state.v_col, stats, count, hp)
  row, col = metric(v_row, v_col, count, hp)
  col = to_unit(col, 1)
  mu_a, mu_b = state.mu_a, state.mu_b
  if hp.b1 is None:
    fg = current_gradients(x, gr, fr)
  else:
    fg, mu_a, mu_b = momentum(to_unit(mu_a, 1), to_unit(mu_b, 1), x, gr, fr, hp.b1, count)
    mu_a, mu_b = to_true(mu_a, 1), to_true(mu_b, 1)
  delta_a, delta_b = solve(x, fg, row, col, gr, hp)
  # A = 2^a A' and B = 2^b B' at scale s: dA = dA' / (s 2^b), dB = dB' / (s 2^a).
  delta_a = times_pow2(delta_a, -e.b) / hp.lora_scale
  delta_b = times_pow2(delta_b, -e.a) / hp.lora_scale
  if hp.balancing is not None:
    omega = balancing_gauge(gr, e, hp.balancing)
    delta_a = delta_a + times_pow2(dot(x.a, omega), e.a)
    delta_b = delta_b - times_pow2(dot(omega, x.b), e.b)
  if hp.factor_clipping is not None:
    delta_a = clip_factor(delta_a, hp.factor_clipping)
    delta_b = clip_factor(delta_b, hp.factor_clipping)
  # An out-of-range traced hyperparameter makes the step not finite: skipped and counted.
  delta_a = jnp.where(in_range(hp), delta_a, jnp.nan)
  return delta_a, delta_b, PairState(v_row, v_col, mu_a, mu_b)
