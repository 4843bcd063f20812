"""Orbax checkpoints of the optimizer state: exact resume, and clear mismatches.

Resuming is checked the strict way: N steps in one go must equal k steps,
a checkpoint, a restore in a *fresh process* and N - k more steps, bit for
bit, on one device and with the state sharded over 8 host CPU devices.
"""

import functools
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from adaprelora_jax import adaprelora
from adaprelora_jax import restore_state
from adaprelora_jax import state_shardings

import toy_lora
from isolated import run_isolated

STEPS, SAVED_AT = 5, 2


def _optimizer():
  return adaprelora(1e-2, b1=0.9, weight_decay=0.01)


def _run(step, params, state, steps, *, place=lambda x: x):
  for t in steps:
    params, state = step(params, state, *map(place, toy_lora.batch(t)))
  return params, state


def _save(path, tree, checkpointer):
  checkpointer.save(path, tree)
  if isinstance(checkpointer, ocp.AsyncCheckpointer):  # StandardCheckpointer
    checkpointer.wait_until_finished()


def _restore_params(path, shardings):
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        toy_lora.params(), shardings)
  return ocp.StandardCheckpointer().restore(path, target)


def _assert_equal_to_saved(tree, path):
  saved = np.load(path)
  leaves = jax.tree.leaves(tree)
  assert len(saved.files) == len(leaves)
  for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(leaf, saved[f"arr_{i}"])


@pytest.mark.slow  # a fresh Python process
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
  tx = _optimizer()
  step = jax.jit(toy_lora.train_step(tx))
  params, state = toy_lora.params(), tx.init(toy_lora.params())
  params, state = _run(step, params, state, range(SAVED_AT))
  _save(tmp_path / "params", params, ocp.StandardCheckpointer())
  _save(tmp_path / "opt_state", state, ocp.PyTreeCheckpointer())
  straight = _run(step, params, state, range(SAVED_AT, STEPS))
  np.savez(tmp_path / "straight.npz", *jax.tree.leaves(straight))
  run_isolated(_resume_on_one_device, str(tmp_path))


def _resume_on_one_device(directory):
  tx = _optimizer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = _restore_params(os.path.join(directory, "params"),
                           jax.tree.map(lambda _: device, toy_lora.params()))
  state = restore_state(os.path.join(directory, "opt_state"), tx, params,
                        checkpointer=ocp.PyTreeCheckpointer())
  assert int(state[0].count) == SAVED_AT
  resumed = _run(jax.jit(toy_lora.train_step(tx)), params, state,
                 range(SAVED_AT, STEPS))
  _assert_equal_to_saved(resumed, os.path.join(directory, "straight.npz"))


def _mesh_shardings(tx):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  params = jax.tree.map(lambda s: NamedSharding(mesh, s), toy_lora.specs())
  state = state_shardings(tx, toy_lora.params(), params)
  step = jax.jit(toy_lora.train_step(tx), out_shardings=(params, state))
  place = functools.partial(jax.device_put, device=NamedSharding(mesh, P("data", None)))
  return params, state, step, place


@pytest.mark.slow  # a fresh Python process
def test_resume_sharded_state_in_a_fresh_process(tmp_path):
  run_isolated(_save_sharded, str(tmp_path), host_devices=8)
  run_isolated(_resume_sharded, str(tmp_path), host_devices=8)


def _save_sharded(directory):
  tx = _optimizer()
  param_shardings, shardings, step, place = _mesh_shardings(tx)
  params = jax.device_put(toy_lora.params(), param_shardings)
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  params, state = _run(step, params, state, range(SAVED_AT), place=place)
  checkpointer = ocp.StandardCheckpointer()
  _save(os.path.join(directory, "params"), params, checkpointer)
  _save(os.path.join(directory, "opt_state"), state, checkpointer)
  straight = _run(step, params, state, range(SAVED_AT, STEPS), place=place)
  np.savez(os.path.join(directory, "straight.npz"), *jax.tree.leaves(straight))


def _resume_sharded(directory):
  tx = _optimizer()
  param_shardings, shardings, step, place = _mesh_shardings(tx)
  params = _restore_params(os.path.join(directory, "params"), param_shardings)
  state = restore_state(os.path.join(directory, "opt_state"), tx, params, shardings)
  assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state)) == \
      jax.tree.leaves(shardings)
  resumed = _run(step, params, state, range(SAVED_AT, STEPS), place=place)
  _assert_equal_to_saved(resumed, os.path.join(directory, "straight.npz"))


def _saved_state(path, tx, params):
  _save(path, tx.init(params), ocp.StandardCheckpointer())
  return path


def test_mismatched_checkpoints_name_the_first_differing_leaf(tmp_path):
  params = toy_lora.params()
  with_momentum = _saved_state(tmp_path / "momentum", adaprelora(1e-2, b1=0.9), params)
  with pytest.raises(ValueError, match=re.escape(
      "has a leaf 0/pairs/attn/out/mu_a ((16, 2) float32) that the optimizer "
      "state for these params does not have")):
    restore_state(with_momentum, adaprelora(1e-2), params)

  without = _saved_state(tmp_path / "plain", adaprelora(1e-2), params)
  with pytest.raises(ValueError, match=re.escape(
      "has no leaf 0/pairs/attn/out/mu_a, which the optimizer state for these "
      "params has ((16, 2) float32)")):
    restore_state(without, adaprelora(1e-2, b1=0.9), params)

  renamed = {**params, "value": params["query"]}
  del renamed["query"]
  with pytest.raises(ValueError, match=re.escape("has no leaf 0/pairs/value/v_row")):
    restore_state(without, adaprelora(1e-2), renamed)

  rank3 = {**params, "query": {"lora_a": jnp.ones((16, 3)), "lora_b": jnp.ones((3, 8))}}
  with pytest.raises(ValueError, match=re.escape(
      "stores 0/pairs/query/mu_a as (16, 4) float32, but the optimizer state "
      "for these params has (16, 3) float32")):
    restore_state(with_momentum, adaprelora(1e-2, b1=0.9), rank3)

  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  adam = _saved_state(tmp_path / "adam", optax.adam(1e-2), params)
  with pytest.raises(ValueError, match=re.escape(
      "stores 0/mu/attn/out/lora/a as (4, 4, 2) float32, but the optimizer "
      "state for these params has (4, 4, 2) bfloat16")):
    restore_state(adam, optax.adam(1e-2), bf16)


def test_readme_snippet(tmp_path):
  run_isolated(_readme_snippet, str(tmp_path), host_devices=8)


def _readme_snippet(directory):
  rng = np.random.default_rng(0)
  lora_params = {"attn": {"lora_a": jnp.asarray(rng.normal(size=(64, 8)), jnp.float32),
                          "lora_b": jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)}}
  grads = jax.tree.map(lambda x: 0.1 * x[::-1], lora_params)
  path = pathlib.Path(directory)
  # --- README snippet ---
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  # A (in, r) split on its in axis and B (r, out) on its out axis, as in
  # tensor-parallel recipes; the optimizer state follows.
  param_shardings = {"attn": {"lora_a": NamedSharding(mesh, P("model", None)),
                              "lora_b": NamedSharding(mesh, P(None, "model"))}}
  params = jax.device_put(lora_params, param_shardings)

  tx = adaprelora(1e-3, b1=0.9)
  opt_shardings = state_shardings(tx, params, param_shardings)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)

  @functools.partial(jax.jit, out_shardings=(param_shardings, opt_shardings))
  def train_step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = train_step(params, opt_state, grads)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "opt_state", opt_state)
  checkpointer.wait_until_finished()
  restored = restore_state(path / "opt_state", tx, params, opt_shardings)
  # --- end of snippet ---
  assert opt_shardings[0].pairs["attn"].v_row.spec == P("model")
  assert restored[0].pairs["attn"].mu_b.sharding == NamedSharding(
      mesh, P(None, "model"))
  jax.tree.map(np.testing.assert_array_equal, restored, opt_state)


def _large_trained_state(path):
  """A state saved after one step, large enough that Orbax stores its arrays
  apart from the metadata (small values are inlined with it)."""
  rng = np.random.default_rng(0)
  params = {"q": {"lora_a": jnp.asarray(rng.normal(size=(1024, 4)), jnp.float32),
                  "lora_b": jnp.asarray(rng.normal(size=(4, 1024)), jnp.float32)}}
  tx = _optimizer()
  grads = jax.tree.map(lambda x: 0.1 * x[::-1], params)
  _, state = tx.update(grads, tx.init(params), params)
  _save(path, state, ocp.StandardCheckpointer())
  return tx, params


def _array_data(path):
  """The checkpoint's largest data file: the one holding the arrays' bytes."""
  return max((f for f in path.rglob("*") if f.is_file() and f.parent.name == "d"),
             key=lambda f: f.stat().st_size)


def _assert_short_and_names(error, path, *phrases):
  message = str(error)
  assert "\n" not in message and len(message) < 300, message
  assert str(path) in message, message
  for phrase in phrases:
    assert phrase in message, message


def test_truncated_array_data_is_one_line_naming_the_path(tmp_path):
  path = tmp_path / "state"
  tx, params = _large_trained_state(path)
  data = _array_data(path)
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  with pytest.raises(ValueError) as error:
    restore_state(path, tx, params)
  _assert_short_and_names(error.value, path, "array data is missing or damaged (")


def test_deleted_array_data_is_one_line_naming_the_path(tmp_path):
  path = tmp_path / "state"
  tx, params = _large_trained_state(path)
  _array_data(path).unlink()
  with pytest.raises(ValueError) as error:
    restore_state(path, tx, params)
  _assert_short_and_names(error.value, path, "array data is missing or damaged (")


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
  path = tmp_path / "state.ckpt"
  path.write_text("not a checkpoint")
  with pytest.raises(NotADirectoryError) as error:
    restore_state(path, _optimizer(), toy_lora.params())
  _assert_short_and_names(error.value, path, "is a file, not a checkpoint directory")
