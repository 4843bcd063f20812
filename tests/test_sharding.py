"""state_shardings: the optimizer state is split along its parameters' mesh axes.

The rules are checked on PartitionSpecs in this process; jit with the derived
NamedShardings runs on 8 host CPU devices in a child process (see isolated.py).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from adaprelora_jax import adaprelora
from adaprelora_jax import pairwise_transformation
from adaprelora_jax import state_shardings

import toy_lora
from isolated import isolated

PAIRS = {  # pair -> (v_row, v_col, mu_a, mu_b) for toy_lora's layout
    "query": (P("model"), P("model"), P("model", None), P(None, "model")),
    "layers/mlp": (P("data", "model"), P("data", "model"),
                   P("data", "model", None), P("data", None, "model")),
    # heads (A's first in axis) on 'model': the flattened m = heads*head_dim is too
    "attn/out": (P("model"), P("model"), P("model", None), P(None, "model")),
    # B (r, 2, 4@model): the sharded axis is not the first out axis, so n is replicated
    "attn/key": (P("model"), P(None), P("model", None), P(None, None)),
}


def _by_path(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _expected_adaprelora(prefix, momentum=True):
  """Every leaf of scale_by_adaprelora's state at ``prefix``, with its spec."""
  fields = ("v_row", "v_col", "mu_a", "mu_b") if momentum else ("v_row", "v_col")
  want = {f"{prefix}.count": P(), f"{prefix}.fallback.inner_state.count": P()}
  for key, specs in PAIRS.items():
    want.update({f"{prefix}.pairs['{key}'].{f}": s for f, s in zip(fields, specs)})
    # Per-slice step counts follow the batch (layer) axis, sharded on 'data' for the stack.
    batch = P("data") if key == "layers/mlp" else P()
    want.update({f"{prefix}.counts['{key}'].{f}": batch for f in ("applied", "skipped")})
  for moment in ("mu", "nu"):
    want[f"{prefix}.fallback.inner_state.{moment}['head']['bias']"] = P("model")
    want[f"{prefix}.fallback.inner_state.{moment}['head']['kernel']"] = P(None, "model")
  return want


@pytest.mark.parametrize("momentum", [True, False])
def test_state_specs_follow_the_factor_axes(momentum):
  tx = adaprelora(1e-2, b1=0.9 if momentum else None, weight_decay=0.01)
  got = state_shardings(tx, toy_lora.params(True), toy_lora.specs(True))
  assert _by_path(got) == _expected_adaprelora("[0]", momentum)
  assert jax.tree.structure(got) == jax.tree.structure(
      jax.eval_shape(tx.init, toy_lora.params(True)))


def test_wrappers_inject_hyperparams_multisteps_masked():
  params, specs = toy_lora.params(True), toy_lora.specs(True)
  injected = optax.inject_hyperparams(adaprelora)(learning_rate=1e-2, b1=0.9)
  got = _by_path(state_shardings(injected, params, specs))
  want = {k.replace("[0]", ".inner_state[0]", 1): s
          for k, s in _expected_adaprelora("[0]").items()}
  want[".count"] = P()
  hyperparams = {k: s for k, s in got.items() if k.startswith(".hyperparams[")}
  assert ".hyperparams['learning_rate']" in hyperparams
  assert set(hyperparams.values()) == {P()}
  assert {k: s for k, s in got.items() if k not in hyperparams} == want

  multi = _by_path(state_shardings(
      optax.MultiSteps(adaprelora(1e-2, b1=0.9), 2), params, specs))
  inner = {k: s for k, s in multi.items() if k.startswith(".inner_opt_state")}
  assert inner == {k.replace("[0]", ".inner_opt_state[0]", 1): s
                   for k, s in _expected_adaprelora("[0]").items()}
  # the gradient accumulator mirrors the params, LoRA factors included
  assert {k: s for k, s in multi.items() if k.startswith(".acc_grads")} == {
      ".acc_grads" + k: s for k, s in _by_path(specs).items()}

  mask = jax.tree.map(lambda _: True, params)
  mask["query"] = {"lora_a": False, "lora_b": False}
  masked = _by_path(state_shardings(
      optax.masked(adaprelora(1e-2, b1=0.9), mask), params, specs))
  assert masked == {k.replace("[0]", ".inner_state[0]", 1): s
                    for k, s in _expected_adaprelora("[0]").items()
                    if "['query']" not in k}


class _ToyState(NamedTuple):
  gram: jax.Array
  w: jax.Array
  x: jax.Array
  s: jax.Array

  def axes(self):
    return _ToyState(("r", "r"), ("m", "n"), ("m", "r"), ())


def test_slice_update_states_are_sharded_by_the_axes_they_declare():
  def slice_init(m, n, r, dtype):
    return _ToyState(jnp.zeros((r, r)), jnp.zeros((m, n)), jnp.zeros((m, r)), jnp.zeros(()))

  tx = pairwise_transformation("toy", slice_init, None, fallback=optax.identity())
  params = {"query": toy_lora.params()["query"],
            # m = n = 8 with different entries: the declared axes tell them apart
            "square": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 8))},
            "fsdp": {"lora_a": jnp.ones((32, 2)), "lora_b": jnp.ones((2, 8))}}
  specs = {"query": toy_lora.specs()["query"],
           "square": {"lora_a": P("model", None), "lora_b": P(None, "data")},
           "fsdp": {"lora_a": P(("data", "model"), None),
                    "lora_b": P(None, "model")}}
  got = state_shardings(tx, params, specs).pairs
  # (m, n): m and n both want 'model'; a spec may use it only once
  assert got["query"] == _ToyState(P(None, None), P("model", None), P("model", None), P())
  assert got["square"] == _ToyState(P(None, None), P("model", "data"), P("model", None), P())
  assert got["fsdp"].w == P(("data", "model"), None)
  assert state_shardings(adaprelora(1e-2), params, specs)[0].pairs["fsdp"] == \
      (P(("data", "model")), P("model"), None, None)


def test_a_slice_update_state_without_declared_axes_is_an_error():
  tx = pairwise_transformation("toy", lambda m, n, r, dtype: {"w": jnp.zeros((m, n))}, None,
                               fallback=optax.identity())
  params = {"query": toy_lora.params()["query"]}
  with pytest.raises(ValueError, match=r"state of LoRA pair 'query' \(dict\) declares no axes"):
    state_shardings(tx, params, {"query": toy_lora.specs()["query"]})


def test_errors_name_the_problem():
  params, specs = toy_lora.params(), toy_lora.specs()
  tx = adaprelora(1e-2)
  with pytest.raises(ValueError, match="must have the structure of params"):
    state_shardings(tx, params, {"query": specs["query"]})

  def rule(names):
    return ("enc", "a" if names[-1] == "down" else "b") if names[0] == "enc" else None

  custom = {"enc": {"down": jnp.ones((16, 2)), "up": jnp.ones((2, 8))}}
  custom_specs = {"enc": {"down": P("model", None), "up": P(None, "model")}}
  paired = adaprelora(1e-2, pairing=rule)
  with pytest.raises(ValueError, match=r"holds LoRA pair 'enc', but params have "
                     r"the pairs \[\]; pass the optimizer's pairing rule"):
    state_shardings(paired, custom, custom_specs)
  got = state_shardings(paired, custom, custom_specs, pairing=rule)
  assert got[0].pairs["enc"].v_row == P("model")

  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  mixed = jax.tree.map(lambda s: s, specs)
  mixed["head"]["bias"] = NamedSharding(mesh, P("model"))
  with pytest.raises(ValueError, match="mixes NamedSharding and PartitionSpec"):
    state_shardings(tx, params, mixed)
  mixed["head"]["bias"] = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(ValueError, match="param_shardings at head/bias is "
                     "SingleDeviceSharding"):
    state_shardings(tx, params, mixed)


def _mesh(axis_type=AxisType.Auto):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


@isolated(host_devices=8)
def test_jit_init_has_the_derived_shardings():
  mesh = _mesh()
  params, specs = toy_lora.params(True), toy_lora.specs(True)
  param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  params = jax.device_put(params, param_shardings)
  for tx in (adaprelora(1e-2, b1=0.9, weight_decay=0.01),
             optax.inject_hyperparams(adaprelora)(learning_rate=1e-2, b1=0.9)):
    shardings = state_shardings(tx, params, param_shardings)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    assert jax.tree.structure(state) == jax.tree.structure(shardings)
    for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(state),
                                  jax.tree.leaves(shardings)):
      assert leaf.sharding == want, (jax.tree_util.keystr(path), leaf.sharding)
    assert _by_path(jax.tree.map(lambda s: s.spec, shardings)) == _by_path(
        state_shardings(tx, params, specs))
  # v_row (16@model,) of 'query' really is split four ways
  v_row = state.inner_state[0].pairs["query"].v_row
  assert {s.data.shape for s in v_row.addressable_shards} == {(4,)}


def _assert_close(got, want):
  """Equal up to float32 rounding, relative to each buffer's own scale.

  Sharded matmuls sum in another order; after 3 steps the measured error is
  at most 2.3e-6 of the buffer's largest entry (momentum, then moments).
  """
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * np.max(np.abs(w)))


def _sharded_run(jit_step, tx, params, specs, mesh, batches):
  """The steps with params, state and batches sharded over ``mesh``."""
  param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  shardings = state_shardings(tx, params, param_shardings)
  out = (jax.device_put(params, param_shardings),
         jax.jit(tx.init, out_shardings=shardings)(params))
  step = jit_step((param_shardings, shardings))
  data = NamedSharding(mesh, P("data", None))
  for x, y in batches:
    out = step(*out, jax.device_put(x, data), jax.device_put(y, data))
  assert jax.tree.leaves(jax.tree.map(lambda a: a.sharding, out)) == \
      jax.tree.leaves((param_shardings, shardings))
  return out


@pytest.mark.slow  # a subprocess with eight CPU devices
@isolated(host_devices=8)
def test_sharded_steps_equal_unsharded_steps():
  params, specs = toy_lora.params(True), toy_lora.specs(True)
  tx = adaprelora(1e-2, b1=0.9, weight_decay=0.01)
  step = toy_lora.train_step(tx)
  batches = [toy_lora.batch(t) for t in range(3)]
  want, plain = (params, tx.init(params)), jax.jit(step)
  for x, y in batches:
    want = plain(*want, x, y)

  got = _sharded_run(lambda out: jax.jit(step, out_shardings=out), tx, params,
                     specs, _mesh(), batches)
  _assert_close(got, want)
  assert int(got[1][0].count) == 3

  # The update's Gram products contract sharded axes, which JAX refuses to
  # type under Explicit mesh axes; jax.sharding.auto_axes lets XLA choose.
  explicit = lambda out: jax.jit(jax.sharding.auto_axes(step, out_sharding=out))
  _assert_close(_sharded_run(explicit, tx, params, specs,
                             _mesh(AxisType.Explicit), batches), want)
