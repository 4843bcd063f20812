"""The ablation benchmark changes one thing per variant, and starts every variant from the same W."""

import argparse
import importlib
import json
import pathlib

import jax
import pytest
import numpy as np

from adaprelora_jax import WeightStats
from benchmarks import ablations, controlled, run_all


def test_balanced_init_starts_from_the_same_product_as_zero_b():
  params, w_loss = controlled.PROBLEMS["lora_regression"](0)
  balanced, offset = ablations.balance(params, 0)
  a, b = balanced["lora_a"], balanced["lora_b"]
  np.testing.assert_allclose(np.linalg.norm(a), np.linalg.norm(b), rtol=0.3)
  assert np.linalg.matrix_rank(np.asarray(b)) == b.shape[0]  # B is not zero
  np.testing.assert_allclose(a @ b - offset, params["lora_a"] @ params["lora_b"], atol=1e-6)


def test_full_stats_variant_feeds_the_exact_w_gradient_statistics(monkeypatch):
  """``train(weight_stats=True)`` passes mean squares of dL/dW, not of the factor gradients."""
  params, w_loss = controlled.PROBLEMS["matrix_sensing"](1)
  seen = []
  tx = ablations.adaprelora(1e-2, statistics="full")
  update = tx.update

  def spy(grads, state, params, **extra):
    jax.debug.callback(lambda *xs: seen.append(xs), params, extra["weight_stats"][""])
    return update(grads, state, params, **extra)

  controlled.train(tx._replace(update=spy), params, w_loss, 1, weight_stats=True)
  ((p, stats),) = seen
  g = np.asarray(jax.grad(w_loss)(p["lora_a"] @ p["lora_b"]))
  assert isinstance(stats, WeightStats)
  np.testing.assert_allclose(stats.row, np.mean(g**2, 1), rtol=1e-5)
  np.testing.assert_allclose(stats.col, np.mean(g**2, 0), rtol=1e-5)


def test_every_variant_runs_and_is_reported(tmp_path):
  results = ablations.main(
      [
          "--problems",
          "lora_regression",
          "--steps",
          "6",
          "--seeds",
          "1",
          "--grid",
          "0.1",
          "--out",
          str(tmp_path),
      ]
  )
  saved = json.loads((tmp_path / "ablations.json").read_text())
  assert set(saved["results"]["lora_regression"]) == set(ablations.VARIANTS)
  finals = {name: by_lr[0.1]["final"][0] for name, by_lr in results["lora_regression"].items()}
  assert all(np.isfinite(v) and v < 1.0 for v in finals.values()), finals
  assert finals["b1"] != finals["default"]  # the variant changed something
  assert (tmp_path / "ablations.png").stat().st_size > 0


class _Parsed(Exception):
  """Carries the parsed arguments out of a benchmark's ``main`` before it runs anything."""

  def __init__(self, args):
    super().__init__()
    self.namespace = args


def test_run_all_covers_every_benchmark_with_arguments_they_accept(monkeypatch):
  """Each command names a benchmark module whose own parser accepts its arguments."""
  original = argparse.ArgumentParser.parse_args

  def parse_then_stop(self, args=None, namespace=None):
    raise _Parsed(original(self, args, namespace))  # a bad argument exits with status 2 here

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
  commands = run_all.commands("gpu", pathlib.Path("/tmp/out"), None)
  assert [c[2] for c in commands] == [f"benchmarks.{name}" for name in run_all.BENCHMARKS]
  for command in commands:
    with pytest.raises(_Parsed) as parsed:
      importlib.import_module(command[2]).main(command[3:])
    assert parsed.value.namespace.size == "gpu"


def test_gpu_size_enlarges_the_controlled_problems(tmp_path, monkeypatch):
  shapes = []
  problem = controlled.PROBLEMS["lora_regression"]

  def spy(seed, **dims):
    params, w_loss = problem(seed, **dims)
    shapes.append((params["lora_a"].shape, params["lora_b"].shape))
    return params, w_loss

  monkeypatch.setitem(controlled.PROBLEMS, "lora_regression", spy)
  argv = ["--size", "gpu", "--problems", "lora_regression", "--steps", "2", "--seeds", "1"]
  controlled.main([*argv, "--optimizers", "adamw", "--out", str(tmp_path / "c")])
  ablations.main([*argv, "--variants", "default", "--grid", "0.1", "--out", str(tmp_path / "a")])
  m, n, rank = (controlled.SIZES["gpu"]["dims"][k] for k in ("m", "n", "rank"))
  assert set(shapes) == {((m, rank), (rank, n))} and m > controlled.SIZES["cpu"]["dims"]["m"]
  for name in ("c/controlled.json", "a/ablations.json"):
    saved = json.loads((tmp_path / name).read_text())
    gpu = controlled.SIZES["gpu"]["dims"]
    assert (saved["size"], saved["dims"], saved["steps"]) == ("gpu", gpu, 2)


def test_finetune_size_sets_defaults_that_flags_override():
  from benchmarks import finetune

  gpu = finetune.parse_args(["--size", "gpu", "--sweep"])
  assert vars(gpu).items() >= finetune.SIZES["gpu_sweep"].items()
  cpu = finetune.parse_args(["--steps", "7"])
  assert (cpu.steps, cpu.batch) == (7, finetune.SIZES["cpu"]["batch"])
