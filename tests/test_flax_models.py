"""adaprelora trains real Flax models end to end: NNX, Qwix, Gemma peft, Linen, scans.

Each model (see ``flax_models.py``) is trained a few steps on a task its
adapters can learn, and the loss on fresh batches must fall. The tests also
check that the pairing found exactly the adapted layers, with the shapes and
batch axes expected, and that frozen weights stayed bit for bit the same.
Scanned stacks are checked against the optimizer run on each layer's slice
alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from adaprelora_jax import adaprelora, lora_pairs

import flax_models as fm
from flax_models import (
    D,
    FROZEN,
    TOKENS,
    assert_learned,
    assert_trees_equal,
    lm_loss,
    snapshot,
    train_nnx,
)

pytestmark = pytest.mark.slow  # trains Flax, Qwix and Gemma-style models end to end


def _pair_shapes(tree):
  """``{key: (batch, in, out, rank)}`` as the pairing reads ``tree``."""
  return {p.key: (p.batch_shape, p.in_shape, p.out_shape, p.rank) for p in lora_pairs(tree).pairs}


def test_nnx_transformer_with_nnx_lora():
  model = fm.TinyLM(d=D, lora_rank=4, rngs=fm.rngs(0))
  want = {}
  for i in range(2):
    want |= {
        f"blocks/{i}/q_lora": ((), (D,), (D,), 4),
        f"blocks/{i}/v_lora": ((), (D,), (D,), 4),
        f"blocks/{i}/up/lora": ((), (D,), (64,), 4),
        f"blocks/{i}/down/lora": ((), (64,), (D,), 4),
    }
  assert _pair_shapes(nnx.state(model, nnx.LoRAParam)) == want
  frozen = snapshot(nnx.state(model, FROZEN))

  optimizer, losses, _ = train_nnx(model, adaprelora(3e-2), lm_loss, TOKENS)

  assert set(optimizer.opt_state[0].pairs) == set(want)
  assert_learned(losses)
  assert_trees_equal(nnx.state(model, FROZEN), frozen)


def _submodule(model, path):
  for name in path.split("/"):
    model = model[int(name)] if name.isdigit() else getattr(model, name)
  return model


def test_qwix_lora_provider_on_einsum_and_linear_layers():
  qwix = pytest.importorskip("qwix")
  rank, alpha = 4, 8.0
  base = fm.TinyLM(d=D, rngs=fm.rngs(0))
  provider = qwix.LoraProvider(module_path=r".*/(q|v|o|up|down)", rank=rank, alpha=alpha)
  model = qwix.apply_lora_to_model(base, provider, TOKENS[0][0], rngs=fm.rngs(1))
  lora = nnx.state(model, nnx.LoRAParam)
  want = {}
  for i in range(2):  # Qwix's einsum factors: A takes the contracted axes, B the rest
    want |= {
        f"blocks/{i}/q/kernel": ((), (D,), (4, 8), rank),
        f"blocks/{i}/v/kernel": ((), (D,), (4, 8), rank),
        f"blocks/{i}/o/kernel": ((), (4, 8), (D,), rank),
        f"blocks/{i}/up/kernel": ((), (D,), (64,), rank),
        f"blocks/{i}/down/kernel": ((), (64,), (D,), rank),
    }
  assert _pair_shapes(lora) == want

  # Qwix adds (alpha / rank) x A B: with B ≠ 0 the adapted model equals the
  # base model with kernels W + (alpha / rank) A B, so lora_scale = alpha / rank.
  rng = np.random.default_rng(0)
  reference = nnx.clone(base)
  for pair in lora_pairs(lora).pairs:
    b = _submodule(model, pair.b_path)
    b.set_value(jnp.asarray(0.1 * rng.normal(size=b.shape), jnp.float32))
    a = _submodule(model, pair.a_path)
    kernel = _submodule(reference, pair.key)
    delta = a[...].reshape(pair.m, rank) @ b[...].reshape(rank, pair.n)
    kernel.set_value(kernel[...] + alpha / rank * delta.reshape(kernel.shape))
  tokens = TOKENS[0][0]
  np.testing.assert_allclose(model(tokens), reference(tokens), rtol=1e-4, atol=1e-5)

  frozen = snapshot(nnx.state(model, FROZEN))
  optimizer, losses, _ = train_nnx(
      model, adaprelora(3e-2, lora_scale=alpha / rank), lm_loss, TOKENS
  )
  assert set(optimizer.opt_state[0].pairs) == set(want)
  q = optimizer.opt_state[0].pairs["blocks/0/q/kernel"]
  assert (q.v_row.shape, q.v_col.shape) == ((D,), (4 * 8,))
  assert_learned(losses)
  assert_trees_equal(nnx.state(model, FROZEN), frozen)


def test_gemma_peft_tree_with_an_optax_loop():
  lora, frozen = fm.split_lora(fm.gemma_params(d=D))
  want = {}
  for i in range(2):  # gemma.peft's einsum factors: A (*in, r), B (r, *out)
    want |= {
        f"layer_{i}/attn/q_einsum": ((), (D,), (4, 8), 4),
        f"layer_{i}/attn/kv_einsum": ((), (D,), (2, 2, 8), 4),
        f"layer_{i}/attn/attn_vec_einsum": ((), (4, 8), (D,), 4),
        f"layer_{i}/mlp/gating_einsum": ((), (D,), (2, 64), 4),
        f"layer_{i}/mlp/linear": ((), (64,), (D,), 4),
    }
  assert _pair_shapes(lora) == want
  tx = optax.chain(optax.clip_by_global_norm(1.0), adaprelora(3e-2))
  loss = lambda lora, tokens, targets: fm.cross_entropy(
      fm.gemma_apply(fm.merge(lora, frozen), tokens), targets
  )

  @jax.jit
  def step(lora, state, tokens, targets):
    value, grads = jax.value_and_grad(loss)(lora, tokens, targets)
    updates, state = tx.update(grads, state, lora)
    return optax.apply_updates(lora, updates), state, value

  state = tx.init(lora)
  kv = state[1][0].pairs["layer_0/attn/kv_einsum"]
  assert (kv.v_row.shape, kv.v_col.shape) == ((D,), (2 * 2 * 8,))
  losses = []
  for batch in TOKENS:
    lora, state, value = step(lora, state, *batch)
    losses.append(float(value))
  assert_learned(losses)


def _classification_batch(seed, classes=4, batch=64):
  teacher = np.random.default_rng(7).normal(size=(D, classes))
  x = np.random.default_rng(seed).normal(size=(batch, D))
  return jnp.asarray(x, jnp.float32), jnp.asarray(np.argmax(np.tanh(x) @ teacher, -1))


def _freeze_lora_dense(params):
  """multi_transform labels: the kernel and bias of every LoRA layer are frozen."""
  flat = traverse_util.flatten_dict(params)
  adapted = {path[:-1] for path in flat if path[-1] == "lora_a"}
  return traverse_util.unflatten_dict(
      {
          path: "frozen" if path[:-1] in adapted and path[-1] in ("kernel", "bias") else "train"
          for path in flat
      }
  )


def _train_linen(tx, loss, params, batches):
  """``init``/``apply``-style jitted steps: ``(params, state, losses, grads)``."""

  @jax.jit
  def step(params, state, *batch):
    value, grads = jax.value_and_grad(loss)(params, *batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value, grads

  state, losses, grads = tx.init(params), [], []
  for batch in batches:
    params, state, value, g = step(params, state, *batch)
    losses.append(float(value))
    grads.append(g)
  return params, state, losses, grads


def test_linen_lora_dense_with_init_apply_and_multi_transform():
  model = fm.LinenMLP(hidden=D)
  batches = [_classification_batch(seed) for seed in range(20)]
  params = model.init(fm.key(0), batches[0][0])["params"]
  assert _pair_shapes(params) == {"fc1": ((), (D,), (D,), 4), "fc2": ((), (D,), (D,), 4)}
  tx = optax.multi_transform(
      {"train": adaprelora(3e-2), "frozen": optax.set_to_zero()}, _freeze_lora_dense
  )

  def loss(params, x, labels):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  initial = snapshot(params)
  params, state, losses, _ = _train_linen(tx, loss, params, batches)

  # the head goes to the fallback, the frozen kernels are masked out
  assert set(state.inner_states["train"].inner_state[0].pairs) == {"fc1", "fc2"}
  assert_learned(losses, 0.7)
  for layer in ("fc1", "fc2"):
    for name in ("kernel", "bias"):
      np.testing.assert_array_equal(params[layer][name], initial[layer][name])
  assert not np.allclose(params["head"]["kernel"], initial["head"]["kernel"])


def _assert_stacked_equals_per_layer(tx, initial, grads, final, layers):
  """Replaying ``grads`` on one layer's slice alone lands on that slice of ``final``.

  ``initial``, every ``grads[t]`` and ``final`` hold only stacked leaves. The
  stacked run solves all layers in one ``vmap``, a slice alone without, so
  they agree to float32 rounding, not bit for bit.
  """
  update = jax.jit(tx.update)
  for i in range(layers):
    take = lambda tree: jax.tree.map(lambda x: x[i], tree)
    params = take(initial)
    state = tx.init(params)
    assert all(p.batch_shape == () for p in lora_pairs(params).pairs)
    for g in grads:
      updates, state = update(take(g), state, params)
      params = optax.apply_updates(params, updates)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), params, take(final)
    )


def test_nnx_vmap_created_scan_applied_stack():
  layers = 3
  model = fm.NNXStack(layers, D, rank=4, rngs=fm.rngs(0))
  lora = nnx.state(model, nnx.LoRAParam)
  assert _pair_shapes(lora) == {
      "blocks/fc1/lora": ((layers,), (D,), (2 * D,), 4),
      "blocks/fc2/lora": ((layers,), (2 * D,), (D,), 4),
  }
  initial = snapshot(nnx.to_pure_dict(lora))
  frozen = snapshot(nnx.state(model, FROZEN))
  tx = adaprelora(1e-2, b1=0.9)

  optimizer, losses, grads = train_nnx(
      model,
      tx,
      lambda m, x, y: jnp.mean((m(x) - y) ** 2),
      [fm.regression_batch(seed, D) for seed in range(10)],
  )

  assert_learned(losses)
  assert_trees_equal(nnx.state(model, FROZEN), frozen)
  state = optimizer.opt_state[0].pairs["blocks/fc1/lora"]
  assert state.v_row.shape == (layers, D) and state.mu_b.shape == (layers, 4, 2 * D)
  _assert_stacked_equals_per_layer(
      tx,
      initial,
      [nnx.to_pure_dict(g) for g in grads],
      nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)),
      layers,
  )


def test_linen_nn_scan_stack():
  layers = 3
  model = fm.LinenStack(layers)
  batches = [fm.regression_batch(seed, D) for seed in range(10)]
  initial = model.init(fm.key(0), batches[0][0])["params"]
  assert _pair_shapes(initial) == {"blocks/fc": ((layers,), (D,), (D,), 4)}
  # fc's kernel and bias are frozen; its factors and the stacked norms train
  tx = optax.multi_transform(
      {"train": adaprelora(1e-2, b1=0.9), "frozen": optax.set_to_zero()}, _freeze_lora_dense
  )
  loss = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  params, _, losses, grads = _train_linen(tx, loss, initial, batches)

  assert_learned(losses)
  np.testing.assert_array_equal(params["blocks"]["fc"]["kernel"], initial["blocks"]["fc"]["kernel"])
  _assert_stacked_equals_per_layer(tx, initial, grads, params, layers)
