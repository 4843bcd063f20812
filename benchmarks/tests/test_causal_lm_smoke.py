"""Tiny-settings run of the causal-LM benchmark (benchmarks/causal_lm.py) on a 2-block SmolLM2.

Besides "it runs", the zero-shot reference line and the first training loss
are recomputed from a model built without adapters, so the benchmark's
step-0 numbers are those of the base model on the intended data.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import causal_lm
from benchmarks.fortunes import LMData, load_fortunes, perplexity
from benchmarks.smollm2 import lm_loss, load_smollm2

LAYERS, MAX_LEN, BATCH, EVAL_ROWS, EVAL_BATCH = 2, 16, 2, 8, 4
TINY = [
    *("--optimizers", "adamw", "adaprelora", "--lrs", "1e-3", "--steps", "3"),
    *("--batch", str(BATCH), "--max-len", str(MAX_LEN), "--num-layers", str(LAYERS)),
    *("--eval-rows", str(EVAL_ROWS), "--eval-batch", str(EVAL_BATCH), "--eval-every", "1"),
]


def test_main_writes_json_and_plot_from_the_base_model(tmp_path):
  report = causal_lm.main([*TINY, "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "causal_lm.json").read_text())
  assert (tmp_path / "causal_lm.png").stat().st_size > 0
  assert {
      "config",
      "zero_shot_ppl",
      "runs",
      "summary",
      "heldout_categories",
      "eval_targets",
  } <= set(saved)
  assert saved["weight_decay"] == causal_lm.WEIGHT_DECAY == 0.01
  assert [r["optimizer"] for r in saved["runs"]] == ["adamw", "adaprelora"]
  assert saved["eval_rows"] == EVAL_ROWS and set(saved["summary"]) == {"adamw", "adaprelora"}

  # Independent reference: the truncated model without adapters, on the fixed held-out rows.
  base, tokenizer = load_smollm2(None, num_layers=LAYERS)
  train, heldout = load_fortunes(tokenizer, MAX_LEN, seed=0)
  eval_batches = heldout.batches(EVAL_BATCH, seed=causal_lm.EVAL_SEED)[: EVAL_ROWS // EVAL_BATCH]
  zero_shot = perplexity(base, eval_batches)
  assert saved["zero_shot_ppl"] == pytest.approx(zero_shot, rel=1e-5)
  assert saved["eval_targets"] == sum(int(m[:, 1:].sum()) for _, m in eval_batches)
  first_ids, first_mask = train.batches(BATCH, seed=0)[0]
  first_loss = float(lm_loss(base, jnp.asarray(first_ids), jnp.asarray(first_mask)))

  finals = []
  for r in saved["runs"]:
    assert r["eval_steps"] == [0, 1, 2, 3] and len(r["losses"]) == 3
    assert np.all(np.isfinite(r["losses"])) and np.all(np.isfinite(r["ppl"]))
    # B = 0: the loss before the first update is the base model's on the seed's first batch.
    assert r["losses"][0] == pytest.approx(first_loss, rel=1e-5)
    # Warmup starts at lr 0: the first update changes nothing, the second does.
    assert r["ppl"][0] == r["ppl"][1] == saved["zero_shot_ppl"] != r["ppl"][2]
    assert r["final_ppl"] == r["ppl"][-1] and r["best_ppl"] == min(r["ppl"])
    finals.append(r["final_ppl"])
  assert finals[0] != finals[1]  # the optimizers differ
  assert report["summary"]["adaprelora"]["best_lr"] == 1e-3
  assert "| adaprelora * | 0.001 |" in causal_lm.format_table(report["summary"], zero_shot)


def test_train_batches_cycle_through_fresh_epochs():
  rows = 5
  data = LMData(np.arange(rows * 3, dtype=np.int32).reshape(rows, 3), np.ones((rows, 3), np.int32))
  batches = causal_lm.train_batches(data, 2, 7, seed=0)
  assert len(batches) == 7 and all(ids.shape == (2, 3) for ids, _ in batches)
  real_rows = lambda part: [int(ids[i, 0]) // 3 for ids, m in part for i in range(2) if m[i].any()]
  first, second = real_rows(batches[:3]), real_rows(batches[3:6])
  assert sorted(first) == sorted(second) == list(range(rows))  # each epoch: every row once
  assert first != second  # a new permutation per epoch
  assert real_rows(batches[6:]) == real_rows(data.batches(2, seed=2)[:1])


def test_truncated_loader():
  model, _ = load_smollm2(4, num_layers=LAYERS)
  assert len(model.layers) == LAYERS == model.config.num_hidden_layers
  with pytest.raises(ValueError, match=r"num_layers must be in \[1, 30\]"):
    load_smollm2(None, num_layers=31)
