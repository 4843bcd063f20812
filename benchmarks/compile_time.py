"""Compile time of the optimizer step as the number of adapted layers grows.

A decoder with ``L`` layers and seven adapted matrices per layer (``--decoder
small``: q, k, v, o ``64 × 64``; gate, up ``64 × 128``; down ``128 × 64``;
``r = 4``, so that compiling dominates; ``--decoder 7b``: the 7B shapes of
:mod:`benchmarks.update_cost` at ``r = 16``, where AdaPreLoRA solves in
several chunks), in the two layouts Flax models produce:

* ``unscanned``: one pair per matrix, ``7 L`` pairs (a Python loop over
  layers, ``nnx.List``). The update is traced and compiled once per pair.
* ``stacked``: seven pairs with a leading layer axis (``nnx.scan``,
  ``nn.scan``). Each pair is solved for all layers by one ``vmap``.

The step is ``tx.update`` and ``optax.apply_updates`` on abstract inputs
(no model), so the figures are the optimizer's own. ``lower`` (tracing to
StableHLO) and ``compile`` (XLA) are timed separately, each the minimum over
``--repeats`` fresh traces, in wall-clock and in CPU time (the figure to
compare on a shared machine); ``optax.adamw`` is the reference::

  python -m benchmarks.compile_time                        # L = 4, 8, 16, 32
  python -m benchmarks.compile_time --size gpu             # and L = 64
  python -m benchmarks.compile_time --layers 4 8 --optimizers adaprelora
  python -m benchmarks.compile_time --decoder 7b --layers 8 32

Prints a table and writes ``compile_time.json`` (``compile_time_7b.json``)
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax import CHUNKED, adaprelora
from benchmarks import update_cost
from benchmarks.sizes import fill_defaults

Layout = Literal["unscanned", "stacked"]


class Decoder(NamedTuple):
  """The adapted matrices ``(m, n)`` of one layer, by role, and the LoRA rank."""

  shapes: dict[str, tuple[int, int]]
  rank: int


DECODERS = {
    "small": Decoder({"q": (64, 64), "k": (64, 64), "v": (64, 64), "o": (64, 64),
                      "gate": (64, 128), "up": (64, 128), "down": (128, 64)}, rank=4),
    "7b": Decoder(update_cost.SHAPES, rank=16),
}
OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: optax.adamw(1e-3),
    "adaprelora": lambda: adaprelora(1e-3),
    "adaprelora_chunked": lambda: adaprelora(1e-3, layout=CHUNKED),
}


def abstract_params(layers: int, layout: Layout, decoder: Decoder = DECODERS["small"]) -> dict:
  """The LoRA factors of ``layers`` layers, as ``ShapeDtypeStruct`` s."""
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  r = decoder.rank
  if layout == "stacked":
    return {name: {"lora_a": spec(layers, m, r), "lora_b": spec(layers, r, n)}
            for name, (m, n) in decoder.shapes.items()}
  return {f"layer_{i}": {name: {"lora_a": spec(m, r), "lora_b": spec(r, n)}
                         for name, (m, n) in decoder.shapes.items()}
          for i in range(layers)}


def compile_seconds(optimizer: str, layers: int, layout: Layout, repeats: int = 1,
                    decoder: Decoder = DECODERS["small"]) -> dict[str, float]:
  """Seconds to lower and to compile the jitted step, minima over ``repeats``.

  Returns ``{"lower", "compile"}`` (wall clock) and ``{"lower_cpu",
  "compile_cpu"}`` (this process's CPU time, all threads). CPU time is what
  to compare on a shared machine: other processes stretch the wall clock,
  not the work done. Every repeat traces a new step function, so neither
  JAX's tracing cache nor its compilation cache can answer it.
  """
  params = abstract_params(layers, layout, decoder)
  runs = []
  for _ in range(repeats):
    tx = OPTIMIZERS[optimizer]()
    state = jax.eval_shape(tx.init, params)

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    clocks = [(time.perf_counter(), time.process_time())]
    lowered = jax.jit(step).lower(params, state, params)
    clocks.append((time.perf_counter(), time.process_time()))
    lowered.compile()
    clocks.append((time.perf_counter(), time.process_time()))
    (w0, c0), (w1, c1), (w2, c2) = clocks
    runs.append({"lower": w1 - w0, "compile": w2 - w1,
                 "lower_cpu": c1 - c0, "compile_cpu": c2 - c1})
  return {name: min(run[name] for run in runs) for name in runs[0]}


def measure(layer_counts: Sequence[int], optimizers: Sequence[str],
            layouts: Sequence[Layout], repeats: int = 1,
            decoder: Decoder = DECODERS["small"]) -> list[dict]:
  """One row per (optimizer, layout, L), smallest ``L`` first."""
  rows = []
  for optimizer in optimizers:
    for layout in layouts:
      for layers in sorted(layer_counts):
        seconds = compile_seconds(optimizer, layers, layout, repeats, decoder)
        rows.append(dict(optimizer=optimizer, layout=layout, layers=layers,
                         pairs=len(decoder.shapes) * (layers if layout == "unscanned" else 1),
                         **seconds))
        print(f"  {optimizer:>10} {layout:>9} L={layers:<3} lower "
              f"{seconds['lower']:6.2f} s  compile {seconds['compile']:6.2f} s "
              f"(CPU {seconds['compile_cpu']:6.2f} s)", flush=True)
  return rows


def table(rows: list[dict]) -> str:
  """Markdown table; the last column is compile CPU time relative to the smallest ``L``."""
  lines = ["| optimizer | layout | L | pairs | lower s | compile s | compile CPU s "
           "| CPU s / layer | CPU vs smallest L |", "|---|---|---|---|---|---|---|---|---|"]
  first = {}
  for r in rows:
    base = first.setdefault((r["optimizer"], r["layout"]), r)
    growth = r["compile_cpu"] / base["compile_cpu"]
    lines.append(
        f"| {r['optimizer']} | {r['layout']} | {r['layers']} | {r['pairs']} | "
        f"{r['lower']:.2f} | {r['compile']:.2f} | {r['compile_cpu']:.2f} | "
        f"{r['compile_cpu'] / r['layers']:.3f} | "
        f"×{growth:.2f} for L ×{r['layers'] / base['layers']:g} |")
  return "\n".join(lines)


LAYERS = {"cpu": [4, 8, 16, 32], "gpu": [4, 8, 16, 32, 64]}
"""Depths of each ``--size`` (a GPU compiles more per kernel; 64 layers is a 70B-class depth)."""


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=list(LAYERS), default="cpu")
  parser.add_argument("--decoder", choices=list(DECODERS), default="small")
  parser.add_argument("--layers", type=int, nargs="+", help="default: by --size")
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument("--layouts", nargs="+", default=["unscanned", "stacked"],
                      choices=["unscanned", "stacked"])
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out"))
  args = parser.parse_args(argv)
  fill_defaults(args, dict(layers=LAYERS[args.size]))
  decoder = DECODERS[args.decoder]
  rows = measure(args.layers, args.optimizers, args.layouts, args.repeats, decoder)
  print(table(rows))
  args.out.mkdir(parents=True, exist_ok=True)
  result = dict(rows=rows, decoder=args.decoder, shapes=decoder.shapes, rank=decoder.rank,
                repeats=args.repeats,
                jax=jax.__version__, backend=jax.default_backend(),
                machine=platform.machine(), processor=platform.processor())
  name = "compile_time.json" if args.decoder == "small" else f"compile_time_{args.decoder}.json"
  (args.out / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
