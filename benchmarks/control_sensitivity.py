"""Before and after the factor-step control: final metric against peak lr, on both real tasks.

Draws from committed results, every point the mean over the seeds run at that
lr (min-max bars), diverged points crossed:

* MiniLM on WordNet nouns (150 steps of 32, 2000 held-out glosses, seeds 0-2):
  the paper's rule and AdamW from ``finetune_sweep.json``, AdaPreLoRA with the
  control from ``lr_sensitivity_minilm.json`` (the same protocol);
* SmolLM2-135M on fortunes (``lr_sensitivity --task smollm2``: all 30 blocks,
  80 steps of 4 × 64 tokens, the grid on seed 0, seeds 1-2 at each method's
  best): all four methods from ``lr_sensitivity_smollm2.json``.

::

  python -m benchmarks.control_sensitivity    # results/control_sensitivity.png
"""

from __future__ import annotations

import json
import math
import pathlib

from benchmarks import report as rep

RESULTS = pathlib.Path(__file__).parent / "results"
AFTER = "AdaPreLoRA, default (with the control)"
LABELS = {"adaprelora": AFTER, "adaprelora_exact": "AdaPreLoRA, the paper's rule",
          "adamw": "AdamW", "adafactor": "Adafactor"}
COLORS = {"AdamW": "tab:blue", "Adafactor": "tab:gray", "AdaPreLoRA, the paper's rule": "tab:orange",
          AFTER: "tab:green"}
Point = tuple[float, bool]  # one seed's final score, and whether the run diverged
Curves = dict[str, dict[float, list[Point]]]  # label -> lr -> one point per seed


def _load(name: str) -> dict:
  return json.loads((RESULTS / name).read_text())


def _from_lr_sensitivity(name: str, optimizers: dict[str, str]) -> Curves:
  runs = _load(name)["runs"]
  return {
      label: {
          float(lr): [(math.nan if r["final"] is None else r["final"], r["diverged"])
                      for r in by_seed.values()]
          for lr, by_seed in runs[optimizer].items()
      }
      for optimizer, label in optimizers.items()
      if optimizer in runs
  }


def minilm() -> Curves:
  curves: Curves = {}
  # The sweep ran the paper's rule under the name the default now has.
  before = {"adaprelora": LABELS["adaprelora_exact"], "adamw": LABELS["adamw"]}
  for run in _load("finetune_sweep.json")["runs"]:
    label = before[run["optimizer"]]
    curves.setdefault(label, {}).setdefault(run["lr"], []).append(
        (run["final_accuracy"], not run["finite"]))
  return curves | _from_lr_sensitivity("lr_sensitivity_minilm.json", {"adaprelora": AFTER})


def smollm2() -> Curves:
  return _from_lr_sensitivity("lr_sensitivity_smollm2.json", LABELS)


def main() -> None:
  fig, axes = rep.figure(2, width=5.5, height=4.2)
  tasks = [("MiniLM / WordNet: final held-out accuracy", minilm(), False),
           ("SmolLM2 / fortunes: final held-out perplexity", smollm2(), True)]
  for ax, (title, curves, log_y) in zip(axes, tasks):
    for label, by_lr in curves.items():
      lrs = sorted(by_lr)
      rep.lr_line(ax, lrs, [[v for v, _ in by_lr[lr]] for lr in lrs], label,
                  diverged=[any(bad for _, bad in by_lr[lr]) for lr in lrs], color=COLORS[label],
                  linewidth=2.5 if label == AFTER else 1.2)
    ax.set_xscale("log")
    if log_y:
      ax.set_yscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_title(title, fontsize=10)
  fig.suptitle("Mean over seeds, min-max bars; x: diverged", fontsize=9)
  out = RESULTS / "control_sensitivity.png"
  rep.save(fig, axes, out)
  for title, curves, _ in tasks:
    print(title)
    for label, by_lr in curves.items():
      cells = (f"{lr:g}: " + "/".join(f"{v:.4g}{'(div)' if bad else ''}" for v, bad in by_lr[lr])
               for lr in sorted(by_lr))
      print(f"  {label}: " + ", ".join(cells))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
