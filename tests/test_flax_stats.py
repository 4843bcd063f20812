"""Exact W-gradient statistics from the LoRA layers' backward pass (``full``, docs/derivation.md)."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

from adaprelora_jax import WeightStats, adaprelora, lora_pairs, with_weight_stats
from adaprelora_jax.flax import LoRADenseWithStats, LoRALinearWithStats, WeightStatsVar
from adaprelora_jax.functional import (linear_with_weight_stats, split_weight_stats,
                                       weight_stats_probe)

WRT = nnx.Any(nnx.LoRAParam, WeightStatsVar)
NORMAL = nnx.initializers.normal(1.0)


def _layer(m, n, r, *, seed=0, dtype=jnp.float32, **kw):
  return LoRALinearWithStats(
      m, n, lora_rank=r, rngs=nnx.Rngs(seed), param_dtype=dtype,
      lora_param_dtype=dtype, b_initializer=NORMAL, **kw)


def _head(y):
  """A nonlinear scalar loss on the layer output, so δ is not constant."""
  return jnp.sum(jnp.sin(y) * jnp.linspace(0.5, 1.5, y.shape[-1]))


@jax.jit
def _delta(x, kernel, bias, a, b, scale):
  """``δ = ∂head/∂y`` from ``jax.vjp`` of a plain dense reference layer."""
  y = x @ kernel + bias + scale * (x @ a) @ b
  _, pullback = jax.vjp(_head, y)
  return pullback(jnp.ones((), y.dtype))[0]


def _dense_g(layer, x, scale=1.0):
  """``G = xᵀ δ``, formed explicitly."""
  delta = _delta(x, layer.kernel[...], layer.bias[...], layer.lora.lora_a[...],
                 layer.lora.lora_b[...], scale)
  m, n = layer.kernel.shape
  return np.asarray(x).reshape(-1, m).T @ np.asarray(delta).reshape(-1, n)


def _ms(g):
  return WeightStats(np.mean(g**2, -1), np.mean(g**2, -2))


@nnx.jit
def _grads(layer, x):
  return nnx.grad(lambda l: _head(l(x)), argnums=nnx.DiffState(0, WRT))(layer)


def _layer_grads(layer, x):
  return split_weight_stats(nnx.pure(_grads(layer, x)))


@pytest.mark.parametrize("method", ["dense", "gram"])
@pytest.mark.parametrize("x_shape", [(7, 6), (2, 3, 6)])
def test_stats_equal_dense_reference(x64, x_shape, method):
  layer = _layer(6, 5, 2, dtype=jnp.float64, stats_dtype=jnp.float64,
                 lora_scale=0.7, stats_method=method)
  x = jax.random.normal(jax.random.key(1), x_shape, jnp.float64)
  _, stats = _layer_grads(layer, x)
  assert list(stats) == ["lora"]
  want = _ms(_dense_g(layer, x, scale=0.7))
  np.testing.assert_allclose(stats["lora"].row, want.row, rtol=1e-11)
  np.testing.assert_allclose(stats["lora"].col, want.col, rtol=1e-11)


@pytest.mark.parametrize("method", ["auto", "dense", "gram"])
def test_functional_vjp_gives_true_cotangents(x64, method):
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(3, 4, 6)), rng.normal(size=(6, 5))
  probe = weight_stats_probe(6, 5, jnp.float64)
  f = lambda x, w, p: _head(linear_with_weight_stats(x, w, p, method=method))
  dx, dw, dp = jax.grad(f, argnums=(0, 1, 2))(x, w, probe)
  want_dx, want_dw = jax.grad(lambda x, w: _head(x @ w), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-12)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-12)  # the kernel gets G
  np.testing.assert_allclose(dp.row, np.mean(want_dw**2, 1), rtol=1e-11)
  np.testing.assert_allclose(dp.col, np.mean(want_dw**2, 0), rtol=1e-11)


def test_shared_layer_sums_per_call_statistics():
  """Documented: a layer applied twice gets ms(G₁) + ms(G₂), not ms(G₁ + G₂)."""
  rng = np.random.default_rng(1)
  x1, x2, w = rng.normal(size=(5, 6)), rng.normal(size=(3, 6)), rng.normal(size=(6, 4))
  f = lambda w, p: sum(_head(linear_with_weight_stats(x, w, p)) for x in (x1, x2))
  dw, dp = jax.grad(f, argnums=(0, 1))(w, weight_stats_probe(6, 4))
  g1, g2 = (jax.grad(lambda w: _head(x @ w))(w) for x in (x1, x2))
  np.testing.assert_allclose(dp.row, np.mean(g1**2 + g2**2, 1), rtol=1e-5)
  np.testing.assert_allclose(dw, g1 + g2, rtol=1e-5)


@pytest.mark.parametrize("tokens, gram", [(4, True), (512, False)])
def test_auto_picks_the_cheaper_route(tokens, gram):
  """``2 N (m + n) < m n`` selects the N × N Grams, otherwise G is formed."""
  x, w = jnp.ones((tokens, 64)), jnp.ones((64, 64))
  grad = jax.grad(lambda p: jnp.sum(linear_with_weight_stats(x, w, p)))
  jaxpr = jax.make_jaxpr(grad)(weight_stats_probe(64, 64))
  shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars
            if eqn.primitive.name == "dot_general"}
  assert ((tokens, tokens) in shapes) == gram


def test_matches_nnx_lora_linear():
  kw = dict(lora_rank=3, b_initializer=NORMAL)
  ours = LoRALinearWithStats(8, 5, rngs=nnx.Rngs(4), **kw)
  ref = nnx.LoRALinear(8, 5, rngs=nnx.Rngs(4), **kw)
  x = jax.random.normal(jax.random.key(2), (2, 4, 8))
  np.testing.assert_array_equal(ours.kernel[...], ref.kernel[...])
  np.testing.assert_array_equal(ours(x), ref(x))
  loss = lambda layer, x: _head(layer(x))
  diff = nnx.DiffState(0, nnx.LoRAParam)
  grad = nnx.jit(nnx.grad(loss, argnums=(diff, 1)))
  got, want = grad(ours, x), grad(ref, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  # The LoRA gradients' pair key is the statistics' key.
  rest, stats = _layer_grads(ours, x)
  assert [p.key for p in lora_pairs(rest).pairs] == list(stats) == ["lora"]


def test_full_step_with_layer_stats_equals_step_with_dense_g(x64):
  layer = _layer(9, 7, 2, dtype=jnp.float64, stats_dtype=jnp.float64)
  params = nnx.pure(nnx.state(layer, nnx.LoRAParam))
  tx = adaprelora(0.1, statistics="full", b1=0.9)
  update = jax.jit(tx.update)
  got_state = want_state = tx.init(params)
  for seed in range(2):
    x = jax.random.normal(jax.random.key(seed), (5, 4, 9), jnp.float64)
    grads, stats = _layer_grads(layer, x)
    got, got_state = update(grads, got_state, params, weight_stats=stats)
    dense = {"lora": _ms(_dense_g(layer, x))}
    want, want_state = update(grads, want_state, params, weight_stats=dense)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9), got, want)
    if seed == 0:  # β̂_0 = 0: the first moments are the statistics themselves
      np.testing.assert_allclose(got_state[0].pairs["lora"].v_col,
                                 dense["lora"].col, rtol=1e-12)


def test_full_rank_layer_reduces_to_optax_factored_rms(x64):
  """W-step with the layer's stats == −lr × optax.scale_by_factored_rms(G)."""
  lr, s = 0.05, 0.7
  layer = _layer(6, 5, 5, dtype=jnp.float64, stats_dtype=jnp.float64,
                 lora_scale=s)  # r = min(m, n): the adapter spans all of W
  a, b = np.asarray(layer.lora.lora_a[...]), np.asarray(layer.lora.lora_b[...])
  params = nnx.pure(nnx.state(layer, nnx.LoRAParam))
  tx = adaprelora(lr, damping=0.0, clipping_threshold=None, statistics="full",
                  lora_scale=s)
  ref = optax.scale_by_factored_rms(min_dim_size_to_factor=1)
  state, ref_state = tx.init(params), ref.init(jnp.zeros((6, 5)))
  update = jax.jit(tx.update)
  for seed in range(4):
    x = jax.random.normal(jax.random.key(seed), (11, 6), jnp.float64)
    x = x * jnp.linspace(0.2, 3.0, 6)  # uneven rows, so ℓ is not flat
    grads, stats = _layer_grads(layer, x)
    updates, state = update(grads, state, params, weight_stats=stats)
    want, ref_state = ref.update(jnp.asarray(_dense_g(layer, x, s)), ref_state,
                                 jnp.zeros((6, 5)))
    u = updates["lora"]
    w_step = s * (np.asarray(u["lora_a"]) @ b + a @ np.asarray(u["lora_b"]))
    # optax evaluates β̂_t in float32, hence 1e-6 rather than 1e-12.
    np.testing.assert_allclose(w_step, -lr * np.asarray(want), rtol=1e-6,
                               atol=1e-12)


class _TwoLayers(nnx.Module):

  def __init__(self, rngs):
    self.fc = LoRALinearWithStats(16, 8, lora_rank=4, rngs=rngs)
    self.out = LoRALinearWithStats(8, 4, lora_rank=2, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.gelu(self.fc(x)))


def test_nnx_optimizer_trains_with_full_statistics():
  model = _TwoLayers(nnx.Rngs(0))
  kernel = np.asarray(model.fc.kernel[...])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  opt = nnx.Optimizer(model, with_weight_stats(adaprelora(3e-2, statistics="full")),
                      wrt=WRT)

  @nnx.jit
  def step(model, opt):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, WRT))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(40)]
  assert losses[-1] < 0.8 * losses[0]
  np.testing.assert_array_equal(model.fc.kernel[...], kernel)
  np.testing.assert_array_equal(model.fc.lora.weight_stats.get_value().row, 0)
  pairs = opt.opt_state[0].pairs
  assert set(pairs) == {"fc/lora", "out/lora"}
  assert np.all(np.asarray(pairs["fc/lora"].v_row) > 0)


def test_multisteps_averages_micro_batch_statistics():
  """Documented: mean_t ms(G_t) over micro-batches, not ms(mean_t G_t)."""
  layer = _layer(9, 7, 2)
  full_params = nnx.pure(nnx.state(layer, WRT))
  params = nnx.pure(nnx.state(layer, nnx.LoRAParam))
  xs = [jax.random.normal(jax.random.key(i), (6, 9)) for i in range(2)]
  full_grads = [nnx.pure(_grads(layer, x)) for x in xs]
  tx = optax.MultiSteps(with_weight_stats(adaprelora(1e-2, statistics="full")), 2)
  update = jax.jit(tx.update)
  state = tx.init(full_params)
  first, state = update(full_grads[0], state, full_params)
  assert all(np.all(u == 0) for u in jax.tree.leaves(first))
  second, state = update(full_grads[1], state, full_params)
  np.testing.assert_array_equal(second["lora"]["weight_stats"].row, 0)

  split = [split_weight_stats(g) for g in full_grads]
  mean = lambda *t: jax.tree.map(lambda a, b: (a + b) / 2, *t)
  mean_grads, mean_stats = mean(split[0][0], split[1][0]), mean(split[0][1], split[1][1])
  plain = adaprelora(1e-2, statistics="full")
  want, want_state = jax.jit(plain.update)(mean_grads, plain.init(params), params,
                                  weight_stats=mean_stats)
  for key in ("lora_a", "lora_b"):
    np.testing.assert_allclose(second["lora"][key], want["lora"][key], rtol=1e-5)
  v_row = state.inner_opt_state[0].pairs["lora"].v_row  # β̂_0 = 0: the stats
  np.testing.assert_allclose(v_row, mean_stats["lora"].row, rtol=1e-6)
  g_mean = (_dense_g(layer, xs[0]) + _dense_g(layer, xs[1])) / 2
  assert np.all(np.asarray(v_row) > _ms(g_mean).row)


def test_scanned_layers_give_stacked_statistics():
  depth, width = 3, 6

  class Stack(nnx.Module):

    def __init__(self, rngs):
      @nnx.split_rngs(splits=depth)
      @nnx.vmap(in_axes=0, out_axes=0)
      def make(rngs):
        return LoRALinearWithStats(width, width, lora_rank=2, rngs=rngs,
                                   b_initializer=NORMAL)
      self.layers = make(rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, layer):
        return jnp.tanh(layer(x))
      return body(x, self.layers)

  model = Stack(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (5, width))
  grads = _grads(model, x)
  rest, stats = split_weight_stats(nnx.pure(grads))
  assert list(stats) == ["layers/lora"]
  assert stats["layers/lora"].row.shape == (depth, width)

  layers = model.layers
  def reference(kernels):
    def body(h, p):
      w, bias, a, b = p
      return jnp.tanh(h @ w + bias + (h @ a) @ b), None
    p = (kernels, layers.bias[...], layers.lora.lora_a[...], layers.lora.lora_b[...])
    return _head(jax.lax.scan(body, x, p)[0])
  g = np.asarray(jax.jit(jax.grad(reference))(layers.kernel[...]))
  np.testing.assert_allclose(stats["layers/lora"].row, _ms(g).row, rtol=1e-5)
  np.testing.assert_allclose(stats["layers/lora"].col, _ms(g).col, rtol=1e-5)
  params = nnx.pure(nnx.state(model, nnx.LoRAParam))
  tx = adaprelora(1e-2, statistics="full")
  _, state = jax.jit(tx.update)(rest, tx.init(params), params, weight_stats=stats)
  assert state[0].pairs["layers/lora"].v_col.shape == (depth, width)


def test_linen_layer_stats_and_keys():
  class Net(linen.Module):

    @linen.compact
    def __call__(self, x):
      h = jnp.tanh(LoRADenseWithStats(5, 2, b_init=linen.initializers.normal(1.0),
                                      name="fc")(x))
      return LoRADenseWithStats(3, 2, lora_scale=0.5, name="out")(h)

  x = jax.random.normal(jax.random.key(0), (4, 2, 6))
  variables = Net().init(jax.random.key(1), x)
  params, probes = variables["params"], variables["weight_stats"]

  def loss(params, probes):
    return _head(Net().apply({"params": params, "weight_stats": probes}, x))

  _, stat_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, probes)
  rest, stats = split_weight_stats(stat_grads)
  assert rest == {"fc": {}, "out": {}}
  assert [p.key for p in lora_pairs(params).pairs] == sorted(stats) == ["fc", "out"]

  def reference(k_fc, k_out):
    p = lambda name: params[name]
    low = lambda h, name, s: s * (h @ p(name)["lora_a"]) @ p(name)["lora_b"]
    h = jnp.tanh(x @ k_fc + p("fc")["bias"] + low(x, "fc", 1.0))
    return _head(h @ k_out + p("out")["bias"] + low(h, "out", 0.5))
  g_fc, g_out = jax.jit(jax.grad(reference, argnums=(0, 1)))(params["fc"]["kernel"],
                                                    params["out"]["kernel"])
  for key, g in (("fc", g_fc), ("out", g_out)):
    np.testing.assert_allclose(stats[key].row, _ms(np.asarray(g)).row, rtol=1e-5)
    np.testing.assert_allclose(stats[key].col, _ms(np.asarray(g)).col, rtol=1e-5)


def test_bfloat16_inputs_give_float32_statistics():
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(16, 8)), rng.normal(size=(8, 6))
  f = lambda x, w, p: _head(linear_with_weight_stats(x, w, p))
  dp = jax.jit(jax.grad(f, argnums=2))(
      jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16),
      weight_stats_probe(8, 6))
  assert dp.row.dtype == dp.col.dtype == jnp.float32
  g = jax.grad(lambda w: _head(x @ w))(w)  # float32 reference
  np.testing.assert_allclose(dp.row, np.mean(g**2, 1), rtol=5e-2)
  np.testing.assert_allclose(dp.col, np.mean(g**2, 0), rtol=5e-2)


SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from adaprelora_jax.functional import linear_with_weight_stats, weight_stats_probe
x0 = np.random.default_rng(0).normal(size=(4, 3, 8)).astype(np.float32)
w0 = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
loss = lambda p, w, x, method: jnp.sum(jnp.sin(linear_with_weight_stats(x, w, p, method=method)))
grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)
want_p, want_w = jax.grad(loss, argnums=(0, 1))(weight_stats_probe(8, 6), w0, x0, "dense")
for kind in (AxisType.Explicit, AxisType.Auto):
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(kind, kind))
  x = jax.device_put(x0, NamedSharding(mesh, P("data")))
  for spec in (P(), P(None, "model"), P("model", None)):
    w = jax.device_put(w0, NamedSharding(mesh, spec))
    probe = jax.device_put(weight_stats_probe(8, 6), NamedSharding(mesh, P()))
    got_p, got_w = grad(probe, w, x, "auto")
    np.testing.assert_allclose(got_p.row, want_p.row, rtol=1e-5)
    np.testing.assert_allclose(got_p.col, want_p.col, rtol=1e-5)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    if kind == AxisType.Explicit:
      assert got_w.sharding.is_equivalent_to(w.sharding, 2), (got_w.sharding, spec)
try:
  grad(weight_stats_probe(8, 6), w, jax.device_put(x0, NamedSharding(
      jax.make_mesh((2, 2), ("data", "model")), P("data"))), "gram")
except ValueError as e:
  assert "method='gram' needs unsharded token axes" in str(e), e
  print("ok")
"""


def test_sharded_batch_gives_global_statistics():
  """On a 2×2 CPU mesh (batch on 'data', kernel replicated or on 'model'),
  the statistics are the global G's and the kernel cotangent keeps its layout."""
  done = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_errors():
  with pytest.raises(ValueError, match="custom dot_general is not supported"):
    LoRALinearWithStats(4, 3, lora_rank=1, rngs=nnx.Rngs(0),
                        dot_general=lambda *a, **k: None)
  with pytest.raises(ValueError, match=re.escape(
      "probe has row (4,) and col (2,); expected (4,) and (3,)")):
    linear_with_weight_stats(jnp.ones((2, 4)), jnp.ones((4, 3)), weight_stats_probe(4, 2))
  with pytest.raises(ValueError, match=re.escape(
      "x has shape (2, 5) and kernel (4, 3)")):
    linear_with_weight_stats(jnp.ones((2, 5)), jnp.ones((4, 3)), weight_stats_probe(4, 3))
  with pytest.raises(ValueError, match="method must be"):
    linear_with_weight_stats(jnp.ones((2, 4)), jnp.ones((4, 3)),
                             weight_stats_probe(4, 3), method="exact")
  with pytest.raises(ValueError, match="outside a mapping"):
    split_weight_stats({"layers": [weight_stats_probe(2, 2)]})
  with pytest.raises(ValueError, match="two weight statistics nodes under 'fc'"):
    split_weight_stats({"fc": {"s1": weight_stats_probe(2, 2),
                               "s2": weight_stats_probe(2, 2)}})
  layer = _layer(4, 3, 1)
  tx = with_weight_stats(adaprelora(1e-2, statistics="full"))
  params = nnx.pure(nnx.state(layer, WRT))
  with pytest.raises(ValueError, match="do not also pass weight_stats"):
    tx.update(params, tx.init(params), params, weight_stats={})
  lora_only = nnx.pure(nnx.state(layer, nnx.LoRAParam))
  with pytest.raises(ValueError, match=r"missing: \['lora'\]"):
    tx.update(lora_only, tx.init(lora_only), lora_only)
