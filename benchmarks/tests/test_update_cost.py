"""Tiny-settings runs of the update-cost benchmark, so a broken benchmark fails CI."""

import json

import pytest

from benchmarks import family, update_cost


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
