"""scale_by_adaprelora / adaprelora: reductions, statistics, state and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaprelora_jax import WeightStats, adaprelora, scale_by_adaprelora
from adaprelora_jax.functional import solve_factor_update
from conftest import EXACT, random_pair


def _pair_params(p, dtype=jnp.float32):
  return {"proj": {"lora_a": jnp.asarray(p["a"], dtype),
                   "lora_b": jnp.asarray(p["b"], dtype)}}


def _pair_grads(p, g, dtype=jnp.float32):
  s = p["scale"]
  return {"proj": {"lora_a": jnp.asarray(s * g @ p["b"].T, dtype),
                   "lora_b": jnp.asarray(s * p["a"].T @ g, dtype)}}


def _w_step(p, updates):
  u = updates["proj"]
  return p["scale"] * (np.asarray(u["lora_a"]) @ p["b"]
                       + p["a"] @ np.asarray(u["lora_b"]))


@pytest.mark.parametrize("statistics", ["full", "tangent"])
def test_full_rank_adapter_reduces_to_optax_factored_rms(x64, statistics):
  """W-step of adaprelora == −lr × optax.scale_by_factored_rms(G), step by step."""
  lr = 0.05
  p = random_pair(0, 6, 5, 5)  # r >= min(m, n): the adapter spans all of W
  params = _pair_params(p, jnp.float64)
  tx = adaprelora(lr, damping=0.0, clipping_threshold=None,
                  statistics=statistics, lora_scale=p["scale"], **EXACT)
  ref = optax.scale_by_factored_rms(min_dim_size_to_factor=1)
  state, ref_state = tx.init(params), ref.init(jnp.zeros((6, 5)))
  rng = np.random.default_rng(1)
  for _ in range(4):
    g = rng.normal(size=(6, 5)) * rng.uniform(0.1, 3.0, size=(6, 1))
    stats = {"proj": WeightStats(np.mean(g**2, 1), np.mean(g**2, 0))}
    updates, state = tx.update(_pair_grads(p, g, jnp.float64), state, params,
                               weight_stats=stats)
    want, ref_state = ref.update(jnp.asarray(g), ref_state, jnp.zeros((6, 5)))
    # optax evaluates β̂_t in float32, hence 1e-6 rather than 1e-12.
    np.testing.assert_allclose(_w_step(p, updates), -lr * np.asarray(want),
                               rtol=1e-6, atol=1e-12)


def test_auto_statistics_use_weight_stats_when_given():
  p = random_pair(2, 8, 6, 2)
  params, grads = _pair_params(p), _pair_grads(p, p["g"])
  g = p["g"]
  stats = {"proj": WeightStats(np.mean(g**2, 1), np.mean(g**2, 0))}
  run = lambda mode, **kw: scale_by_adaprelora(statistics=mode).update(
      grads, scale_by_adaprelora(statistics=mode).init(params), params, **kw)[1]
  full, auto_given = run("full", weight_stats=stats), run("auto", weight_stats=stats)
  tangent, auto_missing = run("tangent"), run("auto")
  np.testing.assert_array_equal(full.pairs["proj"].v_row, auto_given.pairs["proj"].v_row)
  np.testing.assert_array_equal(tangent.pairs["proj"].v_row, auto_missing.pairs["proj"].v_row)
  np.testing.assert_allclose(full.pairs["proj"].v_row, np.mean(g**2, 1), rtol=1e-5)
  assert not np.allclose(full.pairs["proj"].v_row, tangent.pairs["proj"].v_row)


def test_constant_b2_has_bias_corrected_moments():
  p = random_pair(3, 5, 4, 2)
  params = _pair_params(p)
  tx = scale_by_adaprelora(b2=0.9, statistics="full", lora_scale=p["scale"],
                           damping=1e-6, **EXACT)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  v, direction = np.zeros(4), None
  for t in range(3):
    g = rng.normal(size=(5, 4))
    stats = {"proj": WeightStats(np.mean(g**2, 1), np.mean(g**2, 0))}
    direction, state = tx.update(_pair_grads(p, g), state, params, weight_stats=stats)
    v = 0.9 * v + 0.1 * (np.mean(g**2, 0) + 1e-30)
  np.testing.assert_allclose(state.pairs["proj"].v_col, v, rtol=1e-5)
  # The last direction uses ρ = sqrt(v / (1 − 0.9³)).
  v_row = np.asarray(state.pairs["proj"].v_row)
  want = solve_factor_update(
      p["a"], p["b"], p["scale"] * g @ p["b"].T, p["scale"] * p["a"].T @ g,
      np.sqrt(v_row / v_row.mean()), np.sqrt(v / (1 - 0.9**3)),
      scale=p["scale"], damping=1e-6)
  np.testing.assert_allclose(direction["proj"]["lora_a"], want[0], rtol=1e-4)


def test_momentum_first_step_equals_plain_solve():
  p = random_pair(4, 9, 7, 3)
  params, grads = _pair_params(p), _pair_grads(p, p["g"])
  plain = scale_by_adaprelora(b1=None)
  heavy = scale_by_adaprelora(b1=0.9)
  u0, _ = plain.update(grads, plain.init(params), params)
  u1, _ = heavy.update(grads, heavy.init(params), params)
  for k in ("lora_a", "lora_b"):
    np.testing.assert_allclose(u1["proj"][k], u0["proj"][k], rtol=2e-4, atol=1e-6)


def test_momentum_is_invariant_to_factor_rescaling():
  """Rescaling A → A/c, B → cB between steps leaves the W-steps unchanged.

  An EMA of factor directions fails this: a stored dA is multiplied by the new B.
  """
  p = random_pair(5, 10, 8, 2)
  rng = np.random.default_rng(3)
  gs = [rng.normal(size=(10, 8)) for _ in range(3)]

  def w_steps(c):
    tx = scale_by_adaprelora(b1=0.9, damping=1e-9, **EXACT)
    q = dict(p)
    state, out = tx.init(_pair_params(q)), []
    for t, g in enumerate(gs):
      if t:  # change the gauge between steps
        q = dict(q, a=q["a"] / c, b=q["b"] * c)
      u, state = tx.update(_pair_grads(q, g), state, _pair_params(q))
      out.append(_w_step(q, u))
    return out

  for base, scaled in zip(w_steps(1.0), w_steps(8.0)):
    np.testing.assert_allclose(scaled, base, rtol=2e-3, atol=1e-5)


def test_clipping_bounds_w_step_rms():
  p = random_pair(6, 12, 10, 3)
  p["row"] = np.ones(12)
  params, grads = _pair_params(p), _pair_grads(p, p["g"])
  tx = scale_by_adaprelora(clipping_threshold=0.1, lora_scale=p["scale"], **EXACT)
  u, _ = tx.update(grads, tx.init(params), params)
  unclipped = scale_by_adaprelora(clipping_threshold=None, lora_scale=p["scale"], **EXACT)
  v, _ = unclipped.update(grads, unclipped.init(params), params)
  rms_clipped = np.sqrt(np.mean(_w_step(p, u) ** 2))
  rms_free = np.sqrt(np.mean(_w_step(p, v) ** 2))
  assert rms_free > 0.1
  np.testing.assert_allclose(rms_clipped, 0.1, rtol=1e-4)
  np.testing.assert_allclose(u["proj"]["lora_a"] * rms_free / 0.1,
                             v["proj"]["lora_a"], rtol=1e-4, atol=1e-7)


def test_bfloat16_params_compute_in_float32():
  p = random_pair(7, 16, 12, 4)
  params16, grads16 = _pair_params(p, jnp.bfloat16), _pair_grads(p, p["g"], jnp.bfloat16)
  params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params16)
  grads32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads16)
  tx = adaprelora(1e-2)
  u16, s16 = tx.update(grads16, tx.init(params16), params16)
  u32, _ = tx.update(grads32, tx.init(params32), params32)
  assert jax.tree.map(lambda x: x.dtype, u16) == jax.tree.map(lambda x: x.dtype, params16)
  assert s16[0].pairs["proj"].v_row.dtype == jnp.float32
  for k in ("lora_a", "lora_b"):
    np.testing.assert_allclose(np.asarray(u16["proj"][k], np.float32),
                               u32["proj"][k], rtol=2e-2, atol=1e-5)


def test_zero_b_init_gives_finite_step_with_zero_delta_a():
  p = random_pair(8, 16, 12, 4)
  p["b"] = np.zeros((4, 12))
  params, grads = _pair_params(p), _pair_grads(p, p["g"])
  tx = adaprelora(1e-3, b1=0.9)
  state = tx.init(params)
  for _ in range(3):
    u, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u)
    p = dict(p, a=np.asarray(params["proj"]["lora_a"]),
             b=np.asarray(params["proj"]["lora_b"]))
    grads = _pair_grads(p, p["g"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((u, state)))
  q = dict(p, b=np.zeros((4, 12)))
  exact, balanced = adaprelora(1e-3, **EXACT), adaprelora(1e-3, factor_clipping=None)
  u, _ = exact.update(_pair_grads(q, q["g"]), exact.init(_pair_params(q)), _pair_params(q))
  np.testing.assert_array_equal(u["proj"]["lora_a"], 0.0)
  assert np.abs(u["proj"]["lora_b"]).max() > 0
  # The balancing term moves A along itself (a pure gauge: W does not move with B = 0),
  # and leaves B's step as it was.
  v, _ = balanced.update(_pair_grads(q, q["g"]), balanced.init(_pair_params(q)),
                         _pair_params(q))
  np.testing.assert_allclose(v["proj"]["lora_a"], -1e-3 * q["a"], rtol=1e-4)
  np.testing.assert_allclose(v["proj"]["lora_b"], u["proj"]["lora_b"], rtol=1e-5)


def test_non_lora_leaves_go_to_fallback():
  p = random_pair(9, 6, 5, 2)
  params = {**_pair_params(p), "head": {"bias": jnp.ones(5)}}
  grads = {**_pair_grads(p, p["g"]), "head": {"bias": jnp.arange(5.0)}}
  tx = scale_by_adaprelora(fallback=optax.scale(-3.0))
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u["head"]["bias"], -3.0 * np.arange(5.0))
  default = scale_by_adaprelora()
  u, _ = default.update(grads, default.init(params), params)
  want, _ = optax.scale_by_adam().update(grads["head"], optax.scale_by_adam().init(
      params["head"]))
  np.testing.assert_allclose(u["head"]["bias"], want["bias"], rtol=1e-6)


def test_stacked_and_nd_factors_match_per_slice_solves(x64):
  """In float64, so that a slice solved with another's inputs cannot hide in rounding."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 4, 2, 5))        # (layers, heads, head_dim, r)
  b = rng.normal(size=(3, 5, 6))           # (layers, r, out)
  params = {"attn": {"w_lora_a": jnp.asarray(a), "w_lora_b": jnp.asarray(b)}}
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
  tx = scale_by_adaprelora(clipping_threshold=None)
  u, state = tx.update(grads, tx.init(params), params)
  assert state.pairs["attn/w"].v_row.shape == (3, 8)
  assert u["attn"]["w_lora_a"].shape == a.shape
  for layer in range(3):
    sub = {"l": {"lora_a": params["attn"]["w_lora_a"][layer].reshape(8, 5),
                 "lora_b": params["attn"]["w_lora_b"][layer]}}
    sub_g = {"l": {"lora_a": grads["attn"]["w_lora_a"][layer].reshape(8, 5),
                   "lora_b": grads["attn"]["w_lora_b"][layer]}}
    v, _ = tx.update(sub_g, tx.init(sub), sub)
    np.testing.assert_allclose(u["attn"]["w_lora_a"][layer].reshape(8, 5),
                               v["l"]["lora_a"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(u["attn"]["w_lora_b"][layer], v["l"]["lora_b"],
                               rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # many steps
def test_finite_inputs_never_give_nan_over_many_steps():
  """A training run with B = 0 init and tiny/large gradients stays finite."""
  rng = np.random.default_rng(10)
  params = {"l": {"lora_a": jnp.asarray(rng.normal(size=(20, 4)), jnp.float32),
                  "lora_b": jnp.zeros((4, 16))}}
  tx = adaprelora(1e-2, b1=0.9)
  state = tx.init(params)
  for t in range(30):
    scale = 10.0 ** rng.uniform(-12, 6)
    grads = jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape),
                                               jnp.float32), params)
    u, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((params, state)))


@pytest.mark.parametrize("b1", [None, 0.9])
def test_rank_one_gradients_from_zero_b_stay_stable_in_float32(b1):
  """One example per step: B becomes rank one plus float32 rounding.

  Its Gram is then indefinite by more than the damping (a Cholesky
  factorisation returned NaN), and its rounding-level singular values sit
  near √δ, where the solve's gain on the other factor peaks (at damping
  1e-6 the loss below reached 1e8 and then NaN on most seeds; with
  ``b1=0.9``, 1e4 to 2e5 on two seeds). At the default damping the
  trajectory is chaotic: float32 rounding alone (dots or unrolled products)
  moves seed 0's worst loss with ``b1=0.9`` between 60× and 130× its start.
  """
  m, n, r = 256, 256, 16
  for seed in range(4):
    rng = np.random.default_rng(seed)
    params = {"p": {"lora_a": jnp.asarray(rng.normal(size=(m, r)) / np.sqrt(m), jnp.float32),
                    "lora_b": jnp.zeros((r, n), jnp.float32)}}
    x = jnp.asarray(rng.normal(size=(1, m)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(1, n)), jnp.float32)
    loss = lambda p: jnp.sum((x @ p["p"]["lora_a"] @ p["p"]["lora_b"] - y) ** 2)
    tx = adaprelora(1e-2, b1=b1)
    state, initial = tx.init(params), float(loss(params))
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(8):
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
      assert np.isfinite(float(loss(params)))
      assert float(loss(params)) < 1000 * initial, (seed, float(loss(params)), initial)
