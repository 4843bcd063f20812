"""The main job: MiniLM + LoRA on WordNet noun categories, each optimizer once at its tuned lr.

The task is :mod:`benchmarks.minilm_wordnet` at a smaller size (80 steps,
1000 held-out glosses); every optimizer trains with seed 0 at its best lr of
the MiniLM sweeps (:data:`TUNED_LR`). By default the comparison a user needs
first, AdaPreLoRA against AdamW and Adafactor; ``--family`` runs every method
of the family and the two reference lines (AdamW on the head only, and on
every weight)::

  python -m benchmarks.finetune                # AdaPreLoRA, AdamW, Adafactor
  python -m benchmarks.finetune --family       # the whole family and the references
  python -m benchmarks.finetune --optimizers adaprelora lora_rite --seeds 0 1

One seed at 80 steps is a first look; the tuned comparison over three seeds
is ``python -m benchmarks.run_all --only minilm_family``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import tasks
from benchmarks.family import FAMILY
from benchmarks.sweep import Plan, sweep

DEFAULT = ("adaprelora", "adamw", "adafactor")
REFERENCES = ("head_only_adamw", "full_ft_adamw")

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
    "adaprelora_exact": 3e-3,
    "adaprelora_chunked": 3e-3,
    "head_only_adamw": 3e-2,
    "full_ft_adamw": 3e-4,
}
"""Best lr per method in the MiniLM sweeps (RESULTS.md: ``minilm_family.json``, and
``minilm_after_control.json`` for AdaPreLoRA with the factor-step control)."""

SIZES = {
    "cpu": dict(steps=80, eval_examples=1000, eval_every=20),
    # All 8179 held-out definitions; 0.5 epoch of the 73,936 training definitions.
    "gpu": dict(steps=600, eval_every=50),
}
"""What the main job changes in the task's size of the same name: fewer steps (and, on CPU,
fewer held-out glosses)."""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--family", action="store_true", help="every method and the two references")
  parser.add_argument("--optimizers", nargs="+", help=f"names from {sorted(TUNED_LR)}")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
  for flag in ("steps", "batch", "eval_examples", "eval_every"):
    parser.add_argument(f"--{flag.replace('_', '-')}", type=int, help="default: by --size")
  parser.add_argument("--out", type=Path, default=Path("benchmarks/out/finetune"),
                      help="folder of finetune.json and finetune.png (runs already there are kept)")
  args = parser.parse_args(argv)
  names = args.optimizers or ([*FAMILY, *REFERENCES] if args.family else list(DEFAULT))
  unknown = sorted(set(names) - set(TUNED_LR))
  if unknown:
    raise SystemExit(f"no tuned lr for {unknown}; choose from {sorted(TUNED_LR)}")
  task = tasks.get("minilm")
  size = {**task.sizes[args.size], **SIZES[args.size]}
  size.update({k: v for k in ("steps", "batch", "eval_examples", "eval_every")
               if (v := getattr(args, k)) is not None})
  plan = Plan({name: [TUNED_LR[name]] for name in names}, seeds=args.seeds)
  return sweep(task, size, plan, args.out / "finetune.json", reference_optimizer="adaprelora")


if __name__ == "__main__":
  main()
