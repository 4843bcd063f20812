"""adaprelora composes with Optax and Flax NNX, and rejects bad input cleanly."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adaprelora_jax import WeightStats, adaprelora, baselines
from conftest import count_primitive

EVERY_OPTIMIZER = pytest.mark.parametrize(
    "make",
    [
        lambda: adaprelora(1e-2, b1=0.9),
        lambda: baselines.lora_plus(1e-2),
        lambda: baselines.scaled_adamw(1e-2),
        lambda: baselines.lora_pro(1e-2),
        lambda: baselines.lora_pro(1e-2, variant="full"),
        lambda: baselines.lora_rite(1e-2),
    ],
)
"""Every optimizer built on the pairwise plumbing."""


def _params(seed=0, zero_b=False):
  rng = np.random.default_rng(seed)
  p = {
      "q": {"lora_a": rng.normal(size=(12, 3)), "lora_b": rng.normal(size=(3, 10))},
      "v": {"lora_a": rng.normal(size=(12, 2)), "lora_b": rng.normal(size=(2, 8))},
      "head": {"bias": rng.normal(size=(10,))},
  }
  if zero_b:
    p["q"]["lora_b"] = 0 * p["q"]["lora_b"]
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)


def _run(tx, params, grad_seeds, **kw):
  state = tx.init(params)
  for seed in grad_seeds:
    updates, state = tx.update(_grads(params, seed), state, params, **kw)
    params = optax.apply_updates(params, updates)
  return params, state


def _assert_trees_close(x, y, **kw):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **kw), x, y)


@pytest.mark.slow  # several jitted steps of a model
def test_chain_with_clip_by_global_norm_clips_first():
  params = _params()
  grads = jax.tree.map(lambda g: 50.0 * g, _grads(params, 1))
  clipped = optax.clip_by_global_norm(1.0).update(grads, None)[0]
  tx = optax.chain(optax.clip_by_global_norm(1.0), adaprelora(1e-2))
  got, _ = tx.update(grads, tx.init(params), params)
  want, _ = adaprelora(1e-2).update(clipped, adaprelora(1e-2).init(params), params)
  _assert_trees_close(got, want, rtol=1e-6)


def test_inject_hyperparams_learning_rate_and_schedule():
  params = _params()
  tx = optax.inject_hyperparams(adaprelora)(learning_rate=1e-2, b1=0.9)
  state = tx.init(params)
  state.hyperparams["learning_rate"] = jnp.asarray(3e-3)
  got, _ = jax.jit(tx.update)(_grads(params, 1), state, params)
  plain = adaprelora(3e-3, b1=0.9)
  want, _ = plain.update(_grads(params, 1), plain.init(params), params)
  _assert_trees_close(got, want, rtol=1e-5, atol=1e-8)
  schedule = optax.linear_schedule(1e-2, 0.0, 4)
  sched_params, _ = _run(adaprelora(schedule), params, range(3))
  inj_params, _ = _run(optax.inject_hyperparams(adaprelora)(schedule), params, range(3))
  _assert_trees_close(sched_params, inj_params, rtol=1e-5, atol=1e-7)


def test_multisteps_equals_one_step_on_mean_gradient():
  params = _params()
  g1, g2 = _grads(params, 1), _grads(params, 2)
  tx = optax.MultiSteps(adaprelora(1e-2), every_k_schedule=2)
  state = tx.init(params)
  u1, state = tx.update(g1, state, params)
  _assert_trees_close(u1, jax.tree.map(jnp.zeros_like, params), atol=0)
  u2, _ = tx.update(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want, _ = adaprelora(1e-2).update(mean, adaprelora(1e-2).init(params), params)
  _assert_trees_close(u2, want, rtol=1e-5, atol=1e-8)


@pytest.mark.slow  # several jitted steps of a model
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_apply_if_finite_leaves_state_untouched(bad):
  params = _params()
  tx = optax.apply_if_finite(adaprelora(1e-2, b1=0.9), max_consecutive_errors=3)
  _, state = _run(tx, params, [1, 2])
  grads = _grads(params, 3)
  grads["q"]["lora_a"] = grads["q"]["lora_a"].at[0, 0].set(bad)
  updates, new_state = tx.update(grads, state, params)
  _assert_trees_close(updates, jax.tree.map(jnp.zeros_like, params), atol=0)
  _assert_trees_close(new_state.inner_state, state.inner_state, atol=0)
  assert int(new_state.notfinite_count) == 1


def test_masked_pair_passes_through():
  params = _params()
  mask = {
      "q": {"lora_a": True, "lora_b": True},
      "v": {"lora_a": False, "lora_b": False},
      "head": {"bias": False},
  }
  tx = optax.masked(adaprelora(1e-2), mask)
  grads = _grads(params, 1)
  got, _ = tx.update(grads, tx.init(params), params)
  only_q = {"q": params["q"]}
  want, _ = adaprelora(1e-2).update({"q": grads["q"]}, adaprelora(1e-2).init(only_q), only_q)
  _assert_trees_close(got["q"], want["q"], rtol=1e-6)
  _assert_trees_close(got["v"], grads["v"], atol=0)


def test_jit_with_donated_state_and_eval_shape_init():
  params = _params(zero_b=True)
  tx = adaprelora(1e-2, b1=0.9)
  abstract = jax.eval_shape(tx.init, params)
  concrete = tx.init(params)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
      lambda x: (x.shape, x.dtype), concrete
  )

  @jax.jit
  def reference(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(reference, donate_argnums=(0, 1))
  want = reference(params, tx.init(params), _grads(params, 1))
  got = step(jax.tree.map(jnp.copy, params), tx.init(params), _grads(params, 1))
  _assert_trees_close(got, want, atol=0)


def test_bad_grads_raise_before_donated_state_is_consumed():
  params = _params()
  tx = adaprelora(1e-2)
  state = tx.init(params)
  before = jax.tree.map(np.asarray, state)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
  bad = _grads(params, 1)
  bad["v"]["lora_b"] = jnp.zeros((2, 9))
  with pytest.raises(
      ValueError,
      match=re.escape(
          "update at ['v']['lora_b'] has shape (2, 9), but the parameter has shape (2, 8)"
      ),
  ):
    step(bad, state, params)
  _assert_trees_close(state, before, atol=0)  # still alive and unchanged
  step(_grads(params, 1), state, params)


def test_error_messages():
  params = _params()
  tx = adaprelora(1e-2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="updates tree does not match"):
    tx.update({"q": _grads(params, 1)["q"]}, state, params)
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(_grads(params, 1), state)
  other = {"k": params["q"], "v": params["v"], "head": params["head"]}
  with pytest.raises(ValueError, match=r"Missing in state: \['k'\]; unknown in params: \['q'\]"):
    tx.update(_grads(other, 1), state, other)
  full = adaprelora(1e-2, statistics="full")
  with pytest.raises(ValueError, match=r"missing: \['q', 'v'\]"):
    full.update(_grads(params, 1), full.init(params), params)
  stats = {"q": WeightStats(jnp.ones(12), jnp.ones(11))}
  with pytest.raises(
      ValueError,
      match=re.escape("weight_stats['q'].col has shape (11,); expected (10,) for A q/lora_a"),
  ):
    tx.update(_grads(params, 1), state, params, weight_stats=stats)
  with pytest.raises(ValueError, match=r"unknown pair keys \['x'\]"):
    tx.update(
        _grads(params, 1), state, params, weight_stats={"x": WeightStats(jnp.ones(1), jnp.ones(1))}
    )
  with pytest.raises(ValueError, match="statistics must be"):
    adaprelora(1e-2, statistics="exact")


def test_nnx_optimizer_trains_lora_params_only():
  class Model(nnx.Module):

    def __init__(self, rngs):
      self.fc = nnx.LoRALinear(16, 8, lora_rank=4, rngs=rngs)
      self.out = nnx.LoRALinear(8, 4, lora_rank=2, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.gelu(self.fc(x)))

  model = Model(nnx.Rngs(0))
  kernel = np.asarray(model.fc.kernel[...])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  opt = nnx.Optimizer(model, adaprelora(3e-2, b1=0.9), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, opt):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(60)]
  assert losses[-1] < 0.8 * losses[0]
  np.testing.assert_array_equal(model.fc.kernel[...], kernel)
  assert set(opt.opt_state[0].pairs) == {"fc/lora", "out/lora"}


@EVERY_OPTIMIZER
def test_state_can_be_donated(make):
  """No buffer appears twice in the state (a rule may reuse one zeros array)."""
  params, tx = _params(), make()
  state = tx.init(params)
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
  assert len(pointers) == len(set(pointers))
  step = jax.jit(lambda p, s, g: tx.update(g, s, p), donate_argnums=(1,))
  for seed in (1, 2):
    _, state = step(params, state, _grads(params, seed))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def _layered_params(layers, seed=0):
  """An unscanned stack: ``layers`` copies of the q (12 x 10) and mlp (12 x 6) pairs, plus a
  stacked pair with q's shape (it carries a batch axis, so it joins q's group)."""
  rng = np.random.default_rng(seed)
  pair = lambda *batch, m, n: {
      "lora_a": rng.normal(size=(*batch, m, 3)),
      "lora_b": rng.normal(size=(*batch, 3, n)),
  }
  p = {
      "layers": {str(i): {"q": pair(m=12, n=10), "mlp": pair(m=12, n=6)} for i in range(layers)},
      "stacked": {"q": pair(2, m=12, n=10)},
  }
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)


def _pair_states(state):
  """The per-pair states, wherever the alias's chain holds them."""
  has_pairs = lambda x: hasattr(x, "pairs")
  return next(x.pairs for x in jax.tree.leaves(state, is_leaf=has_pairs) if has_pairs(x))


@pytest.mark.slow  # compiles every optimizer twice over a many-pair tree
@EVERY_OPTIMIZER
def test_same_role_pairs_solved_together_equal_pairs_solved_alone(make):
  tx, params = make(), _layered_params(3)  # the default layout joins each role's layers
  together, state = _run(tx, params, [1, 2, 3])
  for key, (a, b) in {"layers/1/q": ("layers", "1"), "layers/2/mlp": ("layers", "2")}.items():
    role = key.split("/")[-1]
    alone = {"p": {role: params[a][b][role]}}
    grads = [{"p": {role: _grads(params, s)[a][b][role]}} for s in (1, 2, 3)]
    alone_state = tx.init(alone)
    for g in grads:
      updates, alone_state = tx.update(g, alone_state, alone)
      alone = optax.apply_updates(alone, updates)
    _assert_trees_close(alone["p"][role], together[a][b][role], rtol=1e-5, atol=1e-6)
    _assert_trees_close(
        _pair_states(alone_state)["p/" + role], _pair_states(state)[key], rtol=1e-5, atol=1e-6
    )


def test_traced_solves_do_not_grow_with_unscanned_depth():
  """Compile time follows the traced program: one solve per role and shape, whatever the depth."""
  tx = adaprelora(1e-2)

  def eighs(layers):
    params = _layered_params(layers)
    step = lambda p, s, g: tx.update(g, s, p)
    return count_primitive(jax.make_jaxpr(step)(params, tx.init(params), params).jaxpr, "eigh")

  assert eighs(16) == eighs(2) == eighs(1) > 0
