"""What the lr-sweep benchmarks report: seed statistics, the best lr, the summary table, the plots.

Runs are grouped per optimizer and peak lr; a score is "final" (after the
last step) per seed. Shared by :mod:`benchmarks.finetune`,
:mod:`benchmarks.causal_lm` and :mod:`benchmarks.lr_sensitivity`, so the
three rank learning rates by one rule and draw them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats


def ci95(values: Sequence[float]) -> float | None:
  """Half-width of the two-sided 95% Student-t interval for the mean (``None`` for one value)."""
  if len(values) < 2:
    return None
  return float(
      scipy.stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
  )


def best_lr(finals: Mapping[float, Mapping[int, float]], higher_is_better: bool) -> float:
  """The lr with the best mean final score over the seeds every lr ran (non-finite ranks last).

  ``finals[lr][seed]`` is one run's final score. Comparing on the common seeds
  keeps an lr that also ran extra seeds from being judged on other draws;
  ties go to the first lr in ``finals``' order.
  """
  common = set.intersection(*(set(by_seed) for by_seed in finals.values()))
  worst = -math.inf if higher_is_better else math.inf

  def score(lr: float) -> float:
    mean = float(np.mean([finals[lr][seed] for seed in sorted(common)]))
    return mean if math.isfinite(mean) else worst

  pick = max if higher_is_better else min
  return pick(finals, key=score)


def paired_differences(
    finals: Mapping[str, Mapping[int, float]], reference: str
) -> dict[str, dict[str, Any]]:
  """Per optimizer, its final score minus ``reference``'s, seed by seed (``finals[name][seed]``).

  A seed fixes the init and batch order for every optimizer, so the paired
  differences vary less than either score. Empty without ``reference``.
  """
  if reference not in finals:
    return {}
  ref = finals[reference]
  out = {}
  for name, mine in finals.items():
    seeds = sorted(set(mine) & set(ref))
    if name == reference or not seeds:
      continue
    diffs = [mine[s] - ref[s] for s in seeds]
    out[name] = dict(seeds=seeds, diffs=diffs, mean=float(np.mean(diffs)), ci95=ci95(diffs))
  return out


def sweep_table(
    summary: Mapping[str, Mapping[str, Any]], columns: Mapping[str, Callable[[dict], str]]
) -> list[str]:
  """Markdown rows: one per optimizer and lr (best lr starred), one column per ``columns`` entry.

  ``summary[name]`` has ``lrs`` (lr -> per-lr statistics, what each column
  formats) and ``best_lr``.
  """
  lines = [
      "| optimizer | lr | " + " | ".join(columns) + " |",
      "|---|---|" + "---|" * len(columns),
  ]
  for name, s in summary.items():
    for lr, st in s["lrs"].items():
      star = " *" if lr == s["best_lr"] else ""
      cells = " | ".join(cell(st) for cell in columns.values())
      lines.append(f"| {name}{star} | {lr:g} | {cells} |")
  return lines


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


def band(ax: Any, steps: Sequence[int], curves: Sequence[Sequence[float]], label: str, **style):
  """Mean of ``curves`` (one per seed, over ``steps``) with their min-max band."""
  values = np.array(curves, dtype=float)
  ax.plot(steps, values.mean(0), marker="o", markersize=3, label=label, **style)
  if len(values) > 1:
    ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15, **style)


def lr_line(
    ax: Any,
    lrs: Sequence[float],
    finals: Sequence[Sequence[float]],
    label: str,
    diverged: Sequence[bool] | None = None,
    **style,
) -> None:
  """Mean final score against peak lr, min-max error bars where an lr ran several seeds.

  Points marked ``diverged`` get a cross; a non-finite one is drawn at the
  top edge of the axes (above every finite point), since it has no value.
  """
  values = [np.asarray(v, dtype=float) for v in finals]
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
