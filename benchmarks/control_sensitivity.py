"""Before and after the factor-step control: final metric against peak lr, on both real tasks.

Draws from committed results, every run at seed 0 under its task's protocol:

* MiniLM on WordNet nouns (150 steps of 32, 2000 held-out glosses): the paper's
  rule, AdamW and Adafactor from ``finetune_sweep.json``, AdaPreLoRA with the
  control from ``lr_sensitivity_minilm.json``;
* SmolLM2-135M on fortunes (``causal_lm`` CPU size, 40 steps of 4 × 64 tokens):
  the paper's rule, AdamW and Adafactor from ``causal_lm.json`` and
  ``causal_lm_flags.json``, AdaPreLoRA with the control from
  ``causal_lm_control.json``.

::

  python -m benchmarks.control_sensitivity    # results/control_sensitivity.png
"""

from __future__ import annotations

import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
BEFORE = {"adaprelora": "AdaPreLoRA, the paper's rule", "adamw": "AdamW",
          "adafactor": "Adafactor"}
AFTER = "AdaPreLoRA, default (with the control)"
COLORS = {"AdamW": "tab:blue", "Adafactor": "tab:gray", "AdaPreLoRA, the paper's rule": "tab:orange",
          AFTER: "tab:green"}
Curve = dict[float, float]


def _load(name: str) -> dict:
  return json.loads((RESULTS / name).read_text())


def _seed0(runs: list[dict], metric: str) -> dict[str, Curve]:
  curves: dict[str, Curve] = {}
  for run in runs:
    if run["seed"] == 0 and run["optimizer"] in BEFORE:
      curves.setdefault(run["optimizer"], {})[run["lr"]] = run[metric]
  return curves


def minilm() -> dict[str, Curve]:
  curves = {BEFORE[k]: v for k, v in _seed0(_load("finetune_sweep.json")["runs"],
                                             "final_accuracy").items()}
  after = _load("lr_sensitivity_minilm.json")["runs"]["adaprelora"]
  curves[AFTER] = {float(lr): seeds["0"]["final"] for lr, seeds in after.items()}
  return curves


def smollm2() -> dict[str, Curve]:
  runs = _load("causal_lm.json")["runs"] + _load("causal_lm_flags.json")["runs"]
  curves = {BEFORE[k]: v for k, v in _seed0(runs, "final_ppl").items()}
  curves[AFTER] = {run["lr"]: run["final_ppl"] for run in _load("causal_lm_control.json")["runs"]}
  return curves


def main() -> None:
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  tasks = [("MiniLM / WordNet: final held-out accuracy", minilm(), (0.6, 0.82)),
           ("SmolLM2 / fortunes: final held-out perplexity", smollm2(), (45, 110))]
  for ax, (title, curves, limits) in zip(axes, tasks):
    for label, curve in curves.items():
      lrs = sorted(curve)
      values = [curve[lr] if math.isfinite(curve[lr]) else float("nan") for lr in lrs]
      ax.plot(lrs, values, "o-" if label == AFTER else "o--", label=label, color=COLORS[label],
              linewidth=2.5 if label == AFTER else 1.2)
    ax.set_xscale("log")
    ax.set_ylim(*limits)
    ax.set_xlabel("peak learning rate")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("Points off the chart diverged (SmolLM2) or collapsed (MiniLM); seed 0", fontsize=9)
  fig.tight_layout()
  out = RESULTS / "control_sensitivity.png"
  fig.savefig(out, dpi=120)
  for title, curves, _ in tasks:
    print(title)
    for label, curve in curves.items():
      print(f"  {label}: " + ", ".join(f"{lr:g}: {v:.4g}" for lr, v in sorted(curve.items())))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
