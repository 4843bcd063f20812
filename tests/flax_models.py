"""Small real Flax models carrying LoRA adapters, for end-to-end optimizer tests.

Every model here is a genuine Flax module (or, for Gemma, the parameter tree
its ``gemma.peft`` layers produce), small enough to compile in seconds:

* :class:`TinyLM`: an NNX causal transformer. With ``lora_rank`` set, ``q``
  and ``v`` get standalone ``nnx.LoRA`` adapters and the MLP is
  ``nnx.LoRALinear``; without, it is the plain base model that Qwix adapts.
  Its attention projections are ``nnx.Einsum`` layers with head-shaped
  kernels, so Qwix gives them N-D factors.
* :func:`gemma_params` / :func:`gemma_apply`: a Gemma-style decoder as a plain
  dict with ``gemma.peft``'s ``…/lora/{a,b}`` naming and its einsum factor
  shapes, and the function that runs it.
* :class:`LoRADense` / :class:`LinenMLP`: Linen layers whose factors are
  ``lora_a`` / ``lora_b`` params next to a frozen ``kernel``.
* :class:`NNXStack` / :class:`LinenStack`: layers created with ``nnx.vmap``
  and applied with ``nnx.scan``, and a Linen ``nn.scan``; every LoRA factor
  carries a leading layer axis.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from flax import traverse_util

Array = jax.Array


def key(seed: int) -> Array:
  """A PRNG key of the ``rbg`` implementation.

  Initialisers on it compile several times faster than on threefry keys, and
  those compiles dominate building these tiny models on CPU.
  """
  return jax.random.key(seed, impl="rbg")


def rngs(seed: int) -> nnx.Rngs:
  """``nnx.Rngs`` on :func:`key`."""
  return nnx.Rngs(key(seed))


# --- NNX transformer ---------------------------------------------------------


class Block(nnx.Module):
  """Pre-norm transformer block: causal attention, then a GELU MLP.

  ``q``, ``k``, ``v``: ``nnx.Einsum('btd,dnh->btnh')`` with kernels
  ``(d, heads, head_dim)``; ``o``: ``'btnh,nhd->btd'``. With ``lora_rank``,
  ``q_lora`` / ``v_lora`` (``nnx.LoRA(d, r, d)``) add ``x A B`` to the query
  and value, and ``up`` / ``down`` are ``nnx.LoRALinear``.
  """

  def __init__(self, d: int, heads: int, hidden: int, *,
               lora_rank: int | None, rngs: nnx.Rngs):
    head_dim = d // heads
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    proj_in = functools.partial(nnx.Einsum, "btd,dnh->btnh",
                                (d, heads, head_dim), rngs=rngs)
    self.q, self.k, self.v = proj_in(), proj_in(), proj_in()
    self.o = nnx.Einsum("btnh,nhd->btd", (heads, head_dim, d), rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    if lora_rank is None:
      self.q_lora = self.v_lora = None
      self.up, self.down = (nnx.Linear(d, hidden, rngs=rngs),
                            nnx.Linear(hidden, d, rngs=rngs))
    else:
      self.q_lora = nnx.LoRA(d, lora_rank, d, rngs=rngs)
      self.v_lora = nnx.LoRA(d, lora_rank, d, rngs=rngs)
      dense = functools.partial(nnx.LoRALinear, lora_rank=lora_rank, rngs=rngs)
      self.up, self.down = dense(d, hidden), dense(hidden, d)

  def _adapted(self, proj: nnx.Einsum, adapter: nnx.LoRA | None, x: Array) -> Array:
    y = proj(x)
    if adapter is not None:
      y = y + adapter(x).reshape(y.shape)
    return y

  def __call__(self, x: Array) -> Array:
    h = self.norm1(x)
    q = self._adapted(self.q, self.q_lora, h)
    k = self.k(h)
    v = self._adapted(self.v, self.v_lora, h)
    t = x.shape[1]
    logits = jnp.einsum("bsnh,btnh->bnst", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
    attn = jnp.einsum("bnst,btnh->bsnh", jax.nn.softmax(logits, -1), v)
    x = x + self.o(attn)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
  """Token embedding, ``layers`` :class:`Block` s, a final norm and a head."""

  def __init__(self, vocab: int = 16, d: int = 32, heads: int = 4,
               hidden: int = 64, layers: int = 2, *,
               lora_rank: int | None = None, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, heads, hidden, lora_rank=lora_rank, rngs=rngs)
                            for _ in range(layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens: Array) -> Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def token_batch(seed: int, vocab: int = 16, batch: int = 16, length: int = 8
                ) -> tuple[Array, Array]:
  """Token tagging: the target of each token ``t`` is ``perm[t]``, one fixed permutation."""
  perm = np.random.default_rng(1234).permutation(vocab)
  tokens = np.random.default_rng(seed).integers(0, vocab, (batch, length))
  return jnp.asarray(tokens), jnp.asarray(perm[tokens])


def cross_entropy(logits: Array, targets: Array) -> Array:
  logp = jax.nn.log_softmax(logits, -1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))


# --- Gemma-peft-style parameter tree ------------------------------------------

# einsum of the frozen weight, and gemma.peft's LoRA rewrite of it: A takes the
# weight axes shared with the input (contracted or batch), B the output axes.
GEMMA_EINSUMS = {
    ("attn", "q_einsum"): ("btd,ndh->btnh", "btd,dr,rnh->btnh"),
    ("attn", "kv_einsum"): ("btd,ckdh->cbtkh", "btd,dr,rckh->cbtkh"),
    ("attn", "attn_vec_einsum"): ("btnh,nhd->btd", "btnh,nhr,rd->btd"),
    ("mlp", "gating_einsum"): ("btd,cfd->btcf", "btd,dr,rcf->btcf"),
    ("mlp", "linear"): ("btf,fd->btd", "btf,fr,rd->btd"),
}


def gemma_params(seed: int = 0, *, vocab: int = 16, d: int = 32, heads: int = 4,
                 kv_heads: int = 2, head_dim: int = 8, hidden: int = 64,
                 layers: int = 2, rank: int = 4) -> dict:
  """Gemma-style decoder params with ``gemma.peft`` LoRA leaves (``B = 0``).

  Per layer: ``attn/q_einsum`` (``w (N, D, H)``, ``lora/a (D, r)``,
  ``lora/b (r, N, H)``), ``attn/kv_einsum`` (``w (2, K, D, H)``,
  ``a (D, r)``, ``b (r, 2, K, H)``), ``attn/attn_vec_einsum``
  (``w (N, H, D)``, ``a (N, H, r)``, ``b (r, D)``), ``mlp/gating_einsum``
  (``w (2, F, D)``, ``a (D, r)``, ``b (r, 2, F)``), ``mlp/linear``
  (``w (F, D)``, ``a (F, r)``, ``b (r, D)``), and RMS-norm scales.
  """
  rng = np.random.default_rng(seed)
  shapes = {
      ("attn", "q_einsum"): ((heads, d, head_dim), (d, rank), (rank, heads, head_dim)),
      ("attn", "kv_einsum"): ((2, kv_heads, d, head_dim), (d, rank),
                              (rank, 2, kv_heads, head_dim)),
      ("attn", "attn_vec_einsum"): ((heads, head_dim, d), (heads, head_dim, rank),
                                    (rank, d)),
      ("mlp", "gating_einsum"): ((2, hidden, d), (d, rank), (rank, 2, hidden)),
      ("mlp", "linear"): ((hidden, d), (hidden, rank), (rank, d)),
  }
  normal = lambda shape, fan_in: jnp.asarray(
      rng.normal(size=shape) / np.sqrt(fan_in), jnp.float32)
  params: dict[str, Any] = {"embedder": {"input_embedding": normal((vocab, d), d)},
                            "final_norm": {"scale": jnp.zeros(d)}}
  for i in range(layers):
    layer: dict[str, Any] = {"pre_attention_norm": {"scale": jnp.zeros(d)},
                             "pre_ffw_norm": {"scale": jnp.zeros(d)}}
    for (group, name), (w, a, b) in shapes.items():
      fan_in = int(np.prod(a[:-1]))
      layer.setdefault(group, {})[name] = {
          "w": normal(w, fan_in),
          "lora": {"a": normal(a, fan_in), "b": jnp.zeros(b)}}
    params[f"layer_{i}"] = layer
  return params


def _rms_norm(x: Array, scale: Array) -> Array:
  x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
  return x * (1 + scale)


def _lora_einsum(layer: dict, group: str, name: str, x: Array) -> Array:
  """``x ⋅ w + x ⋅ a ⋅ b`` for the einsum layer ``layer[group][name]``."""
  spec, lora_spec = GEMMA_EINSUMS[group, name]
  p = layer[group][name]
  return (jnp.einsum(spec, x, p["w"])
          + jnp.einsum(lora_spec, x, p["lora"]["a"], p["lora"]["b"]))


def gemma_apply(params: dict, tokens: Array) -> Array:
  """Logits of the Gemma-style decoder (tied embeddings, grouped-query attention)."""
  emb = params["embedder"]["input_embedding"]
  x = emb[tokens] * np.sqrt(emb.shape[1])
  t = tokens.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for i in range(sum(k.startswith("layer_") for k in params)):
    p = params[f"layer_{i}"]
    h = _rms_norm(x, p["pre_attention_norm"]["scale"])
    q = _lora_einsum(p, "attn", "q_einsum", h)
    k, v = _lora_einsum(p, "attn", "kv_einsum", h)
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, 2), jnp.repeat(v, group, 2)
    logits = jnp.einsum("bsnh,btnh->bnst", q, k) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e9), -1)
    attn = jnp.einsum("bnst,btnh->bsnh", probs, v)
    x = x + _lora_einsum(p, "attn", "attn_vec_einsum", attn)
    h = _rms_norm(x, p["pre_ffw_norm"]["scale"])
    gating = _lora_einsum(p, "mlp", "gating_einsum", h)
    gate, up = gating[..., 0, :], gating[..., 1, :]
    x = x + _lora_einsum(p, "mlp", "linear", jax.nn.gelu(gate) * up)
  return _rms_norm(x, params["final_norm"]["scale"]) @ emb.T


def split_lora(params: dict) -> tuple[dict, dict]:
  """``(lora, frozen)``: the ``…/lora/…`` leaves and the rest, as two trees."""
  flat = traverse_util.flatten_dict(params)
  is_lora = lambda path: "lora" in path
  return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_lora(k)}),
          traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_lora(k)}))


def merge(lora: dict, frozen: dict) -> dict:
  """The inverse of :func:`split_lora`."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                       **traverse_util.flatten_dict(lora)})


# --- Linen -------------------------------------------------------------------


class LoRADense(nn.Module):
  """``y = x W + b + (x A) B`` with params ``kernel``, ``bias``, ``lora_a``, ``lora_b``."""

  features: int
  rank: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    m = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (m, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    a = self.param("lora_a", nn.initializers.he_uniform(), (m, self.rank))
    b = self.param("lora_b", nn.initializers.zeros_init(), (self.rank, self.features))
    return x @ kernel + bias + (x @ a) @ b


class LinenMLP(nn.Module):
  """Two :class:`LoRADense` layers and a plain ``nn.Dense`` classifier head."""

  hidden: int = 32
  classes: int = 4
  rank: int = 4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.gelu(LoRADense(self.hidden, self.rank, name="fc1")(x))
    x = nn.gelu(LoRADense(self.hidden, self.rank, name="fc2")(x))
    return nn.Dense(self.classes, name="head")(x)


class _LinenBlock(nn.Module):
  rank: int

  @nn.compact
  def __call__(self, x: Array, _: None) -> tuple[Array, None]:
    h = LoRADense(x.shape[-1], self.rank, name="fc")(nn.LayerNorm(name="norm")(x))
    return x + nn.gelu(h), None


class LinenStack(nn.Module):
  """``layers`` residual LoRA blocks under ``nn.scan``; every param has a layer axis."""

  layers: int
  rank: int = 4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    blocks = nn.scan(_LinenBlock, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=self.layers)
    return blocks(self.rank, name="blocks")(x, None)[0]


# --- NNX scanned stack ---------------------------------------------------------


class _NNXBlock(nnx.Module):
  def __init__(self, d: int, rank: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.LoRALinear(d, 2 * d, lora_rank=rank, rngs=rngs)
    self.fc2 = nnx.LoRALinear(2 * d, d, lora_rank=rank, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm(x))))


class NNXStack(nnx.Module):
  """``layers`` residual LoRA MLP blocks, created by ``nnx.vmap`` and run by ``nnx.scan``."""

  def __init__(self, layers: int, d: int = 32, rank: int = 4, *, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> _NNXBlock:
      return _NNXBlock(d, rank, rngs)

    self.blocks = create(rngs)

  def __call__(self, x: Array) -> Array:
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x: Array, block: _NNXBlock) -> Array:
      return block(x)

    return run(x, self.blocks)


def regression_batch(seed: int, d: int, batch: int = 32) -> tuple[Array, Array]:
  """Inputs and a fixed nonlinear target map of them (the same for every seed)."""
  teacher = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)
  x = np.random.default_rng(seed).normal(size=(batch, d))
  return jnp.asarray(x, jnp.float32), jnp.asarray(np.tanh(x @ teacher), jnp.float32)


# ---------------------------------------------------------------- shared by the end-to-end tests

FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam subclasses Param
D = 32  # every model's width, so that their small eager compiles are shared


def lm_loss(model: nnx.Module, tokens: Array, targets: Array) -> Array:
  return cross_entropy(model(tokens), targets)


TOKENS = [token_batch(seed) for seed in range(12)]
"""Twelve ``(tokens, targets)`` batches for :class:`TinyLM`, one per step."""


def snapshot(tree: Any) -> Any:
  """A host copy of ``tree``, unaffected by later in-place updates of the model."""
  return jax.tree.map(np.array, tree)


def assert_trees_equal(x: Any, y: Any) -> None:
  jax.tree.map(np.testing.assert_array_equal, x, y)


def assert_learned(losses: list[float], factor: float = 0.8) -> None:
  """Each loss is on a new batch, before the step that uses it: a held-out loss."""
  assert np.mean(losses[-3:]) < factor * losses[0], losses


def train_nnx(model: nnx.Module, tx, loss_fn, batches) -> tuple[nnx.Optimizer, list[float], list]:
  """``nnx.Optimizer`` steps on the LoRA params: ``(optimizer, losses, grads)``."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer, *batch):
    loss, grads = nnx.value_and_grad(
        lambda m: loss_fn(m, *batch), argnums=nnx.DiffState(0, nnx.LoRAParam)
    )(model)
    optimizer.update(model, grads)
    return loss, grads

  losses, grads = zip(*(step(model, optimizer, *batch) for batch in batches))
  return optimizer, [float(x) for x in losses], list(grads)
