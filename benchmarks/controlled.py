"""The LoRA-optimizer family on two controlled, ill-conditioned problems.

* ``lora_regression``: ``min mean ‖X (A B) − X ΔW*‖²`` with anisotropic inputs
  (feature scales 1 … 0.01) and a rank-2 target;
* ``matrix_sensing``: ``min mean_k (⟨S_k, A B⟩ − ⟨S_k, ΔW*⟩)²`` with sensing
  matrices ``S_k = D_m Z_k D_n`` (``Z_k`` Gaussian, ``D`` diagonal scales
  1 … 0.1 on each side) and a rank-2 target.

Both use a rank-4 LoRA initialised as ``nnx.LoRA`` does (``A`` random,
``B = 0``). Every method gets the same warmup + cosine schedule, the same
peak-lr grid and the same seeds. Reported, at each method's best lr (lowest
median final loss): the final loss relative to the initial one, and the steps
to reach ``--target`` of it::

  python -m benchmarks.controlled                      # everything, CPU-sized (32 x 24, rank 4)
  python -m benchmarks.controlled --size gpu           # 256 x 192, rank 8, 2000 steps, 5 seeds
  python -m benchmarks.controlled --problems matrix_sensing --optimizers adamw adaprelora

Results go to ``--out``: ``controlled.json`` and ``controlled.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from adaprelora_jax import WeightStats
from benchmarks import family
from benchmarks.sizes import fill_defaults

WLoss = Callable[[jax.Array], jax.Array]
"""A problem's loss as a function of the adapter's product ``ΔW = A B``."""
Problem = Callable[[int], tuple[dict, WLoss]]

GRID = family.rungs(0.01, 6)
"""Peak learning rates 0.01 to 3, the same for every method.

Rungs of :data:`benchmarks.family.LADDER`, above :data:`benchmarks.family.GRID`
since these problems are unit-scaled.
"""


def _lora_init(rng: np.random.Generator, m: int, n: int, rank: int) -> dict:
  return {
      "lora_a": jnp.asarray(rng.normal(size=(m, rank)) / np.sqrt(m), jnp.float32),
      "lora_b": jnp.zeros((rank, n), jnp.float32),
  }


def lora_regression(
    seed: int, m: int = 32, n: int = 24, rank: int = 4, samples: int | None = None
) -> tuple[dict, WLoss]:
  """Initial LoRA params and the loss (of ``ΔW``) of one regression instance (``8 m`` samples)."""
  rng = np.random.default_rng(seed)
  samples = samples or 8 * m
  x = rng.normal(size=(samples, m)) * np.logspace(0, -2, m)
  target = rng.normal(size=(m, 2)) @ rng.normal(size=(2, n))
  params = _lora_init(rng, m, n, rank)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(x @ target, jnp.float32)
  return params, lambda w: jnp.mean((x @ w - y) ** 2)


def matrix_sensing(
    seed: int, m: int = 32, n: int = 24, rank: int = 4, samples: int | None = None
) -> tuple[dict, WLoss]:
  """Initial LoRA params and the loss (of ``ΔW``) of one matrix-sensing instance (``16 m`` samples)."""
  rng = np.random.default_rng(seed)
  samples = samples or 16 * m
  sensing = (
      np.logspace(0, -1, m)[:, None]
      * rng.normal(size=(samples, m, n))
      * np.logspace(0, -1, n)[None, :]
  )
  target = rng.normal(size=(m, 2)) @ rng.normal(size=(2, n))
  params = _lora_init(rng, m, n, rank)
  sensing = jnp.asarray(sensing, jnp.float32)
  y = jnp.einsum("kmn,mn->k", sensing, jnp.asarray(target, jnp.float32))
  return params, lambda w: jnp.mean((jnp.einsum("kmn,mn->k", sensing, w) - y) ** 2)


PROBLEMS: dict[str, Problem] = {
    "lora_regression": lora_regression,
    "matrix_sensing": matrix_sensing,
}

SIZES = {
    "cpu": dict(dims=dict(m=32, n=24, rank=4), steps=400, seeds=3),
    # 4096 sensing matrices of 256 x 192: 0.8 GB of f32 on the device.
    "gpu": dict(dims=dict(m=256, n=192, rank=8), steps=2000, seeds=5),
}
"""Problem dimensions, steps and seeds of each ``--size``; ``--steps`` / ``--seeds`` override."""


class Run(NamedTuple):
  """One training run: the loss before each step and after the last, the final params, and
  the largest factor norm ``max(|A|, |B|)`` seen after any step."""

  losses: np.ndarray
  params: dict
  largest_factor: float


def train_run(
    tx: optax.GradientTransformation,
    params: dict,
    w_loss: WLoss,
    steps: int,
    *,
    offset: jax.Array | float = 0.0,
    weight_stats: bool = False,
) -> Run:
  """``steps`` updates in one jitted scan.

  The adapter's product is ``ΔW = A B − offset`` (a base weight that absorbs a
  nonzero initial product). With ``weight_stats``, every update also gets the
  exact mean squares of the W-gradient (``full``, docs/derivation.md) for the root pair.
  """
  delta = lambda p: p["lora_a"] @ p["lora_b"] - offset
  loss = lambda p: w_loss(delta(p))
  norm = lambda x: jnp.sqrt(jnp.sum(x * x))

  def step(carry, _):
    params, state, largest = carry
    value, grads = jax.value_and_grad(loss)(params)
    extra = {}
    if weight_stats:
      g2 = jax.grad(w_loss)(delta(params)) ** 2
      extra["weight_stats"] = {"": WeightStats(jnp.mean(g2, 1), jnp.mean(g2, 0))}
    updates, state = tx.update(grads, state, params, **extra)
    params = optax.apply_updates(params, updates)
    largest = jnp.maximum(largest, jnp.maximum(norm(params["lora_a"]), norm(params["lora_b"])))
    return (params, state, largest), value

  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p), jnp.float32(0)), length=steps))
  (params, _, largest), values = run(params)
  return Run(np.append(np.asarray(values), float(loss(params))), params, float(largest))


def train(tx: optax.GradientTransformation, params: dict, w_loss: WLoss, steps: int,
          **kwargs: Any) -> np.ndarray:
  """The loss before each step and after the last one (:func:`train_run`'s ``losses``)."""
  return train_run(tx, params, w_loss, steps, **kwargs).losses


def steps_to(relative: np.ndarray, target: float) -> int | None:
  """The first step at which ``relative`` is below ``target``, or ``None``."""
  hit = np.flatnonzero(relative < target)
  return int(hit[0]) if hit.size else None


def lr_sweep(
    run_seed: Callable[[optax.Schedule, int], np.ndarray],
    steps: int,
    seeds: int,
    target: float,
    grid: tuple[float, ...] = GRID,
) -> dict[float, dict]:
  """Per peak lr: relative final losses, steps to ``target`` and the median curve over seeds.

  ``run_seed(schedule, seed)`` trains one instance and returns its loss curve
  (see :func:`train`); the schedule is warmup + cosine to the peak lr.
  """
  out = {}
  for lr in grid:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps)
    rel = np.stack([curve / curve[0] for curve in (run_seed(schedule, s) for s in range(seeds))])
    out[lr] = dict(
        final=rel[:, -1].tolist(),
        steps_to_target=[steps_to(r, target) for r in rel],
        median_curve=np.median(rel, 0).tolist(),
    )
  return out


def sweep(
    problem: str,
    names: list[str],
    steps: int,
    seeds: int,
    target: float,
    grid: tuple[float, ...] = GRID,
    progress: bool = True,
    dims: dict[str, int] | None = None,
) -> dict:
  """:func:`lr_sweep` of every named family member on ``problem`` (of size ``dims``)."""

  def runner(name: str) -> Callable[[optax.Schedule, int], np.ndarray]:
    def run_seed(schedule: optax.Schedule, seed: int) -> np.ndarray:
      params, w_loss = PROBLEMS[problem](seed, **(dims or {}))
      return train(family.FAMILY[name](schedule, 0.0), params, w_loss, steps)

    return run_seed

  return {
      name: lr_sweep(runner(name), steps, seeds, target, grid)
      for name in tqdm(names, desc=problem, disable=not progress)
  }


def best_lr(by_lr: dict) -> float:
  """The lr with the lowest median final loss (NaN counts as worst)."""
  score = lambda lr: np.nan_to_num(np.median(by_lr[lr]["final"]), nan=np.inf)
  return min(by_lr, key=score)


def report(results: dict, steps: int, target: float) -> str:
  """A markdown table per problem: each method at its best lr."""
  lines = []
  for problem, by_name in results.items():
    lines += [
        f"\n{problem}: final/initial loss (median [min, max] over seeds) and steps to {target:g}, "
        f"best of {len(next(iter(by_name.values())))} peak lrs, {steps} steps",
        "| optimizer | best lr | final / initial | steps to target (per seed) |",
        "|---|---|---|---|",
    ]
    for name, by_lr in by_name.items():
      lr = best_lr(by_lr)
      final = np.asarray(by_lr[lr]["final"])
      reach = ", ".join("-" if s is None else str(s) for s in by_lr[lr]["steps_to_target"])
      lines.append(
          f"| {name} | {lr:g} | {np.median(final):.1e} [{final.min():.1e}, {final.max():.1e}] "
          f"| {reach} |"
      )
  return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
  """Median relative loss vs step at each method's best lr, one panel per problem."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
  for ax, (problem, by_name) in zip(axes[0], results.items()):
    for name, by_lr in by_name.items():
      lr = best_lr(by_lr)
      ax.semilogy(by_lr[lr]["median_curve"], label=f"{name} (lr {lr:g})")
    ax.set_title(problem)
    ax.set_xlabel("step")
    ax.set_ylabel("loss / initial loss (median over seeds)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_json(results: dict, path: pathlib.Path, **meta: Any) -> None:
  """``results`` (lr keys as strings) and ``meta`` as one JSON file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  serialisable = {
      p: {n: {str(lr): v for lr, v in d.items()} for n, d in r.items()} for p, r in results.items()
  }
  path.write_text(json.dumps(dict(**meta, results=serialisable)))


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
  """``--size``, ``--steps``, ``--seeds`` and ``--target``, shared with the ablations."""
  parser.add_argument("--size", choices=list(SIZES), default="cpu")
  parser.add_argument("--steps", type=int, help="default: by --size")
  parser.add_argument("--seeds", type=int, help="default: by --size")
  parser.add_argument("--target", type=float, default=1e-3)


def apply_size(args: argparse.Namespace) -> dict[str, int]:
  """Fills ``args.steps`` / ``args.seeds`` from ``--size``; returns the problem dimensions."""
  size = SIZES[args.size]
  fill_defaults(args, dict(steps=size["steps"], seeds=size["seeds"]))
  return size["dims"]


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
  parser.add_argument("--optimizers", nargs="+", help=f"default: all of {list(family.FAMILY)}")
  add_size_arguments(parser)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out/controlled"))
  args = parser.parse_args(argv)
  dims = apply_size(args)
  names = list(family.select(args.optimizers))
  results = {
      p: sweep(p, names, args.steps, args.seeds, args.target, dims=dims) for p in args.problems
  }
  print(report(results, args.steps, args.target))
  write_json(
      results,
      args.out / "controlled.json",
      size=args.size,
      dims=dims,
      steps=args.steps,
      seeds=args.seeds,
      target=args.target,
      grid=GRID,
  )
  plot(results, args.out / "controlled.png")
  return results


if __name__ == "__main__":
  main()
