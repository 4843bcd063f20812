"""``scale_by_adaprelora``: the AdaPreLoRA direction as an Optax transformation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax import gram, moments, momentum
from adaprelora_jax.pairing import LoRAPair, LoRAPairing, PairingRule, lora_pairs
from adaprelora_jax.solve import compute_dtype

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
    mu_a: running mean of ``G B̂ᵀ``, the W-gradient's coordinates in ``B``'s
      row frame, shaped like ``A`` (``None`` without momentum).
    mu_b: running mean of ``Âᵀ G``, shaped like ``B``.
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

  def slice_update(a, b, grad_a, grad_b, v_row, v_col, mu_y, mu_x, stats,
                   count):
    """One (m, r) / (r, n) slice: statistics, moments, momentum, solve, clip."""
    # The m- and n-side Grams that everything below is assembled from.
    side_m = [a, grad_a] + ([] if b1 is None else [mu_y])
    side_n = [b, grad_b] + ([] if b1 is None else [mu_x])
    gram_m = jnp.concatenate(side_m, 1).T @ jnp.concatenate(side_m, 1)
    gram_n = jnp.concatenate(side_n, 0) @ jnp.concatenate(side_n, 0).T
    r = a.shape[1]
    block = lambda g, i, j: g[i * r:(i + 1) * r, j * r:(j + 1) * r]
    gram_a, gram_b = block(gram_m, 0, 0), block(gram_n, 0, 0)
    a_grad_a = block(gram_m, 0, 1)
    fr = gram.frames(gram_a, gram_b, damping, lora_scale)
    if stats is None:
      stats = gram.tangent_mean_squares(a, b, grad_a, grad_b, fr, a_grad_a,
                                        gram_m[:2 * r, :2 * r],
                                        gram_n[:2 * r, :2 * r])
    beta = moments.decay_rate(count, decay_rate=decay_rate, b2=b2)
    v_row, v_col = moments.update_moments(v_row, v_col, *stats, beta, eps)
    row, col = moments.scalings(v_row, v_col, count, b2)
    # Factor gradients fed to the solve: E_A @ map_a and map_b @ E_B, the
    # (averaged) W-gradient's frame coordinates mapped back to the factors.
    eff_a, eff_b, a_eff_a = grad_a, grad_b, a_grad_a
    map_a = lora_scale * fr.to_y @ fr.chol_b.T
    map_b = lora_scale * fr.chol_a @ fr.to_x
    if b1 is not None:
      (eff_a, eff_b), (mu_y, mu_x), a_eff_a = momentum.update_momentum(
          mu_y, mu_x, grad_a, grad_b, fr, a_grad_a, block(gram_m, 0, 2),
          b1, count)
      map_a, map_b = lora_scale * fr.chol_b.T, lora_scale * fr.chol_a
    sol = gram.solve(a, b, eff_a, map_a, eff_b, map_b, a_eff_a, row, col,
                     scale=lora_scale, damping=damping)
    delta_a, delta_b = sol.delta_a, sol.delta_b
    if clipping_threshold is not None:
      rms = gram.w_step_rms(sol, gram_a, gram_b, lora_scale)
      shrink = 1.0 / jnp.maximum(1.0, rms / clipping_threshold)
      delta_a, delta_b = delta_a * shrink, delta_b * shrink
    return delta_a, delta_b, v_row, v_col, mu_y, mu_x

  def pair_update(pair, a, b, grad_a, grad_b, pstate, stats, count):
    """Solves every batch slice of one pair with a single vmap."""
    dtype = compute_dtype(a.dtype, grad_a.dtype)
    slices = math.prod(pair.batch_shape)
    flat = lambda x, *shape: x.astype(dtype).reshape(slices, *shape)
    m, n, r = pair.m, pair.n, pair.rank
    args = (flat(a, m, r), flat(b, r, n), flat(grad_a, m, r), flat(grad_b, r, n),
            flat(pstate.v_row, m), flat(pstate.v_col, n))
    mus = (None, None) if b1 is None else (
        flat(pstate.mu_a, m, r), flat(pstate.mu_b, r, n))
    stats = None if stats is None else (flat(stats[0], m), flat(stats[1], n))
    if slices == 1:  # batched matrix products are slower on CPU; avoid vmap
      squeeze = lambda x: None if x is None else jax.tree.map(lambda y: y[0], x)
      out = jax.tree.map(lambda y: y[None], slice_update(
          *squeeze(args), *squeeze(mus), squeeze(stats), count))
    else:
      out = jax.vmap(slice_update, in_axes=(0,) * 9 + (None,))(
          *args, *mus, stats, count)
    delta_a, delta_b, v_row, v_col, mu_a, mu_b = out
    unflat = lambda x, like: None if like is None else x.reshape(like.shape)
    return (delta_a, delta_b), PairState(
        unflat(v_row, pstate.v_row), unflat(v_col, pstate.v_col),
        unflat(mu_a, pstate.mu_a), unflat(mu_b, pstate.mu_b))

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
      stats = None
      if statistics != "tangent" and pair.key in weight_stats:
        stats = _full_stats(pair, weight_stats[pair.key])
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

