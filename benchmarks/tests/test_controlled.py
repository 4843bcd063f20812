"""The controlled problems and the factor-control toy, through the task interface at tiny sizes."""

import jax
import numpy as np
import pytest

from adaprelora_jax import WeightStats, adaprelora
from benchmarks import controlled, factor_control, tasks
from benchmarks.family import FAMILY, METHODS

TINY = dict(steps=8, eval_every=4)


@pytest.mark.parametrize("problem", list(controlled.PROBLEMS))
def test_every_method_runs_and_makes_progress(problem):
  task = tasks.get(problem)
  size = {**task.sizes["cpu"], **TINY}
  for name, method in task.methods.items():
    # The window's lowest lr: at 0.03 and above LoRA-RITE first overshoots from B = 0.
    run = task.run(method.factory, 0.01, 0, {**size, **method.overrides})
    assert run.eval_steps == [0, 4, 8] and len(run.losses) == 9, name
    assert run.values[0] == 1.0 and run.final == run.values[-1] < 1.0, (name, run.final)
    assert not run.diverged and run.best == min(run.values), name
  assert set(FAMILY) | set(controlled.ABLATIONS) <= set(task.methods)


def test_problems_are_low_rank_targets_from_zero_b():
  for problem in controlled.PROBLEMS.values():
    params, w_loss = problem(0)
    assert np.all(np.asarray(params["lora_b"]) == 0)  # nnx.LoRA init
    assert float(w_loss(params["lora_a"] @ params["lora_b"])) > 0


def test_steps_to_target_is_the_first_step_below_it():
  task = tasks.get("lora_regression")
  run = task.run(METHODS["adamw"], 1.0, 0, {**task.sizes["cpu"], "steps": 100, "target": 0.1})
  relative = np.array(run.losses) / run.losses[0]
  hit = run.extra["steps_to_target"]
  assert hit is not None and relative[hit] < 0.1 <= relative[:hit].min()


def test_balanced_init_starts_from_the_same_product_as_zero_b():
  params, _ = controlled.PROBLEMS["lora_regression"](0)
  balanced, offset = controlled.balance(params, 0)
  a, b = balanced["lora_a"], balanced["lora_b"]
  np.testing.assert_allclose(np.linalg.norm(a), np.linalg.norm(b), rtol=0.3)
  assert np.linalg.matrix_rank(np.asarray(b)) == b.shape[0]  # B is not zero
  np.testing.assert_allclose(a @ b - offset, params["lora_a"] @ params["lora_b"], atol=1e-6)


def test_full_stats_feed_the_exact_w_gradient_statistics():
  """``train(weight_stats=True)`` passes mean squares of dL/dW, not of the factor gradients."""
  params, w_loss = controlled.PROBLEMS["matrix_sensing"](1)
  seen = []
  tx = adaprelora(1e-2, statistics="full")
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


def test_factor_control_measures_how_far_a_moves():
  size = {**factor_control.SIZES["cpu"], "steps": 50}
  tiny = {name: factor_control.run(METHODS[name], 1e-6, 0, size)
          for name in ("adamw", "adaprelora_exact")}
  # From B = 0 the paper's rule moves A by O(|A|) whatever the lr; Adam by O(lr) per step.
  assert tiny["adaprelora_exact"].extra["moved"] > 0.5 > 100 * tiny["adamw"].extra["moved"]
  assert all(r.extra["largest_factor"] > 0 and not r.diverged for r in tiny.values())
