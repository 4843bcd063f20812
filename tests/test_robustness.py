"""Bad hyperparameters, bad statistics, extreme magnitudes and zero factors, for every optimizer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from adaprelora_jax import WeightStats, adaprelora, baselines, skipped_steps
from adaprelora_jax import restore_state
from conftest import EXACT


def _params(seed=0, b_scale=0.5):
  rng = np.random.default_rng(seed)
  return {"q": {"lora_a": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32),
                "lora_b": jnp.asarray(b_scale * rng.normal(size=(3, 10)), jnp.float32)},
          "head": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}


def _grads(params, seed=1, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32), params)


def _finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, value", [
    ("lora_scale", 0.0), ("lora_scale", -2.0), ("lora_scale", float("inf")),
    ("b1", 1.0), ("b1", -0.1), ("b2", 1.5),
    ("damping", -1e-4), ("damping", float("nan")), ("eps", -1e-30), ("eps", float("inf")),
    ("clipping_threshold", 0.0), ("decay_rate", float("nan")),
    ("balancing", -1.0), ("factor_clipping", 0.0), ("factor_clipping", float("inf")),
])
def test_bad_hyperparameters_are_named_at_construction(name, value):
  with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}")):
    adaprelora(1e-2, **{name: value})


def test_host_weight_stats_must_be_finite_mean_squares():
  params = _params()
  tx = adaprelora(1e-2)
  state = tx.init(params)
  for bad in (-1.0, float("nan"), float("inf")):
    row = np.ones(12, np.float32)
    row[3] = bad
    stats = {"q": WeightStats(row, np.ones(10, np.float32))}
    with pytest.raises(ValueError, match=r"weight_stats\['q'\].row must be finite and >= 0"):
      tx.update(_grads(params), state, params, weight_stats=stats)


def test_device_weight_stats_are_not_read_back_but_skip_and_count():
  """A device array is not copied to the host each step: a NaN in it skips the pair, counted."""
  params = _params()
  tx = adaprelora(1e-2)
  stats = {"q": WeightStats(jnp.ones(12).at[3].set(jnp.nan), jnp.ones(10))}
  with jax.transfer_guard_device_to_host("disallow"):
    updates, state = tx.update(_grads(params), tx.init(params), params, weight_stats=stats)
  np.testing.assert_array_equal(updates["q"]["lora_a"], 0.0)
  assert int(skipped_steps(state)["q"]) == 1


def test_traced_weight_stats_never_give_nan():
  """Under jit the statistics cannot be checked: negative ones count as 0 and a non-finite
  one skips the pair's step, its state kept."""
  params = _params()
  tx = adaprelora(1e-2)
  state = tx.init(params)
  step = jax.jit(lambda s, row: tx.update(_grads(params), s, params,
                                          weight_stats={"q": WeightStats(row, jnp.ones(10))}))
  updates, new_state = step(state, -jnp.ones(12))
  assert _finite((updates, new_state))
  updates, skipped = step(state, jnp.ones(12).at[0].set(jnp.nan))
  np.testing.assert_array_equal(updates["q"]["lora_a"], 0.0)
  jax.tree.map(np.testing.assert_array_equal, skipped[0].pairs, state[0].pairs)


@pytest.mark.parametrize("b1", [None, 0.9])
@pytest.mark.parametrize("case", ["gradients 1e19", "gradients 1e30", "gradients 3e38",
                                  "A entry 1e20", "B entry 1e-30", "both factors 1e15"])
def test_large_finite_inputs_give_finite_updates(case, b1):
  params, grads = _params(), _grads(_params())
  if case.startswith("gradients"):
    grads = jax.tree.map(lambda g: jnp.clip(g * float(case.split()[1]), -3e38, 3e38), grads)
  elif case == "A entry 1e20":
    params["q"]["lora_a"] = params["q"]["lora_a"].at[0, 0].set(1e20)
  elif case == "B entry 1e-30":
    params["q"]["lora_b"] = jnp.zeros((3, 10)).at[1, 2].set(1e-30)
  else:
    params["q"] = jax.tree.map(lambda x: x * 1e15, params["q"])
  tx = adaprelora(1e-2, b1=b1)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    # The head's fallback is optax's own Adam, whose squares overflow at 1e30.
    assert _finite((updates["q"], state[0].pairs)), case


@pytest.mark.parametrize("control", [EXACT, {}])
def test_extreme_scales_give_the_rescaled_step(control):
  """Rescaling the gradients leaves Adafactor's first step unchanged, and for the paper's rule
  the gauge ``(c A, B / c)`` maps the step to ``(c dA, dB / c)`` (the balancing term is not
  gauge-covariant by design), far beyond where the squares overflow."""
  params, grads = _params(), _grads(_params())
  tx = adaprelora(1.0, eps=0.0, **control)
  step = lambda p, g: tx.update(g, tx.init(p), p)[0]["q"]
  base = step(params, grads)
  big = step(params, jax.tree.map(lambda g: 1e15 * g, grads))
  for k in base:
    np.testing.assert_allclose(big[k], base[k], rtol=2e-5, atol=1e-7)
  if not control:  # the default's balancing term is not gauge-covariant
    return
  c = 2.0**66  # 7e19, a power of two: the gauged inputs are exact
  gauged = {**params, "q": {"lora_a": c * params["q"]["lora_a"],
                             "lora_b": params["q"]["lora_b"] / c}}
  gauged_grads = {**grads, "q": {"lora_a": grads["q"]["lora_a"] / c,
                                  "lora_b": c * grads["q"]["lora_b"]}}
  out = step(gauged, gauged_grads)
  np.testing.assert_allclose(out["lora_a"] / c, base["lora_a"], rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(out["lora_b"] * c, base["lora_b"], rtol=2e-5, atol=1e-7)


def test_a_step_that_cannot_be_represented_is_skipped_and_keeps_the_state():
  """Gradients of 1e30 at unit factors: the W-gradient's squares exceed float32, so that pair
  steps by zero and keeps its state, while the other leaves step as usual."""
  params = _params()
  tx = adaprelora(1e-2, b1=0.9)
  state = tx.update(_grads(params, 5), tx.init(params), params)[1]
  grads = _grads(params)
  grads["q"] = jax.tree.map(lambda g: g * 1e30, grads["q"])
  updates, new_state = tx.update(grads, state, params)
  jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), updates["q"])
  jax.tree.map(np.testing.assert_array_equal, new_state[0].pairs, state[0].pairs)
  assert float(jnp.max(jnp.abs(updates["head"]))) > 0


@pytest.mark.parametrize("make", [
    lambda: baselines.scaled_gd(1e-2), lambda: baselines.scaled_adamw(1e-2),
    lambda: baselines.lora_rite(1e-2), lambda: baselines.lora_pro(1e-2),
    lambda: baselines.lora_plus(1e-2), lambda: adaprelora(1e-2),
])
def test_zero_factors_with_nonzero_gradients_make_no_giant_steps(make):
  """At A = B = 0 no W-gradient gives nonzero factor gradients, so there is nothing to amplify."""
  params = jax.tree.map(jnp.zeros_like, _params())
  tx = make()
  state = tx.init(params)
  for seed in range(3):
    updates, state = tx.update(_grads(params, seed), state, params)
    assert _finite(state)
    assert float(jnp.max(jnp.abs(updates["q"]["lora_a"]))) <= 1.0
    assert float(jnp.max(jnp.abs(updates["q"]["lora_b"]))) <= 1.0


def test_an_extra_or_missing_update_leaf_is_named():
  params = _params()
  tx = adaprelora(1e-2)
  state = tx.init(params)
  grads = _grads(params)
  with pytest.raises(ValueError, match="the updates have extra, which the params lack"):
    tx.update({**grads, "extra": jnp.ones(2)}, state, params)
  with pytest.raises(ValueError, match="the params have head, which the updates lack"):
    tx.update({"q": grads["q"]}, state, params)


def test_restore_reports_a_missing_or_damaged_checkpoint(tmp_path):
  params = _params()
  tx = adaprelora(1e-2)
  with pytest.raises(FileNotFoundError, match="not found"):
    restore_state(tmp_path / "nothing", tx, params)
  path = tmp_path / "state"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tx.init(params))
  checkpointer.wait_until_finished()
  (path / "_METADATA").write_text("garbage")
  with pytest.raises(ValueError, match="could not read its metadata"):
    restore_state(path, tx, params)
