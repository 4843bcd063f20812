"""The plumbing all LoRA-pair optimizers here share: a per-slice update to an Optax transformation.

An optimizer of this family is an update of one *slice*, a matrix pair
``A (m, r)``, ``B (r, n)`` with its factor gradients and a small state, plus
this module:

* :func:`~adaprelora_jax.lora_pairs` finds the pairs;
* each pair's factors are read as matrices (N-D factors flattened); its
  leading batch axes (stacked layers, experts) and the pairs a
  :class:`~adaprelora_jax.Layout` groups are solved with one ``vmap``;
* the slice update computes in float32, or wider if the factors are; the state keeps
  its dtype;
* every other leaf goes to a fallback transformation;
* a slice whose inputs or results are not all finite steps by zero and keeps
  its state; each slice counts its applied and its skipped steps
  (:class:`SliceCounts`, read with :func:`skipped_steps`), and its update
  sees its own applied-step count, so a slice resumed after skips steps as a
  fresh one would;
* the update checks the trees and the state and names the offending leaves.

The state of a pair is the slice update's state with the pair's batch axes
in front, so a ``(*batch, m, r)`` buffer lines up with ``A``'s axes. Its
NamedTuple declares each buffer's axes (an ``axes()`` method), which
:mod:`adaprelora_jax._src.sharding` reads.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax._src.base import Array, PyTree, compute_dtype
from adaprelora_jax._src.layout import JOINED, Layout, Member, input_bytes, plan
from adaprelora_jax._src.pairing import LoRAPair, LoRAPairing, PairingRule, lora_pairs, path_names
from adaprelora_jax._src.solver_batching import batch_solves


class SliceInit(Protocol):
  def __call__(self, m: int, n: int, rank: int, dtype: jnp.dtype) -> PyTree:
    """The state of one ``(m, r)`` / ``(r, n)`` slice."""


class SliceUpdate(Protocol):
  def __call__(self, a: Array, b: Array, grad_a: Array, grad_b: Array,
               state: PyTree, extra: PyTree, count: Array
               ) -> tuple[Array, Array, PyTree]:
    """``(delta_a, delta_b, new_state)`` for one slice that has taken ``count`` steps.

    A slice update asks for the step to be skipped (and counted) by returning a
    non-finite result.
    """


PairExtras = Callable[[LoRAPairing, Mapping[str, Any]], Mapping[str, PyTree]]
"""Per-pair extra inputs (with the pair's batch axes) from ``update``'s extra arguments."""


class SliceCounts(NamedTuple):
  """Steps of each batch slice of a pair, int32 arrays of the pair's batch shape.

  Attributes:
    applied: steps the slice took: its update's step number (decays, bias
      corrections).
    skipped: steps it skipped because an input or a result was not finite
      (as ``optax.apply_if_finite`` counts ``notfinite_count``).
  """

  applied: Array
  skipped: Array

  def axes(self) -> SliceCounts:
    """No axes after the batch axes, for :mod:`adaprelora_jax._src.sharding`."""
    return SliceCounts((), ())


class PairwiseState(NamedTuple):
  """State of a transformation built by :func:`pairwise_transformation`.

  Attributes:
    count: number of updates so far, int32.
    pairs: the slice update's state per LoRA pair, keyed by the pair key.
    counts: each pair's :class:`SliceCounts`, keyed by the pair key.
    fallback: the fallback transformation's state (non-LoRA leaves).
  """

  count: Array
  pairs: dict[str, PyTree]
  counts: dict[str, SliceCounts]
  fallback: optax.OptState


def skipped_steps(state: optax.OptState) -> dict[str, Array]:
  """How many steps each LoRA pair's slices skipped, keyed by the pair key.

  ``state`` is the state of any optimizer of this family, alone or inside
  Optax wrappers (``chain``, ``inject_hyperparams``, ``MultiSteps``). Each
  value has the pair's batch shape (``()`` for an unstacked pair). A slice
  skips a step, and keeps its state, when its factors, gradients or
  statistics, or its computed step or state, are not finite.

  Raises:
    ValueError: if ``state`` holds no optimizer of this family.
  """
  nodes = [node for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, PairwiseState))
           if isinstance(node, PairwiseState)]
  if not nodes:
    raise ValueError(f"skipped_steps: the state ({type(state).__name__}) holds no "
                     "PairwiseState; pass the state of adaprelora, scale_by_adaprelora or a "
                     "baseline of adaprelora_jax.baselines, alone or in Optax wrappers.")
  return {key: counts.skipped for node in nodes for key, counts in node.counts.items()}


def _pair_dtype(leaves: list[Any], pair: LoRAPair) -> jnp.dtype:
  return compute_dtype(leaves[pair.a_index].dtype, leaves[pair.b_index].dtype)


def _per_slice(pair: LoRAPair, per_slice: PyTree) -> PyTree:
  # A copy per leaf: the same buffer twice in a state cannot be donated to a jitted step.
  return jax.tree.map(
      lambda x: jnp.array(jnp.broadcast_to(x, (*pair.batch_shape, *x.shape)), copy=True),
      per_slice)


def _pair_state(slice_init: SliceInit, pair: LoRAPair, dtype) -> PyTree:
  return _per_slice(pair, slice_init(pair.m, pair.n, pair.rank, dtype))


def _zero_counts(pair: LoRAPair) -> SliceCounts:
  zero = jnp.zeros([], jnp.int32)
  return _per_slice(pair, SliceCounts(zero, zero))


def _first_difference(got: Any, want: Any) -> str:
  """The first leaf path at which two pytrees' structures differ, and how."""
  got_paths = [path_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(got)]
  want_paths = [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      jax.tree_util.tree_unflatten(want, [0] * want.num_leaves))[0]]
  for g, w in itertools.zip_longest(got_paths, want_paths):
    if g != w:
      if w is None or (g is not None and g not in want_paths):
        return f"the updates have {'/'.join(g)}, which the params lack"
      return f"the params have {'/'.join(w)}, which the updates lack"
  return "the paths agree but the node types differ"


def check_updates(name: str, pairing: LoRAPairing, updates: Any, params: Any) -> None:
  """Raises a clear error if ``updates`` does not match ``params`` leaf by leaf."""
  flat_updates, tree_updates = jax.tree_util.tree_flatten_with_path(updates)
  if tree_updates != pairing.treedef:
    raise ValueError(f"{name}: the updates tree does not match the params tree: "
                     f"{_first_difference(updates, pairing.treedef)}.")
  flat_params = jax.tree_util.tree_leaves_with_path(params)
  for (path, u), (_, p) in zip(flat_updates, flat_params):
    if u.shape != p.shape:
      raise ValueError(
          f"{name}: update at {jax.tree_util.keystr(path)} has shape {u.shape}, "
          f"but the parameter has shape {p.shape}.")


def check_state(name: str, slice_init: SliceInit, pairing: LoRAPairing,
                state: PairwiseState, params: Any) -> None:
  """Raises a clear error if the state was made for other pairs or shapes."""
  expected = {p.key: p for p in pairing.pairs}
  for field in ("pairs", "counts"):
    held = getattr(state, field)
    if set(held) != set(expected):
      raise ValueError(
          f"{name}: the state was initialised for other LoRA pairs. "
          f"Missing in state: {sorted(set(expected) - set(held))}; "
          f"unknown in params: {sorted(set(held) - set(expected))}.")
  leaves = jax.tree_util.tree_leaves(params)
  for key, pair in expected.items():
    want = jax.eval_shape(lambda: (
        _pair_state(slice_init, pair, _pair_dtype(leaves, pair)), _zero_counts(pair)))
    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(
        (state.pairs[key], state.counts[key]))
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


Solved = dict[str, tuple[Array, Array, PyTree, SliceCounts]]
"""``(delta_a, delta_b, state, counts)`` per pair key, the deltas shaped like the factors'
gradients."""


def _all_finite(*trees: PyTree) -> Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def _skipping(slice_update: SliceUpdate):
  """``slice_update`` that steps by zero, keeps the state and counts where a value is not finite."""

  def step(a, b, grad_a, grad_b, state, extra, counts: SliceCounts):
    delta_a, delta_b, new_state = slice_update(a, b, grad_a, grad_b, state, extra,
                                               counts.applied)
    ok = _all_finite(a, b, grad_a, grad_b, extra, delta_a, delta_b, new_state)
    keep = lambda new, old: jnp.where(ok, new, old)
    return (keep(delta_a, 0.0), keep(delta_b, 0.0), jax.tree.map(keep, new_state, state),
            SliceCounts(keep(optax.safe_increment(counts.applied), counts.applied),
                        keep(counts.skipped, optax.safe_increment(counts.skipped))))

  return step


def _solve_group(slice_update: SliceUpdate, group: list[Member], states: Mapping[str, PyTree],
                 counts: Mapping[str, SliceCounts], extras: Mapping[str, PyTree]) -> Solved:
  """Every batch slice of same-shaped pairs with one ``vmap``, results per pair."""
  pairs = [member.pair for member in group]
  dtype = compute_dtype(*(x.dtype for x in group[0].inputs))
  m, n, r = pairs[0].m, pairs[0].n, pairs[0].rank
  slice_shapes = ((m, r), (r, n), (m, r), (r, n))
  joined = [jnp.concatenate([member.inputs[k].astype(dtype).reshape(-1, *slice_shapes[k])
                             for member in group]) for k in range(4)]

  def join(trees: list[PyTree], as_dtype: bool = True) -> PyTree:
    flat = [jax.tree.map(lambda x, batch=len(pair.batch_shape):
                         x.astype(dtype if as_dtype else x.dtype).reshape(-1, *x.shape[batch:]),
                         tree)
            for tree, pair in zip(trees, pairs)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *flat)

  out = jax.vmap(slice_update)(
      *joined, join([states[p.key] for p in pairs]), join([extras.get(p.key) for p in pairs]),
      join([counts[p.key] for p in pairs], as_dtype=False))
  sizes = [math.prod(pair.batch_shape) for pair in pairs]
  solved = {}
  for member, size, start in zip(group, sizes, itertools.accumulate([0, *sizes])):
    delta_a, delta_b, state, slice_counts = jax.tree.map(
        lambda x, start=start, size=size, batch=member.pair.batch_shape:
        x[start:start + size].reshape(*batch, *x.shape[1:]), out)
    grad_a, grad_b = member.inputs[2:]
    solved[member.pair.key] = (
        delta_a.reshape(grad_a.shape).astype(grad_a.dtype),
        delta_b.reshape(grad_b.shape).astype(grad_b.dtype),
        jax.tree.map(lambda new, old: new.astype(old.dtype), state, states[member.pair.key]),
        slice_counts)
  return solved


def _solve_chunk(slice_update: SliceUpdate, chunk: list[list[Member]],
                 states: Mapping[str, PyTree], counts: Mapping[str, SliceCounts],
                 extras: Mapping[str, PyTree]) -> Solved:
  solved = {}
  for group in chunk:
    solved.update(_solve_group(slice_update, group, states, counts, extras))
  return solved


def _skip_chunk(chunk: list[list[Member]], states: Mapping[str, PyTree],
                counts: Mapping[str, SliceCounts]) -> Solved:
  """:func:`_solve_chunk`'s shapes for the branch never taken: zero updates, states unchanged."""
  return {member.pair.key: (jnp.zeros_like(member.inputs[2]), jnp.zeros_like(member.inputs[3]),
                            states[member.pair.key], counts[member.pair.key])
          for group in chunk for member in group}


def _true_after(x: Array) -> Array:
  """A ``True`` that XLA can only compute once ``x`` exists, and cannot fold (NaN included)."""
  return jnp.isnan(x).astype(jnp.float32) * 0.0 == 0.0


def pairwise_transformation(
    name: str,
    slice_init: SliceInit,
    slice_update: SliceUpdate,
    *,
    fallback: optax.GradientTransformation,
    pairing: PairingRule | None = None,
    pair_extras: PairExtras | None = None,
    layout: Layout = JOINED,
) -> optax.GradientTransformationExtraArgs:
  """An Optax transformation that applies a per-slice update to every LoRA pair.

  Args:
    name: the transformation's name, for error messages.
    slice_init: ``(m, n, r, dtype) -> state`` of one slice.
    slice_update: ``(a, b, grad_a, grad_b, state, extra, count) ->
      (delta_a, delta_b, state)`` for one slice; ``extra`` is the slice of
      what ``pair_extras`` returned for the pair, or ``None``.
    fallback: transformation for the leaves that are not LoRA factors.
    pairing: a rule naming LoRA factors (see :func:`lora_pairs`).
    pair_extras: maps ``update``'s extra keyword arguments to per-pair inputs.
    layout: which pairs are solved together (:mod:`adaprelora_jax._src.layout`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``.
  """

  def masked_fallback(pairs: LoRAPairing) -> optax.GradientTransformation:
    return optax.masked(fallback, pairs.fallback_mask())

  def init_fn(params):
    pairs = lora_pairs(params, pairing)
    leaves = jax.tree_util.tree_leaves(params)
    return PairwiseState(
        count=jnp.zeros([], jnp.int32),
        pairs={p.key: _pair_state(slice_init, p, _pair_dtype(leaves, p))
               for p in pairs.pairs},
        counts={p.key: _zero_counts(p) for p in pairs.pairs},
        fallback=masked_fallback(pairs).init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{name} needs the current params: call "
                       "update(grads, state, params).")
    pairs = lora_pairs(params, pairing)
    check_updates(name, pairs, updates, params)
    check_state(name, slice_init, pairs, state, params)
    extras = {} if pair_extras is None else pair_extras(pairs, extra_args)
    fallback_updates, new_fallback = masked_fallback(pairs).update(
        updates, state.fallback, params)
    new_leaves, treedef = jax.tree_util.tree_flatten(fallback_updates)
    grad_leaves = jax.tree_util.tree_leaves(updates)
    param_leaves = jax.tree_util.tree_leaves(params)
    members = []
    for pair in pairs.pairs:
      inputs = tuple(leaves[i] for leaves in (param_leaves, grad_leaves)
                     for i in (pair.a_index, pair.b_index))
      members.append(Member(pair, inputs, input_bytes(inputs, state.pairs[pair.key])))
    chunks = plan(layout, members, extras) if members else []
    # Traced once per slice shape instead of once per pair; XLA inlines the calls.
    jitted_update = jax.jit(_skipping(slice_update))
    solved, done = {}, state.count.astype(jnp.float32)
    for chunk in chunks:
      solve = functools.partial(_solve_chunk, jitted_update, chunk, state.pairs, state.counts,
                                extras)
      if len(chunks) == 1:
        # One solver call per stage for every role and layer (a chunk keeps its own).
        solved.update(batch_solves(solve)())
        continue
      # XLA runs a conditional as a unit, and this predicate exists only once the
      # previous chunk's conditional has finished.
      out = jax.lax.cond(_true_after(done), solve,
                         functools.partial(_skip_chunk, chunk, state.pairs, state.counts))
      done = next((x.ravel()[0].astype(jnp.float32) for x in jax.tree.leaves(out) if x.size),
                  done)
      solved.update(out)
    new_pairs, new_counts = {}, {}
    for pair in pairs.pairs:
      delta_a, delta_b, new_pairs[pair.key], new_counts[pair.key] = solved[pair.key]
      new_leaves[pair.a_index], new_leaves[pair.b_index] = delta_a, delta_b
    return jax.tree_util.tree_unflatten(treedef, new_leaves), PairwiseState(
        count=optax.safe_increment(state.count), pairs=new_pairs, counts=new_counts,
        fallback=new_fallback)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
