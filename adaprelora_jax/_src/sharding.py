"""Shardings of the optimizer state, derived from the parameters' shardings.

Under ``jax.jit`` with a device mesh, the optimizer state needs shardings of its
own: for ``jax.jit(tx.init, out_shardings=...)``, for a training step's
``out_shardings`` and for restoring a checkpoint onto the mesh.
:func:`state_shardings` derives them from the params' shardings, so that every
buffer is split along the same mesh axes as the parameter it belongs to:

==================================  =============================================
state leaf                          sharded like
==================================  =============================================
``v_row (*batch, m)``               ``A``'s batch axes, then ``A``'s in axes
``v_col (*batch, n)``               ``B``'s batch axes, then ``B``'s out axes
``mu_a (*batch, m, r)``             ``A``, in axes flattened
``mu_b (*batch, r, n)``             ``B``, out axes flattened
``counts`` ``(*batch,)``              the batch axes both factors agree on
``count``, scalars                  replicated
fallback buffers (Adam ``mu/nu``)   the parameter they mirror
==================================  =============================================

N-D factors are stored flattened: ``m = prod(in_axes)``, ``n = prod(out_axes)``.
The flattened axis keeps a sharding only when at most the *first* of the
axes it merges is sharded: a row-major reshape turns contiguous blocks of the
first axis into contiguous blocks of the merged axis, but a sharded inner axis
becomes a strided pattern that no ``PartitionSpec`` describes. Such an axis is
replicated in the state, which costs ``(m + n) r`` floats per batch slice at
most, never an ``m × n`` array.

The state is walked generically, so the helper works for
:func:`~adaprelora_jax.adaprelora` and for any Optax wrapper around it
(``chain``, ``inject_hyperparams``, ``MultiSteps``, ``masked``):

* in each :class:`~adaprelora_jax._src.pairwise.PairwiseState` (AdaPreLoRA's and
  every baseline's), each per-pair buffer follows the axes its state
  declares (``axes()``: ``"m"``, ``"n"`` or ``"r"`` after the batch axes),
  as in the table above; a buffer with ``"m"`` takes ``A``'s batch and rank
  entries, one with ``"n"`` ``B``'s, and an ``r × r`` or scalar buffer the
  entries both factors agree on;
* every other leaf takes the sharding of a parameter of the same shape whose
  path ends its own path (Optax's ``mu['head']['kernel']`` mirrors
  ``params['head']['kernel']``), else of the parameters of its shape if they
  all agree, else it is replicated.

With ``flax.nnx``, sharding lives in the Variables' ``out_sharding``
metadata instead; :func:`adaprelora_jax.flax.annotate_opt_state` annotates the
optimizer's state from it with the shardings derived here.

The update itself is written for sharding propagation: use mesh axes of type
``AxisType.Auto``. ``jax.make_mesh`` makes ``Explicit`` axes by default, under
which JAX refuses to type the update's products over sharded axes; there,
wrap the training step in ``jax.sharding.auto_axes(step, out_sharding=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from adaprelora_jax._src.base import Axes, PyTree
from adaprelora_jax._src.pairing import LoRAPair, PairingRule, lora_pairs, path_names
from adaprelora_jax._src.pairwise import PairwiseState

Entry = Any  # one PartitionSpec entry: None, a mesh axis name, or a tuple of them
Entries = tuple[Entry, ...]

_PAIR_NODES = (PairwiseState,)


def state_shardings(
    tx: optax.GradientTransformation,
    params: PyTree,
    param_shardings: PyTree,
    *,
    pairing: PairingRule | None = None,
) -> PyTree:
  """The shardings of ``tx.init(params)``, derived from the params' shardings.

  Example::

    shardings = state_shardings(tx, params, param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
    step = jax.jit(train_step, out_shardings=(param_shardings, shardings))

  Args:
    tx: the optimizer, e.g. ``adaprelora(...)``, possibly wrapped in other
      Optax transformations.
    params: the parameters, as arrays or ``jax.ShapeDtypeStruct``.
    param_shardings: a tree like ``params`` of ``NamedSharding`` (all on one
      mesh) or of ``PartitionSpec``.
    pairing: the pairing rule given to the optimizer, if any.

  Returns:
    A tree with the structure of ``jax.eval_shape(tx.init, params)``, holding
    a sharding of the same kind as ``param_shardings`` per leaf (see the
    module docstring for the rules).

  Raises:
    ValueError: if ``param_shardings`` does not match ``params``, mixes meshes
      or kinds, or if the state holds a LoRA pair that ``params`` lacks (for
      example because the optimizer has a custom ``pairing`` rule).
  """
  abstract = jax.eval_shape(tx.init, params)
  flat_params, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    given = treedef.flatten_up_to(param_shardings)
  except (ValueError, TypeError) as e:
    raise ValueError("param_shardings must have the structure of params "
                     f"({treedef}).") from e
  names = [path_names(path) for path, _ in flat_params]
  shapes = [tuple(leaf.shape) for _, leaf in flat_params]
  make = _spec_maker(names, given)
  specs = [_padded(_spec_of(s), len(shape)) for s, shape in zip(given, shapes)]
  pairs = {p.key: p for p in lora_pairs(params, pairing).pairs}

  def like_param(leaf_names: tuple[str, ...], shape: tuple[int, ...]) -> Any:
    """The sharding of the parameter this leaf mirrors, or replicated."""
    same_shape = [i for i, s in enumerate(shapes) if s == shape]
    mirrors = [i for i in same_shape
               if len(names[i]) <= len(leaf_names)
               and leaf_names[len(leaf_names) - len(names[i]):] == names[i]]
    if mirrors:
      return given[max(mirrors, key=lambda i: len(names[i]))]
    if same_shape and len({specs[i] for i in same_shape}) == 1:
      return given[same_shape[0]]
    return make(())

  def pair_node(node_names: tuple[str, ...], node: Any) -> Any:
    per_pair, per_pair_counts = {}, {}
    for key, pair_state in node.pairs.items():
      if key not in pairs:
        raise ValueError(
            f"the state at {'/'.join(node_names) or '<root>'} holds LoRA pair "
            f"{key!r}, but params have the pairs {sorted(pairs)}; pass the "
            "optimizer's pairing rule as pairing=.")
      pair = pairs[key]
      if jax.tree.leaves(pair_state) and not hasattr(pair_state, "axes"):
        raise ValueError(
            f"the state of LoRA pair {key!r} ({type(pair_state).__name__}) declares no axes: "
            "give the slice update's state NamedTuple an axes() method naming each buffer's axes "
            "after the batch axes ('m', 'n' or 'r').")
      axes = _PairAxes(pair, specs[pair.a_index], specs[pair.b_index])
      per_pair[key] = axes.shardings(pair_state, make)
      per_pair_counts[key] = axes.shardings(node.counts[key], make)
    return node._replace(count=make(()), pairs=per_pair, counts=per_pair_counts,
                         fallback=walk(node.fallback, (*node_names, "fallback")))

  def walk(tree: PyTree, prefix: tuple[str, ...]) -> PyTree:
    def visit(path, x):
      leaf_names = (*prefix, *path_names(path))
      if isinstance(x, _PAIR_NODES):
        return pair_node(leaf_names, x)
      return like_param(leaf_names, tuple(x.shape))
    return jax.tree_util.tree_map_with_path(
        visit, tree, is_leaf=lambda x: isinstance(x, _PAIR_NODES))

  return walk(abstract, ())


def _spec_maker(names: Sequence[tuple[str, ...]], given: Sequence[Any]
                ) -> Callable[[Entries], Any]:
  """``entries -> sharding`` of the kind ``param_shardings`` uses."""
  named = [isinstance(s, NamedSharding) for s in given]
  for i, s in enumerate(given):
    if not isinstance(s, (NamedSharding, PartitionSpec)):
      raise ValueError(
          f"param_shardings at {'/'.join(names[i])} is {s!r}; expected a "
          "jax.sharding.NamedSharding or a PartitionSpec.")
    if named[i] != named[0]:
      raise ValueError(
          f"param_shardings mixes NamedSharding and PartitionSpec: "
          f"{'/'.join(names[0])} has {type(given[0]).__name__}, "
          f"{'/'.join(names[i])} has {type(s).__name__}.")
  if not given or not named[0]:
    return lambda entries: PartitionSpec(*entries)
  mesh = given[0].mesh
  for i, s in enumerate(given):
    if s.mesh != mesh:
      raise ValueError(
          f"param_shardings use more than one mesh: {'/'.join(names[0])} is "
          f"on {mesh}, {'/'.join(names[i])} on {s.mesh}.")
  return lambda entries: NamedSharding(mesh, PartitionSpec(*entries))


def _spec_of(sharding: NamedSharding | PartitionSpec) -> PartitionSpec:
  return sharding.spec if isinstance(sharding, NamedSharding) else sharding


def _padded(spec: PartitionSpec, ndim: int) -> Entries:
  """One entry per axis: a ``PartitionSpec`` may leave trailing axes out."""
  return (*spec, *(None,) * (ndim - len(spec)))


def _merged(entries: Entries) -> Entry:
  """The entry of the row-major merge of axes: the first's, if no other is split."""
  return None if any(e is not None for e in entries[1:]) else entries[0]


def _mesh_axes(entry: Entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _without_reuse(entries: Entries) -> Entries:
  """Drops entries that reuse a mesh axis (a spec may use each axis once)."""
  used: set[str] = set()
  out = []
  for entry in entries:
    axes = set(_mesh_axes(entry))
    if axes & used:
      out.append(None)
    else:
      out.append(entry)
      used |= axes
  return tuple(out)


def _agreed(x: Entry, y: Entry) -> Entry:
  return x if x == y else None


class _PairAxes:
  """The entries of one pair's matrix axes: batch, ``m``, ``n`` and the rank."""

  def __init__(self, pair: LoRAPair, a: Entries, b: Entries):
    k = len(pair.batch_shape)
    self.a_batch, self.b_batch = a[:k], b[:k]
    self.row = _merged(a[k:-1])
    self.col = _merged(b[k + 1:])
    self.a_rank, self.b_rank = a[-1], b[k]

  def shardings(self, pair_state: PyTree, make: Callable[[Entries], Any]
                ) -> PyTree:
    """A sharding per leaf of the pair's state, from the axes it declares."""
    if not jax.tree.leaves(pair_state):
      return pair_state
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(e, str) for e in x)
    axes, treedef = jax.tree.flatten(pair_state.axes(), is_leaf=is_axes)
    return jax.tree.unflatten(treedef, [make(self._entries(a)) for a in axes])

  def _entries(self, axes: Axes) -> Entries:
    """The entries of a ``(*batch, *axes)`` buffer."""
    if "m" in axes and "n" not in axes:
      batch, rank = self.a_batch, self.a_rank
    elif "n" in axes and "m" not in axes:
      batch, rank = self.b_batch, self.b_rank
    else:
      batch = tuple(map(_agreed, self.a_batch, self.b_batch))
      rank = _agreed(self.a_rank, self.b_rank)
    entry = {"m": self.row, "n": self.col, "r": rank}
    return _without_reuse((*batch, *(entry[axis] for axis in axes)))
