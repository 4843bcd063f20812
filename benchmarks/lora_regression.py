"""AdaPreLoRA vs AdamW on an ill-conditioned LoRA regression.

``min ‖X (A B) − X ΔW*‖²`` with anisotropic inputs (feature scales 1 … 0.01),
a rank-2 target and a rank-4 LoRA initialised as ``nnx.LoRA`` does (``B = 0``).
Every optimizer gets the same warmup + cosine schedule, a peak-lr sweep of the
same size, and the same seeds; reported are the final loss relative to the
initial one and the steps to reach 1e-3 of it, at each optimizer's best lr::

  python -m benchmarks.lora_regression
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from adaprelora_jax import adaprelora

Loss = Callable[[dict], jax.Array]

OPTIMIZERS = {
    "adamw": lambda s: optax.adamw(s, weight_decay=0.0),
    "adaprelora": lambda s: adaprelora(s),
    "adaprelora (b1=0.9)": lambda s: adaprelora(s, b1=0.9),
}
GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def lora_regression(seed: int, m: int = 32, n: int = 24, rank: int = 4,
                    samples: int = 256) -> tuple[dict, Loss]:
  """Initial LoRA params and the loss of one problem instance."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(samples, m)) * np.logspace(0, -2, m)
  target = rng.normal(size=(m, 2)) @ rng.normal(size=(2, n))
  params = {"lora_a": jnp.asarray(rng.normal(size=(m, rank)) / np.sqrt(m), jnp.float32),
            "lora_b": jnp.zeros((rank, n), jnp.float32)}
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(x @ target, jnp.float32)
  return params, lambda p: jnp.mean((x @ (p["lora_a"] @ p["lora_b"]) - y) ** 2)


def train(tx: optax.GradientTransformation, params: dict, loss: Loss,
          steps: int) -> np.ndarray:
  """The loss before each step and after the last one."""
  def step(carry, _):
    params, state = carry
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), value

  (params, _), values = jax.jit(
      lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps))(params)
  return np.append(np.asarray(values), float(loss(params)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/out/lora_regression.json")
  args = parser.parse_args(argv)
  results = {}
  jobs = [(name, lr) for name in OPTIMIZERS for lr in GRID]
  for name, lr in tqdm(jobs, desc="runs"):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, args.steps // 20, args.steps)
    curves = [train(OPTIMIZERS[name](schedule), *lora_regression(seed), args.steps)
              for seed in range(args.seeds)]
    rel = np.stack([c / c[0] for c in curves])
    reach = [int(np.argmax(r < 1e-3)) if np.any(r < 1e-3) else None for r in rel]
    results.setdefault(name, {})[lr] = dict(
        final=[float(r[-1]) for r in rel], steps_to_target=reach)
  print(f"\nfinal loss / initial loss (median over {args.seeds} seeds), "
        f"{args.steps} steps")
  print(f"{'optimizer':22s}" + "".join(f"{lr:>10g}" for lr in GRID)
        + "   best lr   steps to 1e-3")
  for name, by_lr in results.items():
    med = {lr: float(np.median(v["final"])) for lr, v in by_lr.items()}
    best = min(med, key=med.get)
    reach = by_lr[best]["steps_to_target"]
    print(f"{name:22s}" + "".join(f"{med[lr]:10.1e}" for lr in GRID)
          + f"   {best:<9g} {reach}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({k: {str(lr): v for lr, v in d.items()}
                             for k, d in results.items()}, indent=1))
  return results


if __name__ == "__main__":
  main()
