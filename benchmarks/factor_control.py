"""Does the learning rate control AdaPreLoRA's factor steps? The toy measurements (task ``factor_control``).

On the controlled LoRA regression (32 × 24, rank 4, ``B = 0`` at init, a rank-2
target; :func:`benchmarks.controlled.lora_regression`) at a constant lr, for
Adam, the paper's exact rule and the default (balancing term and factor
clipping), with and without momentum:

* **moved**: ``|A − A0| / |A0|`` after 1000 steps at lr ``1e-6``: how far a tiny
  learning rate lets ``A`` move from ``B = 0``;
* **largest at lr 0.1 / 0.3**: the largest ``max(|A|, |B|)`` over 10,000 steps at
  10× and 30× the best constant lr (0.01);
* **steps to 2 %** at the best constant lr, seeds 0 and 1, and the final relative loss.

::

  python -m benchmarks.factor_control    # results/factor_control.json

``tests/test_factor_control.py`` asserts the same properties on its own copy of the toy.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks import record
from benchmarks.controlled import lora_regression, steps_to, toy_floats, train
from benchmarks.family import METHODS, Factory, window
from benchmarks.record import Run, loss_diverged, make_run
from benchmarks.report import Metric
from benchmarks.tasks import Method, Size, Task

METRIC = Metric("loss / initial", higher_is_better=False, fmt=".2g", log_scale=True)
OPTIMIZERS = ("adamw", "adaprelora_exact", "adaprelora", "adaprelora_exact_b1", "adaprelora_b1")
MEASUREMENTS: tuple[tuple[float, int, int], ...] = (
    (1e-6, 0, 1000), (0.1, 0, 10_000), (0.3, 0, 10_000), (0.01, 0, 2000), (0.01, 1, 2000))
"""``(lr, seed, steps)`` of every run the table reads."""


def run(factory: Factory, lr: float, seed: int, size: Size, *, progress: bool = True) -> Run:
  """``size["steps"]`` steps of ``factory(lr, 0)`` at the constant ``lr``.

  ``extra``: ``moved`` (``|A − A0| / |A0|``), ``largest_factor`` and the steps to
  ``size["target"]`` of the initial loss. Diverged: the train loss rule of
  :func:`benchmarks.record.loss_diverged`.
  """
  del progress  # one jitted scan
  start = time.perf_counter()
  params, loss = lora_regression(seed)
  trained = train(factory(lr, 0.0), params, loss, size["steps"])
  relative = trained.losses / trained.losses[0]
  a0 = np.asarray(params["lora_a"])
  moved = np.linalg.norm(np.asarray(trained.params["lora_a"]) - a0) / np.linalg.norm(a0)
  eval_steps = list(range(0, size["steps"] + 1, size["eval_every"]))
  return make_run(
      "", lr, seed, dict(size), toy_floats(trained.losses), eval_steps,
      toy_floats(relative[eval_steps]),
      higher_is_better=False,
      stopped=False,
      diverged=loss_diverged(trained.losses),
      wall_s=time.perf_counter() - start,
      extra=dict(moved=float(moved), largest_factor=trained.largest_factor,
                 steps_to_target=steps_to(relative, size["target"])),
  )


SIZES = {"cpu": dict(steps=2000, eval_every=100, target=0.02)}

TASKS = {
    "factor_control": Task(
        name="factor_control",
        metric=METRIC,
        sizes=SIZES,
        run=run,
        methods={name: Method(METHODS[name]) for name in OPTIMIZERS},
        window=lambda name: window(3e-3, 4),  # the constant lrs around the best, 0.01
    )
}


def table(runs: Sequence[Run]) -> str:
  """One row per optimizer: the measurements of the module docstring."""
  at = {(r.optimizer, r.lr, r.seed): r for r in runs}
  lines = ["| optimizer | moved (lr 1e-6) | largest (lr 0.1) | largest (lr 0.3) | "
           "steps to 2 % (lr 0.01) | final loss (lr 0.01) |", "|---" * 6 + "|"]
  for name in OPTIMIZERS:
    best = [at[name, 0.01, seed] for seed in (0, 1)]
    lines.append(
        f"| {name} | {at[name, 1e-6, 0].extra['moved']:.3g} | "
        f"{at[name, 0.1, 0].extra['largest_factor']:.3g} | "
        f"{at[name, 0.3, 0].extra['largest_factor']:.3g} | "
        + ", ".join(str(r.extra["steps_to_target"]) for r in best) + " | "
        + ", ".join(METRIC.show(r.final) for r in best) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Run]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=Path("benchmarks/out/factor_control.json"))
  args = parser.parse_args(argv)
  runs = []
  for name in OPTIMIZERS:
    for lr, seed, steps in MEASUREMENTS:
      r = run(METHODS[name], lr, seed, {**SIZES["cpu"], "steps": steps})
      runs.append(dataclasses.replace(r, optimizer=name))
  print(table(runs))
  saved = dict(task="factor_control", metric=dataclasses.asdict(METRIC), reference=None, runs=runs)
  record.write(saved, args.out)
  print(f"wrote {args.out}")
  return runs


if __name__ == "__main__":
  main()
