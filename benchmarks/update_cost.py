"""Update time and optimizer-state memory of AdaPreLoRA relative to AdamW.

Both optimizers update the same LoRA parameters (7B-like layer shapes: q/k/v/o
4096×4096, gate/up 4096×14336, down 14336×4096, rank 16) in one process,
interleaved, so the ratios are measured side by side::

  python -m benchmarks.update_cost            # CPU-sized default (2 layers)
  python -m benchmarks.update_cost --layers 32 --repeats 50   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from adaprelora_jax import adaprelora

SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096),
          "o": (4096, 4096), "gate": (4096, 14336), "up": (4096, 14336),
          "down": (14336, 4096)}


def lora_params(layers: int, rank: int, seed: int = 0) -> dict:
  """LoRA factors of a 7B-like decoder, one pair per adapted matrix."""
  key = jax.random.PRNGKey(seed)
  params = {}
  for layer in range(layers):
    for name, (m, n) in SHAPES.items():
      key, ka, kb = jax.random.split(key, 3)
      params[f"layer_{layer}/{name}"] = {
          "lora_a": jax.random.normal(ka, (m, rank)) / np.sqrt(m),
          "lora_b": 0.01 * jax.random.normal(kb, (rank, n))}
  return params


def state_bytes(state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default="benchmarks/out/update_cost.json")
  args = parser.parse_args(argv)

  optimizers = {
      "adamw": optax.adamw(1e-4),
      "adaprelora (b1=0.9)": adaprelora(1e-4, b1=0.9),
      "adaprelora (no momentum)": adaprelora(1e-4),
  }
  params = lora_params(args.layers, args.rank)
  grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
  runs = {}
  for name, tx in optimizers.items():
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    step = make_step(tx)
    t0 = time.perf_counter()
    p, s = jax.block_until_ready(step(p, s, grads))
    runs[name] = dict(step=step, params=p, state=s, times=[],
                      compile_s=time.perf_counter() - t0, bytes=state_bytes(s))
  for _ in tqdm(range(args.repeats), desc="timing (interleaved)"):
    for run in runs.values():
      t0 = time.perf_counter()
      run["params"], run["state"] = jax.block_until_ready(
          run["step"](run["params"], run["state"], grads))
      run["times"].append(time.perf_counter() - t0)

  base = runs["adamw"]
  result = {"device": jax.devices()[0].device_kind, "layers": args.layers,
            "rank": args.rank, "repeats": args.repeats, "optimizers": {}}
  print(f"\n{args.layers} layers x 7 LoRA pairs, r={args.rank}, "
        f"device={result['device']}")
  print(f"{'optimizer':28s} {'update ms':>10s} {'time/adamw':>11s} "
        f"{'state MiB':>10s} {'state/adamw':>12s}")
  for name, run in runs.items():
    ms = 1e3 * float(np.median(run["times"]))
    t_ratio = np.median(run["times"]) / np.median(base["times"])
    m_ratio = run["bytes"] / base["bytes"]
    result["optimizers"][name] = dict(
        update_ms=ms, time_ratio=float(t_ratio), state_bytes=run["bytes"],
        state_ratio=m_ratio, compile_s=run["compile_s"])
    print(f"{name:28s} {ms:10.2f} {t_ratio:11.2f} "
          f"{run['bytes'] / 2**20:10.1f} {m_ratio:12.3f}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
