"""``scale_by_adaprelora``: the AdaPreLoRA direction as an Optax transformation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax import gram, moments, momentum
from adaprelora_jax.pairing import LoRAPair, LoRAPairing, PairingRule
from adaprelora_jax.pairwise import pairwise_transformation

Array = jax.Array
Statistics = Literal["auto", "tangent", "full"]

# How the pairs are laid out into one program was tuned on XLA's CPU runtime
# (benchmarks/RESULTS.md, "Where the time goes"); elsewhere every role's
# layers are joined and nothing is chunked, the fewest and largest kernels.
#
# On CPU the update holds about 0.7× its inputs in temporaries (1.5× before
# the products below were unrolled). Chunks of 24 MiB of factors, gradients
# and state (two layers of 7B shapes at r = 16, 16 MiB of temporaries) keep
# them under the 32 MiB above which glibc maps every call's buffer afresh,
# and leave 14 pairs per chunk for XLA to overlap: 2-6 % faster than one
# layer per chunk at 2-8 layers, 4-9 % with momentum.
_CHUNK_BYTES = 24 * 2**20
# On CPU, each pair is solved alone unless a chunk would then hold more than
# this many pairs (small matrices); then each role's layers are joined.
# Joining copies the factors and gradients and batches their products (7B
# shapes, 8 layers: 3.7× AdamW's step alone, 4.4× joined), but XLA compiles a
# chunk in time growing with the square of its pairs. 7B shapes hold about 14
# per chunk, so they compile in time linear in depth (32 layers: first call
# 19 s alone, 9 s joined, with dots; unrolled as below, 75 s alone); the 224
# small pairs of benchmarks.compile_time's 32 layers, all in one chunk, took
# 51 s alone and 4.7 s joined.
_JOIN_ABOVE_PAIRS = 32
# On CPU, slices of rank up to _UNROLL_MAX_RANK with both sides at least
# _UNROLL_MIN_DIM write their products with an m- or n-sized output
# element-wise (``gram.small_matmul``, ``gram._triangular_quadratic_form``),
# which XLA fuses with the work around them: 7B shapes, two layers, r = 16,
# 3.5-3.8× AdamW's step against 4.0-7.0× with dots; at r = 32 dots win. Such
# a slice traces to about 2,300 operations instead of 350, and XLA's compile
# time grows with them (7B shapes, 32 layers: 78 s against 25 s). Small
# slices gain little, and many of them share a chunk, whose compile time
# grows with the square of its pairs (SmolLM2-like shapes, four layers,
# unrolled: 18 s against 2 s), so they keep the dots (benchmarks/RESULTS.md).
_UNROLL_MAX_RANK = 16
_UNROLL_MIN_DIM = 2048


class WeightStats(NamedTuple):
  """Mean squares of the full W-gradient ``G`` of one pair (SPEC §4 ``full``).

  Attributes:
    row: ``mean_j G_ij²``, shape ``(*batch, m)``.
    col: ``mean_i G_ij²``, shape ``(*batch, n)``.
  """

  row: Array
  col: Array


class PairState(NamedTuple):
  """Per-pair optimizer state, in float32 (or the factors' dtype if wider).

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


class ScaleByAdaPreLoRAState(NamedTuple):
  """State of :func:`scale_by_adaprelora`.

  Attributes:
    count: number of updates so far, int32.
    pairs: :class:`PairState` per LoRA pair, keyed by the pair key.
    fallback: the fallback transformation's state (non-LoRA leaves).
  """

  count: Array
  pairs: dict[str, PairState]
  fallback: optax.OptState


def _full_stats(pair: LoRAPair, stats: WeightStats | tuple[Array, Array]
                ) -> tuple[Array, Array]:
  """``stats`` checked against ``pair`` and shaped ``(*batch, m)``, ``(*batch, n)``."""
  batch = pair.batch_shape
  out = []
  for name, value, size in zip(("row", "col"), stats, (pair.m, pair.n)):
    value = jnp.asarray(value)
    if value.shape[: len(batch)] != batch or value.size != math.prod(batch) * size:
      raise ValueError(
          f"weight_stats[{pair.key!r}].{name} has shape {value.shape}; expected "
          f"{(*batch, size)} for A {pair.a_path} and B {pair.b_path}.")
    out.append(value.reshape(*batch, size))
  return out[0], out[1]


def scale_by_adaprelora(
    b1: float | None = None,
    decay_rate: float = 0.8,
    b2: float | None = None,
    eps: float = 1e-30,
    damping: float = 1e-4,
    lora_scale: float = 1.0,
    clipping_threshold: float | None = 1.0,
    statistics: Statistics = "auto",
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales LoRA factor gradients into AdaPreLoRA's factor directions.

  For every LoRA pair ``ΔW = s · A B`` found by :func:`lora_pairs`, keeps
  Adafactor's factored second moments ``v_row (…, m)``, ``v_col (…, n)`` of a
  W-space gradient statistic ``S`` and returns the factor directions
  ``(dA, dB)`` of :func:`solve_factor_update`: the factor step whose W-space
  effect is the ``H``-orthogonal projection of Adafactor's direction
  ``diag(ℓ)⁻¹ G diag(ρ)⁻¹`` onto the LoRA tangent space, with minimal
  ``H``-weighted imbalance between the two factors' contributions.

  Statistics (``statistics``):

  * ``"full"``: ``S = G``, exact Adafactor statistics. ``update`` then needs
    ``weight_stats={pair_key: WeightStats(row, col)}``, the row and column
    mean squares of the true W-gradient.
  * ``"tangent"``: ``S = P_T(G)``, the minimum-norm W-gradient consistent with
    the factor gradients, computed in factored form (rank ``≤ 2r``) at no
    extra cost and with any LoRA library.
  * ``"auto"``: ``full`` for the pairs present in ``weight_stats``, else
    ``tangent``.

  The result follows Optax's sign convention (like ``scale_by_adam``): chain
  with a negative learning-rate scaling, as :func:`adaprelora` does.

  Args:
    b1: momentum coefficient, or ``None`` for none (the default, as in
      Adafactor). The average is of the W-gradient in scale-free factor
      frames (see :mod:`adaprelora_jax.momentum`), not of factor directions.
    decay_rate: Adafactor's second-moment schedule
      ``β̂_t = 1 − (t+1)^(−decay_rate)``, used when ``b2`` is ``None``.
    b2: a constant second-moment decay, with bias correction, instead.
    eps: added to the squared statistic, as in Adafactor.
    damping: relative damping of the ``r × r`` solves (SPEC §5). Where a
      factor has singular values ``σ`` near ``√δ`` (``B`` a step or two
      after ``B = 0``), the solve moves the other factor by up to
      ``1/(2√δ)`` along them; float32 rounding puts ``σ ~ 1e-7`` there
      whenever the first gradients are low-rank. At ``1e-6`` a rank-one
      regression diverged on most seeds; ``1e-4`` bounds that gain and
      changes nothing measurable on well-conditioned factors.
    lora_scale: the LoRA scale ``s`` (``alpha / r`` in Qwix, ``1`` in
      ``flax.nnx.LoRA``).
    clipping_threshold: Adafactor's update clipping: the factor directions are
      scaled down so that the RMS of their first-order W-step is at most this
      (``None`` to disable).
    statistics: ``"auto"``, ``"tangent"`` or ``"full"``, see above.
    fallback: transformation for the leaves that are not LoRA factors
      (biases, norms, heads); defaults to ``optax.scale_by_adam()``.
    pairing: a rule naming LoRA factors (see :func:`lora_pairs`). Under
      ``optax.inject_hyperparams``, list it in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``params`` (required) and an optional ``weight_stats``.

  References:
    Liu, Bian & Cai, `AdaPreLoRA: Adafactor Preconditioned Low-Rank Adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.

    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  if statistics not in ("auto", "tangent", "full"):
    raise ValueError(f"statistics must be 'auto', 'tangent' or 'full', got "
                     f"{statistics!r}.")
  with_momentum = b1 is not None
  on_cpu = jax.default_backend() == "cpu"

  def slice_init(m: int, n: int, rank: int, dtype) -> PairState:
    zeros = lambda *shape: jnp.zeros(shape, dtype)
    return PairState(
        v_row=zeros(m), v_col=zeros(n),
        mu_a=zeros(m, rank) if with_momentum else None,
        mu_b=zeros(rank, n) if with_momentum else None)

  def slice_update(a, b, grad_a, grad_b, state: PairState, stats, count):
    """One (m, r) / (r, n) slice: statistics, moments, momentum, solve, clip."""
    mu_y, mu_x = state.mu_a, state.mu_b
    # The m- and n-side Grams that everything below is assembled from.
    grams = gram.slice_grams(a, b, grad_a, grad_b, damping, lora_scale)
    fr, a_grad_a = grams.frames, grams.a_grad_a
    unrolled = (on_cpu and a.shape[1] <= _UNROLL_MAX_RANK
                and min(a.shape[0], b.shape[1]) >= _UNROLL_MIN_DIM)
    if stats is None:
      stats = gram.tangent_mean_squares(a, b, grad_a, grad_b, grams, unrolled=unrolled)
    beta = moments.decay_rate(count, decay_rate=decay_rate, b2=b2)
    v_row, v_col = moments.update_moments(state.v_row, state.v_col, *stats, beta, eps)
    row, col = moments.scalings(v_row, v_col, count, b2)
    # Factor gradients fed to the solve: E_A @ map_a and map_b @ E_B, the
    # (averaged) W-gradient's frame coordinates mapped back to the factors.
    eff_a, eff_b, a_eff_a = grad_a, grad_b, a_grad_a
    map_a = lora_scale * fr.to_y @ fr.root_b.T
    map_b = lora_scale * fr.root_a @ fr.to_x
    if with_momentum:
      (eff_a, eff_b), (mu_y, mu_x), a_eff_a = momentum.update_momentum(
          mu_y, mu_x, grad_a, grad_b, fr, a_grad_a, a.T @ mu_y, b1, count,
          unrolled=unrolled)
      map_a, map_b = lora_scale * fr.root_b.T, lora_scale * fr.root_a
    clipping = (None if clipping_threshold is None else
                gram.Clipping(clipping_threshold, grams.gram_a, grams.gram_b))
    delta_a, delta_b = gram.solve(a, b, eff_a, map_a, eff_b, map_b, a_eff_a,
                                  row, col, scale=lora_scale, damping=damping,
                                  clipping=clipping, unrolled=unrolled)
    return delta_a, delta_b, PairState(v_row, v_col, mu_y, mu_x)

  def pair_extras(pairs: LoRAPairing, extra_args: Mapping[str, Any]
                  ) -> dict[str, tuple[Array, Array]]:
    """The exact statistics per pair, from ``update(..., weight_stats=...)``."""
    weight_stats = dict(extra_args.get("weight_stats") or {})
    keys = {p.key for p in pairs.pairs}
    unknown = set(weight_stats) - keys
    if unknown:
      raise ValueError(f"weight_stats has unknown pair keys {sorted(unknown)}; "
                       f"the LoRA pairs are {sorted(keys)}.")
    if statistics == "full":
      missing = sorted(keys - set(weight_stats))
      if missing:
        raise ValueError(f"statistics='full' needs weight_stats for every "
                         f"LoRA pair; missing: {missing}.")
    if statistics == "tangent":
      return {}
    return {p.key: _full_stats(p, weight_stats[p.key])
            for p in pairs.pairs if p.key in weight_stats}

  return pairwise_transformation(
      "scale_by_adaprelora", slice_init, slice_update,
      fallback=optax.scale_by_adam() if fallback is None else fallback,
      pairing=pairing, pair_extras=pair_extras,
      state_type=ScaleByAdaPreLoRAState,
      join_layers_above=_JOIN_ABOVE_PAIRS if on_cpu else 0,
      chunk_bytes=_CHUNK_BYTES if on_cpu else None)
