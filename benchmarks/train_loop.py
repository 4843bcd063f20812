"""The training loop of the real-model tasks (MiniLM, SmolLM2): jitted step, periodic held-out score, timings.

A model is split into ``graphdef``, the ``trainable`` state the optimizer
updates and the ``frozen`` rest (``nnx.split``); a task supplies its loss
(of the merged model and one batch), its batches and its held-out score, and
:func:`train` returns the per-step train losses and the scores at the
evaluation steps, in the plain lists the benchmarks write to JSON.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import optax
from flax import nnx
from tqdm import tqdm

Loss = Callable[..., jax.Array]
"""``loss(model, *batch)``: the scalar train loss of the merged model on one batch."""


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss: Loss
) -> Callable:
  """``step(trainable, opt_state, frozen, *batch) -> (trainable, opt_state, loss)``, jitted.

  The trainable state and optimizer state are donated (updated in place);
  ``jax.jit`` over the split state skips ``nnx.jit``'s graph traversal on every call.
  """

  def loss_fn(trainable, frozen, *batch):
    return loss(nnx.merge(graphdef, trainable, frozen), *batch)

  def step(trainable, opt_state, frozen, *batch):
    value, grads = jax.value_and_grad(loss_fn)(trainable, frozen, *batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  return jax.jit(step, donate_argnums=(0, 1))


def train(
    step: Callable,
    trainable: Any,
    opt_state: Any,
    frozen: Any,
    batches: Iterable[tuple],
    *,
    steps: int,
    evaluate: Callable[[Any], float],
    eval_at: set[int],
    desc: str,
    metric: str,
    progress: bool = True,
    stop_on_nonfinite_loss: bool = False,
) -> tuple[Any, dict]:
  """Runs ``step`` over ``steps`` batches, scoring ``evaluate(trainable)`` after the steps in ``eval_at``.

  With ``stop_on_nonfinite_loss`` the loop ends at the first non-finite loss (the
  rest would be NaN too).

  Returns the final trainable state and ``losses`` (per step run),
  ``eval_steps``, ``values`` (the scores), ``stopped_at`` (the step it
  stopped after, or ``None``), ``first_step_s`` (mostly compilation),
  ``train_s`` and ``eval_s``.
  """
  losses: list[float] = []
  eval_steps: list[int] = []
  values: list[float] = []
  times = {"first_step_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
  stopped_at = None
  bar = tqdm(batches, total=steps, desc=desc, leave=False, disable=not progress)
  for t, batch in enumerate(bar, start=1):
    tick = time.perf_counter()
    trainable, opt_state, loss = step(trainable, opt_state, frozen, *batch)
    losses.append(float(loss))
    times["train_s"] += time.perf_counter() - tick
    if t == 1:
      times["first_step_s"] = times["train_s"]
    finite = math.isfinite(losses[-1])
    if not finite and stop_on_nonfinite_loss:
      stopped_at = t
      break
    if t in eval_at:
      tick = time.perf_counter()
      values.append(evaluate(trainable))
      eval_steps.append(t)
      times["eval_s"] += time.perf_counter() - tick
      bar.set_postfix({"loss": f"{losses[-1]:.3f}", metric: f"{values[-1]:.3f}"})
    if t == steps:
      break
  bar.close()
  record = dict(losses=losses, eval_steps=eval_steps, values=values, stopped_at=stopped_at, **times)
  return trainable, record
