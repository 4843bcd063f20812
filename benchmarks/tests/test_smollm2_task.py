"""Tiny-settings run of the SmolLM2 task (benchmarks/smollm2_fortunes.py) on a 2-block SmolLM2.

Besides "it runs", the zero-shot reference line and the first training loss
are recomputed from a model built without adapters, so the benchmark's
step-0 numbers are those of the base model on the intended data.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import record, smollm2_fortunes, sweep, tasks
from benchmarks.fortunes import LMData, load_fortunes, perplexity
from benchmarks.smollm2 import lm_loss, load_smollm2

LAYERS, MAX_LEN, BATCH, EVAL_ROWS, EVAL_BATCH = 2, 16, 2, 8, 4
TINY = dict(steps=3, batch=BATCH, max_len=MAX_LEN, layers=LAYERS, eval_rows=EVAL_ROWS,
            eval_batch=EVAL_BATCH, eval_every=1)


def test_sweep_writes_runs_from_the_base_model(tmp_path):
  task = tasks.get("smollm2")
  plan = sweep.Plan({"adamw": [1e-3], "adaprelora": [1e-3]})
  out = tmp_path / "smollm2.json"
  sweep.sweep(task, {**task.sizes["cpu"], **TINY}, plan, out, progress=False)
  saved = record.read(out)
  assert out.with_suffix(".png").stat().st_size > 0
  assert [r.optimizer for r in saved["runs"]] == ["adamw", "adaprelora"]

  # Independent reference: the truncated model without adapters, on the fixed held-out rows.
  base, tokenizer = load_smollm2(None, num_layers=LAYERS)
  train, heldout = load_fortunes(tokenizer, MAX_LEN, seed=0)
  eval_batches = heldout.batches(EVAL_BATCH, seed=smollm2_fortunes.EVAL_SEED)[: EVAL_ROWS // EVAL_BATCH]
  zero_shot = perplexity(base, eval_batches)
  assert saved["reference"] == dict(label="zero-shot", value=pytest.approx(zero_shot, rel=1e-5))
  first_ids, first_mask = train.batches(BATCH, seed=0)[0]
  first_loss = float(lm_loss(base, jnp.asarray(first_ids), jnp.asarray(first_mask)))

  finals = []
  for r in saved["runs"]:
    assert r.eval_steps == [0, 1, 2, 3] and len(r.losses) == 3
    assert np.all(np.isfinite(r.losses)) and np.all(np.isfinite(r.values))
    # B = 0: the loss before the first update is the base model's on the seed's first batch.
    assert r.losses[0] == pytest.approx(first_loss, rel=1e-5)
    # Warmup starts at lr 0: the first update changes nothing, the second does.
    assert r.values[0] == r.values[1] == saved["reference"]["value"] != r.values[2]
    assert r.final == r.values[-1] and r.best == min(r.values)
    assert r.diverged == (r.final > zero_shot)
    finals.append(r.final)
  assert finals[0] != finals[1]  # the optimizers differ


def test_train_batches_cycle_through_fresh_epochs():
  rows = 5
  data = LMData(np.arange(rows * 3, dtype=np.int32).reshape(rows, 3), np.ones((rows, 3), np.int32))
  batches = smollm2_fortunes.train_batches(data, 2, 7, seed=0)
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
