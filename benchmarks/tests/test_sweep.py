"""The driver (benchmarks/sweep.py) and the report (benchmarks/report.py) on a task that trains nothing."""

from __future__ import annotations

import math

import pytest

from benchmarks import record, report, sweep
from benchmarks.record import Run, loss_diverged
from benchmarks.report import Metric
from benchmarks.tasks import Method, Task

SCORES = {("a", 1e-3): 0.5, ("a", 3e-3): 0.7, ("b", 1e-3): 0.6, ("b", 3e-3): 0.4,
          ("b", 3e-4): 0.3, ("a", 1e-2): 0.8}


def fake_task(calls: list) -> Task:
  """Scores fixed by (method, lr), a little better per seed; the method is its factory's name."""

  def run(factory, lr, seed, size, progress=True):
    calls.append((factory.__name__, lr, seed))
    final = SCORES[factory.__name__, lr] + seed / 100
    return record.make_run("", lr, seed, dict(size), [1.0, 0.5], [2], [final],
                           higher_is_better=True, stopped=False, diverged=False)

  methods = {}
  for name in ("a", "b"):
    factory = lambda lr, wd: None
    factory.__name__ = name
    methods[name] = Method(factory)
  return Task("fake", Metric("score", True), {"cpu": dict(steps=2, eval_every=2)}, run, methods,
              window=lambda name: (1e-3, 3e-3))


def test_protocol_order_edge_rule_and_resume(tmp_path):
  calls = []
  task, out = fake_task(calls), tmp_path / "fake.json"
  plan = sweep.Plan({"a": [1e-3, 3e-3], "b": [1e-3, 3e-3]}, seeds=[0], best_seeds=[1, 2],
                    past_edge=True)
  sweep.sweep(task, task.sizes["cpu"], plan, out, progress=False)
  assert calls == [
      ("a", 1e-3, 0), ("a", 3e-3, 0), ("b", 1e-3, 0), ("b", 3e-3, 0),  # the windows
      ("a", 1e-2, 0), ("b", 3e-4, 0),  # one lr past the edge each best lay on
      ("a", 1e-2, 1), ("a", 1e-2, 2), ("b", 1e-3, 1), ("b", 1e-3, 2),  # seeds at the best
  ]
  saved = record.read(out)
  assert saved["summary"]["a"]["best_lr"] == 1e-2 and saved["summary"]["b"]["best_lr"] == 1e-3
  assert out.with_suffix(".png").stat().st_size > 0
  calls.clear()
  sweep.sweep(task, task.sizes["cpu"], plan, out, progress=False)
  assert calls == []  # everything is in the file
  sweep.sweep(task, {"steps": 2, "eval_every": 1}, plan, out, progress=False)
  assert calls == []  # the eval interval does not change what is trained
  with pytest.raises(SystemExit, match=r"other settings \(steps\)"):
    sweep.sweep(task, {"steps": 3, "eval_every": 2}, plan, out, progress=False)


def _run(lr: float, seed: int, final: float | None, diverged: bool = False) -> Run:
  return Run("x", lr, seed, {}, [1.0], [1], [final], final, final, diverged)


def test_best_lr_rule_means_over_common_seeds_and_ranks_diverged_runs_last():
  by_lr = {1e-3: {0: _run(1e-3, 0, 0.5), 1: _run(1e-3, 1, 0.9)},
           3e-3: {0: _run(3e-3, 0, 0.6)},
           1e-2: {0: _run(1e-2, 0, 0.99, diverged=True)}}
  # Seed 0 is the only seed every lr ran: 1e-3's better seed 1 does not count.
  assert report.best_lr(by_lr, higher_is_better=True) == 3e-3
  assert report.best_lr(by_lr, higher_is_better=False) == 1e-3  # diverged is worst both ways
  ties = {1e-3: {0: _run(1e-3, 0, 0.5)}, 3e-3: {0: _run(3e-3, 0, 0.5)}}
  assert report.best_lr(ties, higher_is_better=True) == 1e-3


def test_one_seed_shows_no_spread_and_several_show_one():
  metric = Metric("score", True)
  runs = [_run(1e-3, 0, 0.638), _run(3e-3, 0, 0.7), _run(3e-3, 1, 0.8)]
  table = "\n".join(report.sweep_table(report.summarize(runs, metric), metric))
  assert "| x | 0.001 | 1 | 0.6380 | 0 |" in table
  assert "| x * | 0.003 | 2 | 0.7500 ± 0.0500 | 0 |" in table


def test_loss_divergence_rule():
  assert not loss_diverged([2.0, 1.0, 1.0])
  assert loss_diverged([1.0, 1.0, math.nan])
  assert loss_diverged([1.0, 2.0, 2.0, 2.0, 2.0, 2.0])  # the last five average 2x the first
  assert not loss_diverged([1.0, 9.0, 1.2, 1.2, 1.2, 1.2, 1.2])  # a spike that settles


def test_records_round_trip_through_json_with_missing_values(tmp_path):
  run = record.make_run("x", 1e-3, 0, {"steps": 2}, [1.0, math.inf], [1, 2], [0.5, math.nan],
                        higher_is_better=False, stopped=True, diverged=True)
  assert run.losses == [1.0, None] and run.final is None and run.best == 0.5
  record.write(dict(task="t", metric={}, reference=None, runs=[run]), tmp_path / "r.json")
  assert record.read(tmp_path / "r.json")["runs"] == [run]
