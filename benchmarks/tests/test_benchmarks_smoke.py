"""Tiny-settings runs of the benchmarks, so a broken benchmark fails CI."""

import json

import numpy as np
import pytest

from benchmarks import controlled, family, update_cost


def test_controlled_problems_run_every_optimizer(tmp_path):
  results = {
      # The grid's smallest lr: at 0.03 and above LoRA-RITE first overshoots from B = 0 (the
      # loss doubles by step 3 on seed 0, 48x at 0.1) before it converges.
      p: controlled.sweep(p, list(family.FAMILY), steps=8, seeds=1, target=1e-3, grid=(0.01,),
                          progress=False)
      for p in controlled.PROBLEMS
  }
  for by_name in results.values():
    assert set(by_name) == set(family.FAMILY)
    for name, by_lr in by_name.items():
      final = by_lr[0.01]["final"][0]
      assert np.isfinite(final) and final < 1.0, (name, final)  # every method makes progress
  assert "| adaprelora |" in controlled.report(results, 8, 1e-3)
  controlled.plot(results, tmp_path / "controlled.png")
  assert (tmp_path / "controlled.png").stat().st_size > 0


def test_controlled_problems_are_ill_conditioned_low_rank_targets():
  for problem in controlled.PROBLEMS.values():
    params, w_loss = problem(0)
    assert np.all(np.asarray(params["lora_b"]) == 0)  # nnx.LoRA init
    assert float(w_loss(params["lora_a"] @ params["lora_b"])) > 0


def test_update_cost_runs_and_measures_state_ratios(tmp_path):
  result = update_cost.main(["--shrink", "64", "--repeats", "1", "--ranks", "4",
                             "--layer-counts", "1", "--evict-mib", "1", "--out", str(tmp_path)])
  main = result["main"]
  assert set(main) == set(family.FAMILY)
  assert main["adamw"]["time_ratio"] == 1.0 and main["adamw"]["state_ratio"] == 1.0
  # Factored second moments + one momentum buffer: (m + n)(r + 1) vs Adam's 2 (m + n) r.
  assert main["adaprelora_b1"]["state_ratio"] < 0.55
  assert main["adaprelora"]["state_ratio"] < 0.05
  # m × n moments: about mn / ((m + n) r) = 2 to 3 times Adam's at 64 × 64 to 64 × 224, r = 16.
  assert main["lora_pro_full"]["state_ratio"] > 2
  saved = json.loads((tmp_path / "update_cost.json").read_text())
  assert saved["evict_mib"] == 1
  assert set(saved["by_rank"]["4"]) == set(family.FAMILY) - set(update_cost.DENSE_STATE)


def test_update_cost_rejects_a_negative_eviction_size():
  with pytest.raises(ValueError, match="--evict-mib must be 0 or more MiB, got -1"):
    update_cost.main(["--shrink", "64", "--evict-mib", "-1", "--no-scaling"])


def test_update_cost_prints_no_table_for_an_empty_sweep(tmp_path, capsys):
  update_cost.main(["--shrink", "64", "--repeats", "1", "--optimizers", "adamw", "--ranks",
                    "--layer-counts", "1", "--evict-mib", "0", "--out", str(tmp_path)])
  printed = capsys.readouterr().out
  assert "by_rank" not in printed and "time / adamw, by_layers" in printed
