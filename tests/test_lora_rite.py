"""lora_rite / scale_by_lora_rite against dense numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaprelora_jax.baselines import lora_rite, scale_by_lora_rite
from conftest import random_pair


M, N, R = 10, 8, 3  # one shape throughout, so eager ops compile once


def _params(a, b):
  return {"proj": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}


def _grads(params, g, s):
  a, b = (np.asarray(params["proj"][k]) for k in ("lora_a", "lora_b"))
  return _params(s * g @ b.T, s * a.T @ g)


def _run(tx, a, b, gs, s):
  """``W_t = A_t B_t`` along a run fed the W-gradients ``gs``; and the last state."""
  params = _params(a, b)
  state = tx.init(params)
  ws = []
  for g in gs:
    u, state = tx.update(_grads(params, g, s), state, params)
    params = optax.apply_updates(params, u)
    ws.append(np.asarray(params["proj"]["lora_a"] @ params["proj"]["lora_b"]))
  return np.stack(ws), state


def _shrunk_polar(x, rank, eps):
  """``x (xᵀx / d)^{-1/2}_ε`` written with the SVD of ``x (d, ·)``."""
  u, sigma, vt = np.linalg.svd(x, full_matrices=False)
  u, sigma, vt = u[:, :rank], sigma[:rank], vt[:rank]
  root = sigma / np.sqrt(x.shape[0])
  return (u * (sigma / (root + eps))) @ vt


@pytest.mark.parametrize("damping, tol", [(0.0, 1e-9), (1e-6, 1e-4)])
def test_first_step_is_the_shrunk_polar_factor_in_the_partner_basis(
    x64, damping, tol):
  p = random_pair(0, M, N, R)
  s, eps = p["scale"], 1e-3
  params = _params(p["a"], p["b"])
  tx = scale_by_lora_rite(eps=eps, damping=damping)
  u, _ = tx.update(_grads(params, p["g"], s), tx.init(params), params)
  q_a, r_a = np.linalg.qr(p["a"])
  q_b, r_b = np.linalg.qr(p["b"].T)
  # Unmagnified gradients s G Q_B (m, r) and s G^T Q_A (n, r), r x r moments.
  want_a = _shrunk_polar(s * p["g"] @ q_b, R, eps) @ np.linalg.inv(r_b).T
  want_b = (_shrunk_polar(s * p["g"].T @ q_a, R, eps) @ np.linalg.inv(r_a).T).T
  np.testing.assert_allclose(u["proj"]["lora_a"], want_a, rtol=tol, atol=tol)
  np.testing.assert_allclose(u["proj"]["lora_b"], want_b, rtol=tol, atol=tol)
  # Basis-free form of the W-step: s (f(s G Π_B) + f(s Π_A G)).
  proj_a, proj_b = q_a @ q_a.T, q_b @ q_b.T
  w_step = s * (u["proj"]["lora_a"] @ p["b"] + p["a"] @ u["proj"]["lora_b"])
  want = s * (_shrunk_polar(s * p["g"] @ proj_b, R, eps)
              + _shrunk_polar(s * p["g"].T @ proj_a, R, eps).T)
  np.testing.assert_allclose(w_step, want, rtol=tol, atol=tol)


def _numpy_rite(a, b, gs, s, lr, b1, b2, eps):
  """The authors' recursion: QR, pseudo-inverses, bias-corrected decays."""
  sides = [dict(m=np.zeros_like(a), v=np.zeros((a.shape[1],) * 2), rho=0.0,
                q=np.zeros_like(b.T)),
           dict(m=np.zeros_like(b.T), v=np.zeros((a.shape[1],) * 2), rho=0.0,
                q=np.zeros_like(a))]
  ws = []
  for t, g in enumerate(gs):
    decay1 = b1 * (1 - b1 ** t) / (1 - b1 ** (t + 1))
    decay2 = b2 * (1 - b2 ** t) / (1 - b2 ** (t + 1))
    deltas = []
    for side, grad, partner in ((sides[0], s * g @ b.T, b.T),
                                (sides[1], s * g.T @ a, a)):
      q, r = np.linalg.qr(partner)
      ri = np.linalg.pinv(r)
      ghat = grad @ ri
      proj = q.T @ side["q"]
      moved = proj @ side["v"] @ proj.T
      lost = np.max(np.linalg.eigvalsh(side["v"]) - np.linalg.eigvalsh(moved))
      side["rho"] = decay2 * (side["rho"] + max(lost, 0.0))
      side["v"] = decay2 * moved + (1 - decay2) * ghat.T @ ghat / ghat.shape[0]
      w, vec = np.linalg.eigh(side["v"] + side["rho"] * np.eye(len(r)))
      precond = vec @ np.diag(1 / (np.sqrt(w) + eps)) @ vec.T
      side["m"] = decay1 * side["m"] @ proj.T + (1 - decay1) * ghat @ precond
      side["q"] = q
      deltas.append(side["m"] @ ri.T)
    a, b = a - lr * deltas[0], b - lr * deltas[1].T
    ws.append(a @ b)
  return np.stack(ws), sides


def test_steps_match_the_reference_recursion_with_escaped_mass(x64):
  p = random_pair(1, M, N, R)
  gs = np.random.default_rng(1).normal(size=(5, M, N))
  kw = dict(b1=0.9, b2=0.99, eps=1e-4)
  tx = optax.chain(scale_by_lora_rite(**kw, damping=0.0), optax.scale(-0.1))
  got, (state, _) = _run(tx, p["a"], p["b"], gs, p["scale"])
  want, sides = _numpy_rite(p["a"], p["b"], gs, p["scale"], 0.1, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
  escaped = state.pairs["proj"].escaped_a / (1 - 0.99 ** 5)
  assert sides[0]["rho"] > 1e-3
  np.testing.assert_allclose(escaped, sides[0]["rho"], rtol=1e-8)


@pytest.mark.parametrize("escaped_mass, damping, general", [
    (True, 0.0, True), (False, 0.0, True), (True, 1e-6, False)])
def test_w_trajectory_is_invariant_to_reparametrisation(
    x64, escaped_mass, damping, general):
  """Any invertible ``S`` without damping; a scaled rotation with it."""
  p = random_pair(2, M, N, R)
  rng = np.random.default_rng(2)
  gs = rng.normal(size=(6, M, N))
  left, _ = np.linalg.qr(rng.normal(size=(R, R)))
  right, _ = np.linalg.qr(rng.normal(size=(R, R)))
  mix = left @ np.diag([20.0, 1.0, 0.05] if general else [30.0] * 3) @ right
  tx = lora_rite(0.05, b2=0.99, damping=damping, escaped_mass=escaped_mass,
                 clipping_threshold=0.5)
  w1, _ = _run(tx, p["a"], p["b"], gs, p["scale"])
  w2, _ = _run(tx, p["a"] @ mix, np.linalg.solve(mix, p["b"]), gs, p["scale"])
  np.testing.assert_allclose(w2, w1, rtol=1e-8, atol=1e-10)
  # Adam on the factors is not invariant: the check above has teeth.
  a1, _ = _run(optax.adam(0.05), p["a"], p["b"], gs, p["scale"])
  a2, _ = _run(optax.adam(0.05), p["a"] @ mix, np.linalg.solve(mix, p["b"]), gs,
               p["scale"])
  assert np.abs(a2 - a1).max() > 1e-2 * np.abs(a1).max()


def test_zero_b_gives_finite_steps_and_zero_delta_a():
  p = random_pair(3, M, N, R)
  params = _params(np.float32(p["a"]), np.zeros((R, N), np.float32))
  tx = lora_rite(1e-2)
  state = tx.init(params)
  u, _ = tx.update(_grads(params, p["g"], 1.0), state, params)
  np.testing.assert_array_equal(u["proj"]["lora_a"], 0.0)
  assert np.abs(u["proj"]["lora_b"]).max() > 0
  rng = np.random.default_rng(3)
  for _ in range(20):
    g = 10.0 ** rng.uniform(-10, 5) * rng.normal(size=(M, N))
    u, state = tx.update(_grads(params, g, 1.0), state, params)
    params = optax.apply_updates(params, u)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((params, state)))


def test_jit_matches_eager():
  p = random_pair(4, M, N, R)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), _params(p["a"], p["b"]))
  grads = jax.tree.map(lambda x: x.astype(jnp.float32), _grads(params, p["g"], 0.7))
  tx = scale_by_lora_rite()
  state = tx.init(params)
  eager, jitted = tx.update, jax.jit(tx.update)
  for _ in range(2):
    v, _ = jitted(grads, state, params)
    u, state = eager(grads, state, params)
    for k in ("lora_a", "lora_b"):
      np.testing.assert_allclose(u["proj"][k], v["proj"][k], rtol=1e-5, atol=1e-6)
  assert jax.eval_shape(tx.init, params).pairs["proj"].nu_a.shape == (R, R)


def test_stacked_pairs_match_per_slice_runs():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(3, 5, 2, R)).astype(np.float32)   # (layers, heads, dim, r)
  b = rng.normal(size=(3, R, N)).astype(np.float32)
  params = {"attn": {"w_lora_a": jnp.asarray(a), "w_lora_b": jnp.asarray(b)}}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                        params) for _ in range(2)]
  tx = scale_by_lora_rite()
  state, subs = tx.init(params), [None] * 3
  for g in grads:
    u, state = tx.update(g, state, params)
    for layer in range(3):
      sub = {"l": {"lora_a": params["attn"]["w_lora_a"][layer].reshape(M, R),
                   "lora_b": params["attn"]["w_lora_b"][layer]}}
      sub_g = {"l": {"lora_a": g["attn"]["w_lora_a"][layer].reshape(M, R),
                     "lora_b": g["attn"]["w_lora_b"][layer]}}
      v, subs[layer] = tx.update(sub_g, subs[layer] or tx.init(sub), sub)
      np.testing.assert_allclose(u["attn"]["w_lora_a"][layer].reshape(M, R),
                                 v["l"]["lora_a"], rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(u["attn"]["w_lora_b"][layer], v["l"]["lora_b"],
                                 rtol=1e-4, atol=1e-5)
  assert state.pairs["attn/w"].nu_a.shape == (3, R, R)


def test_non_lora_leaves_go_to_adam():
  p = random_pair(6, M, N, R)
  params = {**_params(np.float32(p["a"]), np.float32(p["b"])),
            "head": {"bias": jnp.ones(5)}}
  grads = {**_grads(params, p["g"], 1.0), "head": {"bias": jnp.arange(5.0)}}
  tx = scale_by_lora_rite(b1=0.8, b2=0.9, eps=1e-3)
  u, _ = tx.update(grads, tx.init(params), params)
  adam = optax.scale_by_adam(0.8, 0.9, 1e-3)
  want, _ = adam.update(grads["head"], adam.init(params["head"]))
  np.testing.assert_allclose(u["head"]["bias"], want["bias"], rtol=1e-6)


def _regression(dtype):
  """``‖X A B − Y‖²`` with ill-scaled inputs, a rank-2 target, ``B = 0`` init."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(64, M)) * np.logspace(0, -1, M), dtype)
  y = x @ jnp.asarray(rng.normal(size=(M, 2)) @ rng.normal(size=(2, N)), dtype)
  loss = lambda p: jnp.mean((x @ (p["lora_a"] @ p["lora_b"]) - y) ** 2)
  params = {"lora_a": jnp.asarray(rng.normal(size=(M, R)) / np.sqrt(M), dtype),
            "lora_b": jnp.zeros((R, N), dtype)}
  return params, loss


def test_damping_keeps_w_steps_small_when_b_starts_rank_deficient(x64):
  """The rank-2 gradient leaves ``B`` rank 2 plus round-off after one step.

  Inverting that round-off (``damping=0``, like the authors' pseudo-inverse)
  gives ``‖ΔW‖`` of 1e70 and more here.
  """
  params, loss = _regression(jnp.float64)
  tx = lora_rite(optax.warmup_cosine_decay_schedule(0.0, 0.01, 10, 150))
  state = tx.init(params)
  for _ in range(8):
    u, state = tx.update(jax.grad(loss)(params), state, params)
    new = optax.apply_updates(params, u)
    step = new["lora_a"] @ new["lora_b"] - params["lora_a"] @ params["lora_b"]
    assert np.linalg.norm(step) < 0.2
    params = new


def test_alias_with_schedule_decreases_regression_loss():
  params, loss = _regression(jnp.float32)
  tx = lora_rite(optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 150))

  def step(carry, _):
    params, state = carry
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), value

  (params, _), curve = jax.jit(
      lambda p: jax.lax.scan(step, (p, tx.init(p)), length=150))(params)
  assert np.all(np.isfinite(curve)) and np.isfinite(loss(params))
  assert loss(params) < 0.1 * curve[0], (curve[0], loss(params))
