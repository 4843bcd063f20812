"""The MiniLM-on-WordNet fine-tuning task: data, fixed held-out subset, model and one training run.

all-MiniLM-L6-v2 gets rank-8 ``nnx.LoRA`` adapters (``A`` random, ``B = 0``)
on the query and value projections, and a 26-way linear head classifying
WordNet noun definitions by lexicographer category. :func:`run` trains one
model (what trains: a :data:`TRAIN_MODES` key) under a warmup + cosine
schedule and scores it on a held-out subset fixed independently of the run
seed; the seed fixes the ``A`` and head inits and the batch order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.diagnostics import DIAGNOSTICS, lora_factors, pair_diagnostics
from benchmarks.family import eval_schedule, warmup_cosine, warmup_steps
from benchmarks.minilm import TRAINABLE, EncoderClassifier, Frozen, load_minilm
from benchmarks import train_loop
from benchmarks.wordnet import NOUN_LEXNAMES, Split, load_wordnet_nouns

Factory = Callable[[optax.Schedule], optax.GradientTransformation]

MAX_LEN = 32
LORA_TARGETS = ("query", "value")
LORA_SCALE = 1.0  # load_minilm(lora_alpha=None): the nnx.LoRA convention
EVAL_SEED = 1234  # fixes the held-out subset, independently of the run seed
EVAL_CHUNK = 250
LENGTH_QUANTUM = 8  # eval chunks are trimmed to a multiple of this many tokens

TRAIN_MODES: dict[str, Any] = {
    "lora": TRAINABLE,  # LoRA adapters + head
    "head": nnx.Param,  # built without adapters: the head alone
    "full": (nnx.Param, Frozen),  # built without adapters: every weight
    "lora_stats": TRAINABLE,  # adapters with W-gradient statistics probes + head
}
"""What each training mode trains (an ``nnx`` filter); only the ``lora`` modes build adapters."""


@functools.lru_cache(maxsize=1)
def _data() -> tuple[Split, Split]:
  """Train and held-out splits, tokenized once per process (a few seconds)."""
  train_split, heldout, _ = load_wordnet_nouns(max_len=MAX_LEN)
  return train_split, heldout


@dataclasses.dataclass(frozen=True)
class EvalChunk:
  """Held-out rows trimmed to a common width; rows past ``real`` are padding."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray
  real: int


def eval_indices(eval_examples: int) -> np.ndarray:
  """The fixed held-out subset: the same rows for every run, optimizer and seed."""
  _, heldout = _data()
  if eval_examples >= len(heldout):
    return np.arange(len(heldout))
  return np.sort(
      np.random.default_rng(EVAL_SEED).choice(len(heldout), eval_examples, replace=False)
  )


@functools.lru_cache(maxsize=4)
def eval_chunks(eval_examples: int) -> tuple[EvalChunk, ...]:
  """The eval subset sorted by length, in chunks trimmed of trailing padding.

  Trailing pad tokens change nothing (keys are masked, pooling skips them),
  and half the definitions are under 15 tokens, so trimming saves about a
  third of the eval compute, at the price of up to four compiled widths.
  """
  _, heldout = _data()
  idx = eval_indices(eval_examples)
  lengths = heldout.attention_mask.sum(1)
  idx = idx[np.argsort(lengths[idx], kind="stable")]
  size = min(EVAL_CHUNK, len(idx))
  chunks = []
  for start in range(0, len(idx), size):
    part = idx[start : start + size]
    width = min(MAX_LEN, LENGTH_QUANTUM * math.ceil(lengths[part].max() / LENGTH_QUANTUM))
    pad = lambda x: np.pad(x[part, :width], ((0, size - len(part)), (0, 0)))
    chunks.append(
        EvalChunk(
            pad(heldout.input_ids), pad(heldout.attention_mask), heldout.labels[part], len(part)
        )
    )
  return tuple(chunks)


def majority_baseline(eval_examples: int) -> float:
  """Accuracy on the eval subset of always predicting the most frequent training class."""
  train_split, heldout = _data()
  return float(
      np.mean(
          heldout.labels[eval_indices(eval_examples)] == np.bincount(train_split.labels).argmax()
      )
  )


def batch_order(seed: int, count: int, size: int) -> np.ndarray:
  """``count`` training indices drawn by ``seed``: consecutive epochs of fresh permutations."""
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.permutation(size) for _ in range(-(-count // size))])[:count]


def build_model(
    seed: int, lora_rank: int | None = 8, weight_stats: bool = False
) -> EncoderClassifier:
  """MiniLM + LoRA (none for ``lora_rank=None``) + head; ``seed`` draws the ``A`` and head inits.

  ``weight_stats`` adds the adapters' statistics probes (:func:`load_minilm`).
  """
  rngs = nnx.Rngs(seed)
  encoder, _ = load_minilm(lora_rank, LORA_TARGETS, rngs=rngs, weight_stats=weight_stats)
  return EncoderClassifier(encoder, len(NOUN_LEXNAMES), rngs=rngs)


def classification_loss(model: EncoderClassifier, ids, mask, labels) -> jax.Array:
  """Mean cross-entropy of the 26-way head."""
  return optax.softmax_cross_entropy_with_integer_labels(model(ids, mask), labels).mean()


@functools.partial(jax.jit, static_argnums=0)
def _predict(
    graphdef: nnx.GraphDef, trainable: Any, frozen: Any, ids: jax.Array, mask: jax.Array
) -> jax.Array:
  """Class predictions; module-level so its compilations are shared by all runs."""
  return jnp.argmax(nnx.merge(graphdef, trainable, frozen)(ids, mask), -1)


def evaluate(
    graphdef: nnx.GraphDef, trainable: Any, frozen: Any, chunks: Sequence[EvalChunk]
) -> float:
  """Held-out accuracy over ``chunks``."""
  correct = 0
  for c in chunks:
    pred = np.asarray(_predict(graphdef, trainable, frozen, c.input_ids, c.attention_mask))
    correct += int(np.sum(pred[: c.real] == c.labels))
  return correct / sum(c.real for c in chunks)


def adapter_rank(train_mode: str, lora_rank: int) -> int | None:
  """The LoRA rank a model trained in mode ``train_mode`` is built with (``None``: no adapters)."""
  return lora_rank if train_mode in ("lora", "lora_stats") else None


def run(
    optimizer_name: str,
    tx_factory: Factory,
    peak_lr: float,
    seed: int,
    *,
    steps: int = 150,
    batch: int = 32,
    warmup_frac: float = 0.1,
    lora_rank: int = 8,
    train: str = "lora",
    eval_examples: int = 2000,
    eval_every: int = 25,
    diagnostics: bool = False,
    on_params: Callable[[int, Any], None] | None = None,
    progress: bool = True,
    stop_on_nonfinite_loss: bool = False,
) -> dict:
  """Fine-tunes one model with ``tx_factory(family.warmup_cosine(peak_lr, steps, warmup_frac))``.

  ``train`` (a :data:`TRAIN_MODES` key) picks what trains; ``lora_rank`` only
  applies to ``lora``. Held-out accuracy is measured every ``eval_every`` steps
  and after the last one. ``on_params(t, trainable)`` (tests, debugging) sees the trainable
  ``nnx.State`` after ``t`` steps, from ``t = 0``; copy what you keep, the
  buffers are donated to the next step. ``stop_on_nonfinite_loss``: see
  :func:`benchmarks.train_loop.train` (``final_accuracy`` is then NaN).

  Returns a JSON-ready dict: the settings, ``losses`` (per step),
  ``eval_steps``/``accuracies``, ``final_accuracy``, ``best_accuracy``, wall
  times, and with ``diagnostics`` the per-pair
  :func:`~benchmarks.diagnostics.pair_diagnostics` of every step
  (``diagnostics.per_pair[metric][step][pair]``).
  """
  if diagnostics and train != "lora":
    raise ValueError(f"diagnostics measure LoRA pairs; train={train!r} has none")
  start = time.perf_counter()
  data, _ = _data()
  chunks = eval_chunks(eval_examples)
  rank = adapter_rank(train, lora_rank)
  model = build_model(seed, rank, weight_stats=train == "lora_stats")
  graphdef, trainable, frozen = nnx.split(model, TRAIN_MODES[train], ...)
  tx = tx_factory(warmup_cosine(peak_lr, steps, warmup_frac))
  opt_state = tx.init(trainable)
  extra = functools.partial(pair_diagnostics, scale=LORA_SCALE) if diagnostics else None
  step = train_loop.make_train_step(graphdef, tx, classification_loss, extra)
  order = batch_order(seed, steps * batch, len(data)).reshape(steps, batch)
  batches = ((data.input_ids[r], data.attention_mask[r], data.labels[r]) for r in order)
  per_step = []

  def on_step(t: int, params: Any, extras: dict) -> None:
    if diagnostics:
      per_step.append({k: np.asarray(v).tolist() for k, v in extras.items()})
    if on_params is not None:
      on_params(t, params)

  if on_params is not None:
    on_params(0, trainable)
  trainable, record = train_loop.train(
      step,
      trainable,
      opt_state,
      frozen,
      batches,
      steps=steps,
      evaluate=lambda params: evaluate(graphdef, params, frozen, chunks),
      eval_at=eval_schedule(steps, eval_every),
      desc=f"{optimizer_name} lr={peak_lr:g} seed={seed}",
      metric="acc",
      progress=progress,
      on_step=on_step,
      stop_on_nonfinite_loss=stop_on_nonfinite_loss,
  )
  accuracies = record["values"]
  result = dict(
      optimizer=optimizer_name,
      lr=peak_lr,
      seed=seed,
      steps=steps,
      batch=batch,
      warmup_steps=warmup_steps(warmup_frac, steps),
      lora_rank=rank,
      train=train,
      eval_examples=len(eval_indices(eval_examples)),
      losses=record["losses"],
      eval_steps=record["eval_steps"],
      accuracies=accuracies,
      final_accuracy=accuracies[-1] if record["stopped_at"] is None else math.nan,
      best_accuracy=max(accuracies, default=math.nan),
      finite=bool(np.all(np.isfinite(record["losses"]))),
      wall_s=time.perf_counter() - start,
      **{k: record[k] for k in ("first_step_s", "train_s", "eval_s")},
  )
  if diagnostics:
    result["diagnostics"] = dict(
        pairs=list(lora_factors(trainable)),
        per_pair={k: [row[k] for row in per_step] for k in DIAGNOSTICS},
    )
  return result
