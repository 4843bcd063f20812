"""Before and after the factor-step control: final metric against peak lr, on both real tasks.

Draws from committed result files, every point the mean over the seeds run at
that lr (min-max bars), diverged points crossed:

* MiniLM on WordNet nouns (150 steps of 32, 2000 held-out glosses, seeds 0-2
  at every lr): the paper's rule and AdamW from ``minilm_before_control.json``,
  AdaPreLoRA with the control from ``minilm_after_control.json``;
* SmolLM2-135M on fortunes (80 steps of 4 × 64 tokens, the window on seed 0,
  seeds 1-2 at each method's best): ``smollm2_control.json``.

::

  python -m benchmarks.control_sensitivity    # results/control_sensitivity.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from benchmarks import record, report
from benchmarks.record import Run

RESULTS = Path(__file__).parent / "results"
STYLE = {  # optimizer -> label, colour, line width
    "adamw": ("AdamW", "tab:blue", 1.2),
    "adafactor": ("Adafactor", "tab:gray", 1.2),
    "adaprelora_exact": ("AdaPreLoRA, the paper's rule", "tab:orange", 1.2),
    "adaprelora": ("AdaPreLoRA, default (with the control)", "tab:green", 2.5),
}
PANELS = {
    "MiniLM / WordNet: final held-out accuracy": ("minilm_before_control", "minilm_after_control"),
    "SmolLM2 / fortunes: final held-out perplexity": ("smollm2_control",),
}


def runs_of(names: Sequence[str], results: Path) -> list[Run]:
  return [r for name in names for r in record.read(results / f"{name}.json")["runs"]]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", type=Path, default=RESULTS, help="where the result files are")
  parser.add_argument("--out", type=Path, default=RESULTS)
  args = parser.parse_args(argv)
  fig, axes = report.figure(len(PANELS), width=5.5, height=4.2)
  for ax, (title, files) in zip(axes, PANELS.items()):
    for name, by_lr in report.by_optimizer(runs_of(files, args.results)).items():
      label, color, width = STYLE[name]
      lrs = list(by_lr)
      report.lr_line(ax, lrs, [[r.final for r in by_lr[lr].values()] for lr in lrs], label,
                     diverged=[any(r.diverged for r in by_lr[lr].values()) for lr in lrs],
                     color=color, linewidth=width)
    ax.set_xscale("log")
    if "perplexity" in title:
      ax.set_yscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_title(title, fontsize=10)
  fig.suptitle("Mean over seeds, min-max bars; x: diverged", fontsize=9)
  args.out.mkdir(parents=True, exist_ok=True)
  out = args.out / "control_sensitivity.png"
  report.save(fig, axes, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
