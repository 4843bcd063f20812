"""Cost of exact W-gradient statistics: ``LoRALinearWithStats`` vs ``nnx.LoRALinear``.

Two measurements, both of one jitted ``loss + grad`` (mean-square loss on the
output, gradients of the LoRA factors, plus the statistics leaves where asked
for), ``float32``:

* time, of one ``m × n`` layer on ``N = batch · seq`` tokens (its input needs
  no gradient, so the baseline backward has no ``δ Wᵀ`` product) and of a
  stack of ``--layers`` layers under ``nnx.scan`` (inner layers need it, as
  in a real network). Variants are timed interleaved, one call of each per
  repeat, so machine load hits them alike; tables give medians and the ratio
  to ``nnx.LoRALinear``;
* memory, of the scanned stack: XLA's compiled temporary bytes
  (``jit(...).lower(...).compile().memory_analysis()``).

::

  python -m benchmarks.full_stats_cost                     # N=2048, 1024×1024, r=16
  python -m benchmarks.full_stats_cost --size gpu          # N up to 32768, 4096×4096, 8 layers
  python -m benchmarks.full_stats_cost --tokens 128 512 2048 --repeats 40
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from adaprelora_jax.flax import LoRALinearWithStats, WeightStatsVar
from benchmarks.sizes import fill_defaults

# name -> (stats_method, or None for nnx.LoRALinear; whether the statistics are asked for)
VARIANTS = {
    "nnx.LoRALinear": (None, False),
    "stats (auto)": ("auto", True),
    "stats (dense)": ("dense", True),
    "stats (gram)": ("gram", True),
    "stats layer, not asked": ("auto", False),
}
STACK_VARIANTS = ("nnx.LoRALinear", "stats (auto)", "stats layer, not asked")


def make_layer(method: str | None, m: int, n: int, rank: int, rngs: nnx.Rngs):
  kw = dict(lora_rank=rank, rngs=rngs, b_initializer=nnx.initializers.normal(0.01))
  if method is None:
    return nnx.LoRALinear(m, n, **kw)
  return LoRALinearWithStats(m, n, stats_method=method, **kw)


def grad_fn(model: nnx.Module, with_stats: bool) -> tuple[Callable, nnx.State]:
  """A jitted pure ``(state, x) -> (loss, grads)`` and the model's state."""
  wrt = nnx.Any(nnx.LoRAParam, WeightStatsVar) if with_stats else nnx.LoRAParam
  graphdef, state = nnx.split(model)

  def loss_and_grad(state, x):
    loss = lambda model: jnp.mean(model(x) ** 2)
    return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt))(
        nnx.merge(graphdef, state))

  return jax.jit(loss_and_grad), state


def time_variants(make_model: Callable[[str | None], nnx.Module], x: jax.Array,
                  repeats: int, names: list[str], desc: str) -> dict[str, float]:
  """Median seconds of ``loss + grad`` per variant, interleaved."""
  runs = {}
  for name in names:
    method, with_stats = VARIANTS[name]
    fn, state = grad_fn(make_model(method), with_stats)
    jax.block_until_ready(fn(state, x))  # compile
    runs[name] = (fn, state, [])
  for _ in tqdm(range(repeats), desc=desc, leave=False):
    for fn, state, times in runs.values():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state, x))
      times.append(time.perf_counter() - t0)
  return {name: float(np.median(times)) for name, (_, _, times) in runs.items()}


class Stack(nnx.Module):
  """``depth`` layers of one kind, stacked with ``nnx.vmap`` and run by ``nnx.scan``."""

  def __init__(self, method: str | None, depth: int, width: int, rank: int,
               rngs: nnx.Rngs):
    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs):
      return make_layer(method, width, width, rank, rngs)

    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return jax.nn.gelu(layer(x))

    return body(x, self.layers)


def scan_memory(tokens: int, width: int, rank: int, depth: int,
                names: list[str]) -> dict[str, dict[str, int]]:
  """Compiled temp / argument / output bytes of ``loss + grad`` per variant."""
  x = jax.ShapeDtypeStruct((tokens, width), jnp.float32)
  out = {}
  for name in names:
    method, with_stats = VARIANTS[name]
    model = nnx.eval_shape(lambda: Stack(method, depth, width, rank, nnx.Rngs(0)))
    fn, state = grad_fn(model, with_stats)
    mem = fn.lower(state, x).compile().memory_analysis()
    out[name] = dict(temp=mem.temp_size_in_bytes,
                     argument=mem.argument_size_in_bytes,
                     output=mem.output_size_in_bytes)
  return out


SIZES = {
    "cpu": dict(tokens=[2048], features=1024, layers=4),
    "gpu": dict(tokens=[2048, 8192, 32768], features=4096, layers=8),
}
"""Defaults of each ``--size``; any flag given overrides its entry."""


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=list(SIZES), default="cpu")
  parser.add_argument("--tokens", type=int, nargs="+",
                      help="N = batch · seq of the timing table")
  parser.add_argument("--features", type=int, help="m = n")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--layers", type=int, help="depth of the scanned stack")
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                      choices=list(VARIANTS))
  args = parser.parse_args(argv)
  fill_defaults(args, SIZES[args.size])
  names = ["nnx.LoRALinear"] + [v for v in args.variants if v != "nnx.LoRALinear"]
  d, r = args.features, args.rank
  print(f"device: {jax.devices()[0].device_kind}; {d}×{d} kernel, r={r}, "
        f"float32, median of {args.repeats} interleaved repeats")

  x_of = lambda tokens: jax.random.normal(jax.random.key(0), (tokens, d))
  layer = lambda method: make_layer(method, d, d, r, nnx.Rngs(0))
  stack = lambda method: Stack(method, args.layers, d, r, nnx.Rngs(0))
  rows = [(f"1 layer, N={t}", time_variants(layer, x_of(t), args.repeats, names,
                                            f"N={t}"))
          for t in args.tokens]
  tokens = args.tokens[-1]
  stacked = [v for v in names if v in STACK_VARIANTS]
  rows.append((f"{args.layers} scanned layers, N={tokens}",
               time_variants(stack, x_of(tokens), args.repeats, stacked, "stack")))
  print("\n| model | variant | loss+grad ms | / nnx.LoRALinear |\n|---|---|---|---|")
  for model, by_name in rows:
    for name, t in by_name.items():
      print(f"| {model} | {name} | {1e3 * t:.2f} | "
            f"{t / by_name['nnx.LoRALinear']:.2f} |")

  mem = scan_memory(tokens, d, r, args.layers, names)
  kernel_mib = d * d * 4 / 2**20
  print(f"\n{args.layers} scanned layers, N={tokens}: compiled memory of loss+grad "
        f"(one kernel = {kernel_mib:.1f} MiB)\n"
        "| variant | temp MiB | temp − nnx.LoRALinear, in kernels | argument MiB | output MiB |\n"
        "|---|---|---|---|---|")
  base = mem["nnx.LoRALinear"]["temp"]
  for name, m in mem.items():
    print(f"| {name} | {m['temp'] / 2**20:.1f} | "
          f"{(m['temp'] - base) / 2**20 / kernel_mib:+.2f} | "
          f"{m['argument'] / 2**20:.1f} | {m['output'] / 2**20:.2f} |")


if __name__ == "__main__":
  main()
