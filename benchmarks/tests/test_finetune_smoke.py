"""Smoke test of the fine-tuning harness (benchmarks/finetune.py and its modules) on a few tiny steps.

Besides "it runs", the W-step diagnostics are checked against a dense float64
computation from parameter snapshots, since they are the measurement the
optimizer comparison relies on.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import finetune, sweep

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


def _leaf_paths(state) -> set[str]:
  return {
      "/".join(str(getattr(k, "key", k)) for k in path)
      for path, _ in jax.tree_util.tree_leaves_with_path(
          state, is_leaf=lambda x: isinstance(x, nnx.Variable)
      )
  }


@pytest.mark.parametrize("name", ["head_only_adamw", "full_ft_adamw"])
def test_reference_modes_train_what_they_say(name):
  seen = {}
  result = finetune.run(
      name,
      finetune.OPTIMIZERS[name],
      1e-3,
      0,
      train=finetune.train_mode(name),
      on_params=lambda t, p: seen.setdefault(t, jax.tree.map(np.array, p)),
      **TINY,
  )
  assert result["train"] == finetune.train_mode(name) and result["lora_rank"] is None
  paths = _leaf_paths(seen[0])
  assert not any("lora" in p for p in paths)
  if name == "head_only_adamw":
    assert paths == {"head/kernel", "head/bias"}
  else:
    # Every pretrained weight (6 layers x 16, 5 embedding leaves) plus the head.
    assert "encoder/word_embeddings" in paths and len(paths) == 6 * 16 + 5 + 2
    before, after = (seen[t]["encoder"]["layers"][0]["query"]["kernel"][...] for t in (0, 3))
    assert not np.array_equal(before, after)
  with pytest.raises(ValueError, match="diagnostics"):
    finetune.run(name, finetune.OPTIMIZERS[name], 1e-3, 0, train="head", diagnostics=True, **TINY)


def test_sweep_protocol_order_and_edge_rule():
  """Grids on seed 0 first, then one lr past an edge where the best is there, then the other seeds."""
  accuracy = {"a": {1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.7, 3e-2: 0.8, 1e-1: 0.9}, "b": {1e-3: 0.5}}
  accuracy["b"].update({3e-3: 0.7, 1e-2: 0.6, 3e-2: 0.1})
  calls = []

  def execute(name, lr, seed, eval_every):
    calls.append((name, lr, seed, eval_every))
    return {"final_accuracy": accuracy[name][lr] + 0.01 * seed}

  grid = [1e-3, 3e-3, 1e-2, 3e-2]
  sweep.sweep_jobs(["a", "b"], {"a": grid, "b": grid}, [0, 1, 2], 150, 25, execute)
  assert calls == [
      *(("a", lr, 0, 150) for lr in grid),
      *(("b", lr, 0, 150) for lr in grid),
      ("a", 1e-1, 0, 150),  # best at the top edge: one rung up, once (not 3e-1)
      ("a", 1e-1, 1, 25),
      ("a", 1e-1, 2, 25),
      ("b", 3e-3, 1, 25),
      ("b", 3e-3, 2, 25),
  ]
  assert sweep.beyond_edge(3e-4, up=False) == 1e-4 and sweep.beyond_edge(3e-2, up=True) == 0.1


def test_reuse_takes_matching_runs(tmp_path):
  argv = ["--optimizers", "adamw", "--lrs", "1e-3", "--steps", "2", "--batch", "4"]
  argv += ["--eval-examples", "16", "--eval-every", "1"]
  first = finetune.main([*argv, "--out", str(tmp_path / "a")])
  saved = tmp_path / "a" / "finetune.json"
  again = finetune.main([*argv, "--out", str(tmp_path / "b"), "--reuse", str(saved)])
  assert again["runs"] == [{**first["runs"][0], "source": str(saved)}]
  assert again["sources"] == [str(saved)]
  fresh = finetune.main(
      [*argv, "--steps", "3", "--out", str(tmp_path / "c"), "--reuse", str(saved)]
  )
  assert "source" not in fresh["runs"][0] and fresh["sources"] == []
