"""The plumbing every LoRA-pair optimizer here shares.

An optimizer of this family is a rule for one *slice*, a matrix pair
``A (m, r)``, ``B (r, n)`` with its factor gradients and a small state, plus
this module, which turns the rule into an Optax transformation:

* :func:`~adaprelora_jax.pairing.lora_pairs` finds the pairs;
* each pair's factors are read as matrices (N-D factors flattened) and its
  leading batch axes (stacked layers, experts) are solved with one ``vmap``;
* the rule computes in float32, or wider if the factors are;
* every other leaf goes to a fallback transformation;
* the update checks the tree and the state and names the offending leaves.

The state of a pair is the rule's per-slice state with the pair's batch axes
in front, so a ``(*batch, m, r)`` buffer lines up with ``A``'s axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax.pairing import LoRAPair, LoRAPairing, PairingRule, lora_pairs

Array = jax.Array
PyTree = Any


class SliceInit(Protocol):
  def __call__(self, m: int, n: int, rank: int, dtype: jnp.dtype) -> PyTree:
    """The state of one ``(m, r)`` / ``(r, n)`` slice."""


class SliceUpdate(Protocol):
  def __call__(self, a: Array, b: Array, grad_a: Array, grad_b: Array,
               state: PyTree, extra: PyTree, count: Array
               ) -> tuple[Array, Array, PyTree]:
    """``(delta_a, delta_b, new_state)`` for one slice at step ``count``."""


PairExtras = Callable[[LoRAPairing, Mapping[str, Any]], Mapping[str, PyTree]]
"""Per-pair extra inputs (with the pair's batch axes) from ``update``'s extra arguments."""


class PairwiseState(NamedTuple):
  """State of a transformation built by :func:`pairwise_transformation`.

  Attributes:
    count: number of updates so far, int32.
    pairs: the rule's state per LoRA pair, keyed by the pair key.
    fallback: the fallback transformation's state (non-LoRA leaves).
  """

  count: Array
  pairs: dict[str, PyTree]
  fallback: optax.OptState


def compute_dtype(*dtypes: jnp.dtype) -> jnp.dtype:
  """The dtype the optimizers compute in: float32, or wider if an input is."""
  return jnp.result_type(jnp.float32, *dtypes)


def _pair_dtype(leaves: list[Any], pair: LoRAPair) -> jnp.dtype:
  return compute_dtype(leaves[pair.a_index].dtype, leaves[pair.b_index].dtype)


def _pair_state(slice_init: SliceInit, pair: LoRAPair, dtype) -> PyTree:
  per_slice = slice_init(pair.m, pair.n, pair.rank, dtype)
  # A copy per leaf: a rule may return one zeros array for two buffers, and
  # the same buffer twice in a state cannot be donated to a jitted step.
  return jax.tree.map(
      lambda x: jnp.array(jnp.broadcast_to(x, (*pair.batch_shape, *x.shape)), copy=True),
      per_slice)


def check_updates(name: str, pairing: LoRAPairing, updates: Any, params: Any) -> None:
  """Raises a clear error if ``updates`` does not match ``params`` leaf by leaf."""
  flat_updates, tree_updates = jax.tree_util.tree_flatten_with_path(updates)
  if tree_updates != pairing.treedef:
    raise ValueError(
        f"{name}: the updates tree does not match the params tree.\n"
        f"updates: {tree_updates}\nparams:  {pairing.treedef}")
  flat_params = jax.tree_util.tree_leaves_with_path(params)
  for (path, u), (_, p) in zip(flat_updates, flat_params):
    if u.shape != p.shape:
      raise ValueError(
          f"{name}: update at {jax.tree_util.keystr(path)} has shape {u.shape}, "
          f"but the parameter has shape {p.shape}.")


def check_state(name: str, slice_init: SliceInit, pairing: LoRAPairing,
                pair_states: Mapping[str, PyTree], params: Any) -> None:
  """Raises a clear error if the state was made for other pairs or shapes."""
  expected = {p.key: p for p in pairing.pairs}
  if set(pair_states) != set(expected):
    raise ValueError(
        f"{name}: the state was initialised for other LoRA pairs. "
        f"Missing in state: {sorted(set(expected) - set(pair_states))}; "
        f"unknown in params: {sorted(set(pair_states) - set(expected))}.")
  leaves = jax.tree_util.tree_leaves(params)
  for key, pair in expected.items():
    want = jax.eval_shape(
        lambda: _pair_state(slice_init, pair, _pair_dtype(leaves, pair)))
    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(pair_states[key])
    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    if got_tree != want_tree:
      raise ValueError(f"{name}: state of pair {key!r} has structure {got_tree}, "
                       f"expected {want_tree}.")
    for (path, got), w in zip(got_leaves, want_leaves):
      if got.shape != w.shape:
        raise ValueError(
            f"{name}: state of pair {key!r} at {jax.tree_util.keystr(path)} has "
            f"shape {got.shape}, expected {w.shape} for A {pair.a_path} "
            f"{pair.a_matrix_shape} and B {pair.b_path} {pair.b_matrix_shape}.")


def _solve_pair(slice_update: SliceUpdate, pair: LoRAPair, a, b, grad_a, grad_b,
                state, extra, count):
  """Runs ``slice_update`` on every batch slice of one pair with a single vmap."""
  dtype = compute_dtype(a.dtype, b.dtype, grad_a.dtype, grad_b.dtype)
  slices = math.prod(pair.batch_shape)
  batch = len(pair.batch_shape)
  flat = lambda x: x.astype(dtype).reshape(slices, *x.shape[batch:])
  m, n, r = pair.m, pair.n, pair.rank
  factors = (a.astype(dtype).reshape(slices, m, r), b.astype(dtype).reshape(slices, r, n),
             grad_a.astype(dtype).reshape(slices, m, r),
             grad_b.astype(dtype).reshape(slices, r, n))
  state, extra = jax.tree.map(flat, state), jax.tree.map(flat, extra)
  if slices == 1:  # batched matrix products are slower on CPU; avoid vmap
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    out = jax.tree.map(lambda x: x[None], slice_update(
        *first(factors), first(state), first(extra), count))
  else:
    out = jax.vmap(slice_update, in_axes=(0,) * 6 + (None,))(
        *factors, state, extra, count)
  delta_a, delta_b, new_state = out
  unflat = lambda x: x.reshape(*pair.batch_shape, *x.shape[1:])
  return delta_a, delta_b, jax.tree.map(unflat, new_state)


def pairwise_transformation(
    name: str,
    slice_init: SliceInit,
    slice_update: SliceUpdate,
    *,
    fallback: optax.GradientTransformation,
    pairing: PairingRule | None = None,
    pair_extras: PairExtras | None = None,
    state_type: Callable[..., NamedTuple] = PairwiseState,
) -> optax.GradientTransformationExtraArgs:
  """An Optax transformation that applies a per-slice rule to every LoRA pair.

  Args:
    name: the transformation's name, for error messages.
    slice_init: ``(m, n, r, dtype) -> state`` of one slice.
    slice_update: ``(a, b, grad_a, grad_b, state, extra, count) ->
      (delta_a, delta_b, state)`` for one slice; ``extra`` is the slice of
      what ``pair_extras`` returned for the pair, or ``None``.
    fallback: transformation for the leaves that are not LoRA factors.
    pairing: a rule naming LoRA factors (see :func:`lora_pairs`).
    pair_extras: maps ``update``'s extra keyword arguments to per-pair inputs.
    state_type: a NamedTuple with fields ``count``, ``pairs``, ``fallback``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``.
  """

  def masked_fallback(pairs: LoRAPairing) -> optax.GradientTransformation:
    return optax.masked(fallback, pairs.fallback_mask())

  def init_fn(params):
    pairs = lora_pairs(params, pairing)
    leaves = jax.tree_util.tree_leaves(params)
    return state_type(
        count=jnp.zeros([], jnp.int32),
        pairs={p.key: _pair_state(slice_init, p, _pair_dtype(leaves, p))
               for p in pairs.pairs},
        fallback=masked_fallback(pairs).init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{name} needs the current params: call "
                       "update(grads, state, params).")
    pairs = lora_pairs(params, pairing)
    check_updates(name, pairs, updates, params)
    check_state(name, slice_init, pairs, state.pairs, params)
    extras = {} if pair_extras is None else pair_extras(pairs, extra_args)
    fallback_updates, new_fallback = masked_fallback(pairs).update(
        updates, state.fallback, params)
    new_leaves, treedef = jax.tree_util.tree_flatten(fallback_updates)
    grad_leaves = jax.tree_util.tree_leaves(updates)
    param_leaves = jax.tree_util.tree_leaves(params)
    new_pairs = {}
    for pair in pairs.pairs:
      delta_a, delta_b, new_pairs[pair.key] = _solve_pair(
          slice_update, pair, param_leaves[pair.a_index],
          param_leaves[pair.b_index], grad_leaves[pair.a_index],
          grad_leaves[pair.b_index], state.pairs[pair.key],
          extras.get(pair.key), state.count)
      for index, delta in ((pair.a_index, delta_a), (pair.b_index, delta_b)):
        new_leaves[index] = delta.reshape(grad_leaves[index].shape).astype(
            grad_leaves[index].dtype)
    return jax.tree_util.tree_unflatten(treedef, new_leaves), state_type(
        count=optax.safe_increment(state.count), pairs=new_pairs,
        fallback=new_fallback)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
