"""run_all's entries: together they write every file in benchmarks/results/, and only those."""

from __future__ import annotations

import dataclasses
import json
import shutil

from benchmarks import report, run_all, sweep, tasks
from benchmarks.family import GRID


def test_the_entries_write_exactly_the_committed_results():
  written = [f for entry in run_all.ENTRIES.values() for f in entry.files]
  assert len(written) == len(set(written))  # no file has two writers
  assert set(written) == {p.name for p in run_all.RESULTS.iterdir()}


def test_list_names_every_entry_and_its_files(capsys):
  run_all.main(["--list"])
  printed = capsys.readouterr().out
  for name, entry in run_all.ENTRIES.items():
    assert f"{name}: python -m benchmarks.{entry.module}" in printed
    assert all(f in printed for f in entry.files)


def test_sweep_entries_name_known_methods_on_the_grid():
  for name, entry in run_all.ENTRIES.items():
    if entry.module != "sweep":
      continue
    task = tasks.get(entry.args[0])
    args = list(entry.args)
    names = args[args.index("--optimizers") + 1:]
    names = names[:next((i for i, a in enumerate(names) if a.startswith("--")), len(names))]
    assert set(names) <= set(task.methods), name
    lrs = args[args.index("--lrs") + 1:] if "--lrs" in args else []
    lrs = lrs[:next((i for i, a in enumerate(lrs) if a.startswith("--")), len(lrs))]
    for window in sweep.parse_lrs(lrs, task, names).values():
      assert set(window) <= set(GRID), name


def test_dry_run_prints_every_command(capsys):
  run_all.main(["--dry-run"])
  printed = capsys.readouterr().out
  assert printed.count("$ -m benchmarks.") == len(run_all.ENTRIES)


def test_every_sweep_file_holds_exactly_its_entrys_protocol(tmp_path, monkeypatch):
  """Resuming each sweep entry from its committed file trains nothing: the file has every run the
  protocol asks for, with the settings it asks for."""

  def untrained(*args, **kwargs):
    raise AssertionError("the committed file lacks a run of its entry's protocol")

  real_get = tasks.get
  monkeypatch.setattr(sweep, "get", lambda name: dataclasses.replace(real_get(name), run=untrained))
  monkeypatch.setattr(report, "plot", lambda saved, path: None)
  for name, entry in run_all.ENTRIES.items():
    if entry.module != "sweep":
      continue
    for kept in entry.files:
      if kept.endswith(".json"):
        shutil.copy(run_all.RESULTS / kept, tmp_path / kept)
    saved = sweep.main([a.replace("{out}", str(tmp_path)) for a in entry.args])
    committed = json.loads((run_all.RESULTS / f"{name}.json").read_text())
    assert len(saved["runs"]) == len(committed["runs"]), name
