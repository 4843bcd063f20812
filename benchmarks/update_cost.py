"""Update time and optimizer-state memory of the LoRA-optimizer family, relative to AdamW.

Every optimizer updates the same LoRA parameters (7B-like layer shapes: q/k/v/o
4096×4096, gate/up 4096×14336, down 14336×4096) in one process; the timed
steps are interleaved across optimizers, so the ratios to ``optax.adamw`` are
measured side by side and machine load affects them all alike. Before every
timed step a jitted pass streams ``--evict-mib`` MiB through memory: in
training the forward and backward passes leave the optimizer's inputs out of
cache, and without it each step would find some of them left by whichever
optimizer ran before it (AdamW read 2.6 ms alone and 4.9 ms interleaved with
AdaPreLoRA; ``benchmarks/RESULTS.md``)::

  python -m benchmarks.update_cost                       # CPU-sized: 2 layers, r=16, + scaling
  python -m benchmarks.update_cost --optimizers adamw adaprelora adaprelora_b1 --no-scaling
  python -m benchmarks.update_cost --size gpu            # 32 layers, more repeats

Besides the main table it measures how the time ratio scales with the rank
(``--ranks``, one layer) and with the number of layers (``--layer-counts``).
On a GPU it also reports the peak device memory of each optimizer's step.
Results go to ``--out``: ``update_cost.json`` and ``update_cost.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from benchmarks import family

SHAPES = {
    "q": (4096, 4096),
    "k": (4096, 4096),
    "v": (4096, 4096),
    "o": (4096, 4096),
    "gate": (4096, 14336),
    "up": (4096, 14336),
    "down": (14336, 4096),
}
SIZES = {
    # On this shared 2-core CPU one step in five or six runs 20-80 % slow; a median of 10
    # put a third of the processes about 20 % high, one of 30 none (benchmarks/RESULTS.md).
    "cpu": dict(layers=2, repeats=30, ranks=(4, 8, 16, 32, 64, 128), layer_counts=(1, 2, 4, 8)),
    "gpu": dict(layers=32, repeats=50, ranks=(4, 8, 16, 32, 64, 128), layer_counts=(4, 8, 16, 32)),
}
DENSE_STATE = ("lora_pro_full",)  # m×n moments: timed in a pass of their own, not in the sweeps


def lora_params(layers: int, rank: int, seed: int = 0, shrink: int = 1) -> dict:
  """LoRA factors of a 7B-like decoder (each side divided by ``shrink``), one pair per matrix."""
  key = jax.random.PRNGKey(seed)
  params = {}
  for layer in range(layers):
    for name, (m, n) in SHAPES.items():
      m, n = m // shrink, n // shrink
      key, ka, kb = jax.random.split(key, 3)
      params[f"layer_{layer}/{name}"] = {
          "lora_a": jax.random.normal(ka, (m, rank)) / np.sqrt(m),
          "lora_b": 0.01 * jax.random.normal(kb, (rank, n)),
      }
  return params


def state_bytes(state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def make_step(tx: optax.GradientTransformation):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if stats is None else stats.get("peak_bytes_in_use")


def cache_evictor(mib: int) -> Callable[[], None]:
  """A function that streams ``mib`` MiB through the device's memory (a no-op for 0)."""
  if mib < 0:
    raise ValueError(f"--evict-mib must be 0 or more MiB, got {mib}.")
  if not mib:
    return lambda: None
  buffer = jnp.zeros(mib * 2**20 // 4, jnp.float32)
  bump = jax.jit(lambda x: x + 1.0, donate_argnums=0)

  def evict() -> None:
    nonlocal buffer
    buffer = jax.block_until_ready(bump(buffer))

  return evict


def measure(
    names: list[str],
    layers: int,
    rank: int,
    repeats: int,
    shrink: int = 1,
    progress: bool = True,
    evict_mib: int = 0,
) -> dict:
  """Per optimizer: median update ms, state bytes, compile s, and the ratios to adamw.

  Each timed step follows a pass over ``evict_mib`` MiB (see the module docstring).
  """
  names = ["adamw"] + [n for n in names if n != "adamw"]
  evict = cache_evictor(evict_mib)
  params = lora_params(layers, rank, shrink=shrink)
  grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
  runs = {}
  for name in names:
    tx = family.FAMILY[name](1e-4, 0.0)
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    step = make_step(tx)
    t0 = time.perf_counter()
    p, s = jax.block_until_ready(step(p, s, grads))
    runs[name] = dict(
        step=step,
        params=p,
        state=s,
        times=[],
        compile_s=time.perf_counter() - t0,
        bytes=state_bytes(s),
        peak_bytes=_peak_bytes(),
    )
  bar = tqdm(range(repeats), desc=f"{layers} layers, r={rank}", leave=False, disable=not progress)
  for _ in bar:
    for run in runs.values():
      evict()
      t0 = time.perf_counter()
      run["params"], run["state"] = jax.block_until_ready(
          run["step"](run["params"], run["state"], grads)
      )
      run["times"].append(time.perf_counter() - t0)
  base_time, base_bytes = np.median(runs["adamw"]["times"]), runs["adamw"]["bytes"]
  return {
      name: dict(
          update_ms=1e3 * float(np.median(run["times"])),
          time_ratio=float(np.median(run["times"]) / base_time),
          state_bytes=run["bytes"],
          state_ratio=run["bytes"] / base_bytes,
          compile_s=run["compile_s"],
          peak_bytes=run["peak_bytes"],
      )
      for name, run in runs.items()
  }


def table(rows: dict) -> str:
  lines = [
      "| optimizer | update ms | time / adamw | state MiB | state / adamw |",
      "|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    lines.append(
        f"| {name} | {r['update_ms']:.1f} | {r['time_ratio']:.2f} | "
        f"{r['state_bytes'] / 2**20:.1f} | {r['state_ratio']:.3f} |"
    )
  return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
  """Time ratio to adamw vs rank and vs layers."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [
      (k, label)
      for k, label in (("by_rank", "rank r (1 layer)"), ("by_layers", "layers (r=16)"))
      if result.get(k)
  ]
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  for ax, (key, label) in zip(axes[0], panels):
    xs = sorted(result[key], key=int)
    for name in result[key][xs[0]]:
      ax.plot(
          [int(x) for x in xs],
          [result[key][x][name]["time_ratio"] for x in xs],
          marker="o",
          label=name,
      )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("update time / adamw")
    ax.set_title(f"{result['device']}")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=list(SIZES), default="cpu")
  parser.add_argument("--optimizers", nargs="+", help=f"default: all of {list(family.FAMILY)}")
  parser.add_argument("--layers", type=int, help="layers of the main table (default: by --size)")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--repeats", type=int)
  parser.add_argument("--ranks", type=int, nargs="*", help="ranks of the rank sweep (1 layer)")
  parser.add_argument("--layer-counts", type=int, nargs="*", help="layer counts of the layer sweep")
  parser.add_argument("--no-scaling", action="store_true", help="only the main table")
  parser.add_argument(
      "--shrink", type=int, default=1, help="divide every matrix side by this (smoke tests)"
  )
  parser.add_argument(
      "--evict-mib",
      type=int,
      default=1024,
      help="MiB streamed through memory before every timed step (0: none)",
  )
  parser.add_argument(
      "--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out/update_cost")
  )
  args = parser.parse_args(argv)
  size = SIZES[args.size]
  layers, repeats = args.layers or size["layers"], args.repeats or size["repeats"]
  names = list(family.select(args.optimizers))
  scaled = [n for n in names if n not in DENSE_STATE]
  device = jax.devices()[0].device_kind

  result = dict(
      device=device, layers=layers, rank=args.rank, repeats=repeats, evict_mib=args.evict_mib
  )

  def run(names: list[str], layers: int, rank: int, repeats: int = repeats) -> dict:
    return measure(names, layers, rank, repeats, args.shrink, evict_mib=args.evict_mib)

  # The m×n-state optimizers stream gigabytes per step, which slows whatever is
  # timed right after them (LoRA-RITE read 24x AdamW interleaved with them, 5x
  # without), so they are timed in a pass of their own, against AdamW again. Their
  # steps take seconds and read hundreds of times AdamW's, so ten of them suffice.
  dense = [n for n in names if n in DENSE_STATE]
  result["main"] = run(scaled, layers, args.rank)
  if dense:
    rows = run(dense, layers, args.rank, min(repeats, 10))
    result["main"] |= {name: rows[name] for name in dense}
  print(
      f"\n{layers} layers x 7 LoRA pairs, r={args.rank}, device={device}\n{table(result['main'])}"
  )
  if not args.no_scaling:
    ranks = size["ranks"] if args.ranks is None else args.ranks
    counts = size["layer_counts"] if args.layer_counts is None else args.layer_counts
    result["by_rank"] = {r: run(scaled, 1, r) for r in tqdm(ranks, desc="rank sweep")}
    result["by_layers"] = {n: run(scaled, n, args.rank) for n in tqdm(counts, desc="layer sweep")}
    for key in (k for k in ("by_rank", "by_layers") if result[k]):  # `--ranks` alone: no sweep
      print(f"\ntime / adamw, {key}")
      print("| optimizer | " + " | ".join(map(str, result[key])) + " |")
      print("|---|" + "---|" * len(result[key]))
      for name in scaled:
        print(
            f"| {name} | "
            + " | ".join(f"{result[key][x][name]['time_ratio']:.2f}" for x in result[key])
            + " |"
        )
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "update_cost.json").write_text(json.dumps(result, indent=1))
  plot(result, args.out / "update_cost.png")
  return result


if __name__ == "__main__":
  main()
