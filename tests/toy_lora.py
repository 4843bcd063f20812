"""A small LoRA model laid out on a ('data', 'model') mesh like an LLM recipe.

Every factor pair shards ``A``'s in axis and ``B``'s out axis on ``'model'``:

* ``query``: a plain pair, ``A (16, 4)``, ``B (4, 8)``;
* ``layers/mlp``: two stacked layers, ``A (2, 16, 4)``, ``B (2, 4, 8)``, with
  the layer axis on ``'data'``;
* ``attn/out``: a Gemma-style einsum pair with N-D in axes, ``A (4, 4, 2)``
  (heads, head_dim, r), heads on ``'model'``;
* ``attn/key`` (optional): a Qwix-style pair with N-D out axes whose *second*
  out axis is sharded, ``B (2, 2, 4)``, so its flattened ``n`` cannot be;
* ``head``: a non-LoRA kernel and bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

LAYOUT = {
    "query": {"lora_a": ((16, 4), P("model", None)),
              "lora_b": ((4, 8), P(None, "model"))},
    "layers": {"mlp": {"lora_a": ((2, 16, 4), P("data", "model", None)),
                       "lora_b": ((2, 4, 8), P("data", None, "model"))}},
    "attn": {"out": {"lora": {"a": ((4, 4, 2), P("model", None, None)),
                              "b": ((2, 8), P(None, "model"))}}},
    "head": {"kernel": ((8, 8), P(None, "model")), "bias": ((8,), P("model"))},
}
KEY = {"key_lora_a": ((16, 2), P("model", None)),
       "key_lora_b": ((2, 2, 4), P(None, None, "model"))}


def _layout(with_key: bool) -> dict:
  layout = jax.tree.map(lambda x: x, LAYOUT, is_leaf=_is_entry)
  if with_key:
    layout["attn"] = {**layout["attn"], **KEY}
  return layout


def _is_entry(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], P)


def params(with_key: bool = False, seed: int = 0) -> dict:
  """float32 factors with ``B ≠ 0``, so that every factor moves from step 1."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda e: jnp.asarray(0.5 * rng.normal(size=e[0]), jnp.float32),
      _layout(with_key), is_leaf=_is_entry)


def specs(with_key: bool = False) -> dict:
  return jax.tree.map(lambda e: e[1], _layout(with_key), is_leaf=_is_entry)


def batch(step: int) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(1000 + step)
  return (jnp.asarray(rng.normal(size=(16, 16)), jnp.float32),
          jnp.asarray(rng.normal(size=(16, 8)), jnp.float32))


def loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """A regression through every pair (each used as ``x ↦ x A B``) and the head."""
  h = x @ p["query"]["lora_a"] @ p["query"]["lora_b"]
  mlp = p["layers"]["mlp"]
  h += jnp.einsum("bi,lir,lrn->bn", x, mlp["lora_a"], mlp["lora_b"])
  out = p["attn"]["out"]["lora"]
  h += jnp.einsum("bhd,hdr->br", x.reshape(-1, 4, 4), out["a"]) @ out["b"]
  if "key_lora_a" in p["attn"]:
    key = jnp.einsum("br,rij->bij", x @ p["attn"]["key_lora_a"],
                     p["attn"]["key_lora_b"])
    h += key.reshape(h.shape)
  z = jnp.tanh(h) @ p["head"]["kernel"] + p["head"]["bias"]
  return jnp.mean((z - y) ** 2)


def train_step(tx):
  """``(params, opt_state, x, y) -> (params, opt_state)`` for ``tx``."""
  def step(p, state, x, y):
    updates, state = tx.update(jax.grad(loss)(p, x, y), state, p)
    return optax.apply_updates(p, updates), state
  return step
