"""Sharding annotations for an ``nnx.Optimizer``'s state.

With ``flax.nnx``, sharding lives in the Variables' ``out_sharding``
metadata (``nnx.with_partitioning``, ``a_metadata=`` of ``nnx.LoRA``).
``nnx.Optimizer`` copies it onto the state leaves it makes from Variables
(Adam's ``mu``/``nu``), but AdaPreLoRA's buffers are plain arrays, so they
come out unannotated and replicated. :func:`annotate_opt_state` gives them the
annotations :func:`~adaprelora_jax.state_shardings` derives, and, under Flax's
eager sharding, shards them there, as Flax does for the Variables it creates::

  with jax.set_mesh(mesh):
    optimizer = nnx.Optimizer(model, adaprelora(1e-3), wrt=nnx.LoRAParam)
    annotate_opt_state(optimizer, model)
  # nnx.get_partition_spec(nnx.state(optimizer)) now splits v_row like A
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec

from adaprelora_jax._src.pairing import PairingRule
from adaprelora_jax._src.sharding import state_shardings


def annotate_opt_state(
    optimizer: nnx.Optimizer, model: nnx.Module, *, pairing: PairingRule | None = None
) -> None:
  """Annotates ``optimizer``'s state with the shardings of ``model``'s params.

  Every state leaf without ``out_sharding`` metadata (AdaPreLoRA's buffers and
  counts) gets the :class:`~jax.sharding.PartitionSpec` that
  :func:`state_shardings` derives from ``nnx.get_partition_spec`` of the
  params ``optimizer`` trains, so ``nnx.get_partition_spec`` and
  ``nnx.get_named_sharding`` of the optimizer's state follow the params.
  Leaves with eager sharding on (Flax's default) are also sharded at once, on
  the params' ``mesh`` metadata if they agree on one, else on the current
  mesh: call it where the optimizer is made. Logical axis names are resolved
  by the rules in effect now.

  Example::

    with jax.set_mesh(mesh):
      model = Model(rngs=nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, adaprelora(1e-3), wrt=nnx.LoRAParam)
      annotate_opt_state(optimizer, model)

  Args:
    optimizer: an ``nnx.Optimizer`` over ``model``; works inside ``nnx.jit``
      and ``nnx.eval_shape`` too.
    model: the module ``optimizer`` was made for.
    pairing: the pairing rule given to the optimizer, if any.
  """
  params = nnx.state(model, optimizer.wrt)
  specs = state_shardings(
      optimizer.tx, _values(params), _values(nnx.get_partition_spec(params)), pairing=pairing
  )
  meshes = {v.get_metadata().get("mesh") for v in jax.tree.leaves(params, is_leaf=_is_variable)}
  meshes.discard(None)
  mesh = meshes.pop() if len(meshes) == 1 else None

  def annotate(leaf: nnx.Variable, spec: Any) -> None:
    # Skips leaves that already carry an annotation, and MaskedNode leaves.
    if not isinstance(spec, PartitionSpec) or leaf.get_metadata().get("out_sharding"):
      return
    leaf.set_metadata(out_sharding=tuple(spec))
    if leaf.get_metadata().get("eager_sharding"):
      leaf.set_value(spmd.shard_value(leaf.get_value(), spec, None, mesh))

  jax.tree.map(annotate, optimizer.opt_state, specs, is_leaf=_is_variable)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _values(tree: Any) -> Any:
  """``tree`` with each ``Variable`` replaced by its value (``nnx.pure``, renamed across Flax releases)."""
  return jax.tree.map(lambda v: v.get_value() if _is_variable(v) else v, tree, is_leaf=_is_variable)
