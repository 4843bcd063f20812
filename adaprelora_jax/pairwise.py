"""The plumbing every LoRA-pair optimizer here shares.

An optimizer of this family is a rule for one *slice*, a matrix pair
``A (m, r)``, ``B (r, n)`` with its factor gradients and a small state, plus
this module, which turns the rule into an Optax transformation:

* :func:`~adaprelora_jax.pairing.lora_pairs` finds the pairs;
* each pair's factors are read as matrices (N-D factors flattened); its
  leading batch axes (stacked layers, experts) are solved with one ``vmap``,
  and so is the same projection in every unscanned layer (pair keys equal up
  to layer numbers) where many pairs would be solved together, so the
  program XLA compiles at once does not grow with depth;
* the rule computes in float32, or wider if the factors are;
* a rule may ask for its groups to be solved in chunks, one after another
  (``chunk_bytes``), which bounds the update's live temporaries;
* every other leaf goes to a fallback transformation;
* the update checks the tree and the state and names the offending leaves.

The state of a pair is the rule's per-slice state with the pair's batch axes
in front, so a ``(*batch, m, r)`` buffer lines up with ``A``'s axes.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol, TypeVar

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax.pairing import LoRAPair, LoRAPairing, PairingRule, lora_pairs

Array = jax.Array
PyTree = Any
T = TypeVar("T")


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


_LAYER_INDEX = re.compile(r"\d+")


def _group_key(pair: LoRAPair, factors: tuple[Array, ...], extra: PyTree) -> tuple:
  """Pairs solved by one ``vmap``: one role (``layers/3/q`` and ``layers/7/q``), one shape.

  Grouping the same projection of every layer makes an unscanned model trace
  as many solves as a scanned one, so compile time stops growing with depth.
  Those pairs are usually sharded alike, so joining them moves no data.
  """
  return (_LAYER_INDEX.sub("#", pair.key), pair.m, pair.n, pair.rank,
          tuple(x.dtype for x in factors), jax.tree.structure(extra))


def _own_key(pair: LoRAPair, factors: tuple[Array, ...], extra: PyTree) -> tuple:
  """Every pair solved alone (its stacked axes still in one ``vmap``)."""
  return (pair.key,)


def _input_bytes(factors: tuple[Array, ...], state: PyTree) -> int:
  """Bytes of a pair's factors, gradients and state, as its rule computes with them."""
  itemsize = jnp.dtype(compute_dtype(*(x.dtype for x in factors))).itemsize
  return sum(x.size for x in (*factors, *jax.tree.leaves(state))) * itemsize


def _true_after(x: Array) -> Array:
  """A ``True`` that XLA can only compute once ``x`` exists, and cannot fold.

  It is true whatever ``x`` holds, NaN and Inf included, so no pair's values
  reach another's.
  """
  return jnp.isnan(x).astype(jnp.float32) * 0.0 == 0.0


class _Member(NamedTuple):
  """A pair of a group, with its factors and gradients and its :func:`_input_bytes`."""

  pair: LoRAPair
  factors: tuple[Array, Array, Array, Array]
  nbytes: int


def _pack(items: list[T], nbytes: Callable[[T], int], limit: int) -> list[list[T]]:
  """``items`` in order, in runs of at most ``limit`` bytes (at least one item each)."""
  runs, filled = [[]], 0
  for item in items:
    if runs[-1] and filled + nbytes(item) > limit:
      runs.append([])
      filled = 0
    runs[-1].append(item)
    filled += nbytes(item)
  return runs


def _split_group(members: list[_Member], chunk_bytes: int) -> list[list[_Member]]:
  """``members`` in runs of at most ``chunk_bytes`` (at least one member each).

  A group is solved as one ``vmap``, whose temporaries are all live at once,
  so a group larger than a chunk would undo the chunking (7B shapes, 32
  unscanned layers joined whole: 7.7× AdamW's step time on CPU, 5.4× split;
  ``benchmarks/RESULTS.md``).
  """
  return _pack(members, lambda member: member.nbytes, chunk_bytes)


def _layout(members: list[_Member], group_key: Callable[..., tuple],
            extras: Mapping[str, PyTree], chunk_bytes: int | None
            ) -> list[list[list[_Member]]]:
  """``members`` in chunks, solved one after another, of groups, each solved by one ``vmap``."""
  by_key = defaultdict(list)
  for member in members:
    by_key[group_key(member.pair, member.factors, extras.get(member.pair.key))].append(member)
  groups = list(by_key.values())
  if chunk_bytes is None:
    return [groups]
  groups = [run for members in groups for run in _split_group(members, chunk_bytes)]
  return _pack(groups, lambda members: sum(m.nbytes for m in members), chunk_bytes)


def _solve_group(slice_update: SliceUpdate, pairs: list[LoRAPair],
                 factors: list[tuple[Array, Array, Array, Array]],
                 states: list[PyTree], extras: list[PyTree], count: Array
                 ) -> list[tuple[Array, Array, PyTree]]:
  """Runs ``slice_update`` on every batch slice of same-shaped pairs with a single vmap.

  Each pair's batch axes are flattened and the pairs joined along them;
  ``(delta_a, delta_b, state)`` come back per pair with its batch axes.
  """
  dtype = compute_dtype(*(x.dtype for x in factors[0]))
  m, n, r = pairs[0].m, pairs[0].n, pairs[0].rank
  slice_shapes = ((m, r), (r, n), (m, r), (r, n))
  joined = [jnp.concatenate([f[k].astype(dtype).reshape(-1, *slice_shapes[k]) for f in factors])
            for k in range(4)]

  def join(trees: list[PyTree]) -> PyTree:
    flat = [jax.tree.map(lambda x, batch=len(pair.batch_shape):
                         x.astype(dtype).reshape(-1, *x.shape[batch:]), tree)
            for tree, pair in zip(trees, pairs)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *flat)

  state, extra = join(states), join(extras)
  if joined[0].shape[0] == 1:  # batched matrix products are slower on CPU; avoid vmap
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    out = jax.tree.map(lambda x: x[None], slice_update(
        *first(joined), first(state), first(extra), count))
  else:
    out = jax.vmap(slice_update, in_axes=(0,) * 6 + (None,))(*joined, state, extra, count)
  sizes = [math.prod(pair.batch_shape) for pair in pairs]
  return [
      jax.tree.map(lambda x, start=start, size=size, batch=pair.batch_shape:
                   x[start:start + size].reshape(*batch, *x.shape[1:]), out)
      for pair, size, start in zip(pairs, sizes, itertools.accumulate([0, *sizes]))
  ]


Solved = dict[str, tuple[Array, Array, PyTree]]
"""``(delta_a, delta_b, state)`` per pair key, the deltas shaped like the factors' gradients."""


def _solve_chunk(slice_update: SliceUpdate, chunk: list[list[_Member]],
                 states: Mapping[str, PyTree], extras: Mapping[str, PyTree],
                 count: Array) -> Solved:
  """Every group of ``chunk``, each with :func:`_solve_group`."""
  solved = {}
  for members in chunk:
    pairs = [member.pair for member in members]
    outs = _solve_group(slice_update, pairs, [member.factors for member in members],
                        [states[pair.key] for pair in pairs],
                        [extras.get(pair.key) for pair in pairs], count)
    for member, (delta_a, delta_b, new_state) in zip(members, outs):
      grad_a, grad_b = member.factors[2:]
      # The state keeps its dtype, whatever the rule computed in.
      solved[member.pair.key] = (
          delta_a.reshape(grad_a.shape).astype(grad_a.dtype),
          delta_b.reshape(grad_b.shape).astype(grad_b.dtype),
          jax.tree.map(lambda new, old: new.astype(old.dtype), new_state,
                       states[member.pair.key]))
  return solved


def _skip_chunk(chunk: list[list[_Member]], states: Mapping[str, PyTree]) -> Solved:
  """:func:`_solve_chunk`'s result for the branch never taken: zero updates, states unchanged."""
  return {member.pair.key: (jnp.zeros_like(member.factors[2]),
                            jnp.zeros_like(member.factors[3]), states[member.pair.key])
          for members in chunk for member in members}


def pairwise_transformation(
    name: str,
    slice_init: SliceInit,
    slice_update: SliceUpdate,
    *,
    fallback: optax.GradientTransformation,
    pairing: PairingRule | None = None,
    pair_extras: PairExtras | None = None,
    state_type: Callable[..., NamedTuple] = PairwiseState,
    join_layers_above: int | None = 0,
    chunk_bytes: int | None = None,
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
    join_layers_above: solve the same projection of every unscanned layer
      in one ``vmap`` when more than this many pairs would otherwise be
      solved together, in one chunk or, without chunks, in the whole update
      (``None``: never). XLA compiles the pairs solved together as one
      program, in time growing with the square of their number, and joining
      keeps that number flat in depth for rules with ``r × r`` algebra.
      Joining copies the pairs' inputs and state, though, so it costs time
      on every step, and an element-wise rule, cheap to compile and
      memory-bound, is faster without it.
    chunk_bytes: solve the groups (pairs, or joined projections) in chunks of
      about this many bytes of factors, gradients and state (in the compute
      dtype), one chunk after another; ``None`` for all at once. XLA runs
      independent groups side by side and keeps all their temporaries live,
      so a rule with several ``(m, r)`` temporaries per slice needs
      temporary memory growing with depth, and on CPU, which allocates the
      temporaries afresh on every call once they pass a few tens of MiB,
      time growing faster than depth. In chunks, one chunk's temporaries
      are live at a time, while the groups within a chunk still overlap.
      A joined group larger than a chunk is split into chunk-sized groups.
      Each chunk is a ``lax.cond``, which XLA runs as a unit and compiles on
      its own, whose predicate is always true but computed from the
      previous chunk's results (one element, gathered when sharded).

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
    members = []
    for pair in pairs.pairs:
      factors = tuple(leaves[i] for leaves in (param_leaves, grad_leaves)
                      for i in (pair.a_index, pair.b_index))
      members.append(_Member(pair, factors, _input_bytes(factors, state.pairs[pair.key])))
    chunks = _layout(members, _own_key, extras, chunk_bytes)
    if (join_layers_above is not None
        and max(sum(map(len, chunk)) for chunk in chunks) > join_layers_above):
      chunks = _layout(members, _group_key, extras, chunk_bytes)
    # Traced once per slice shape instead of once per pair. XLA inlines the calls, so
    # it compiles the same program (32 layers of 7B shapes lower in 1.0 s, not 7.6).
    rule = jax.jit(slice_update)
    solved, done = {}, state.count.astype(jnp.float32)
    for chunk in chunks:
      solve = functools.partial(_solve_chunk, rule, chunk, state.pairs, extras, state.count)
      if len(chunks) == 1:
        solved.update(solve())
        continue
      # XLA runs a conditional as a unit, and this predicate exists only once the
      # previous chunk's conditional has finished (see ``chunk_bytes``).
      out = jax.lax.cond(_true_after(done), solve,
                         functools.partial(_skip_chunk, chunk, state.pairs))
      done = next((x.ravel()[0].astype(jnp.float32) for x in jax.tree.leaves(out) if x.size),
                  done)
      solved.update(out)
    new_pairs = {}
    for pair in pairs.pairs:
      delta_a, delta_b, new_pairs[pair.key] = solved[pair.key]
      new_leaves[pair.a_index], new_leaves[pair.b_index] = delta_a, delta_b
    return jax.tree_util.tree_unflatten(treedef, new_leaves), state_type(
        count=optax.safe_increment(state.count), pairs=new_pairs,
        fallback=new_fallback)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
