"""Fine-tune MiniLM + LoRA on WordNet noun categories: the optimizer comparison's config and CLI.

The task (:mod:`benchmarks.minilm_wordnet`): all-MiniLM-L6-v2 gets rank-8
``nnx.LoRA`` adapters (``A`` random, ``B = 0``) on the query and value
projections, and a 26-way linear head; only those are trained. Every
optimizer gets the same schedule (linear warmup, then cosine decay to 0), the
same decoupled weight decay on every trainable leaf, the same seed-determined
init and batch order, and is scored on the same fixed held-out subset, so two
runs with one seed differ only by the optimizer and its learning rate. Two
reference lines train with AdamW but without LoRA: ``head_only_adamw`` (frozen
encoder, head only) and ``full_ft_adamw`` (every encoder weight and the head)::

  python -m benchmarks.finetune            # main job: family + references at their tuned lr
  python -m benchmarks.finetune --sweep    # the tuning protocol (`benchmarks.sweep`), 150 steps
  python -m benchmarks.finetune --sweep --size gpu   # 1500 steps of 64, all held-out definitions
  python -m benchmarks.finetune --optimizers adaprelora adaprelora_b1 --lrs 1e-3 --diagnostics
  python -m benchmarks.finetune --optimizers adamw "adaprelora:b1=0.95,decay_rate=0.9" \\
      --lrs adamw=1e-3,3e-3 adaprelora=3e-4,1e-3

Results go to ``--out``: ``finetune.json`` (every run, rewritten after each
one) and ``finetune.png`` (accuracy curves at each optimizer's best lr and the
lr sweep). ``--reuse FILE ...`` takes finished runs with the same settings
from earlier JSON files instead of rerunning them (also: resuming a sweep).
Training loop: :mod:`benchmarks.train_loop`; tables and plots:
:mod:`benchmarks.report`; W-step diagnostics: :mod:`benchmarks.diagnostics`.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import operator
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from adaprelora_jax import adaprelora, scale_by_adaprelora, with_weight_stats
from benchmarks import report as rep
from benchmarks.diagnostics import diagnostics_summary
from benchmarks.family import FAMILY, GRID, rungs, warmup_steps
from benchmarks.minilm_wordnet import (
    Factory,
    adapter_rank,
    eval_indices,
    majority_baseline,
    run,
)
from benchmarks.sizes import fill_defaults
from benchmarks.sweep import load_reusable, run_key, sweep_jobs

WEIGHT_DECAY = 0.01  # the same decoupled decay, on every trainable leaf, for every optimizer
EMA_DECAY = 0.9


def _lora_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` on the LoRA factors only, so the head keeps exactly the fallback Adam of plain ``adaprelora``."""
  is_lora = lambda tree: jax.tree.map(
      lambda v: isinstance(v, nnx.LoRAParam), tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return optax.masked(tx, is_lora)


FULL_STATS = ("adaprelora_full",)
"""Optimizers that read exact W-gradient statistics: trained in mode ``lora_stats``."""

REFERENCES: dict[str, str] = {"head_only_adamw": "head", "full_ft_adamw": "full"}
"""Reference lines: AdamW in a training mode other than ``lora``."""

OPTIMIZERS: dict[str, Factory] = {
    # The family (benchmarks/family.py): adamw, adafactor, lora_plus, scaled_adamw,
    # lora_pro, lora_pro_full, lora_rite, adaprelora, and adaprelora_b1 (the
    # library's momentum: a running mean of the W-gradient in the factors' frames).
    **{name: (lambda s, make=make: make(s, WEIGHT_DECAY)) for name, make in FAMILY.items()},
    **{name: (lambda s: FAMILY["adamw"](s, WEIGHT_DECAY)) for name in REFERENCES},
    # Ablation: EMA of the factor directions AdaPreLoRA outputs.
    "adaprelora_ema_dir": lambda s: optax.chain(
        scale_by_adaprelora(),
        _lora_only(optax.ema(EMA_DECAY, debias=True)),
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.scale_by_learning_rate(s),
    ),
    # Ablation: EMA of the raw factor gradients, fed to AdaPreLoRA (moments included).
    "adaprelora_ema_grad": lambda s: optax.chain(
        _lora_only(optax.ema(EMA_DECAY, debias=True)), adaprelora(s, weight_decay=WEIGHT_DECAY)
    ),
    # Ablation: `full` statistics (docs/derivation.md) from the probes (benchmarks/minilm.py).
    "adaprelora_full": lambda s: with_weight_stats(
        adaprelora(s, statistics="full", weight_decay=WEIGHT_DECAY)
    ),
}
"""Named optimizers; any name may also be ``adamw:k=v,...`` or ``adaprelora:k=v,...`` (extra keyword arguments)."""

HIGH, LOW = GRID[1:], GRID[:-1]  # family.GRID without its bottom or its top point
GRIDS: dict[str, tuple[float, ...]] = {
    "adamw": HIGH,  # per-coordinate normalised factor steps
    "adafactor": LOW,  # no momentum: single-step directions, as AdaPreLoRA's
    "lora_plus": LOW,  # B's lr is 16x the peak lr
    "scaled_adamw": HIGH,
    "lora_pro": HIGH,
    "lora_pro_full": LOW,  # the W-step is a full-matrix Adam step, projected
    "lora_rite": LOW,  # invariant: W-step independent of the factors' scale
    "adaprelora": LOW,
    "adaprelora_b1": LOW,
    "head_only_adamw": rungs(3e-3, 4),  # a linear probe from scratch
    "full_ft_adamw": rungs(3e-5, 4),  # every pretrained weight moves
}
"""``--sweep``'s grids, keyed by :func:`family`: 4-point windows of :data:`benchmarks.family.GRID`.

The two reference lines, not LoRA methods, take 4 rungs of the same ladder
(:func:`benchmarks.family.rungs`) where their optimum lies.
"""

TUNED_LR: dict[str, float] = {
    "adamw": 1e-2,
    "adafactor": 1e-2,
    "lora_plus": 1e-3,
    "scaled_adamw": 1e-2,
    "lora_pro": 1e-2,
    "lora_pro_full": 3e-3,
    "lora_rite": 1e-2,
    "adaprelora": 3e-3,
    "adaprelora_b1": 3e-3,
    "head_only_adamw": 3e-2,
    "full_ft_adamw": 3e-4,
}
"""Best lr per method in the sweep (seed 0, 150 steps, batch 32; RESULTS.md): the main job's lrs."""


def family(name: str) -> str:
  """The method whose grid and tuned lr ``name`` uses: itself, else ``adamw`` or ``adaprelora``."""
  base = name.split(":")[0]
  if base in GRIDS:
    return base
  return "adamw" if base.startswith("adamw") else "adaprelora"


def train_mode(name: str) -> str:
  """The training mode (:data:`benchmarks.minilm_wordnet.TRAIN_MODES` key) ``name`` trains in.

  ``lora``, except for the :data:`REFERENCES` and :data:`FULL_STATS`.
  """
  return "lora_stats" if name in FULL_STATS else REFERENCES.get(name, "lora")


def resolve_optimizer(name: str) -> Factory:
  """A registered name, or ``base:k=v,...`` building ``base`` with extra keyword arguments (``v`` a Python literal)."""
  if name in OPTIMIZERS:
    return OPTIMIZERS[name]
  base, _, spec = name.partition(":")
  if base not in ("adamw", "adaprelora") or not spec:
    raise ValueError(
        f"unknown optimizer {name!r}; use one of {sorted(OPTIMIZERS)} or adamw:k=v / adaprelora:k=v"
    )
  kwargs = {"weight_decay": WEIGHT_DECAY}
  for item in spec.split(","):
    key, _, value = item.partition("=")
    kwargs[key.strip()] = ast.literal_eval(value.strip())
  make = optax.adamw if base == "adamw" else adaprelora
  return lambda s: make(s, **kwargs)


# ------------------------------------------------------------------------ reporting


def summarize(runs: Sequence[dict]) -> dict[str, dict]:
  """Per optimizer: per lr the final and best accuracy over seeds, and the best lr.

  ``final_std`` is the population std (``ddof=0``), ``final_ci95`` the
  Student-t half-width. The best lr is :func:`benchmarks.report.best_lr`'s:
  the highest mean final accuracy over the seeds that every lr of that
  optimizer ran (seed 0 under ``--sweep``).
  """
  groups: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
  for r in runs:
    groups[r["optimizer"]][r["lr"]].append(r)
  summary = {}
  for name, by_lr in groups.items():
    stats = {}
    for lr, rs in sorted(by_lr.items()):
      rs = sorted(rs, key=operator.itemgetter("seed"))
      final = np.array([r["final_accuracy"] for r in rs])
      best = np.array([r["best_accuracy"] for r in rs])
      stats[lr] = dict(
          seeds=[r["seed"] for r in rs],
          finals=final.tolist(),
          final_mean=final.mean(),
          final_std=final.std(),
          final_ci95=rep.ci95(final),
          final_min=final.min(),
          final_max=final.max(),
          best_mean=best.mean(),
          best_std=best.std(),
      )
    finals = {lr: dict(zip(st["seeds"], st["finals"])) for lr, st in stats.items()}
    summary[name] = dict(lrs=stats, best_lr=rep.best_lr(finals, higher_is_better=True))
  return summary


def paired_differences(
    runs: Sequence[dict], summary: dict[str, dict], reference: str = "adaprelora"
) -> dict[str, dict]:
  """Per optimizer, final accuracy minus ``reference``'s, both at their best lr, seed by seed."""
  finals = {
      name: {
          r["seed"]: r["final_accuracy"]
          for r in runs
          if r["optimizer"] == name and r["lr"] == s["best_lr"]
      }
      for name, s in summary.items()
  }
  return rep.paired_differences(finals, reference)


def format_table(summary: dict[str, dict], baseline: float, paired: dict[str, dict]) -> str:
  """Accuracy per optimizer and lr (mean ± std over seeds, best lr starred), then summary lines."""
  lines = rep.sweep_table(
      summary,
      {
          "seeds": lambda st: str(len(st["seeds"])),
          "final acc": lambda st: f"{st['final_mean']:.4f} ± {st['final_std']:.4f}",
          "best acc": lambda st: f"{st['best_mean']:.4f} ± {st['best_std']:.4f}",
      },
  )
  lines.append(f"majority-class baseline: {baseline:.4f}")
  for name, s in summary.items():
    st = s["lrs"][s["best_lr"]]
    ci = "" if st["final_ci95"] is None else f", 95% CI ± {st['final_ci95']:.4f}"
    lines.append(
        f"SUMMARY {name}: best lr {s['best_lr']:g}, final held-out accuracy "
        f"{st['final_mean']:.4f} ± {st['final_std']:.4f}{ci} over {len(st['seeds'])} seed(s) "
        f"[{' '.join(f'{f:.4f}' for f in st['finals'])}]"
    )
  for name, d in paired.items():
    ci = "" if d["ci95"] is None else f" ± {d['ci95']:.4f} (95% CI)"
    lines.append(
        f"PAIRED {name} - adaprelora: {d['mean']:+.4f}{ci} over seeds {d['seeds']} "
        f"[{' '.join(f'{x:+.4f}' for x in d['diffs'])}]"
    )
  return "\n".join(lines)


def plot(runs: Sequence[dict], summary: dict[str, dict], baseline: float, path: Path) -> None:
  """Left: accuracy vs step at each optimizer's best lr. Right: final accuracy vs lr.

  Curves average the runs at the best lr with the most evaluations (under
  ``--sweep``, seed 0 ran there as a grid point evaluated at the end only),
  with a min-max band; the legend gives the final accuracy over all seeds.
  Reference lines are black, dashed.
  """
  fig, (curves, sweep) = rep.figure(2, width=7.5, height=5.5)
  colors = itertools.cycle(rep.colors())
  ref_styles = itertools.cycle(("-.", "--"))
  for name, s in summary.items():
    best = s["lrs"][s["best_lr"]]
    rs = [r for r in runs if r["optimizer"] == name and r["lr"] == s["best_lr"]]
    longest = max(len(r["eval_steps"]) for r in rs)
    rs = [r for r in rs if len(r["eval_steps"]) == longest]
    ref = name in REFERENCES
    style = dict(color="black", linestyle=next(ref_styles)) if ref else dict(color=next(colors))
    label = f"{name} (lr={s['best_lr']:g}): {best['final_mean']:.3f}"
    rep.band(curves, rs[0]["eval_steps"], [r["accuracies"] for r in rs], label, **style)
    lrs = list(s["lrs"])
    rep.lr_line(sweep, lrs, [s["lrs"][lr]["finals"] for lr in lrs], name, **style)
  for ax in (curves, sweep):
    ax.axhline(baseline, color="gray", linestyle=":", label="majority class")
    ax.set_ylabel("held-out accuracy")
  curves.set_xlabel("step")
  curves.set_title("accuracy at the best lr (mean over seeds, min-max band)")
  sweep.set_xscale("log")
  sweep.set_xlabel("peak learning rate")
  sweep.set_title("final accuracy vs lr (mean, min-max over the seeds run)")
  rep.save(fig, (curves, sweep), path)


# ---------------------------------------------------------------------------- jobs

SIZES = {
    # The main job: all eleven methods in about 7 minutes on 2 shared CPU cores.
    "cpu": dict(steps=80, batch=32, eval_examples=1000, eval_every=20),
    "cpu_sweep": dict(steps=150, batch=32, eval_examples=2000, eval_every=25),
    # All 8179 held-out definitions; 0.5 epoch (main) and 1.3 epochs (sweep) of the 73,936
    # training definitions.
    "gpu": dict(steps=600, batch=64, eval_examples=10_000, eval_every=50),
    "gpu_sweep": dict(steps=1500, batch=64, eval_examples=10_000, eval_every=100),
}
"""Defaults of ``--size`` (``_sweep``: with ``--sweep``, the tuning protocol); any flag given overrides its entry."""

def _parse_lrs(
    values: Sequence[str] | None, names: Sequence[str], sweep: bool
) -> dict[str, list[float]]:
  """``--lrs``: plain floats for every optimizer, or ``name=lr1,lr2`` per optimizer; else grid or tuned lr."""
  plain = [float(v) for v in values or () if "=" not in v]
  named = {
      k: [float(x) for x in v.split(",")]
      for k, _, v in (s.partition("=") for s in values or () if "=" in s)
  }
  unknown = set(named) - set(names)
  if unknown:
    raise SystemExit(f"--lrs names optimizers that are not run: {sorted(unknown)}")
  default = lambda n: list(GRIDS[family(n)]) if sweep else [TUNED_LR[family(n)]]
  return {n: named.get(n) or plain or default(n) for n in names}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line, with every size default filled in from ``--size`` (and ``--sweep``)."""
  parser = argparse.ArgumentParser(
      description="MiniLM + LoRA fine-tuning on WordNet noun categories: "
      "held-out accuracy per optimizer and learning rate."
  )
  parser.add_argument(
      "--optimizers",
      nargs="+",
      default=[*FAMILY, *REFERENCES],
      help=f"names from {sorted(OPTIMIZERS)}, or adamw:k=v,... / adaprelora:k=v,...",
  )
  parser.add_argument(
      "--lrs",
      nargs="+",
      help="peak lrs for every optimizer, or name=lr1,lr2 per optimizer "
      "(default: the tuned lr, or the grid with --sweep)",
  )
  parser.add_argument(
      "--sweep",
      action="store_true",
      help=f"the tuning protocol (grids on the first seed, one lr past an edge, the other seeds "
      f"at the best lr), seeds 0 1 2 and {SIZES['cpu_sweep']} at --size cpu unless given",
  )
  parser.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument("--seeds", nargs="+", type=int)
  parser.add_argument("--steps", type=int, help=f"default: by --size, {SIZES}")
  parser.add_argument("--batch", type=int)
  parser.add_argument("--warmup-frac", type=float, default=0.1)
  parser.add_argument("--lora-rank", type=int, default=8)
  parser.add_argument("--eval-examples", type=int, help="default: by --size")
  parser.add_argument("--eval-every", type=int, help="default: by --size")
  parser.add_argument(
      "--grid-eval-every",
      type=int,
      help="evaluation interval of --sweep's grid runs (default: at the last step only)",
  )
  parser.add_argument(
      "--reuse",
      nargs="+",
      type=Path,
      default=[],
      help="finetune.json files whose runs with the same settings are taken instead of rerun",
  )
  parser.add_argument(
      "--diagnostics", action="store_true", help="record factor norms and W-step RMS per step"
  )
  parser.add_argument("--out", type=Path, default=Path("benchmarks/out/finetune"))
  args = parser.parse_args(argv)
  fill_defaults(args, SIZES[args.size + ("_sweep" if args.sweep else "")])
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)

  factories = {name: resolve_optimizer(name) for name in args.optimizers}
  lrs = _parse_lrs(args.lrs, args.optimizers, args.sweep)
  seeds = args.seeds or ([0, 1, 2] if args.sweep else [0])
  reusable = load_reusable(args.reuse, WEIGHT_DECAY)
  args.out.mkdir(parents=True, exist_ok=True)
  json_path, png_path = args.out / "finetune.json", args.out / "finetune.png"
  baseline = majority_baseline(args.eval_examples)
  report = dict(
      config=vars(args), weight_decay=WEIGHT_DECAY, majority_baseline=baseline, sources=[], runs=[]
  )

  def save() -> None:
    """JSON and plot of the runs so far: an interrupted job leaves a consistent summary."""
    report["summary"] = summarize(report["runs"])
    report["paired_vs_adaprelora"] = paired_differences(report["runs"], report["summary"])
    report["wall_s"] = time.perf_counter() - start
    json_path.write_text(json.dumps(report, indent=1, default=str))
    plot(report["runs"], report["summary"], baseline, png_path)

  bar = tqdm(desc="runs", unit="run")
  start = time.perf_counter()

  def execute(name: str, lr: float, seed: int, eval_every: int) -> dict:
    mode = train_mode(name)
    planned = dict(
        optimizer=name,
        lr=lr,
        seed=seed,
        steps=args.steps,
        batch=args.batch,
        warmup_steps=warmup_steps(args.warmup_frac, args.steps),
        lora_rank=adapter_rank(mode, args.lora_rank),
        train=mode,
        eval_examples=len(eval_indices(args.eval_examples)),
    )
    result = None if args.diagnostics else reusable.get(run_key(planned))
    if result is None:
      result = run(
          name,
          factories[name],
          lr,
          seed,
          steps=args.steps,
          batch=args.batch,
          warmup_frac=args.warmup_frac,
          lora_rank=args.lora_rank,
          train=mode,
          eval_examples=args.eval_examples,
          eval_every=eval_every,
          diagnostics=args.diagnostics,
      )
      if args.diagnostics:
        result["diagnostics"]["summary"] = diagnostics_summary(result)
    elif result["source"] not in report["sources"]:
      report["sources"].append(result["source"])
    report["runs"].append(result)
    bar.update()
    tqdm.write(
        f"{name} lr={lr:g} seed={seed}: final {result['final_accuracy']:.4f} "
        f"best {result['best_accuracy']:.4f} "
        + (f"(from {result['source']})" if "source" in result else f"({result['wall_s']:.0f} s)")
    )
    save()
    return result

  if args.sweep:
    grid_eval_every = args.grid_eval_every or args.steps
    sweep_jobs(args.optimizers, lrs, seeds, grid_eval_every, args.eval_every, execute)
  else:
    for name in args.optimizers:
      for lr in lrs[name]:
        for seed in seeds:
          execute(name, lr, seed, args.eval_every)
  bar.close()
  print(format_table(report["summary"], baseline, report["paired_vs_adaprelora"]))
  if args.diagnostics:
    for r in report["runs"]:
      print(
          f"diagnostics {r['optimizer']} lr={r['lr']:g} seed={r['seed']} (median over steps of pair-median"
          f" / pair-max; early = first 30 steps):"
      )
      for metric, v in r["diagnostics"]["summary"].items():
        print(
            f"  {metric:>7}: early {v['early_median']:.3e} / {v['early_max']:.3e}   "
            f"all {v['all_median']:.3e} / {v['all_max']:.3e}   peak {v['all_peak']:.3e}"
        )
  print(f"wrote {json_path} and {png_path} ({report['wall_s']:.0f} s)")
  return report


if __name__ == "__main__":
  main()
