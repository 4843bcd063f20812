"""A slice that cannot step is skipped, counted, and resumes as a fresh slice would."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaprelora_jax import adaprelora, baselines, skipped_steps

OPTIMIZERS = {
    "adaprelora": lambda: adaprelora(1e-2),
    "adaprelora_b1": lambda: adaprelora(1e-2, b1=0.9),
    "lora_plus": lambda: baselines.lora_plus(1e-2),
    "scaled_gd": lambda: baselines.scaled_gd(1e-2),
    "scaled_adamw": lambda: baselines.scaled_adamw(1e-2),
    "lora_pro": lambda: baselines.lora_pro(1e-2),
    "lora_rite": lambda: baselines.lora_rite(1e-2),
}


def _params():
  rng = np.random.default_rng(0)
  pair = lambda m, n: {"lora_a": jnp.asarray(rng.normal(size=(m, 3)), jnp.float32),
                       "lora_b": jnp.asarray(0.5 * rng.normal(size=(3, n)), jnp.float32)}
  stacked = {"lora_a": jnp.asarray(rng.normal(size=(2, 8, 3)), jnp.float32),
             "lora_b": jnp.asarray(0.5 * rng.normal(size=(2, 3, 6)), jnp.float32)}
  return {"q": pair(12, 10), "v": pair(12, 10), "layers": stacked}


def _grads(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def _finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_non_finite_gradient_skips_that_slice_and_counts(name):
  tx, params = OPTIMIZERS[name](), _params()
  state = tx.init(params)
  grads = _grads(params)
  grads["q"]["lora_b"] = grads["q"]["lora_b"].at[0, 0].set(jnp.nan)
  grads["layers"]["lora_a"] = grads["layers"]["lora_a"].at[1, 0, 0].set(jnp.inf)
  step = jax.jit(tx.update)
  updates, state = step(grads, state, params)
  assert _finite(updates) and _finite(state)
  np.testing.assert_array_equal(updates["q"]["lora_a"], 0.0)
  np.testing.assert_array_equal(updates["layers"]["lora_a"][1], 0.0)
  assert np.any(updates["v"]["lora_a"] != 0) and np.any(updates["layers"]["lora_a"][0] != 0)
  counts = jax.tree.map(np.asarray, skipped_steps(state))
  assert {k: v.tolist() for k, v in counts.items()} == {"q": 1, "v": 0, "layers": [0, 1]}
  _, state = step(_grads(params, seed=2), state, params)
  assert skipped_steps(state)["q"] == 1  # a later finite step is not counted


def test_a_nan_restored_into_the_state_is_counted_every_step():
  tx, params = adaprelora(1e-2, b1=0.9), _params()
  state = tx.init(params)
  inner = state[0]
  state = (inner._replace(pairs={**inner.pairs, "q": inner.pairs["q"]._replace(
      mu_a=inner.pairs["q"].mu_a.at[0, 0].set(jnp.nan))}), *state[1:])
  step = jax.jit(tx.update)
  for t in range(3):
    updates, state = step(_grads(params, seed=t), state, params)
  assert int(skipped_steps(state)["q"]) == 3 and int(skipped_steps(state)["v"]) == 0
  np.testing.assert_array_equal(updates["q"]["lora_a"], 0.0)


@pytest.mark.parametrize("kwargs", [dict(clipping_threshold=None), {}, dict(b1=0.9)])
def test_a_slice_resumed_after_skips_steps_like_a_fresh_one(kwargs):
  """Its decay and bias corrections count its own applied steps, not the update count."""
  tx, params = adaprelora(1e-2, **kwargs), _params()
  step = jax.jit(tx.update)
  state = tx.init(params)
  bad = _grads(params)
  bad["q"]["lora_a"] = bad["q"]["lora_a"].at[0, 0].set(jnp.nan)
  for _ in range(50):
    _, state = step(bad, state, params)
  assert int(skipped_steps(state)["q"]) == 50
  good = _grads(params, seed=7)
  resumed, _ = step(good, state, params)
  fresh, _ = step(good, tx.init(params), params)
  np.testing.assert_allclose(resumed["q"]["lora_a"], fresh["q"]["lora_a"], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(resumed["q"]["lora_b"], fresh["q"]["lora_b"], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name, value", [("b1", 1.0), ("b1", float("nan")), ("damping", -1e-4),
                                         ("eps", float("inf")), ("lora_scale", 0.0)])
def test_an_injected_out_of_range_hyperparameter_skips_and_counts(name, value):
  tx = optax.inject_hyperparams(adaprelora)(learning_rate=1e-2, b1=0.9, damping=1e-4, eps=1e-30,
                                            lora_scale=1.0)
  params = _params()
  state = tx.init(params)
  state.hyperparams[name] = jnp.asarray(value, jnp.float32)
  updates, new_state = jax.jit(tx.update)(_grads(params), state, params)
  assert _finite(updates) and _finite(new_state.inner_state)
  np.testing.assert_array_equal(updates["q"]["lora_a"], 0.0)
  assert {k: np.asarray(v).tolist() for k, v in skipped_steps(new_state).items()} == {
      "q": 1, "v": 1, "layers": [1, 1]}


def test_skipped_steps_reads_the_state_inside_wrappers():
  tx = optax.MultiSteps(adaprelora(1e-2), every_k_schedule=1)
  params = _params()
  counts = skipped_steps(tx.init(params))
  assert set(counts) == {"q", "v", "layers"} and counts["layers"].shape == (2,)
  with pytest.raises(ValueError, match=r"state \(ScaleByAdamState\) holds no PairwiseState"):
    skipped_steps(optax.adam(1e-2).init(params)[0])
