"""Causal-LM benchmark: SmolLM2-135M + LoRA on fortunes, held-out perplexity on unseen categories.

SmolLM2-135M (:mod:`benchmarks.smollm2`) gets rank-8 ``nnx.LoRA`` adapters
(``A`` random, ``B = 0``) on the four attention projections of every block and
is trained as a language model on the packed fortunes of the training
categories (:mod:`benchmarks.fortunes`). The score is the perplexity on a
fixed subset of the held-out categories (``food``, ``love``, ``medicine``,
``pets``, ``sports``), which training never sees: it measures how well the
adapters learnt the fortune *style*, not the entries. Since ``B = 0`` at
init, every run starts at the base model's zero-shot perplexity, the
reference line.

Every optimizer of :data:`benchmarks.family.FAMILY` trains under the same
schedule (linear warmup over 10% of the steps, then cosine decay to 0), the
same decoupled weight decay, the same adapter init and the same batch order;
only the peak learning rate is swept, on a grid of the same size for every
method::

  python -m benchmarks.causal_lm               # CPU: 5 methods x 2 lrs, 40 steps of 4 x 64 tokens
  python -m benchmarks.causal_lm --size gpu    # whole family x family.GRID, 300 steps of 16 x 128
  python -m benchmarks.causal_lm --optimizers adafactor lora_pro lora_pro_full adaprelora_b1

Results go to ``--out``: ``causal_lm.json`` (every run, rewritten after each
one) and ``causal_lm.png`` (held-out perplexity and train loss at each
method's best lr, and final perplexity vs lr).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from benchmarks.family import (
    FAMILY,
    GRID,
    Factory,
    eval_schedule,
    select,
    warmup_cosine,
    warmup_steps,
)
from benchmarks.fortunes import (
    Batch,
    LMData,
    load_fortunes,
    perplexity,
    read_fortunes,
    split_categories,
)
from benchmarks.sizes import fill_defaults
from benchmarks.smollm2 import TRAINABLE, lm_loss, load_smollm2

WEIGHT_DECAY = 0.01  # the same decoupled decay, on every adapter, for every optimizer
WARMUP_FRAC = 0.1
LORA_RANK = 8
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EVAL_SEED = 1234  # fixes the held-out subset, independently of the run seed
LOSS_WINDOW = 5  # running mean of the plotted train loss

# Each method's best lr in the MiniLM sweep (finetune.py's TUNED_LR) and one 1-3-10 rung below it.
CPU_GRIDS: dict[str, tuple[float, ...]] = {
    "adamw": (3e-3, 1e-2),
    "adafactor": (1e-3, 3e-3),
    "lora_plus": (3e-4, 1e-3),  # B's lr is 16x the peak lr
    "scaled_adamw": (3e-3, 1e-2),
    "lora_pro": (3e-3, 1e-2),
    "lora_pro_full": (1e-3, 3e-3),
    "lora_rite": (1e-3, 3e-3),
    "adaprelora": (1e-3, 3e-3),
    "adaprelora_b1": (1e-3, 3e-3),
}
"""Peak lrs per method at ``--size cpu``; ``--size gpu`` sweeps :data:`~benchmarks.family.GRID`."""

SIZES: dict[str, dict[str, Any]] = {
    # 10 runs of 40 steps and 4 evals of 2k tokens: 23 minutes measured on 2 CPU cores shared
    # with another benchmark (~2 s per step, ~7 s per eval); less on an idle machine.
    "cpu": dict(
        optimizers=["adamw", "lora_plus", "scaled_adamw", "lora_rite", "adaprelora"],
        steps=40,
        batch=4,
        max_len=64,
        eval_rows=32,
        eval_every=10,
    ),
    # About one epoch of the training categories (~630k tokens), all 31k held-out tokens.
    "gpu": dict(
        optimizers=list(FAMILY), steps=300, batch=16, max_len=128, eval_rows=0, eval_every=25
    ),
}
"""Defaults of each ``--size``; any flag given overrides its entry."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every run shares: the split model at init, the data and the zero-shot perplexity."""

  graphdef: nnx.GraphDef
  trainable: nnx.State  # the adapters at init (B = 0); copied by every run
  frozen: nnx.State
  train: LMData
  eval_batches: list[Batch]
  zero_shot_ppl: float

  def heldout_ppl(self, trainable: nnx.State) -> float:
    return perplexity(nnx.merge(self.graphdef, trainable, self.frozen), self.eval_batches)


def eval_batches(heldout: LMData, rows: int, batch: int) -> list[Batch]:
  """The fixed held-out subset: the first ``rows`` (0: all) of a fixed permutation, whole batches.

  The permutation spans every held-out category (the packed rows are in
  category order) and does not depend on the run seed.
  """
  batches = heldout.batches(batch, seed=EVAL_SEED)
  return batches if rows <= 0 else batches[: -(-rows // batch)]


def prepare(
    *,
    max_len: int,
    eval_rows: int,
    eval_batch: int,
    lora_rank: int = LORA_RANK,
    targets: Sequence[str] = ATTENTION,
    num_layers: int | None = None,
    seed: int = 0,
) -> Setup:
  """Loads the model with adapters (``seed`` draws ``A``) and the data; scores the model at init."""
  model, tokenizer = load_smollm2(lora_rank, targets, rngs=nnx.Rngs(seed), num_layers=num_layers)
  train, heldout = load_fortunes(tokenizer, max_len, seed=seed)
  graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
  batches = eval_batches(heldout, eval_rows, eval_batch)
  setup = Setup(graphdef, trainable, frozen, train, batches, 0.0)
  return dataclasses.replace(setup, zero_shot_ppl=setup.heldout_ppl(trainable))


def train_batches(data: LMData, batch: int, steps: int, seed: int) -> list[Batch]:
  """``steps`` batches: epochs of ``seed``-dependent permutations, as many as needed."""
  epochs = itertools.chain.from_iterable(
      data.batches(batch, seed=seed + e) for e in itertools.count()
  )
  return list(itertools.islice(epochs, steps))


def _make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> Callable:
  def loss_fn(trainable, frozen, ids, mask):
    return lm_loss(nnx.merge(graphdef, trainable, frozen), ids, mask)

  def step(trainable, opt_state, frozen, ids, mask):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def run(
    setup: Setup,
    name: str,
    factory: Factory,
    lr: float,
    *,
    steps: int,
    batch: int,
    eval_every: int,
    seed: int = 0,
    progress: bool = True,
) -> dict:
  """Trains the adapters with ``factory(family.warmup_cosine(lr, steps, WARMUP_FRAC), WEIGHT_DECAY)``.

  Held-out perplexity is measured every ``eval_every`` steps and after the
  last one; step 0 is the shared zero-shot perplexity. Returns a JSON-ready
  dict: settings, ``losses`` (train loss per step), ``eval_steps``/``ppl``,
  ``final_ppl``, ``best_ppl`` (step 0 included) and wall times.
  """
  start = time.perf_counter()
  tx = factory(warmup_cosine(lr, steps, WARMUP_FRAC), WEIGHT_DECAY)
  trainable = jax.tree.map(jnp.copy, setup.trainable)  # the step donates its input
  opt_state = tx.init(trainable)
  train_step = _make_train_step(setup.graphdef, tx)
  eval_at = eval_schedule(steps, eval_every)
  losses, eval_steps, ppl = [], [0], [setup.zero_shot_ppl]
  times = {"first_step_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
  bar = tqdm(
      train_batches(setup.train, batch, steps, seed),
      desc=f"{name} lr={lr:g}",
      leave=False,
      disable=not progress,
  )
  for t, (ids, mask) in enumerate(bar, start=1):
    tick = time.perf_counter()
    trainable, opt_state, loss = train_step(trainable, opt_state, setup.frozen, ids, mask)
    losses.append(float(loss))
    times["train_s"] += time.perf_counter() - tick
    if t == 1:
      times["first_step_s"] = times["train_s"]  # mostly compilation
    if t in eval_at:
      tick = time.perf_counter()
      ppl.append(setup.heldout_ppl(trainable) if math.isfinite(losses[-1]) else math.nan)
      eval_steps.append(t)
      times["eval_s"] += time.perf_counter() - tick
      bar.set_postfix(loss=f"{losses[-1]:.3f}", ppl=f"{ppl[-1]:.2f}")
  return dict(
      optimizer=name,
      lr=lr,
      seed=seed,
      steps=steps,
      batch=batch,
      warmup_steps=warmup_steps(WARMUP_FRAC, steps),
      losses=losses,
      eval_steps=eval_steps,
      ppl=ppl,
      final_ppl=ppl[-1],
      best_ppl=float(np.nanmin(ppl)),
      finite=bool(np.all(np.isfinite(losses))),
      wall_s=time.perf_counter() - start,
      **times,
  )


# ------------------------------------------------------------------------ reporting


def _final_or_inf(r: dict) -> float:
  return r["final_ppl"] if math.isfinite(r["final_ppl"]) else math.inf


def summarize(runs: Sequence[dict]) -> dict[str, dict]:
  """Per optimizer: its runs by lr and the best lr (lowest final held-out ppl; NaN ranks last)."""
  summary: dict[str, dict] = {}
  for r in runs:
    summary.setdefault(r["optimizer"], {"lrs": {}})["lrs"][r["lr"]] = dict(
        final_ppl=r["final_ppl"],
        best_ppl=r["best_ppl"],
        last_losses=float(np.mean(r["losses"][-LOSS_WINDOW:])),
    )
  for name, s in summary.items():
    by_lr = {r["lr"]: r for r in runs if r["optimizer"] == name}
    s["best_lr"] = min(by_lr, key=lambda lr: _final_or_inf(by_lr[lr]))
  return summary


def format_table(summary: dict[str, dict], zero_shot: float) -> str:
  """Markdown table: final and best held-out perplexity and late train loss per optimizer and lr."""
  lines = [
      f"zero-shot held-out perplexity (step 0, every run): {zero_shot:.3f}",
      "",
      f"| optimizer | lr | final ppl | vs zero-shot | best ppl | train loss (last {LOSS_WINDOW}) |",
      "|---|---|---|---|---|---|",
  ]
  for name, s in summary.items():
    for lr, st in s["lrs"].items():
      star = " *" if lr == s["best_lr"] else ""
      lines.append(
          f"| {name}{star} | {lr:g} | {st['final_ppl']:.3f} | "
          f"{100 * (st['final_ppl'] / zero_shot - 1):+.1f}% | {st['best_ppl']:.3f} | "
          f"{st['last_losses']:.3f} |"
      )
  lines.append("(* best lr: lowest final held-out perplexity)")
  return "\n".join(lines)


def plot(runs: Sequence[dict], summary: dict[str, dict], zero_shot: float, path: Path) -> None:
  """Held-out perplexity and train loss (running mean) vs step at each best lr; final ppl vs lr."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (curves, losses, sweep) = plt.subplots(1, 3, figsize=(18, 5))
  colors = plt.get_cmap("tab10").colors
  for color, (name, s) in zip(itertools.cycle(colors), summary.items()):
    r = next(r for r in runs if r["optimizer"] == name and r["lr"] == s["best_lr"])
    label = f"{name} (lr={s['best_lr']:g})"
    curves.plot(r["eval_steps"], r["ppl"], marker="o", markersize=3, color=color, label=label)
    window = min(LOSS_WINDOW, len(r["losses"]))
    smooth = np.convolve(r["losses"], np.ones(window) / window, mode="valid")
    losses.plot(np.arange(window, len(r["losses"]) + 1), smooth, color=color, label=label)
    lrs = list(s["lrs"])
    sweep.plot(lrs, [s["lrs"][lr]["final_ppl"] for lr in lrs], marker="o", color=color, label=name)
  for ax in (curves, sweep):
    ax.axhline(zero_shot, color="gray", linestyle=":", label="zero-shot")
    ax.set_ylabel("held-out perplexity")
  curves.set_title("held-out perplexity (unseen categories) at the best lr")
  losses.set_title(f"train loss at the best lr (running mean of {LOSS_WINDOW} steps)")
  losses.set_ylabel("train loss (nats/token)")
  sweep.set_title("final held-out perplexity vs peak lr")
  sweep.set_xscale("log")
  sweep.set_yscale("log")  # a diverged run would flatten the rest
  sweep.set_xlabel("peak learning rate")
  for ax in (curves, losses):
    ax.set_xlabel("step")
  for ax in (curves, losses, sweep):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(
      description="SmolLM2-135M + LoRA on fortunes: held-out perplexity on unseen categories, "
      "per optimizer and peak lr."
  )
  parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
  parser.add_argument("--optimizers", nargs="+", help=f"names from {sorted(FAMILY)}")
  parser.add_argument(
      "--lrs",
      nargs="+",
      type=float,
      help="peak lrs for every optimizer (default: the size's grids)",
  )
  parser.add_argument("--steps", type=int)
  parser.add_argument("--batch", type=int)
  parser.add_argument("--max-len", type=int, help="tokens per packed row")
  parser.add_argument("--eval-rows", type=int, help="held-out rows scored (0: all)")
  parser.add_argument("--eval-every", type=int)
  parser.add_argument("--eval-batch", type=int, default=16)
  parser.add_argument("--lora-rank", type=int, default=LORA_RANK)
  parser.add_argument("--targets", nargs="+", default=list(ATTENTION))
  parser.add_argument(
      "--num-layers", type=int, help="truncate the decoder to its first blocks (smoke tests)"
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=Path, default=Path("benchmarks/out/causal_lm"))
  args = parser.parse_args(argv)
  fill_defaults(args, SIZES[args.size])
  factories = select(args.optimizers)
  grid = lambda name: args.lrs or (CPU_GRIDS[name] if args.size == "cpu" else GRID)

  start = time.perf_counter()
  setup = prepare(
      max_len=args.max_len,
      eval_rows=args.eval_rows,
      eval_batch=args.eval_batch,
      lora_rank=args.lora_rank,
      targets=args.targets,
      num_layers=args.num_layers,
      seed=args.seed,
  )
  train_names, heldout_names = split_categories(read_fortunes())
  args.out.mkdir(parents=True, exist_ok=True)
  json_path, png_path = args.out / "causal_lm.json", args.out / "causal_lm.png"
  report = dict(
      config=vars(args),
      weight_decay=WEIGHT_DECAY,
      warmup_frac=WARMUP_FRAC,
      train_categories=train_names,
      heldout_categories=heldout_names,
      train_rows=len(setup.train),
      eval_rows=sum(len(ids) for ids, _ in setup.eval_batches),
      eval_targets=int(sum(mask[:, 1:].sum() for _, mask in setup.eval_batches)),
      zero_shot_ppl=setup.zero_shot_ppl,
      runs=[],
  )
  tqdm.write(f"zero-shot held-out perplexity: {setup.zero_shot_ppl:.3f}")
  jobs = [(name, lr) for name in factories for lr in grid(name)]
  for name, lr in tqdm(jobs, desc="runs", unit="run"):
    r = run(
        setup,
        name,
        factories[name],
        lr,
        steps=args.steps,
        batch=args.batch,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    report["runs"].append(r)
    tqdm.write(
        f"{name} lr={lr:g}: final ppl {r['final_ppl']:.3f} best {r['best_ppl']:.3f} "
        f"({r['wall_s']:.0f} s)"
    )
    report["summary"] = summarize(report["runs"])
    report["wall_s"] = time.perf_counter() - start
    json_path.write_text(json.dumps(report, indent=1, default=str))
    plot(report["runs"], report["summary"], setup.zero_shot_ppl, png_path)
  print(format_table(report["summary"], setup.zero_shot_ppl))
  print(f"wrote {json_path} and {png_path} ({report['wall_s']:.0f} s)")
  return report


if __name__ == "__main__":
  main()
