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
only the peak learning rate is swept, on windows of :data:`benchmarks.family.GRID`
of the same size for every method::

  python -m benchmarks.causal_lm               # CPU: 5 methods x 2 lrs, 40 steps of 4 x 64 tokens
  python -m benchmarks.causal_lm --size gpu    # whole family x family.GRID, 300 steps of 16 x 128
  python -m benchmarks.causal_lm --optimizers adafactor lora_pro lora_pro_full adaprelora_b1

Results go to ``--out``: ``causal_lm.json`` (every run, rewritten after each
one) and ``causal_lm.png`` (held-out perplexity and train loss at each
method's best lr, and final perplexity vs lr). The loop is
:mod:`benchmarks.train_loop`'s, the table and plots :mod:`benchmarks.report`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from benchmarks import finetune
from benchmarks import report as rep
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
from benchmarks.train_loop import make_train_step, train

WEIGHT_DECAY = 0.01  # the same decoupled decay, on every adapter, for every optimizer
WARMUP_FRAC = 0.1
LORA_RANK = 8
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EVAL_SEED = 1234  # fixes the held-out subset, independently of the run seed
LOSS_WINDOW = 5  # running mean of the plotted train loss


def cpu_grid(name: str) -> tuple[float, ...]:
  """Peak lrs at ``--size cpu``: the window of :data:`~benchmarks.family.GRID` ending at the MiniLM best.

  Two points: the method's best lr in the MiniLM sweep (``finetune.TUNED_LR``,
  that of :func:`benchmarks.finetune.family`'s stand-in for a method it did
  not tune) and the grid point below it. ``--size gpu`` sweeps all of
  :data:`~benchmarks.family.GRID`.
  """
  i = GRID.index(finetune.TUNED_LR[finetune.family(name)])
  return GRID[max(i - 1, 0) : i + 1]

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
    stop_on_nonfinite_loss: bool = False,
) -> dict:
  """Trains the adapters with ``factory(family.warmup_cosine(lr, steps, WARMUP_FRAC), WEIGHT_DECAY)``.

  Held-out perplexity is measured every ``eval_every`` steps and after the
  last one; step 0 is the shared zero-shot perplexity. Returns a JSON-ready
  dict: settings, ``losses`` (train loss per step), ``eval_steps``/``ppl``,
  ``final_ppl`` (NaN when stopped at a non-finite loss), ``best_ppl`` (step 0
  included) and wall times.
  """
  start = time.perf_counter()
  tx = factory(warmup_cosine(lr, steps, WARMUP_FRAC), WEIGHT_DECAY)
  trainable = jax.tree.map(jnp.copy, setup.trainable)  # the step donates its input
  _, record = train(
      make_train_step(setup.graphdef, tx, lm_loss),
      trainable,
      tx.init(trainable),
      setup.frozen,
      train_batches(setup.train, batch, steps, seed),
      steps=steps,
      evaluate=setup.heldout_ppl,
      eval_at=eval_schedule(steps, eval_every),
      desc=f"{name} lr={lr:g}",
      metric="ppl",
      progress=progress,
      skip_eval_after_nonfinite_loss=True,
      stop_on_nonfinite_loss=stop_on_nonfinite_loss,
  )
  ppl = [setup.zero_shot_ppl, *record["values"]]
  return dict(
      optimizer=name,
      lr=lr,
      seed=seed,
      steps=steps,
      batch=batch,
      warmup_steps=warmup_steps(WARMUP_FRAC, steps),
      losses=record["losses"],
      eval_steps=[0, *record["eval_steps"]],
      ppl=ppl,
      final_ppl=ppl[-1] if record["stopped_at"] is None else math.nan,
      best_ppl=float(np.nanmin(ppl)),
      finite=bool(np.all(np.isfinite(record["losses"]))),
      wall_s=time.perf_counter() - start,
      **{k: record[k] for k in ("first_step_s", "train_s", "eval_s")},
  )


# ------------------------------------------------------------------------ reporting


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
    finals = {r["lr"]: {r["seed"]: r["final_ppl"]} for r in runs if r["optimizer"] == name}
    s["best_lr"] = rep.best_lr(finals, higher_is_better=False)
  return summary


def format_table(summary: dict[str, dict], zero_shot: float) -> str:
  """Markdown table: final and best held-out perplexity and late train loss per optimizer and lr."""
  table = rep.sweep_table(
      summary,
      {
          "final ppl": lambda st: f"{st['final_ppl']:.3f}",
          "vs zero-shot": lambda st: f"{100 * (st['final_ppl'] / zero_shot - 1):+.1f}%",
          "best ppl": lambda st: f"{st['best_ppl']:.3f}",
          f"train loss (last {LOSS_WINDOW})": lambda st: f"{st['last_losses']:.3f}",
      },
  )
  return "\n".join(
      [
          f"zero-shot held-out perplexity (step 0, every run): {zero_shot:.3f}",
          "",
          *table,
          "(* best lr: lowest final held-out perplexity)",
      ]
  )


def plot(runs: Sequence[dict], summary: dict[str, dict], zero_shot: float, path: Path) -> None:
  """Held-out perplexity and train loss (running mean) vs step at each best lr; final ppl vs lr."""
  fig, (curves, losses, sweep) = rep.figure(3, width=6.0, height=5.0)
  for color, (name, s) in zip(itertools.cycle(rep.colors()), summary.items()):
    r = next(r for r in runs if r["optimizer"] == name and r["lr"] == s["best_lr"])
    label = f"{name} (lr={s['best_lr']:g})"
    rep.band(curves, r["eval_steps"], [r["ppl"]], label, color=color)
    window = min(LOSS_WINDOW, len(r["losses"]))
    smooth = np.convolve(r["losses"], np.ones(window) / window, mode="valid")
    losses.plot(np.arange(window, len(r["losses"]) + 1), smooth, color=color, label=label)
    lrs = list(s["lrs"])
    rep.lr_line(sweep, lrs, [[s["lrs"][lr]["final_ppl"]] for lr in lrs], name, color=color)
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
  rep.save(fig, (curves, losses, sweep), path)


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
      help="peak lrs for every optimizer (default: cpu_grid at --size cpu, family.GRID at gpu)",
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
  grid = lambda name: args.lrs or (cpu_grid(name) if args.size == "cpu" else GRID)

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
