"""The one driver of lr sweeps and seeds, for every task, with resume; its command line.

The protocol, the same for every task and method (:func:`sweep`):

1. each method's lr window on every seed of ``seeds``;
2. with ``past_edge``, for each method whose best lr (:func:`benchmarks.report.best_lr`)
   is at an edge of its window, the next grid point past that edge, once;
3. ``best_seeds`` at each method's best lr.

Every run is written to the result file (:mod:`benchmarks.record`) as it
finishes, the plot at the end; runs already in the file with the same settings are
kept, not rerun, so a sweep resumes where it stopped and a new method, lr or
seed extends it::

  python -m benchmarks.sweep minilm --optimizers adaprelora adamw --best-seeds 1 2 --out F.json
  python -m benchmarks.sweep smollm2 --optimizers adaprelora --lrs 1e-3 3e-3 --set steps=40
  python -m benchmarks.sweep lora_regression --seeds 0 1 2 --out benchmarks/out/regression.json
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks import record, report
from benchmarks.family import FAMILY, neighbour
from benchmarks.record import Run
from benchmarks.tasks import Task, get

RUN_ONLY = ("eval_every",)
"""Size entries that change what is recorded, not what is trained: runs that differ only
there are interchangeable."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which runs a sweep makes: per method its lrs, the seeds of every lr, more seeds at the best."""

  lrs: Mapping[str, Sequence[float]]
  seeds: Sequence[int] = (0,)
  best_seeds: Sequence[int] = ()
  past_edge: bool = False


def _trained(settings: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in settings.items() if k not in RUN_ONLY}


def sweep(
    task: Task,
    size: Mapping[str, Any],
    plan: Plan,
    path: Path,
    *,
    reference_optimizer: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
  """Runs ``plan`` on ``task`` at ``size`` into the result file ``path`` (and its PNG); returns it."""
  saved: dict[str, Any] = record.read(path) if path.exists() else dict(
      task=task.name, metric=dataclasses.asdict(task.metric), reference=None, runs=[])
  if saved["task"] != task.name:
    raise SystemExit(f"{path} holds task {saved['task']!r}, not {task.name!r}")
  unknown = sorted(set(plan.lrs) - set(task.methods))
  if unknown:
    raise SystemExit(f"unknown optimizers {unknown} for {task.name}; choose from {sorted(task.methods)}")
  if task.reference is not None and saved["reference"] is None:
    label, value = task.reference(size)
    saved["reference"] = dict(label=label, value=value)
  bar = tqdm(desc=task.name, unit="run", disable=not progress)

  def write() -> None:
    saved["summary"] = report.summarize(saved["runs"], task.metric)
    record.write(saved, path)

  def ensure(name: str, lr: float, seed: int) -> Run:
    """The run of ``(name, lr, seed)`` at ``size``: from the file, else trained and saved."""
    method = task.methods[name]
    settings = {**size, **method.overrides}
    for r in saved["runs"]:
      if (r.optimizer, r.lr, r.seed) == (name, lr, seed):
        stored, wanted = _trained(r.settings), _trained(settings)
        if stored != wanted:
          differ = sorted(k for k in {*stored, *wanted} if stored.get(k) != wanted.get(k))
          raise SystemExit(f"{path} holds {name} lr={lr:g} seed={seed} with other settings "
                           f"({', '.join(differ)}); use another file or remove it")
        return r
    bar.set_description(f"{name} lr={lr:g} seed={seed}")
    r = dataclasses.replace(task.run(method.factory, lr, seed, settings, progress=progress),
                            optimizer=name)
    saved["runs"].append(r)
    bar.update()
    tqdm.write(f"{name} lr={lr:g} seed={seed}: final {task.metric.name} "
               f"{task.metric.show(r.final)}{' (diverged)' if r.diverged else ''} ({r.wall_s or 0:.0f} s)")
    write()
    return r

  def best(name: str, lrs: Sequence[float]) -> float:
    runs = {lr: {s: ensure(name, lr, s) for s in plan.seeds} for lr in lrs}
    return report.best_lr(runs, task.metric.higher_is_better)

  lrs = {name: sorted(window) for name, window in plan.lrs.items()}
  for name, window in lrs.items():
    for lr in window:
      for seed in plan.seeds:
        ensure(name, lr, seed)
  if plan.past_edge:
    for name, window in lrs.items():
      top = best(name, window)
      if len(window) > 1 and top in (window[0], window[-1]):
        past = neighbour(top, 1 if top == window[-1] else -1)
        window.append(past)
        window.sort()
        for seed in plan.seeds:
          ensure(name, past, seed)
  for name, window in lrs.items():
    top = best(name, window)
    for seed in plan.best_seeds:
      ensure(name, top, seed)
  bar.close()
  write()
  report.plot(saved, path.with_suffix(".png"))
  print(report.text(saved, reference_optimizer))
  print(f"wrote {path} and {path.with_suffix('.png')}")
  return saved


def parse_lrs(values: Sequence[str] | None, task: Task, names: Sequence[str]) -> dict[str, list[float]]:
  """``--lrs``: plain floats for every method, or ``name=lr1,lr2`` per method; else the task's window."""
  plain = [float(v) for v in values or () if "=" not in v]
  named = {k: [float(x) for x in v.split(",")]
           for k, _, v in (s.partition("=") for s in values or () if "=" in s)}
  unknown = set(named) - set(names)
  if unknown:
    raise SystemExit(f"--lrs names optimizers that are not run: {sorted(unknown)}")
  return {n: named.get(n) or plain or list(task.window(n)) for n in names}


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
  """``--set key=value ...`` (values as Python literals, else strings)."""
  out = {}
  for item in items:
    key, _, value = item.partition("=")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("task", help="minilm, smollm2, lora_regression or matrix_sensing")
  parser.add_argument("--optimizers", nargs="+", help="the task's method names (default: the family)")
  parser.add_argument("--lrs", nargs="+", help="peak lrs for every method, or name=lr1,lr2 "
                      "(default: the task's window of family.GRID per method)")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of every lr")
  parser.add_argument("--best-seeds", nargs="+", type=int, default=[],
                      help="more seeds at each method's best lr")
  parser.add_argument("--past-edge", action="store_true",
                      help="one more lr past a window's edge where the best lr lies on it")
  parser.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                      help="size entries to change, e.g. steps=40 eval_every=10")
  parser.add_argument("--paired-with", help="the method the best table pairs the others with")
  parser.add_argument("--out", type=Path, help="result file (default: benchmarks/out/<task>.json)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  task = get(args.task)
  names = args.optimizers or list(FAMILY)
  size = {**task.sizes[args.size], **parse_settings(args.set)}
  plan = Plan(parse_lrs(args.lrs, task, names), args.seeds, args.best_seeds, args.past_edge)
  out = args.out or Path(f"benchmarks/out/{args.task}.json")
  return sweep(task, size, plan, out, reference_optimizer=args.paired_with,
               progress=not args.no_progress)


if __name__ == "__main__":
  main()
