"""Does the learning rate control AdaPreLoRA's factor steps? The toy measurements of the fix.

On the controlled LoRA regression (32 × 24, rank 4, ``B = 0`` at init, a rank-2
target; :func:`benchmarks.controlled.lora_regression`), for Adam, the paper's exact
rule and the default (balancing term and factor clipping), with and without
momentum:

* **moved**: ``|A − A0| / |A0|`` after 1000 steps at lr ``1e-6``: how far a tiny
  learning rate lets ``A`` move from ``B = 0``;
* **largest at lr 0.1 / 0.3**: the largest ``max(|A|, |B|)`` over 10,000 steps at
  10× and 30× the best constant lr (0.01), and the final relative loss;
* **steps to 2 %** at the best constant lr, seeds 0 and 1, and the final relative loss.

::

  python -m benchmarks.factor_control    # about a minute; results/factor_control.json

``tests/test_factor_control.py`` asserts the same properties.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import optax

from adaprelora_jax import adaprelora
from benchmarks.controlled import lora_regression, steps_to, train_run
from benchmarks.family import EXACT

OPTIMIZERS = {
    "adam": lambda lr, b1: optax.adam(lr, b1=0.9 if b1 is None else b1),
    "adaprelora (exact, the paper's rule)": lambda lr, b1: adaprelora(lr, b1=b1, **EXACT),
    "adaprelora (default)": lambda lr, b1: adaprelora(lr, b1=b1),
}


def moved(params: dict, final: dict) -> float:
  """``|A − A0| / |A0|``."""
  a0 = np.asarray(params["lora_a"])
  return float(np.linalg.norm(np.asarray(final["lora_a"]) - a0) / np.linalg.norm(a0))


def measure(name: str, b1: float | None) -> dict:
  make = OPTIMIZERS[name]
  params, loss = lora_regression(0)
  row = {"moved": moved(params, train_run(make(1e-6, b1), params, loss, 1000).params)}
  for lr in (0.1, 0.3):
    run = train_run(make(lr, b1), params, loss, 10_000)
    row[f"largest at lr {lr}"] = run.largest_factor
    row[f"final loss at lr {lr}"] = float(run.losses[-1] / run.losses[0])
  best = []
  for seed in (0, 1):
    params, loss = lora_regression(seed)
    relative = train_run(make(0.01, b1), params, loss, 2000).losses
    relative = relative / relative[0]
    best.append((steps_to(relative, 0.02), float(relative[-1])))
  row["steps to 2 % at lr 0.01"] = [s for s, _ in best]
  row["final loss at lr 0.01"] = [f for _, f in best]
  return row


def table(rows: dict) -> str:
  lines = ["| optimizer | b1 | moved (lr 1e-6) | largest (lr 0.1) | largest (lr 0.3) | "
           "steps to 2 % (lr 0.01) | final loss (lr 0.01) |", "|---" * 7 + "|"]
  for (name, b1), r in rows.items():
    lines.append(
        f"| {name} | {b1} | {r['moved']:.3g} | {r['largest at lr 0.1']:.3g} | "
        f"{r['largest at lr 0.3']:.3g} | {r['steps to 2 % at lr 0.01']} | "
        + ", ".join(f"{f:.2g}" for f in r["final loss at lr 0.01"]) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  args = parser.parse_args(argv)
  rows = {(name, b1): measure(name, b1) for b1 in (None, 0.9) for name in OPTIMIZERS}
  print(table(rows))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "factor_control.json").write_text(json.dumps(
      [{"optimizer": name, "b1": b1, **r} for (name, b1), r in rows.items()], indent=1))
  return rows


if __name__ == "__main__":
  main()
