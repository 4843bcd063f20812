"""The one report of every sweep: seed statistics, the best lr, the tables and the plot.

Parameterised by the task's :class:`Metric` (its name, whether higher is
better, how to print it); everything else is read from the runs
(:class:`benchmarks.record.Run`). The best-lr rule, the same for every task:
the lr with the best mean final metric over the seeds every lr of that
optimizer ran, a diverged run counting as the worst value; ties go to the
lower lr.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

from benchmarks.record import LOSS_WINDOW, Run, finite_or_none


@dataclasses.dataclass(frozen=True)
class Metric:
  """What a task scores: its name, its direction, its print format and its axis."""

  name: str
  higher_is_better: bool
  fmt: str = ".4f"
  log_scale: bool = False

  def show(self, x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, self.fmt)


def ci95(values: Sequence[float]) -> float | None:
  """Half-width of the two-sided 95% Student-t interval for the mean (``None`` for one value)."""
  if len(values) < 2:
    return None
  return float(
      scipy.stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
  )


def _score(run: Run) -> float:
  """A run's final metric; NaN where it diverged or has none."""
  return math.nan if run.diverged or run.final is None else run.final


def by_optimizer(runs: Sequence[Run]) -> dict[str, dict[float, dict[int, Run]]]:
  """``{optimizer: {lr: {seed: run}}}``, optimizers in first-run order, lrs ascending."""
  out: dict[str, dict[float, dict[int, Run]]] = defaultdict(dict)
  for r in runs:
    out[r.optimizer].setdefault(r.lr, {})[r.seed] = r
  return {name: dict(sorted(by_lr.items())) for name, by_lr in out.items()}


def best_lr(by_lr: Mapping[float, Mapping[int, Run]], higher_is_better: bool) -> float:
  """The best-lr rule (module docstring) over one optimizer's runs."""
  common = set.intersection(*(set(by_seed) for by_seed in by_lr.values()))
  worst = -math.inf if higher_is_better else math.inf

  def score(lr: float) -> float:
    mean = float(np.mean([_score(by_lr[lr][s]) for s in sorted(common)]))
    return mean if math.isfinite(mean) else worst

  return (max if higher_is_better else min)(sorted(by_lr), key=score)


def summarize(runs: Sequence[Run], metric: Metric) -> dict[str, dict[str, Any]]:
  """Per optimizer: per lr the seeds, finals, mean, std (``None`` for one seed), CI and
  diverged count; and the best lr."""
  summary = {}
  for name, by_lr in by_optimizer(runs).items():
    stats = {}
    for lr, by_seed in by_lr.items():
      seeds = sorted(by_seed)
      finals = np.array([np.nan if by_seed[s].final is None else by_seed[s].final for s in seeds])
      several = len(seeds) > 1
      stats[lr] = dict(
          seeds=seeds,
          finals=[by_seed[s].final for s in seeds],
          mean=finite_or_none(finals.mean()),
          std=finite_or_none(finals.std()) if several else None,
          ci95=finite_or_none(ci95(finals)) if several else None,
          diverged=sum(by_seed[s].diverged for s in seeds),
      )
    summary[name] = dict(lrs=stats, best_lr=best_lr(by_lr, metric.higher_is_better))
  return summary


def paired(runs: Sequence[Run], summary: Mapping[str, Any], reference: str) -> dict[str, dict]:
  """Per optimizer at its best lr, its final metric minus ``reference``'s at its best, seed by seed.

  A seed fixes the init and batch order for every optimizer, so the paired
  differences vary less than either score. Empty without ``reference``.
  """
  grouped = by_optimizer(runs)
  if reference not in grouped:
    return {}
  finals = {name: grouped[name][s["best_lr"]] for name, s in summary.items()}
  out = {}
  for name, mine in finals.items():
    seeds = sorted(set(mine) & set(finals[reference]))
    if name == reference or not seeds:
      continue
    diffs = [_score(mine[s]) - _score(finals[reference][s]) for s in seeds]
    out[name] = dict(seeds=seeds, diffs=diffs, mean=float(np.mean(diffs)), ci95=ci95(diffs))
  return out


def _mean_std(st: Mapping[str, Any], metric: Metric) -> str:
  """``mean ± std``; the value alone for one seed (one seed has no spread)."""
  if st["std"] is None:
    return metric.show(st["mean"])
  return f"{metric.show(st['mean'])} ± {metric.show(st['std'])}"


def sweep_table(summary: Mapping[str, Any], metric: Metric) -> list[str]:
  """Markdown rows: one per optimizer and lr (best lr starred)."""
  lines = [f"| optimizer | lr | seeds | final {metric.name} | diverged |", "|---|---|---|---|---|"]
  for name, s in summary.items():
    for lr, st in s["lrs"].items():
      star = " *" if lr == s["best_lr"] else ""
      lines.append(
          f"| {name}{star} | {lr:g} | {len(st['seeds'])} | {_mean_std(st, metric)} | {st['diverged']} |"
      )
  return lines


def best_table(
    runs: Sequence[Run], summary: Mapping[str, Any], metric: Metric, reference: str | None
) -> list[str]:
  """Markdown rows: each optimizer at its best lr, per seed, and paired against ``reference``.

  Task-specific measurements (``Run.extra``) get a column each, per seed.
  """
  grouped = by_optimizer(runs)
  differences = paired(runs, summary, reference) if reference else {}
  extras = sorted({k for r in runs for k in r.extra})
  head = ["optimizer", "best lr", f"final {metric.name}", "95% CI", "per seed", *extras]
  if differences:
    head.append(f"minus {reference}, paired (95% CI)")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, s in summary.items():
    st = s["lrs"][s["best_lr"]]
    at_best = grouped[name][s["best_lr"]]
    cells = [
        name,
        f"{s['best_lr']:g}",
        _mean_std(st, metric),
        "" if st["ci95"] is None else f"± {metric.show(st['ci95'])}",
        ", ".join(metric.show(f) for f in st["finals"]),
        *(", ".join(str(at_best[seed].extra.get(k)) for seed in st["seeds"]) for k in extras),
    ]
    if differences:
      d = differences.get(name)
      cells.append(
          "–" if d is None
          else f"{d['mean']:+{metric.fmt}}" + ("" if d["ci95"] is None else f" ± {metric.show(d['ci95'])}")
      )
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def text(saved: Mapping[str, Any], reference_optimizer: str | None = None) -> str:
  """Both tables and the reference line, as the sweep prints them."""
  metric = Metric(**saved["metric"])
  runs, summary = saved["runs"], summarize(saved["runs"], metric)
  lines = [*sweep_table(summary, metric), "(* best lr)", "", *best_table(runs, summary, metric, reference_optimizer)]
  if saved.get("reference"):
    ref = saved["reference"]
    lines.append(f"{ref['label']}: {metric.show(ref['value'])}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def figure(panels: int, width: float = 6.0, height: float = 5.0) -> tuple[Any, list[Any]]:
  """A row of ``panels`` axes on the non-interactive backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
  return fig, list(axes[0])


def colors() -> tuple:
  """The line colours, in the order optimizers are drawn."""
  import matplotlib.pyplot as plt

  return plt.get_cmap("tab10").colors


def _nan(values: Sequence[float | None]) -> np.ndarray:
  return np.array([np.nan if v is None else v for v in values], dtype=float)


def band(ax: Any, steps: Sequence[int], curves: Sequence[Sequence[float | None]], label: str, **style):
  """Mean of ``curves`` (one per seed, over ``steps``) with their min-max band."""
  values = np.array([_nan(c) for c in curves])
  ax.plot(steps, values.mean(0), marker="o", markersize=3, label=label, **style)
  if len(values) > 1:
    ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15, **style)


def lr_line(
    ax: Any,
    lrs: Sequence[float],
    finals: Sequence[Sequence[float | None]],
    label: str,
    diverged: Sequence[bool] | None = None,
    **style,
) -> None:
  """Mean final score against peak lr, min-max error bars where an lr ran several seeds.

  Points marked ``diverged`` get a cross; a non-finite one is drawn at the
  top edge of the axes (above every finite point), since it has no value.
  """
  values = [_nan(v) for v in finals]
  mean = np.array([v.mean() if np.all(np.isfinite(v)) else np.nan for v in values])
  if any(len(v) > 1 for v in values):
    spread = np.array([[m - v.min(), v.max() - m] for m, v in zip(mean, values)]).T
    ax.errorbar(lrs, mean, yerr=spread, marker="o", capsize=3, label=label, **style)
  else:
    ax.plot(lrs, mean, marker="o", label=label, **style)
  if diverged is not None:
    import matplotlib.transforms as transforms

    top = transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for lr, m, bad in zip(lrs, mean, diverged):
      if bad and np.isfinite(m):
        ax.plot([lr], [m], marker="x", markersize=10, mew=2, linestyle="none", **style)
      elif bad:
        ax.plot([lr], [1.0], marker="x", markersize=10, mew=2, transform=top, clip_on=False,
                **style)


def save(fig: Any, axes: Sequence[Any], path: Path) -> None:
  """Grid and legend on every panel, then the PNG."""
  import matplotlib.pyplot as plt

  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot(saved: Mapping[str, Any], path: Path) -> None:
  """The metric against step and the train loss at each best lr; the final metric against lr.

  Curves average the seeds at the best lr that have the most evaluations
  (grid runs may be scored after the last step only), with a min-max band.
  """
  metric = Metric(**saved["metric"])
  runs = saved["runs"]
  summary = summarize(runs, metric)
  grouped = by_optimizer(runs)
  fig, (curves, losses, sweep) = figure(3, width=6.0, height=5.0)
  for color, (name, s) in zip(itertools.cycle(colors()), summary.items()):
    at_best = list(grouped[name][s["best_lr"]].values())
    longest = max(len(r.eval_steps) for r in at_best)
    rs = [r for r in at_best if len(r.eval_steps) == longest]
    label = f"{name} (lr={s['best_lr']:g}, {len(rs)} seed(s))"
    band(curves, rs[0].eval_steps, [r.values for r in rs], label, color=color)
    loss = np.nanmean([_nan(r.losses) for r in at_best if len(r.losses) == len(at_best[0].losses)], 0)
    window = min(LOSS_WINDOW, len(loss))
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    losses.plot(np.arange(window, len(loss) + 1), smooth, color=color, label=name)
    lrs = list(s["lrs"])
    lr_line(sweep, lrs, [s["lrs"][lr]["finals"] for lr in lrs], name,
            diverged=[s["lrs"][lr]["diverged"] > 0 for lr in lrs], color=color)
  for ax in (curves, sweep):
    if saved.get("reference"):
      ax.axhline(saved["reference"]["value"], color="gray", linestyle=":",
                 label=saved["reference"]["label"])
    ax.set_ylabel(metric.name)
    if metric.log_scale:
      ax.set_yscale("log")
  curves.set_title(f"{metric.name} at each best lr (mean, min-max band)")
  losses.set_title(f"train loss at each best lr (running mean of {LOSS_WINDOW} steps)")
  losses.set_yscale("log")
  sweep.set_title(f"final {metric.name} vs peak lr (mean, min-max; x: diverged)")
  sweep.set_xscale("log")
  sweep.set_xlabel("peak learning rate")
  for ax in (curves, losses):
    ax.set_xlabel("step")
  save(fig, (curves, losses, sweep), path)
