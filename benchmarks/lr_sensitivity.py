"""Learning-rate sensitivity: every optimizer at every point of the one grid, on a real-model task.

Each named optimizer of :data:`benchmarks.family.FAMILY` trains at every peak
lr of :data:`benchmarks.family.GRID` (warmup over 10% of the steps, then
cosine to 0, weight decay 0.01, as the other benchmarks), on every seed of
``--seeds``; ``--best-seeds`` then adds seeds at each optimizer's best lr. The
tasks are those of the other benchmarks, with their ``--size`` defaults:

* ``minilm``: :mod:`benchmarks.finetune`'s sweep protocol (MiniLM + LoRA on
  WordNet noun categories, 150 steps of 32 at CPU size), scored by final
  held-out accuracy;
* ``smollm2``: :mod:`benchmarks.causal_lm` (SmolLM2-135M + LoRA on fortunes,
  4 x 64 tokens per step at CPU size, 80 steps here), scored by final
  held-out perplexity on unseen categories.

::

  python -m benchmarks.lr_sensitivity --task minilm --optimizers adaprelora adamw --seeds 0 1 2
  python -m benchmarks.lr_sensitivity --task smollm2 --optimizers adaprelora adamw --best-seeds 1 2

Results go to ``--out``: ``lr_sensitivity_<task>.json`` (per optimizer, lr
and seed: final score, ``diverged``, the held-out curve and the train
losses; rewritten after each run) and ``lr_sensitivity_<task>.png`` (final
score against peak lr, one line per optimizer, min-max bars over seeds,
diverged points crossed; the curves at each best lr). A run has diverged when
a train loss is non-finite, when its last losses average 1.5x the first, or,
on SmolLM2, when it ends above the zero-shot perplexity. Runs already in the
JSON with the same settings are kept, not rerun, so a sweep resumes where it
stopped and a new optimizer, lr or seed extends it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks import causal_lm, finetune, minilm_wordnet
from benchmarks import report as rep
from benchmarks.family import FAMILY, GRID, select, warmup_steps
from benchmarks.sizes import fill_defaults

WARMUP_FRAC = 0.1  # both tasks' benchmarks train with 10% warmup
LOSS_WINDOW = 5
DIVERGED_FACTOR = 1.5  # above train-loss noise at init, below a blown-up run's loss

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "minilm": {
        "cpu": {**finetune.SIZES["cpu_sweep"], "layers": None},
        "gpu": {**finetune.SIZES["gpu_sweep"], "layers": None},
    },
    # 80 steps rather than causal_lm's 40, so the lrs have time to separate.
    "smollm2": {
        "cpu": {**causal_lm.SIZES["cpu"], "steps": 80, "eval_every": 20, "layers": None},
        "gpu": {**causal_lm.SIZES["gpu"], "layers": None},
    },
}
"""Defaults per task and ``--size``; any flag given overrides its entry (``optimizers`` aside)."""

METRICS = {"minilm": ("held-out accuracy", True), "smollm2": ("held-out perplexity", False)}
"""Per task: the score's name and whether higher is better."""


def diverged(losses: Sequence[float]) -> bool:
  """A non-finite loss, or a mean loss over the last steps 1.5x the first step's (the init's)."""
  if not losses or not np.all(np.isfinite(losses)):
    return True
  return float(np.mean(losses[-LOSS_WINDOW:])) > DIVERGED_FACTOR * losses[0]


def ended_worse(task: str, final: float | None, reference: float) -> bool:
  """SmolLM2: a final perplexity above the zero-shot model's, i.e. the fine-tune undid its start.

  MiniLM's head starts untrained, so its reference (the majority class) is not
  where a run begins and a low accuracy there is not a divergence.
  """
  return task == "smollm2" and (final is None or final > reference)


def _finite_or_none(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def settings(args: argparse.Namespace) -> dict[str, Any]:
  """What every stored run shares; runs are reused only under identical settings."""
  common = dict(
      task=args.task,
      size=args.size,
      steps=args.steps,
      batch=args.batch,
      warmup_steps=warmup_steps(WARMUP_FRAC, args.steps),
      weight_decay=finetune.WEIGHT_DECAY if args.task == "minilm" else causal_lm.WEIGHT_DECAY,
      lora_rank=args.lora_rank,
      eval_every=args.eval_every,
  )
  if args.task == "minilm":
    return {**common, "eval_examples": args.eval_examples}
  return {
      **common,
      "max_len": args.max_len,
      "eval_rows": args.eval_rows,
      "eval_batch": args.eval_batch,
      "layers": args.layers,
  }


Runner = Callable[[str, float, int], dict]
"""``runner(optimizer, lr, seed)``: one finished run as stored in the JSON."""


def _record(final: float, losses: list[float], eval_steps: list[int], curve: list[float], wall_s):
  return dict(
      final=_finite_or_none(final),
      diverged=diverged(losses) or not math.isfinite(final),
      eval_steps=eval_steps,
      curve=[_finite_or_none(v) for v in curve],
      losses=[_finite_or_none(v) for v in losses],
      wall_s=wall_s,
  )


def minilm_runner(args: argparse.Namespace, progress: bool) -> tuple[Runner, float]:
  """Runs of :func:`benchmarks.minilm_wordnet.run` (mode ``lora``), and the majority-class accuracy."""

  def runner(name: str, lr: float, seed: int) -> dict:
    r = minilm_wordnet.run(
        name,
        lambda s: FAMILY[name](s, finetune.WEIGHT_DECAY),
        lr,
        seed,
        steps=args.steps,
        batch=args.batch,
        warmup_frac=WARMUP_FRAC,
        lora_rank=args.lora_rank,
        eval_examples=args.eval_examples,
        eval_every=args.eval_every,
        progress=progress,
        stop_on_nonfinite_loss=True,
    )
    return _record(r["final_accuracy"], r["losses"], r["eval_steps"], r["accuracies"], r["wall_s"])

  return runner, minilm_wordnet.majority_baseline(args.eval_examples)


def smollm2_runner(args: argparse.Namespace, progress: bool) -> tuple[Runner, float]:
  """Runs of :func:`benchmarks.causal_lm.run`, and the zero-shot perplexity (the same for every seed)."""

  @functools.lru_cache(maxsize=1)  # one model in memory; runs come seed by seed
  def setup(seed: int) -> causal_lm.Setup:
    return causal_lm.prepare(
        max_len=args.max_len,
        eval_rows=args.eval_rows,
        eval_batch=args.eval_batch,
        lora_rank=args.lora_rank,
        num_layers=args.layers,
        seed=seed,
    )

  def runner(name: str, lr: float, seed: int) -> dict:
    r = causal_lm.run(
        setup(seed),
        name,
        FAMILY[name],
        lr,
        steps=args.steps,
        batch=args.batch,
        eval_every=args.eval_every,
        seed=seed,
        progress=progress,
        stop_on_nonfinite_loss=True,
    )
    return _record(r["final_ppl"], r["losses"], r["eval_steps"], r["ppl"], r["wall_s"])

  return runner, setup(0).zero_shot_ppl


def lr_key(lr: float) -> str:
  """A JSON key that reads back as the same float."""
  return repr(float(lr))


def finals_by_lr(runs: dict[str, dict[str, dict]]) -> dict[float, dict[int, float]]:
  """``{lr: {seed: final}}`` of one optimizer; a diverged run scores NaN (ranks last)."""
  return {
      float(lr): {int(s): math.nan if r["diverged"] else r["final"] for s, r in by_seed.items()}
      for lr, by_seed in runs.items()
  }


def summarize(runs: dict[str, dict[str, dict[str, dict]]], higher_is_better: bool) -> dict:
  """Per optimizer: per lr the seeds, finals, mean, std and diverged count; and the best lr."""
  summary = {}
  for name, by_lr in runs.items():
    if not by_lr:
      continue
    stats = {}
    for lr in sorted(by_lr, key=float):
      seeds = sorted(by_lr[lr], key=int)
      finals = [by_lr[lr][s]["final"] for s in seeds]
      values = np.array([np.nan if f is None else f for f in finals], dtype=float)
      stats[lr] = dict(
          seeds=[int(s) for s in seeds],
          finals=finals,
          mean=_finite_or_none(values.mean()),
          std=_finite_or_none(values.std()),
          diverged=sum(by_lr[lr][s]["diverged"] for s in seeds),
      )
    best = rep.best_lr(finals_by_lr({lr: by_lr[lr] for lr in stats}), higher_is_better)
    summary[name] = dict(lrs=stats, best_lr=lr_key(best))
  return summary


def format_table(summary: dict, metric: str) -> str:
  """Markdown: final score (mean ± std over seeds) and diverged runs per optimizer and lr."""
  as_floats = {
      name: dict(lrs={float(lr): st for lr, st in s["lrs"].items()}, best_lr=float(s["best_lr"]))
      for name, s in summary.items()
  }
  show = lambda x: "n/a" if x is None else f"{x:.4f}"
  return "\n".join(
      rep.sweep_table(
          as_floats,
          {
              "seeds": lambda st: str(len(st["seeds"])),
              f"final {metric}": lambda st: f"{show(st['mean'])} ± {show(st['std'])}",
              "diverged": lambda st: str(st["diverged"]),
          },
      )
  )


def plot(saved: dict, path: Path) -> None:
  """Left: final score vs peak lr (log x), crosses at diverged runs. Right: curves at each best lr."""
  metric, higher = METRICS[saved["task"]]
  fig, (sweep, curves) = rep.figure(2, width=7.0, height=5.0)
  for color, (name, s) in zip(rep.colors() * 3, saved["summary"].items()):
    by_lr = saved["runs"][name]
    lrs = list(s["lrs"])
    finals = [[np.nan if f is None else f for f in s["lrs"][lr]["finals"]] for lr in lrs]
    bad = [s["lrs"][lr]["diverged"] > 0 for lr in lrs]
    rep.lr_line(sweep, [float(lr) for lr in lrs], finals, name, diverged=bad, color=color)
    best = by_lr[s["best_lr"]]
    longest = max(len(r["eval_steps"]) for r in best.values())
    rs = [r for r in best.values() if len(r["eval_steps"]) == longest]
    values = [[np.nan if v is None else v for v in r["curve"]] for r in rs]
    label = f"{name} (lr={float(s['best_lr']):g}, {len(rs)} seed(s))"
    rep.band(curves, rs[0]["eval_steps"], values, label, color=color)
  reference = "majority class" if higher else "zero-shot"
  for ax in (sweep, curves):
    ax.axhline(saved["reference"], color="gray", linestyle=":", label=reference)
    ax.set_ylabel(metric)
    if not higher:
      ax.set_yscale("log")
  sweep.set_xscale("log")
  sweep.set_xlabel("peak learning rate")
  sweep.set_title(f"final {metric} vs peak lr (mean, min-max over seeds; x: diverged)")
  curves.set_xlabel("step")
  curves.set_title(f"{metric} at each optimizer's best lr (mean, min-max band)")
  rep.save(fig, (sweep, curves), path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line, with the task's ``--size`` defaults filled in."""
  parser = argparse.ArgumentParser(
      description="Final held-out score of each optimizer at every peak lr of family.GRID."
  )
  parser.add_argument("--task", choices=sorted(SIZES), required=True)
  parser.add_argument(
      "--optimizers", nargs="+", help=f"names from {sorted(FAMILY)} (default: all of them)"
  )
  parser.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument("--lrs", nargs="+", type=float, help=f"default: family.GRID {GRID}")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of the whole grid")
  parser.add_argument(
      "--best-seeds",
      nargs="+",
      type=int,
      default=[],
      help="more seeds, run at each optimizer's best lr on --seeds after the grid",
  )
  parser.add_argument("--steps", type=int)
  parser.add_argument("--batch", type=int)
  parser.add_argument("--eval-every", type=int)
  parser.add_argument("--lora-rank", type=int, default=8)
  parser.add_argument("--eval-examples", type=int, help="minilm: held-out definitions scored")
  parser.add_argument("--max-len", type=int, help="smollm2: tokens per packed row")
  parser.add_argument("--eval-rows", type=int, help="smollm2: held-out rows scored (0: all)")
  parser.add_argument("--eval-batch", type=int, default=16, help="smollm2: rows per eval batch")
  parser.add_argument("--layers", type=int, help="smollm2: keep the first decoder blocks only")
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
  parser.add_argument("--no-progress", action="store_true", help="no per-step progress bars")
  args = parser.parse_args(argv)
  defaults = {k: v for k, v in SIZES[args.task][args.size].items() if hasattr(args, k)}
  fill_defaults(args, {k: v for k, v in defaults.items() if k != "optimizers"})
  if args.task == "minilm" and args.layers is not None:
    parser.error("--layers applies to --task smollm2 only (MiniLM keeps its 6 layers)")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  names = list(select(args.optimizers))
  lrs = [float(lr) for lr in (args.lrs or GRID)]
  metric, higher = METRICS[args.task]
  args.out.mkdir(parents=True, exist_ok=True)
  json_path = args.out / f"lr_sensitivity_{args.task}.json"
  png_path = args.out / f"lr_sensitivity_{args.task}.png"
  config = settings(args)
  saved: dict[str, Any] = dict(task=args.task, metric=metric, higher_is_better=higher)
  saved.update(settings=config, grid=list(GRID), reference=None, runs={}, summary={})
  if json_path.exists():
    old = json.loads(json_path.read_text())
    if old["settings"] != config:
      keys = {*config, *old["settings"]}
      differ = sorted(k for k in keys if config.get(k) != old["settings"].get(k))
      raise SystemExit(
          f"{json_path} holds runs with other settings ({', '.join(differ)}); "
          "use another --out or remove it"
      )
    saved.update(runs=old["runs"], reference=old["reference"])
  progress = not args.no_progress
  make = minilm_runner if args.task == "minilm" else smollm2_runner
  runner, reference = make(args, progress)
  saved["reference"] = reference

  def settle(r: dict) -> dict:
    """``r`` with ``diverged`` also set by :func:`ended_worse`."""
    r["diverged"] = r["diverged"] or ended_worse(args.task, r["final"], reference)
    return r

  for by_lr in saved["runs"].values():  # runs stored before the rule flag the same way
    for by_seed in by_lr.values():
      for r in by_seed.values():
        settle(r)
  start = time.perf_counter()

  def write() -> None:
    saved["summary"] = summarize(saved["runs"], higher)
    saved["wall_s"] = time.perf_counter() - start
    json_path.write_text(json.dumps(saved, indent=1, allow_nan=False))
    plot(saved, png_path)

  bar = tqdm(total=len(names) * (len(lrs) * len(args.seeds) + len(args.best_seeds)), unit="run")

  def ensure(name: str, lr: float, seed: int) -> None:
    """Runs ``(name, lr, seed)`` unless the JSON has it; saves after every new run."""
    by_seed = saved["runs"].setdefault(name, {}).setdefault(lr_key(lr), {})
    if str(seed) not in by_seed:
      bar.set_description(f"{name} lr={lr:g} seed={seed}")
      r = settle(runner(name, lr, seed))
      by_seed[str(seed)] = r
      final = "n/a" if r["final"] is None else f"{r['final']:.4f}"
      tqdm.write(
          f"{name} lr={lr:g} seed={seed}: final {metric} {final}"
          f"{' (diverged)' if r['diverged'] else ''} ({r['wall_s']:.0f} s)"
      )
      write()
    bar.update()

  for name in names:
    for lr in lrs:
      for seed in args.seeds:
        ensure(name, lr, seed)
  for name in names:
    grid_runs = {lr_key(lr): saved["runs"][name][lr_key(lr)] for lr in lrs}
    best = rep.best_lr(finals_by_lr(grid_runs), higher)
    for seed in args.best_seeds:
      ensure(name, best, seed)
  bar.close()
  write()
  print(format_table(saved["summary"], metric))
  print(f"reference ({'majority class' if higher else 'zero-shot'}): {reference:.4f}")
  print(f"wrote {json_path} and {png_path}")
  return saved


if __name__ == "__main__":
  main()
