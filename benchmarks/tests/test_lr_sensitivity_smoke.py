"""Tiny-settings runs of the lr-sensitivity benchmark (benchmarks/lr_sensitivity.py) on both tasks."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import family, lr_sensitivity

MINILM = [
    *("--task", "minilm", "--optimizers", "adamw", "--steps", "4", "--batch", "4"),
    *("--eval-examples", "16", "--eval-every", "2", "--no-progress"),
]


def _check_run(r: dict, steps: int) -> None:
  assert set(r) == {"final", "diverged", "eval_steps", "curve", "losses", "wall_s"}
  assert len(r["eval_steps"]) == len(r["curve"]) and len(r["losses"]) <= steps


def test_diverged_rule():
  assert not lr_sensitivity.diverged([3.0, 2.5, 2.0, 1.0])
  assert not lr_sensitivity.diverged([3.0, 3.5, 4.0, 4.2])  # worse, within batch noise
  assert lr_sensitivity.diverged([3.0, 2.0, math.nan])
  assert lr_sensitivity.diverged([3.0, 3.0, 9.0, 9.0])  # finite, blown up
  assert lr_sensitivity.diverged([])
  # SmolLM2 also fails a run that ends above the zero-shot perplexity, whatever its train loss.
  assert lr_sensitivity.ended_worse("smollm2", 1994.0, 102.4)
  assert lr_sensitivity.ended_worse("smollm2", None, 102.4)
  assert not lr_sensitivity.ended_worse("smollm2", 48.1, 102.4)
  assert not lr_sensitivity.ended_worse("minilm", 0.05, 0.13)  # an untrained head starts below


def test_minilm_grid_flags_an_absurd_lr_and_reuses_runs(tmp_path):
  out = ["--out", str(tmp_path)]
  first = lr_sensitivity.main([*MINILM, "--lrs", "1e-3", "1e3", *out])
  saved = json.loads((tmp_path / "lr_sensitivity_minilm.json").read_text())
  assert (tmp_path / "lr_sensitivity_minilm.png").stat().st_size > 0
  keys = {"task", "metric", "higher_is_better", "settings", "grid", "reference", "runs", "summary"}
  assert keys <= set(saved)
  assert saved["grid"] == list(family.GRID) and saved["higher_is_better"] is True
  assert saved["settings"]["steps"] == 4 and 0 < saved["reference"] < 1
  runs = saved["runs"]["adamw"]
  assert set(runs) == {repr(1e-3), repr(1e3)}
  assert all(set(by_seed) == {"0"} for by_seed in runs.values())
  for by_seed in runs.values():
    _check_run(by_seed["0"], 4)
  sane, absurd = runs[repr(1e-3)]["0"], runs[repr(1e3)]["0"]
  assert 0 <= sane["final"] <= 1 and sane["eval_steps"] == [2, 4] and not sane["diverged"]
  assert absurd["diverged"] is True
  summary = saved["summary"]["adamw"]
  assert summary["best_lr"] == repr(1e-3)  # a diverged run ranks last, whatever its accuracy
  assert summary["lrs"][repr(1e3)]["diverged"] == 1 and summary["lrs"][repr(1e-3)]["seeds"] == [0]

  # Extending: the stored runs are kept as they are, one more seed runs at the best lr only.
  again = lr_sensitivity.main([*MINILM, "--lrs", "1e-3", "1e3", "--best-seeds", "1", *out])
  assert again["runs"]["adamw"][repr(1e3)] == first["runs"]["adamw"][repr(1e3)]
  assert again["runs"]["adamw"][repr(1e-3)]["0"] == sane
  assert set(again["runs"]["adamw"][repr(1e-3)]) == {"0", "1"}
  assert again["summary"]["adamw"]["lrs"][repr(1e-3)]["seeds"] == [0, 1]

  with pytest.raises(SystemExit, match="other settings \\(steps, warmup_steps\\)"):
    lr_sensitivity.main([*MINILM, "--steps", "40", "--lrs", "1e-3", *out])


def test_minilm_has_no_layers_option():
  with pytest.raises(SystemExit):
    lr_sensitivity.parse_args(["--task", "minilm", "--layers", "2"])


def test_unknown_optimizer_is_named():
  with pytest.raises(SystemExit, match="unknown optimizers \\['sgd'\\]"):
    lr_sensitivity.main(["--task", "minilm", "--optimizers", "sgd", "--steps", "1"])


def test_smollm2_task_scores_held_out_perplexity(tmp_path):
  argv = [
      *("--task", "smollm2", "--optimizers", "adaprelora", "--lrs", "1e-3", "--steps", "3"),
      *("--layers", "2", "--batch", "2", "--max-len", "16", "--eval-rows", "8"),
      *("--eval-batch", "4", "--eval-every", "3", "--no-progress", "--out", str(tmp_path)),
  ]
  saved = lr_sensitivity.main(argv)
  path = tmp_path / "lr_sensitivity_smollm2.json"
  assert json.loads(path.read_text()) == saved
  assert saved["higher_is_better"] is False and saved["settings"]["layers"] == 2
  r = saved["runs"]["adaprelora"][repr(1e-3)]["0"]
  _check_run(r, 3)
  # Step 0 is the base model (B = 0): the zero-shot perplexity, the reference line.
  assert r["eval_steps"] == [0, 3] and r["curve"][0] == saved["reference"]
  assert r["final"] == r["curve"][-1] > 0

  # A stored run that ended above the zero-shot perplexity is flagged when the JSON is read back.
  r.update(final=10 * saved["reference"], diverged=False)
  path.write_text(json.dumps(saved))
  again = lr_sensitivity.main(argv)
  assert again["runs"]["adaprelora"][repr(1e-3)]["0"]["diverged"] is True
  assert again["summary"]["adaprelora"]["lrs"][repr(1e-3)]["diverged"] == 1
