"""LoRA+: AdamW with B's learning rate lr_ratio times A's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaprelora_jax import lora_pairs
from adaprelora_jax.baselines import lora_plus, scale_by_lora_plus


def _run(tx, params, grads_seq):
  """Updates of ``tx`` over a sequence of gradients, applying each step."""
  state, out = tx.init(params), []
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def _random_like(rng, tree):
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                      tree)


# (params, path of LoRA's B: the zero-init, output-side factor) per naming.
NAMINGS = {
    "nnx": ({"proj": {"lora_a": (6, 2), "lora_b": (2, 5)}}, ("proj", "lora_b")),
    "qwix": ({"proj": {"kernel_lora_a": (6, 2), "kernel_lora_b": (2, 5)}},
             ("proj", "kernel_lora_b")),
    "gemma": ({"proj": {"lora": {"a": (6, 2), "b": (2, 5)}}},
              ("proj", "lora", "b")),
    # PyTorch layout: the pair is read as ΔW = lora_B @ lora_A, so lora_B has
    # the matrix role A, but LoRA+ must still speed it up.
    "pytorch": ({"proj": {"lora_A": {"weight": (2, 6)},
                          "lora_B": {"weight": (5, 2)}}},
                ("proj", "lora_B", "weight")),
}


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.mark.parametrize("naming", NAMINGS)
def test_adam_on_a_and_ratio_times_adam_on_b(naming):
  """lora_plus == optax.adamw(lr) leaf by leaf, with lr·λ on LoRA's B."""
  shapes, b_path = NAMINGS[naming]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
                        shapes, is_leaf=lambda x: isinstance(x, tuple))
  params["bias"] = jnp.asarray(rng.normal(size=5), jnp.float32)
  if naming == "pytorch":
    pair, = lora_pairs(params).pairs
    assert pair.a_path == "proj/lora_B/weight"  # the swapped reading
  lr, ratio, wd = 0.01, 8.0, 0.1
  grads_seq = [_random_like(rng, params) for _ in range(4)]
  got = _run(lora_plus(lr, lr_ratio=ratio, weight_decay=wd), params, grads_seq)

  def reference(path, leaf):
    is_b = tuple(k.key for k in path) == b_path
    tx = optax.adamw(lr * ratio if is_b else lr, weight_decay=wd)
    leaf_grads = [_get(g, tuple(k.key for k in path)) for g in grads_seq]
    return _run(tx, leaf, leaf_grads)

  want = jax.tree_util.tree_map_with_path(reference, params)
  for t in range(len(grads_seq)):
    jax.tree.map(
        lambda w, g: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9),
        jax.tree.map(lambda steps: steps[t], want,
                     is_leaf=lambda x: isinstance(x, list)), got[t])
  # The ratio really went to B, and only to B.
  b_step = np.abs(_get(got[0], b_path)).max()
  assert b_step > 0.5 * lr * ratio and np.abs(got[0]["bias"]).max() < 2 * lr


def test_direction_is_ratio_on_b_and_finite_at_zero_b():
  rng = np.random.default_rng(1)
  params = {"lora_a": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32),
            "lora_b": jnp.zeros((3, 4), jnp.float32)}
  x, y = rng.normal(size=(8, 7)), rng.normal(size=(8, 4))
  loss = lambda p: jnp.mean((x @ p["lora_a"] @ p["lora_b"] - y) ** 2)
  grads = jax.grad(loss)(params)
  tx = scale_by_lora_plus(lr_ratio=16.0)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  adam = optax.scale_by_adam()
  want, _ = adam.update(grads, adam.init(params))
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
  np.testing.assert_allclose(updates["lora_a"], want["lora_a"], atol=1e-7)
  np.testing.assert_allclose(updates["lora_b"], 16.0 * want["lora_b"],
                             rtol=1e-6)


def test_stacked_pair_under_jit_matches_slices():
  rng = np.random.default_rng(2)
  params = {"lora_a": jnp.asarray(rng.normal(size=(3, 6, 2)), jnp.float32),
            "lora_b": jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32)}
  grads_seq = [_random_like(rng, params) for _ in range(3)]
  tx = lora_plus(0.01)
  assert jax.tree.leaves(jax.eval_shape(tx.init, params))
  tx = optax.GradientTransformationExtraArgs(tx.init, jax.jit(tx.update))
  stacked = _run(tx, params, grads_seq)
  close = lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-8)
  for i in range(3):
    part = lambda tree: jax.tree.map(lambda x: x[i], tree)
    sliced = _run(lora_plus(0.01), part(params), [part(g) for g in grads_seq])
    for s, t in zip(sliced, stacked):
      jax.tree.map(close, s, part(t))


def test_alias_with_schedule_fits_a_lora_regression():
  rng = np.random.default_rng(3)
  m, n, r = 12, 10, 3
  x = jnp.asarray(rng.normal(size=(64, m)), jnp.float32)
  y = x @ jnp.asarray(rng.normal(size=(m, r)) @ rng.normal(size=(r, n)) / 3,
                      jnp.float32)
  params = {"lora_a": jnp.asarray(rng.normal(size=(m, r)) / np.sqrt(m),
                                  jnp.float32),
            "lora_b": jnp.zeros((r, n), jnp.float32)}
  loss = lambda p: jnp.mean((x @ p["lora_a"] @ p["lora_b"] - y) ** 2)
  tx = lora_plus(optax.cosine_decay_schedule(0.02, 150))

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state, start = tx.init(params), loss(params)
  for _ in range(150):
    params, state = step(params, state)
  assert loss(params) < 0.05 * start
