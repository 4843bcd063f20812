"""A LoRA regression small enough to train for thousands of steps in a test.

``min mean ‖X A B − X ΔW*‖²`` with input feature scales 1 … 0.01 (ill-conditioned)
and a rank-2 target, a rank-4 adapter initialised as ``nnx.LoRA`` does (``A``
random, ``B = 0``); :func:`train` runs the optimizer in one jitted scan.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def lora_regression(seed: int, m: int = 32, n: int = 24, rank: int = 4):
  """Initial factors and the loss of the factors, for one instance (``8 m`` samples)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(8 * m, m)) * np.logspace(0, -2, m)
  target = rng.normal(size=(m, 2)) @ rng.normal(size=(2, n))
  params = {"lora_a": jnp.asarray(rng.normal(size=(m, rank)) / np.sqrt(m), jnp.float32),
            "lora_b": jnp.zeros((rank, n), jnp.float32)}
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(x @ target, jnp.float32)
  return params, lambda p: jnp.mean((x @ (p["lora_a"] @ p["lora_b"]) - y) ** 2)


class Run(NamedTuple):
  """The loss before each step and after the last, the final factors, the largest ``max(|A|, |B|)``."""

  losses: np.ndarray
  params: dict
  largest_factor: float


def train(tx: optax.GradientTransformation, params: dict, loss, steps: int) -> Run:
  """``steps`` updates of ``tx`` on ``loss``."""
  norm = lambda x: jnp.sqrt(jnp.sum(x * x))

  def step(carry, _):
    params, state, largest = carry
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    largest = jnp.maximum(largest, jnp.maximum(norm(params["lora_a"]), norm(params["lora_b"])))
    return (params, state, largest), value

  scan = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p), jnp.float32(0)), length=steps))
  (params, _, largest), values = scan(params)
  return Run(np.append(np.asarray(values), float(loss(params))), params, float(largest))


def moved(params: dict, final: dict) -> float:
  """``|A − A0| / |A0|``: how far ``A`` moved from its init."""
  a0 = np.asarray(params["lora_a"])
  return float(np.linalg.norm(np.asarray(final["lora_a"]) - a0) / np.linalg.norm(a0))
