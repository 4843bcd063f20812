"""AdaPreLoRA optimises an ill-conditioned LoRA regression."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaprelora_jax import adaprelora


def lora_regression(seed, m=32, n=24, rank=4, samples=256):
  """Anisotropic inputs (scales 1 … 0.01) and a rank-2 target ΔW*."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(samples, m)) * np.logspace(0, -2, m)
  target = rng.normal(size=(m, 2)) @ rng.normal(size=(2, n))
  params = {"lora_a": jnp.asarray(rng.normal(size=(m, rank)) / np.sqrt(m), jnp.float32),
            "lora_b": jnp.zeros((rank, n), jnp.float32)}
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(x @ target, jnp.float32)
  loss = lambda p: jnp.mean((x @ (p["lora_a"] @ p["lora_b"]) - y) ** 2)
  return params, loss


def train(tx, params, loss, steps):
  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  state, values = tx.init(params), []
  for _ in range(steps):
    params, state, value = step(params, state)
    values.append(float(value))
  return np.asarray(values + [float(loss(params))])


def test_reaches_two_percent_of_initial_loss_in_400_steps():
  for seed in range(3):
    params, loss = lora_regression(seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 20, 400)
    curve = train(adaprelora(schedule, b1=0.9), params, loss, 400)
    assert np.all(np.isfinite(curve))
    assert curve[-1] < 0.02 * curve[0], (seed, curve[0], curve[-1])
