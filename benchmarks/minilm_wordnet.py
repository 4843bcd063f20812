"""The MiniLM-on-WordNet fine-tuning task (``minilm``): data, fixed held-out subset, model, one run.

all-MiniLM-L6-v2 gets rank-8 ``nnx.LoRA`` adapters (``A`` random, ``B = 0``)
on the query and value projections, and a 26-way linear head classifying
WordNet noun definitions by lexicographer category. :func:`run` trains one
model (what trains: a :data:`TRAIN_MODES` key) under the benchmarks' warmup +
cosine schedule and scores it on a held-out subset fixed independently of the
run seed; the seed fixes the ``A`` and head inits and the batch order, so two
runs with one seed differ only by the optimizer and its learning rate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adaprelora_jax import adaprelora, with_weight_stats
from benchmarks import train_loop
from benchmarks.family import EXACT, METHODS, Factory, eval_schedule, warmup_cosine, window
from benchmarks.minilm import TRAINABLE, EncoderClassifier, Frozen, load_minilm
from benchmarks.record import Run, loss_diverged, make_run
from benchmarks.report import Metric
from benchmarks.tasks import Method, Size, Task
from benchmarks.wordnet import NOUN_LEXNAMES, Split, load_wordnet_nouns

MAX_LEN = 32
LORA_TARGETS = ("query", "value")
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


def run(factory: Factory, lr: float, seed: int, size: Size, *, progress: bool = True) -> Run:
  """Fine-tunes one model with ``factory(family.warmup_cosine(lr, steps), weight_decay)``.

  ``size["train"]`` (a :data:`TRAIN_MODES` key) picks what trains;
  ``lora_rank`` only applies to the ``lora`` modes. Held-out accuracy is
  measured every ``eval_every`` steps and after the last one; training stops
  at a non-finite loss (there is no final accuracy then). Diverged: the train
  loss rule of :func:`benchmarks.record.loss_diverged`.
  """
  start = time.perf_counter()
  data, _ = _data()
  chunks = eval_chunks(size["eval_examples"])
  train, steps, batch = size["train"], size["steps"], size["batch"]
  model = build_model(seed, adapter_rank(train, size["lora_rank"]), weight_stats=train == "lora_stats")
  graphdef, trainable, frozen = nnx.split(model, TRAIN_MODES[train], ...)
  tx = factory(warmup_cosine(lr, steps), size["weight_decay"])
  step = train_loop.make_train_step(graphdef, tx, classification_loss)
  order = batch_order(seed, steps * batch, len(data)).reshape(steps, batch)
  batches = ((data.input_ids[r], data.attention_mask[r], data.labels[r]) for r in order)
  _, record = train_loop.train(
      step,
      trainable,
      tx.init(trainable),
      frozen,
      batches,
      steps=steps,
      evaluate=lambda params: evaluate(graphdef, params, frozen, chunks),
      eval_at=eval_schedule(steps, size["eval_every"]),
      desc=f"lr={lr:g} seed={seed}",
      metric="acc",
      progress=progress,
      stop_on_nonfinite_loss=True,
  )
  return make_run(
      "", lr, seed, dict(size), record["losses"], record["eval_steps"], record["values"],
      higher_is_better=True,
      stopped=record["stopped_at"] is not None,
      diverged=loss_diverged(record["losses"]),
      wall_s=time.perf_counter() - start,
      **{k: record[k] for k in ("first_step_s", "train_s", "eval_s")},
  )


SIZES: dict[str, dict[str, Any]] = {
    "cpu": dict(steps=150, batch=32, eval_examples=2000, eval_every=25, lora_rank=8, train="lora",
                weight_decay=0.01),
    # All 8179 held-out definitions; 1.3 epochs of the 73,936 training definitions.
    "gpu": dict(steps=1500, batch=64, eval_examples=10_000, eval_every=100, lora_rank=8,
                train="lora", weight_decay=0.01),
}
"""Sizes; ``weight_decay`` is the decoupled decay every optimizer applies to every trainable leaf."""

_full_stats = lambda **kw: lambda lr, wd: with_weight_stats(
    adaprelora(lr, statistics="full", weight_decay=wd, **kw))

OPTIMIZERS: dict[str, Method] = {
    **{name: Method(make) for name, make in METHODS.items()},
    # Reference lines: AdamW without adapters, on the head alone (a linear probe) or on everything.
    "head_only_adamw": Method(METHODS["adamw"], {"train": "head"}),
    "full_ft_adamw": Method(METHODS["adamw"], {"train": "full"}),
    # AdaPreLoRA on exact W-gradient statistics (docs/derivation.md, `full`), read from probes.
    "adaprelora_full": Method(_full_stats(), {"train": "lora_stats"}),
    "adaprelora_exact_full": Method(_full_stats(**EXACT), {"train": "lora_stats"}),
}

HIGH, LOW = window(1e-3, 4), window(3e-4, 4)
WINDOWS: dict[str, tuple[float, ...]] = {
    # Per-coordinate Adam steps on the factors: each entry moves about `lr` per step.
    **dict.fromkeys(("adamw", "scaled_adamw", "lora_pro"), HIGH),
    # The step is built in W-space (larger W-steps per unit lr from B = 0), or has no
    # momentum (adafactor), or steps B at 16x the lr (lora_plus).
    **dict.fromkeys(("adafactor", "lora_plus", "lora_pro_full", "lora_rite"), LOW),
    "head_only_adamw": window(3e-3, 4),  # a linear head from scratch takes larger steps
    "full_ft_adamw": window(3e-5, 4),  # every pretrained weight moves
}
"""Each method's 4-point window of :data:`benchmarks.family.GRID` (AdaPreLoRA's variants: ``LOW``)."""

TASKS = {
    "minilm": Task(
        name="minilm",
        metric=Metric("held-out accuracy", higher_is_better=True),
        sizes=SIZES,
        run=run,
        methods=OPTIMIZERS,
        window=lambda name: WINDOWS.get(name, LOW),
        reference=lambda size: ("majority class", majority_baseline(size["eval_examples"])),
    )
}
