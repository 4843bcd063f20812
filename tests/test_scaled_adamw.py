"""ScaledGD / ScaledAdamW: Riemannian-preconditioned LoRA (Zhang & Pilanci)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaprelora_jax.baselines import (scale_by_scaled_adam, scale_by_scaled_gd,
                                      scaled_adamw, scaled_gd)
from conftest import random_pair


def _params(a, b, dtype=jnp.float64, bias=None):
  params = {"proj": {"lora_a": jnp.asarray(a, dtype),
                     "lora_b": jnp.asarray(b, dtype)}}
  if bias is not None:
    params["bias"] = jnp.asarray(bias, dtype)
  return params


def _dense_scaled(a, b, grad_a, grad_b, damping):
  """Direct numpy: g_A (BBᵀ + δ_B)⁻¹ and (AᵀA + δ_A)⁻¹ g_B, δ_M = d·tr(M)/r."""
  r = a.shape[1]
  gram_b, gram_a = b @ b.T, a.T @ a
  shift = lambda g: g + damping * np.trace(g) / r * np.eye(r)
  return (np.linalg.solve(shift(gram_b), grad_a.T).T,
          np.linalg.solve(shift(gram_a), grad_b))


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_scaled_gd_direction_is_the_dense_solve(x64, damping):
  p = random_pair(0, 7, 6, 3)
  params = _params(p["a"], p["b"], bias=p["col"])
  grads = _params(p["grad_a"], p["grad_b"], bias=p["row"][:6])
  tx = scale_by_scaled_gd(damping=damping)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["bias"], grads["bias"])  # plain GD
  want_a, want_b = _dense_scaled(p["a"], p["b"], p["grad_a"], p["grad_b"],
                                 damping)
  np.testing.assert_allclose(updates["proj"]["lora_a"], want_a, rtol=1e-10)
  np.testing.assert_allclose(updates["proj"]["lora_b"], want_b, rtol=1e-10)


def test_scaled_adamw_is_optax_adam_on_scaled_gradients(x64):
  """Several steps, params moving: factors match scale_by_adam on the dense
  scaled gradients; a non-LoRA leaf gets plain Adam."""
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(8, 3)), rng.normal(size=(3, 5))
  bias = rng.normal(size=5)
  lr, damping = 0.05, 0.01
  tx = scaled_adamw(lr, b1=0.8, b2=0.95, eps=1e-6, damping=damping)
  ref = optax.scale_by_adam(b1=0.8, b2=0.95, eps=1e-6)
  params = _params(a, b, bias=bias)
  state, ref_state = tx.init(params), ref.init((a, b, bias))
  for _ in range(4):
    g = rng.normal(size=(8, 5))
    grad_a, grad_b, grad_bias = g @ b.T, a.T @ g, rng.normal(size=5)
    scaled = _dense_scaled(a, b, grad_a, grad_b, damping)
    want, ref_state = ref.update((*scaled, grad_bias), ref_state)
    updates, state = tx.update(_params(grad_a, grad_b, bias=grad_bias), state,
                               params)
    got = (updates["proj"]["lora_a"], updates["proj"]["lora_b"],
           updates["bias"])
    for u, w in zip(got, want):
      np.testing.assert_allclose(u, -lr * np.asarray(w), rtol=1e-9, atol=1e-14)
    params = optax.apply_updates(params, updates)
    a = np.asarray(params["proj"]["lora_a"])
    b = np.asarray(params["proj"]["lora_b"])


def _w_step(a, b, updates, scale):
  u = updates["proj"]
  return scale * (np.asarray(u["lora_a"]) @ b + a @ np.asarray(u["lora_b"]))


def _gd_w_step(a, b, g, scale, damping=0.0):
  """ScaledGD's first-order W-step for W-gradient g at ΔW = s·A@B."""
  tx = scale_by_scaled_gd(damping=damping)
  params = _params(a, b)
  grads = _params(scale * g @ b.T, scale * a.T @ g)
  updates, _ = tx.update(grads, tx.init(params), params)
  return _w_step(a, b, updates, scale)


def test_scaled_gd_w_step_is_invariant_to_the_factorisation(x64):
  """(A, B) → (A S, S⁻¹ B) keeps s(dA B + A dB) = s²(G P_B + P_A G)."""
  p = random_pair(2, 9, 7, 3)
  a, b, g, s = p["a"], p["b"], p["g"], p["scale"]
  rng = np.random.default_rng(2)
  mix = np.eye(3) + 0.5 * rng.normal(size=(3, 3))
  step = _gd_w_step(a, b, g, s)
  moved = _gd_w_step(a @ mix, np.linalg.solve(mix, b), g, s)
  np.testing.assert_allclose(moved, step, rtol=1e-9, atol=1e-12)
  proj_a = a @ np.linalg.pinv(a)
  proj_b = np.linalg.pinv(b) @ b
  np.testing.assert_allclose(step, s**2 * (g @ proj_b + proj_a @ g),
                             rtol=1e-9, atol=1e-12)
  # Plain gradient descent on the factors is not invariant.
  plain = lambda a, b: s * (s * g @ b.T @ b + a @ (s * a.T @ g))
  assert not np.allclose(plain(a @ mix, np.linalg.solve(mix, b)), plain(a, b),
                         rtol=1e-3)


def test_relative_damping_keeps_rescaling_invariance(x64):
  p = random_pair(3, 6, 8, 2)
  a, b, g, s = p["a"], p["b"], p["g"], p["scale"]
  step = _gd_w_step(a, b, g, s, damping=0.5)
  np.testing.assert_allclose(_gd_w_step(30.0 * a, b / 30.0, g, s, damping=0.5),
                             step, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", [scale_by_scaled_gd, scale_by_scaled_adam])
def test_finite_at_zero_and_rank_deficient_b(make):
  """float32: B = 0 (init), and a rank-1 B with r = 16, whose rounded Gram is
  indefinite enough to break a Cholesky-based inverse."""
  rng = np.random.default_rng(0)
  m, n, r = 64, 256, 16
  a = rng.normal(size=(m, r)) / np.sqrt(m)
  g = rng.normal(size=(1, m)).T @ rng.normal(size=(1, n))  # one example
  for b in (np.zeros((r, n)), np.outer(rng.normal(size=r), rng.normal(size=n))):
    params = _params(a, b, jnp.float32)
    grads = _params(g @ b.T, a.T @ g, jnp.float32)
    tx = make()
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for u in jax.tree.leaves(updates):
      assert np.isfinite(np.asarray(u)).all()
    if not b.any():  # at B = 0, g_A = 0: only B moves
      assert not np.asarray(updates["proj"]["lora_a"]).any()
      assert np.asarray(updates["proj"]["lora_b"]).any()


def test_stacked_pair_under_jit_matches_slices():
  rng = np.random.default_rng(5)
  params = _params(rng.normal(size=(3, 6, 2)), rng.normal(size=(3, 2, 5)),
                   jnp.float32)
  grads_seq = [jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
      for _ in range(3)]

  def run(tx, params, grads_seq):
    state, out = tx.init(params), []
    update = jax.jit(tx.update)
    for grads in grads_seq:
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
      out.append(updates)
    return out

  for make in (lambda: scaled_adamw(0.01), lambda: scaled_gd(0.01)):
    stacked = run(make(), params, grads_seq)
    for i in range(3):
      part = lambda tree: jax.tree.map(lambda x: x[i], tree)
      sliced = run(make(), part(params), [part(g) for g in grads_seq])
      for u, v in zip(sliced, stacked):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(
            x, y, rtol=2e-4, atol=1e-6), u, part(v))


def test_init_traces_under_eval_shape():
  params = _params(np.ones((4, 6, 2)), np.ones((4, 2, 5)), jnp.bfloat16,
                   bias=np.ones(5))
  for tx in (scaled_adamw(0.1), scaled_gd(0.1)):
    state = jax.eval_shape(tx.init, params)
    assert jax.tree.leaves(state)  # has shapes, built without computing


@pytest.mark.parametrize("make,lr", [(scaled_adamw, 0.05), (scaled_gd, 0.2)])
def test_alias_with_schedule_fits_a_lora_regression(make, lr):
  rng = np.random.default_rng(6)
  m, n, r = 12, 10, 3
  x = jnp.asarray(rng.normal(size=(64, m)), jnp.float32)
  y = x @ jnp.asarray(rng.normal(size=(m, r)) @ rng.normal(size=(r, n)) / 3,
                      jnp.float32)
  params = _params(rng.normal(size=(m, r)) / np.sqrt(m), np.zeros((r, n)),
                   jnp.float32)
  loss = lambda p: jnp.mean((x @ p["proj"]["lora_a"] @ p["proj"]["lora_b"]
                             - y) ** 2)
  tx = make(optax.cosine_decay_schedule(lr, 150))

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state, start = tx.init(params), loss(params)
  for _ in range(150):
    params, state = step(params, state)
  assert loss(params) < 0.05 * start
