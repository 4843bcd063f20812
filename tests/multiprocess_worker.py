"""One host of the 2-process SPMD run in ``test_multiprocess.py``.

Started as ``python multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT``
with ``--xla_force_host_platform_device_count=4`` in ``XLA_FLAGS``: each
process joins ``jax.distributed`` on ``localhost:PORT`` and owns 4 of the
mesh's devices, as one host of a pod owns its chips. Every process runs the
same program; the README section "On many hosts" shows its core.

For ``optax`` (toy_lora's pairs with ``state_shardings``) and for
``nnx.Optimizer`` (test_nnx_sharding's model with ``annotate_opt_state``)
each process:

1. builds the state on a ``("data", "model")`` mesh whose ``data`` axis
   spans the processes;
2. trains ``SAVED_AT`` steps, each on this process's rows of the batch;
3. saves params and optimizer state with Orbax into one checkpoint
   directory shared by all processes;
4. trains on to ``STEPS`` ("straight"), then restores the checkpoint into a
   fresh model and optimizer with ``restore_state`` and trains the same
   steps again ("resumed").

It asserts in place that every state leaf is split as its sharding says,
from ``addressable_shards``, and that the resumed run equals the straight
one bit for bit; process 0 writes the straight run's global arrays to
``OUT/<kind>.npz`` for the test to compare with one process.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import test_nnx_sharding as models
import toy_lora
from adaprelora_jax import adaprelora, state_shardings
from adaprelora_jax.flax import annotate_opt_state
from adaprelora_jax import restore_state

STEPS, SAVED_AT = 5, 2
pure = getattr(nnx, "as_pure", None) or nnx.pure  # Flax renamed it; pure warns in newer ones
ROWS = 16  # global batch rows, split over the processes by the 'data' axis


def main(port: int, process_id: int, num_processes: int, out: str) -> None:
  if "jax_cpu_collectives_implementation" in jax.config.values:  # gone once gloo is the only one
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60)
  assert jax.process_count() == num_processes, jax.process_count()
  mesh = _mesh()
  start = time.perf_counter()
  _optax_run(mesh, out)
  print(f"process {process_id}: optax run {time.perf_counter() - start:.1f} s", flush=True)
  start = time.perf_counter()
  _nnx_run(mesh, out)
  print(f"process {process_id}: nnx run {time.perf_counter() - start:.1f} s", flush=True)


def _mesh() -> jax.sharding.Mesh:
  mesh = jax.make_mesh((jax.process_count(), jax.local_device_count()),
                       ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  # One row of the mesh per process: each host feeds its own rows of a batch.
  rows = [{d.process_index for d in row} for row in mesh.devices]
  assert rows == [{p} for p in range(jax.process_count())], rows
  return mesh


def _local_batch(mesh, x, y):
  """Global arrays from this process's rows of the batch ``(x, y)``."""
  data = NamedSharding(mesh, P("data", None))
  rows = slice(jax.process_index() * ROWS // jax.process_count(),
               (jax.process_index() + 1) * ROWS // jax.process_count())
  return tuple(jax.make_array_from_process_local_data(data, a[rows])
               for a in (x, y))


def _global(tree, shardings):
  """Global arrays from a tree of host values that every process holds in full."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
      tree, shardings)


def _check_split(tree, shardings) -> int:
  """Asserts each leaf of ``tree`` holds here exactly the blocks ``shardings`` names.

  Computed from ``addressable_shards``: every shard has the block shape the
  spec gives, and a leaf split on ``data`` keeps ``1 / process_count`` of its
  entries in this process, any other all of them. Returns how many leaves
  are split across processes.
  """
  across = 0
  for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(tree),
                                jax.tree.leaves(shardings)):
    name = jax.tree_util.keystr(path)
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (name, leaf.sharding, want)
    entries = (*want.spec, *(None,) * (leaf.ndim - len(want.spec)))
    axes = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries]
    block = tuple(n // math.prod(want.mesh.shape[a] for a in ax)
                  for n, ax in zip(leaf.shape, axes))
    blocks = {tuple((s.start, s.stop) for s in shard.index): shard.data.shape
              for shard in leaf.addressable_shards}
    assert set(blocks.values()) == {block}, (name, want.spec, blocks, block)
    held = len(blocks) * math.prod(block)
    if any("data" in ax for ax in axes):
      assert held * jax.process_count() == leaf.size, (name, want.spec, held)
      across += 1
    else:
      assert held == leaf.size, (name, want.spec, held)
  return across


def _assert_bit_identical(got, want, what: str) -> None:
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    assert g.sharding.is_equivalent_to(w.sharding, g.ndim), (what, jax.tree_util.keystr(path))
    for gs, ws in zip(g.addressable_shards, w.addressable_shards):
      assert gs.index == ws.index
      np.testing.assert_array_equal(gs.data, ws.data, err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _report(out: str, kind: str, **fields) -> None:
  path = os.path.join(out, f"process_{jax.process_index()}.json")
  report = json.load(open(path)) if os.path.exists(path) else {}
  report[kind] = fields
  with open(path, "w") as f:
    json.dump(report, f)


def _save_gathered(tree, path: str) -> None:
  """Writes the global arrays of ``tree`` (keyed by path) from process 0."""
  gathered = multihost_utils.process_allgather(tree, tiled=True)
  if jax.process_index() == 0:
    np.savez(path, **{jax.tree_util.keystr(p): np.asarray(x)
                      for p, x in jax.tree_util.tree_leaves_with_path(gathered)})


def _optax_run(mesh, out: str) -> None:
  def optimizer():
    return adaprelora(1e-2, b1=0.9, weight_decay=0.01)

  tx = optimizer()
  param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), toy_lora.specs())
  params = _global(toy_lora.params(), param_shardings)  # same values on every host
  opt_shardings = state_shardings(tx, params, param_shardings)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  step = jax.jit(toy_lora.train_step(tx), out_shardings=(param_shardings, opt_shardings))
  for t in range(SAVED_AT):
    x, y = _local_batch(mesh, *toy_lora.batch(t))  # this host's rows only
    params, opt_state = step(params, opt_state, x, y)

  directory = os.path.join(out, "optax_checkpoint")  # one directory, all hosts
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), params)
  checkpointer.save(os.path.join(directory, "opt_state"), opt_state)
  checkpointer.wait_until_finished()

  fresh = optimizer()  # e.g. after a restart, on every host
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        params)
  restored_params = checkpointer.restore(os.path.join(directory, "params"), target)
  restored_state = restore_state(os.path.join(directory, "opt_state"), fresh,
                                 restored_params, state_shardings(fresh, params, param_shardings))
  saved = (params, opt_state)
  split = _check_split(saved, (param_shardings, opt_shardings))
  _assert_bit_identical((restored_params, restored_state), saved, "restored")

  # The optimizer is pure, so ``step`` (compiled once, to keep the test short)
  # is the program a restarted host would compile from ``fresh``.
  resumed = (restored_params, restored_state)
  straight = saved
  for t in range(SAVED_AT, STEPS):
    x, y = _local_batch(mesh, *toy_lora.batch(t))
    straight = step(*straight, x, y)
    resumed = step(*resumed, x, y)
  _check_split(straight, (param_shardings, opt_shardings))
  _assert_bit_identical(resumed, straight, "resumed")
  _report(out, "optax", split_across_processes=split, resumed_bit_identical=True)
  _save_gathered(straight, os.path.join(out, "optax.npz"))


def _nnx_run(mesh, out: str) -> None:
  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss = lambda model: jnp.mean((model(x) - y) ** 2)
    optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, models.WRT))(model))
    for node in (model, optimizer):
      state = nnx.state(node)
      nnx.update(node, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))

  tx = adaprelora(1e-2, b1=0.9)

  @nnx.jit
  def create_sharded():
    model = models.Model(rngs=nnx.Rngs(0))
    # A fresh Optimizer over the same pure tx: nnx.jit then reuses the compiled step.
    optimizer = nnx.Optimizer(model, tx, wrt=models.WRT)
    annotate_opt_state(optimizer, model)
    for node in (model, optimizer):
      state = nnx.state(node)
      nnx.update(node, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
    return model, optimizer

  def create():
    with jax.set_mesh(mesh):  # one program makes every host's blocks
      return create_sharded()

  def values(optimizer):
    return jax.tree.map(lambda v: v.get_value(), optimizer.opt_state, is_leaf=_is_variable)

  def run(model, optimizer, steps):
    for t in steps:
      x, y = _local_batch(mesh, *models._batch(t))
      with jax.set_mesh(mesh):
        train_step(model, optimizer, x, y)

  model, optimizer = create()
  run(model, optimizer, range(SAVED_AT))
  directory = os.path.join(out, "nnx_checkpoint")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "model"), nnx.state(model))
  checkpointer.save(os.path.join(directory, "opt_state"), values(optimizer))
  checkpointer.save(os.path.join(directory, "step"), {"step": optimizer.step.get_value()})
  checkpointer.wait_until_finished()

  fresh_model, fresh = create()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          nnx.state(fresh_model))
  nnx.update(fresh_model, checkpointer.restore(os.path.join(directory, "model"), abstract))
  params = pure(nnx.state(fresh_model, models.WRT))
  shardings = state_shardings(fresh.tx, params, jax.tree.map(lambda x: x.sharding, params))
  split = _check_split(values(optimizer), shardings)
  restored = restore_state(os.path.join(directory, "opt_state"), fresh.tx, params, shardings)
  jax.tree.map(lambda v, x: v.set_value(x), fresh.opt_state, restored, is_leaf=_is_variable)
  step = checkpointer.restore(os.path.join(directory, "step"))["step"]
  fresh.step.set_value(step)
  _assert_bit_identical(values(fresh), values(optimizer), "restored")

  run(model, optimizer, range(SAVED_AT, STEPS))
  run(fresh_model, fresh, range(SAVED_AT, STEPS))
  _check_split(values(optimizer), shardings)
  _assert_bit_identical(values(fresh), values(optimizer), "resumed")
  _assert_bit_identical(pure(nnx.state(fresh_model)), pure(nnx.state(model)),
                        "resumed model")
  _report(out, "nnx", split_across_processes=split, resumed_bit_identical=True)
  _save_gathered({"model": pure(nnx.state(model, models.WRT)),
                  "optimizer": pure(nnx.state(optimizer))},
                 os.path.join(out, "nnx.npz"))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
