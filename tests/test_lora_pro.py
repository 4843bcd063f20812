"""LoRA-Pro: the adjusted gradients, the Sylvester gauge, both Adam variants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from adaprelora_jax._src.baselines.lora_pro import lora_pro_gradients, solve_sylvester
from adaprelora_jax.baselines import lora_pro, scale_by_lora_pro
from conftest import h_projection, random_pair


def _params(a, b, dtype=jnp.float32):
  return {"proj": {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype)}}


def _grads(a, b, g, s, dtype=jnp.float32):
  return _params(s * g @ b.T, s * a.T @ g, dtype)


def _factors(tree):
  return np.asarray(tree["proj"]["lora_a"]), np.asarray(tree["proj"]["lora_b"])


def _closest_adjustment(a, b, g, s):
  """Dense brute force: the factor step nearest ``(g_A, g_B)`` among those whose
  equivalent gradient ``s (g̃_A B + A g̃_B)`` is closest to ``G``."""
  m, r = a.shape
  n = b.shape[1]
  cols = [(s * e.reshape(m, r) @ b).ravel() for e in np.eye(m * r)]
  cols += [(s * a @ e.reshape(r, n)).ravel() for e in np.eye(r * n)]
  jac = np.stack(cols, axis=1)                 # vec(Z_A, Z_B) -> vec(ΔW)
  raw = jac.T @ g.ravel()                      # (g_A, g_B) = (s G Bᵀ, s Aᵀ G)
  target = jac @ np.linalg.lstsq(jac, g.ravel(), rcond=None)[0]
  z = raw + np.linalg.pinv(jac) @ (target - jac @ raw)
  return z[:m * r].reshape(m, r), z[m * r:].reshape(r, n)


def test_equivalent_gradient_is_frobenius_projection(x64):
  p = random_pair(0, 7, 6, 3)
  adj_a, adj_b = lora_pro_gradients(p["a"], p["b"], p["grad_a"], p["grad_b"],
                                    scale=p["scale"])
  equivalent = p["scale"] * (np.asarray(adj_a) @ p["b"] + p["a"] @ np.asarray(adj_b))
  want = h_projection(p["g"], p["a"], p["b"], np.ones(7), np.ones(6))
  np.testing.assert_allclose(equivalent, want, rtol=1e-9, atol=1e-10)


def test_gauge_keeps_adjusted_gradients_closest_to_raw_ones(x64):
  p = random_pair(1, 6, 8, 3, scale=2.0)
  adj_a, adj_b = lora_pro_gradients(p["a"], p["b"], p["grad_a"], p["grad_b"],
                                    scale=p["scale"])
  want_a, want_b = _closest_adjustment(p["a"], p["b"], p["g"], p["scale"])
  np.testing.assert_allclose(adj_a, want_a, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(adj_b, want_b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_sylvester_solution_satisfies_its_equation(x64, damping):
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(2, 9, 4)), rng.normal(size=(2, 4, 7))
  p, q = np.swapaxes(a, 1, 2) @ a, b @ np.swapaxes(b, 1, 2)
  c = rng.normal(size=(2, 4, 4))
  x = np.asarray(solve_sylvester(p, q, c, damping=damping))
  shift = lambda m: m + damping * np.trace(m) / 4 * np.eye(4)
  for i in range(2):
    pd, qd = shift(p[i]), shift(q[i])
    np.testing.assert_allclose(pd @ x[i] + x[i] @ qd, c[i], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(x[i], scipy.linalg.solve_sylvester(pd, qd, c[i]),
                               rtol=1e-9, atol=1e-12)


def test_efficient_variant_is_adam_on_adjusted_gradients(x64):
  """Moments of the brute-force adjusted gradients, with numpy's Adam."""
  lr, (b1, b2, eps) = 0.01, (0.8, 0.95, 1e-8)
  p = random_pair(3, 6, 5, 2, scale=1.5)
  a, b, s = p["a"], p["b"], p["scale"]
  tx = lora_pro(lr, b1=b1, b2=b2, eps=eps, damping=0.0, lora_scale=s)
  params = _params(a, b, jnp.float64)
  state, update = tx.init(params), jax.jit(tx.update)
  mu = nu = (np.zeros_like(a), np.zeros_like(b))
  rng = np.random.default_rng(4)
  for t in range(1, 4):
    g = rng.normal(size=(6, 5))
    updates, state = update(_grads(a, b, g, s, jnp.float64), state, params)
    adjusted = _closest_adjustment(a, b, g, s)
    mu = tuple(b1 * m + (1 - b1) * x for m, x in zip(mu, adjusted))
    nu = tuple(b2 * v + (1 - b2) * x**2 for v, x in zip(nu, adjusted))
    for got, m, v in zip(_factors(updates), mu, nu):
      want = -lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
      np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12)
    params = optax.apply_updates(params, updates)
    a, b = _factors(params)


def test_full_variant_with_full_rank_adapter_steps_w_like_adam(x64):
  """W-step of the ``full`` variant == optax.adam's update on G, step by step."""
  lr, s = 0.05, 0.7
  p = random_pair(5, 6, 5, 5)  # r >= min(m, n): the adapter spans all of W
  a, b = p["a"], p["b"]
  tx = lora_pro(lr, variant="full", damping=0.0, lora_scale=s)
  ref = optax.adam(lr)
  params = _params(a, b, jnp.float64)
  state, ref_state = tx.init(params), ref.init(jnp.zeros((6, 5)))
  update = jax.jit(tx.update)
  rng = np.random.default_rng(6)
  for _ in range(4):
    g = rng.normal(size=(6, 5)) * rng.uniform(0.1, 3.0, size=(6, 1))
    updates, state = update(_grads(a, b, g, s, jnp.float64), state, params)
    want, ref_state = ref.update(jnp.asarray(g), ref_state)
    u_a, u_b = _factors(updates)
    np.testing.assert_allclose(s * (u_a @ b + a @ u_b), want, rtol=1e-7, atol=1e-12)
    params = optax.apply_updates(params, updates)
    a, b = _factors(params)
  assert state[0].pairs["proj"].mu.shape == (6, 5)


@pytest.mark.parametrize("variant", ["efficient", "full"])
def test_zero_b_init_gives_finite_steps(variant):
  p = random_pair(7, 16, 12, 4)
  a, b = p["a"], np.zeros((4, 12))
  tx = lora_pro(1e-2, variant=variant)
  params = _params(a, b)
  state, update = tx.init(params), jax.jit(tx.update)
  rng = np.random.default_rng(8)
  for t in range(4):
    g = rng.normal(size=(16, 12))
    updates, state = update(_grads(a, b, g, 1.0), state, params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((updates, state)))
    if t == 0:  # B = 0: the W-gradient moves B only
      np.testing.assert_array_equal(updates["proj"]["lora_a"], 0.0)
      assert np.abs(updates["proj"]["lora_b"]).max() > 0
    params = optax.apply_updates(params, updates)
    a, b = (x.astype(np.float64) for x in _factors(params))
  # Factor gradients no W-gradient produces (a nonzero g_A with B = 0) too.
  zero = _params(a, np.zeros((4, 12)))
  junk = jax.tree.map(lambda x: jnp.asarray(1e3 * rng.normal(size=x.shape),
                                            jnp.float32), zero)
  updates, state = update(junk, tx.init(zero), zero)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((updates, state)))


@pytest.mark.parametrize("variant", ["efficient", "full"])
def test_jit_and_stacked_pairs_match_per_slice(variant):
  rng = np.random.default_rng(9)
  a, b = rng.normal(size=(3, 8, 2)), rng.normal(size=(3, 2, 6))
  params = _params(a, b)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                       params)
  tx = scale_by_lora_pro(variant)
  state = jax.eval_shape(tx.init, params)
  assert jax.tree.map(lambda x: x.shape, state.pairs["proj"].mu) == (
      (3, 8, 6) if variant == "full" else ((3, 8, 2), (3, 2, 6)))
  update = jax.jit(tx.update)
  stacked, _ = update(grads, tx.init(params), params)
  for layer in range(3):
    sub = jax.tree.map(lambda x: x[layer], params)
    sub_g = jax.tree.map(lambda x: x[layer], grads)
    want, _ = update(sub_g, tx.init(sub), sub)
    got = jax.tree.map(lambda x: x[layer], stacked)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  eager, _ = tx.update(sub_g, tx.init(sub), sub)  # and jit changes nothing
  for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_non_lora_leaves_go_to_adam_fallback():
  p = random_pair(10, 6, 5, 2)
  params = {**_params(p["a"], p["b"]), "head": {"bias": jnp.ones(5)}}
  grads = {**_grads(p["a"], p["b"], p["g"], 1.0), "head": {"bias": jnp.arange(5.0)}}
  tx = scale_by_lora_pro(b1=0.5, b2=0.9)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  adam = optax.scale_by_adam(0.5, 0.9)
  want, _ = adam.update(grads["head"], adam.init(params["head"]))
  np.testing.assert_allclose(updates["head"]["bias"], want["bias"], rtol=1e-6)
  with pytest.raises(ValueError, match="variant"):
    scale_by_lora_pro("dense")


@pytest.mark.parametrize("variant", ["efficient", "full"])
def test_alias_with_schedule_decreases_lora_regression_loss(variant):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(64, 10)), jnp.float32)
  target = x @ jnp.asarray(rng.normal(size=(10, 2)) @ rng.normal(size=(2, 8)),
                           jnp.float32)
  params = _params(0.3 * rng.normal(size=(10, 2)), np.zeros((2, 8)))
  loss = lambda p: jnp.mean((x @ p["proj"]["lora_a"] @ p["proj"]["lora_b"]
                             - target) ** 2)
  tx = lora_pro(optax.warmup_cosine_decay_schedule(0.0, 0.2, 5, 80),
                variant=variant, weight_decay=1e-4)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  first = loss(params)
  for _ in range(80):
    params, state, _ = step(params, state)
  assert loss(params) < 0.1 * first
