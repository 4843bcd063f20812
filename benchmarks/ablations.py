"""Ablations of AdaPreLoRA's own choices, on the controlled problems.

Each variant changes one thing against the default ``adaprelora`` (tangent
statistics, no momentum, update clipping at 1, damping 1e-4, Adafactor's
decay schedule, ``B = 0`` init):

* ``full_stats``: exact Adafactor statistics of the W-gradient (docs/derivation.md,
  ``full``), fed as ``weight_stats``; the problems know ``G`` exactly;
* ``b1``: momentum 0.9; ``no_clipping``; ``damping=1e-6`` / ``1e-2``;
* ``b2=0.999``: a constant second-moment decay with bias correction;
* ``balanced_init``: ``A`` and ``B`` both random with equal norms, the base
  weight absorbing their product, so the starting ``W`` is the same.

Every variant gets the controlled benchmark's protocol: the same warmup +
cosine schedule, peak-lr grid and seeds, reported at its best lr::

  python -m benchmarks.ablations                    # both problems, 3 seeds
  python -m benchmarks.ablations --size gpu         # the controlled benchmark's GPU size
  python -m benchmarks.ablations --variants default full_stats --seeds 1

Results go to ``--out``: ``ablations.json`` and ``ablations.png``. The cost
of ``full`` statistics in a real model is ``benchmarks/full_stats_cost.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from adaprelora_jax import adaprelora
from benchmarks import controlled


@dataclasses.dataclass(frozen=True)
class Variant:
  """Keyword arguments for ``adaprelora`` and how the problem is run."""

  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  weight_stats: bool = False
  balanced_init: bool = False


VARIANTS: dict[str, Variant] = {
    "default": Variant(),
    "full_stats": Variant(dict(statistics="full"), weight_stats=True),
    "b1": Variant(dict(b1=0.9)),
    "no_clipping": Variant(dict(clipping_threshold=None)),
    "damping=1e-6": Variant(dict(damping=1e-6)),
    "damping=1e-2": Variant(dict(damping=1e-2)),
    "b2=0.999": Variant(dict(b2=0.999)),
    "balanced_init": Variant(balanced_init=True),
}


def balance(params: dict, seed: int) -> tuple[dict, jnp.ndarray]:
  """``A``, ``B`` with i.i.d. entries of variance ``1/m`` and ``1/n`` and the offset ``A B``."""
  rng = np.random.default_rng(seed + 10_000)
  (m, r), n = params["lora_a"].shape, params["lora_b"].shape[1]
  a = jnp.asarray(rng.normal(size=(m, r)) / np.sqrt(m), jnp.float32)
  b = jnp.asarray(rng.normal(size=(r, n)) / np.sqrt(n), jnp.float32)
  return {"lora_a": a, "lora_b": b}, a @ b


def runner(
    problem: str, name: str, steps: int, dims: dict[str, int] | None = None
) -> Callable[[optax.Schedule, int], np.ndarray]:
  """``run_seed(schedule, seed)`` for :func:`controlled.lr_sweep`: one variant on one instance."""
  variant = VARIANTS[name]

  def run_seed(schedule: optax.Schedule, seed: int) -> np.ndarray:
    params, w_loss = controlled.PROBLEMS[problem](seed, **(dims or {}))
    offset = 0.0
    if variant.balanced_init:
      params, offset = balance(params, seed)
    tx = adaprelora(schedule, **variant.kwargs)
    return controlled.train(
        tx, params, w_loss, steps, offset=offset, weight_stats=variant.weight_stats
    )

  return run_seed


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--problems", nargs="+", default=list(controlled.PROBLEMS), choices=list(controlled.PROBLEMS)
  )
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  controlled.add_size_arguments(parser)
  parser.add_argument("--grid", type=float, nargs="+", default=list(controlled.GRID))
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out/ablations"))
  args = parser.parse_args(argv)
  dims = controlled.apply_size(args)
  jobs = [(p, v) for p in args.problems for v in args.variants]
  results: dict[str, dict] = {}
  for problem, name in tqdm(jobs, desc="ablations"):
    run_seed = runner(problem, name, args.steps, dims)
    results.setdefault(problem, {})[name] = controlled.lr_sweep(
        run_seed, args.steps, args.seeds, args.target, tuple(args.grid)
    )
  print(controlled.report(results, args.steps, args.target))
  controlled.write_json(
      results,
      args.out / "ablations.json",
      size=args.size,
      dims=dims,
      steps=args.steps,
      seeds=args.seeds,
      target=args.target,
      grid=args.grid,
  )
  controlled.plot(results, args.out / "ablations.png")
  return results


if __name__ == "__main__":
  main()
