"""``scale_by_adaprelora``: the AdaPreLoRA direction as an Optax transformation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax import moments, momentum
from adaprelora_jax.pairing import LoRAPair, LoRAPairing, PairingRule, lora_pairs
from adaprelora_jax.solve import (compute_dtype, solve_factor_update,
                                  tangent_mean_squares, w_step_rms)

Array = jax.Array
Statistics = Literal["auto", "tangent", "full"]


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
    mu_a: momentum in ``A``'s frame coordinates, shaped like ``A``
      (``None`` without momentum).
    mu_b: likewise for ``B``.
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


def _pair_init(pair: LoRAPair, dtype: jnp.dtype, with_momentum: bool
               ) -> PairState:
  batch = pair.batch_shape
  zeros = lambda shape: jnp.zeros(shape, dtype)
  return PairState(
      v_row=zeros((*batch, pair.m)),
      v_col=zeros((*batch, pair.n)),
      mu_a=zeros((*batch, *pair.in_shape, pair.rank)) if with_momentum else None,
      mu_b=zeros((*batch, pair.rank, *pair.out_shape)) if with_momentum else None,
  )


def _state_dtype(params: Any, pair: LoRAPair) -> jnp.dtype:
  """float32, or the factors' dtype if wider (float64 under x64)."""
  leaves = jax.tree_util.tree_leaves(params)
  return compute_dtype(leaves[pair.a_index].dtype, leaves[pair.b_index].dtype)


def _check_tree(pairing: LoRAPairing, updates: Any, params: Any) -> None:
  """Raises a clear error if ``updates`` does not match ``params`` leaf by leaf."""
  flat_updates, tree_updates = jax.tree_util.tree_flatten_with_path(updates)
  if tree_updates != pairing.treedef:
    raise ValueError(
        "scale_by_adaprelora: the updates tree does not match the params tree.\n"
        f"updates: {tree_updates}\nparams:  {pairing.treedef}")
  flat_params = jax.tree_util.tree_leaves_with_path(params)
  for (path, u), (_, p) in zip(flat_updates, flat_params):
    if u.shape != p.shape:
      raise ValueError(
          f"scale_by_adaprelora: update at {jax.tree_util.keystr(path)} has "
          f"shape {u.shape}, but the parameter has shape {p.shape}.")


def _check_state(pairing: LoRAPairing, state: ScaleByAdaPreLoRAState) -> None:
  expected = {p.key: p for p in pairing.pairs}
  if set(state.pairs) != set(expected):
    raise ValueError(
        "scale_by_adaprelora: the state was initialised for other LoRA pairs. "
        f"Missing in state: {sorted(set(expected) - set(state.pairs))}; "
        f"unknown in params: {sorted(set(state.pairs) - set(expected))}.")
  for key, pair in expected.items():
    got = state.pairs[key]
    want = ((*pair.batch_shape, pair.m), (*pair.batch_shape, pair.n))
    if (got.v_row.shape, got.v_col.shape) != want:
      raise ValueError(
          f"scale_by_adaprelora: state of pair {key!r} has v_row/v_col shapes "
          f"{got.v_row.shape}/{got.v_col.shape}, expected {want[0]}/{want[1]} "
          f"for A {pair.a_path} and B {pair.b_path}.")


def _full_stats(pair: LoRAPair, stats: WeightStats) -> tuple[Array, Array]:
  batch = pair.batch_shape
  out = []
  for name, value, size in (("row", stats.row, pair.m), ("col", stats.col, pair.n)):
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
    damping: float = 1e-6,
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
    damping: relative damping of the ``r × r`` solves (SPEC §5).
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
  fallback = optax.scale_by_adam() if fallback is None else fallback

  def masked_fallback(pairs: LoRAPairing) -> optax.GradientTransformation:
    return optax.masked(fallback, pairs.fallback_mask())

  def init_fn(params):
    pairs = lora_pairs(params, pairing)
    return ScaleByAdaPreLoRAState(
        count=jnp.zeros([], jnp.int32),
        pairs={p.key: _pair_init(p, _state_dtype(params, p), b1 is not None)
               for p in pairs.pairs},
        fallback=masked_fallback(pairs).init(params),
    )

  def pair_update(pair, a, b, grad_a, grad_b, pstate, stats, count):
    dtype = compute_dtype(a.dtype, grad_a.dtype)
    a, grad_a = (x.astype(dtype).reshape(pair.a_matrix_shape) for x in (a, grad_a))
    b, grad_b = (x.astype(dtype).reshape(pair.b_matrix_shape) for x in (b, grad_b))
    if stats is None:
      row_ms, col_ms = tangent_mean_squares(
          a, b, grad_a, grad_b, scale=lora_scale, damping=damping)
    else:
      row_ms, col_ms = _full_stats(pair, stats)
    beta = moments.decay_rate(count, decay_rate=decay_rate, b2=b2)
    v_row, v_col = moments.update_moments(
        pstate.v_row, pstate.v_col, row_ms, col_ms, beta, eps)
    row, col = moments.scalings(v_row, v_col, count, b2)
    mu_a, mu_b = pstate.mu_a, pstate.mu_b
    if b1 is not None:
      grad_a, grad_b, mu_a, mu_b = momentum.averaged_gradients(
          a, b, grad_a, grad_b, mu_a.reshape(pair.a_matrix_shape),
          mu_b.reshape(pair.b_matrix_shape), scale=lora_scale, damping=damping,
          b1=b1, count=count)
      mu_a, mu_b = mu_a.reshape(pstate.mu_a.shape), mu_b.reshape(pstate.mu_b.shape)
    delta_a, delta_b = solve_factor_update(
        a, b, grad_a, grad_b, row, col, scale=lora_scale, damping=damping)
    if clipping_threshold is not None:
      rms = w_step_rms(a, b, delta_a, delta_b, scale=lora_scale)
      shrink = (1.0 / jnp.maximum(1.0, rms / clipping_threshold))[..., None, None]
      delta_a, delta_b = delta_a * shrink, delta_b * shrink
    return (delta_a, delta_b), PairState(v_row, v_col, mu_a, mu_b)

  def update_fn(updates, state, params=None, *, weight_stats=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("scale_by_adaprelora needs the current params: call "
                       "update(grads, state, params).")
    pairs = lora_pairs(params, pairing)
    _check_tree(pairs, updates, params)
    _check_state(pairs, state)
    weight_stats = {} if weight_stats is None else dict(weight_stats)
    if statistics == "full":
      missing = [p.key for p in pairs.pairs if p.key not in weight_stats]
      if missing:
        raise ValueError(f"statistics='full' needs weight_stats for every "
                         f"LoRA pair; missing: {missing}.")
    unknown = set(weight_stats) - {p.key for p in pairs.pairs}
    if unknown:
      raise ValueError(f"weight_stats has unknown pair keys {sorted(unknown)}.")
    param_leaves = jax.tree_util.tree_leaves(params)
    fallback_updates, new_fallback = masked_fallback(pairs).update(
        updates, state.fallback, params)
    new_leaves, treedef = jax.tree_util.tree_flatten(fallback_updates)
    grad_leaves = jax.tree_util.tree_leaves(updates)
    new_pairs = {}
    for pair in pairs.pairs:
      stats = None if statistics == "tangent" else weight_stats.get(pair.key)
      (delta_a, delta_b), new_pairs[pair.key] = pair_update(
          pair, param_leaves[pair.a_index], param_leaves[pair.b_index],
          grad_leaves[pair.a_index], grad_leaves[pair.b_index],
          state.pairs[pair.key], stats, state.count)
      for index, delta in ((pair.a_index, delta_a), (pair.b_index, delta_b)):
        new_leaves[index] = delta.reshape(grad_leaves[index].shape).astype(
            grad_leaves[index].dtype)
    return jax.tree_util.tree_unflatten(treedef, new_leaves), ScaleByAdaPreLoRAState(
        count=optax.safe_increment(state.count), pairs=new_pairs,
        fallback=new_fallback)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

