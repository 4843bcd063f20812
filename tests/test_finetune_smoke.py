"""Smoke test of the fine-tuning harness (benchmarks/finetune.py) on a few tiny steps.

Besides "it runs", the W-step diagnostics are checked against a dense float64
computation from parameter snapshots, since they are the measurement the
optimizer comparison relies on.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import finetune

TINY = dict(steps=3, batch=4, eval_examples=16, eval_every=2, progress=False)
PAIR = ("encoder", "layers", 0, "query", "lora")


def _snapshot(trainable) -> dict:
  """Float64 copies of one pair's factors (the live buffers are donated to the next step)."""
  node = trainable
  for key in PAIR:
    node = node[key]
  return {name: np.array(node[name][...], dtype=np.float64) for name in ("lora_a", "lora_b")}


@pytest.mark.parametrize("name", ["adamw", "adaprelora"])
def test_run_and_diagnostics(name):
  snaps = []
  result = finetune.run(
      name,
      finetune.OPTIMIZERS[name],
      1e-3,
      0,
      diagnostics=True,
      on_params=lambda t, p: snaps.append(_snapshot(p)),
      **TINY,
  )
  assert len(result["losses"]) == 3 and np.all(np.isfinite(result["losses"]))
  assert result["eval_steps"] == [2, 3] and all(0.0 <= a <= 1.0 for a in result["accuracies"])
  assert result["final_accuracy"] == result["accuracies"][-1]

  diag = result["diagnostics"]
  assert len(diag["pairs"]) == 12 and diag["pairs"][0] == "/".join(map(str, PAIR[:-1]))
  step = 2  # the last step: both factors non-zero and moving
  a, b = snaps[step]["lora_a"], snaps[step]["lora_b"]
  da, db = snaps[step + 1]["lora_a"] - a, snaps[step + 1]["lora_b"] - b
  rms = lambda x: np.sqrt(np.mean(x**2))
  second, first = rms(da @ db), rms(da @ b + a @ db)
  assert second > 0
  np.testing.assert_allclose(diag["per_pair"]["w2_rms"][step][0], second, rtol=1e-3)
  np.testing.assert_allclose(diag["per_pair"]["w1_rms"][step][0], first, rtol=1e-3)
  np.testing.assert_allclose(
      diag["per_pair"]["b_norm"][step][0], np.linalg.norm(snaps[step + 1]["lora_b"]), rtol=1e-5
  )


def test_main_writes_json_and_plot(tmp_path):
  report = finetune.main(
      [
          "--optimizers",
          "adamw",
          "adaprelora_ema_dir",
          "--lrs",
          "1e-3",
          "--steps",
          "2",
          "--batch",
          "4",
          "--eval-examples",
          "16",
          "--eval-every",
          "1",
          "--out",
          str(tmp_path),
      ]
  )
  saved = json.loads((tmp_path / "finetune.json").read_text())
  assert (tmp_path / "finetune.png").stat().st_size > 0
  assert [r["optimizer"] for r in saved["runs"]] == ["adamw", "adaprelora_ema_dir"]
  assert all(
      np.all(np.isfinite(r["losses"])) and 0 <= r["final_accuracy"] <= 1 for r in saved["runs"]
  )
  assert (
      set(saved["summary"]) == {"adamw", "adaprelora_ema_dir"}
      and 0 <= saved["majority_baseline"] <= 1
  )
  assert report["summary"]["adamw"]["best_lr"] == 1e-3


def test_variant_specs():
  assert (
      finetune.family("adaprelora:b1=0.95") == "adaprelora" and finetune.family("adamw") == "adamw"
  )
  assert callable(finetune.resolve_optimizer("adaprelora:b1=0.95,decay_rate=0.9"))
  with pytest.raises(ValueError):
    finetune.resolve_optimizer("sgd")
