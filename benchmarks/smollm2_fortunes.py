"""The SmolLM2-on-fortunes task (``smollm2``): held-out perplexity on categories never trained on.

SmolLM2-135M (:mod:`benchmarks.smollm2`) gets rank-8 ``nnx.LoRA`` adapters
(``A`` random, ``B = 0``) on the four attention projections of every block and
is trained as a language model on the packed fortunes of the training
categories (:mod:`benchmarks.fortunes`). The score is the perplexity on a
fixed subset of the held-out categories (``food``, ``love``, ``medicine``,
``pets``, ``sports``), which training never sees: it measures how well the
adapters learnt the fortune *style*, not the entries. Since ``B = 0`` at
init, every run starts at the base model's zero-shot perplexity, the
reference line; a run that ends above it has undone its start and counts as
diverged, as does one whose train loss blows up.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.family import METHODS, Factory, eval_schedule, warmup_cosine, window
from benchmarks.fortunes import Batch, LMData, load_fortunes, perplexity
from benchmarks.record import Run, loss_diverged, make_run
from benchmarks.report import Metric
from benchmarks.smollm2 import TRAINABLE, lm_loss, load_smollm2
from benchmarks.tasks import Method, Size, Task
from benchmarks.train_loop import make_train_step, train

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EVAL_SEED = 1234  # fixes the held-out subset, independently of the run seed


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every run shares: the split model at init, the data and the zero-shot perplexity."""

  graphdef: nnx.GraphDef
  trainable: nnx.State  # the adapters at init (B = 0); copied by every run
  frozen: nnx.State
  train: LMData
  eval_batches: list[Batch]
  zero_shot_ppl: float

  def heldout_ppl(self, trainable: nnx.State) -> float:
    return perplexity(nnx.merge(self.graphdef, trainable, self.frozen), self.eval_batches)


def eval_batches(heldout: LMData, rows: int, batch: int) -> list[Batch]:
  """The fixed held-out subset: the first ``rows`` (0: all) of a fixed permutation, whole batches.

  The permutation spans every held-out category (the packed rows are in
  category order) and does not depend on the run seed.
  """
  batches = heldout.batches(batch, seed=EVAL_SEED)
  return batches if rows <= 0 else batches[: -(-rows // batch)]


@functools.lru_cache(maxsize=1)  # one model in memory; a sweep runs seed by seed
def prepare(
    *,
    max_len: int,
    eval_rows: int,
    eval_batch: int,
    lora_rank: int,
    layers: int | None = None,
    seed: int = 0,
    targets: Sequence[str] = ATTENTION,
) -> Setup:
  """Loads the model with adapters (``seed`` draws ``A``) and the data; scores the model at init.

  ``layers`` keeps the first decoder blocks only (smoke tests).
  """
  model, tokenizer = load_smollm2(lora_rank, targets, rngs=nnx.Rngs(seed), num_layers=layers)
  train, heldout = load_fortunes(tokenizer, max_len, seed=seed)
  graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
  batches = eval_batches(heldout, eval_rows, eval_batch)
  setup = Setup(graphdef, trainable, frozen, train, batches, 0.0)
  return dataclasses.replace(setup, zero_shot_ppl=setup.heldout_ppl(trainable))


def train_batches(data: LMData, batch: int, steps: int, seed: int) -> list[Batch]:
  """``steps`` batches: epochs of ``seed``-dependent permutations, as many as needed."""
  epochs = itertools.chain.from_iterable(
      data.batches(batch, seed=seed + e) for e in itertools.count()
  )
  return list(itertools.islice(epochs, steps))


def setup_of(size: Size, seed: int) -> Setup:
  """The :class:`Setup` a run of ``size`` and ``seed`` starts from."""
  return prepare(max_len=size["max_len"], eval_rows=size["eval_rows"],
                 eval_batch=size["eval_batch"], lora_rank=size["lora_rank"],
                 layers=size["layers"], seed=seed)


def run(factory: Factory, lr: float, seed: int, size: Size, *, progress: bool = True) -> Run:
  """Trains the adapters with ``factory(family.warmup_cosine(lr, steps), weight_decay)``.

  Held-out perplexity is measured every ``eval_every`` steps and after the
  last one; step 0 is the shared zero-shot perplexity. Training stops at a
  non-finite loss.
  """
  start = time.perf_counter()
  setup = setup_of(size, seed)
  steps = size["steps"]
  tx = factory(warmup_cosine(lr, steps), size["weight_decay"])
  trainable = jax.tree.map(jnp.copy, setup.trainable)  # the step donates its input
  _, record = train(
      make_train_step(setup.graphdef, tx, lm_loss),
      trainable,
      tx.init(trainable),
      setup.frozen,
      train_batches(setup.train, size["batch"], steps, seed),
      steps=steps,
      evaluate=setup.heldout_ppl,
      eval_at=eval_schedule(steps, size["eval_every"]),
      desc=f"lr={lr:g} seed={seed}",
      metric="ppl",
      progress=progress,
      stop_on_nonfinite_loss=True,
  )
  stopped = record["stopped_at"] is not None
  final = record["values"][-1] if record["values"] and not stopped else None
  return make_run(
      "", lr, seed, dict(size), record["losses"], [0, *record["eval_steps"]],
      [setup.zero_shot_ppl, *record["values"]],
      higher_is_better=False,
      stopped=stopped,
      diverged=loss_diverged(record["losses"]) or final is None or final > setup.zero_shot_ppl,
      wall_s=time.perf_counter() - start,
      **{k: record[k] for k in ("first_step_s", "train_s", "eval_s")},
  )


SIZES: dict[str, dict[str, Any]] = {
    # 80 steps of 4 x 64 tokens (1.6% of an epoch each 40 steps), 32 held-out rows (2016 tokens).
    "cpu": dict(steps=80, batch=4, max_len=64, eval_rows=32, eval_batch=16, eval_every=20,
                layers=None, lora_rank=8, weight_decay=0.01),
    # About one epoch of the training categories (~630k tokens), all 31k held-out tokens.
    "gpu": dict(steps=300, batch=16, max_len=128, eval_rows=0, eval_batch=16, eval_every=25,
                layers=None, lora_rank=8, weight_decay=0.01),
}

TASKS = {
    "smollm2": Task(
        name="smollm2",
        metric=Metric("held-out perplexity", higher_is_better=False, fmt=".2f", log_scale=True),
        sizes=SIZES,
        run=run,
        methods={name: Method(make) for name, make in METHODS.items()},
        window=lambda name: window(3e-4, 5),
        reference=lambda size: ("zero-shot", setup_of(size, 0).zero_shot_ppl),
    )
}
