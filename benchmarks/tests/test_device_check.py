"""benchmarks/device_check.sh runs end to end on CPU with --smoke.

The script is what a GPU machine runs first; this runs the same steps at toy
sizes, so every command, flag and output file is known to work beforehand.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parent.parent / "device_check.sh"
STEPS = ["update_cost", "model_r4", "scan_tests", "full_stats_cost", "finetune"]


def _run(out, *, limit=None, timeout=600):
  env = dict(os.environ, PYTHON=sys.executable)
  if limit is not None:
    env["STEP_LIMIT_S"] = str(limit)
  return subprocess.run(["bash", str(SCRIPT), "--smoke", str(out)], env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # runs every step of the script (tiny sizes), each in its own process
def test_smoke_run_writes_every_check(tmp_path):
  run = _run(tmp_path)
  assert run.returncode == 0, run.stdout + run.stderr
  record = json.loads((tmp_path / "steps.json").read_text())
  assert record["device"] == "cpu"
  assert [(s["name"], s["rc"]) for s in record["steps"]] == [(n, 0) for n in STEPS]
  cost = json.loads((tmp_path / "update_cost.json").read_text())
  assert cost["main"]["adamw"]["time_ratio"] == 1.0
  assert cost["main"]["adaprelora"]["time_ratio"] > 0
  configs = json.loads((tmp_path / "model_r4.json").read_text())
  assert (configs["layers"], configs["rank"], set(configs["by_layers"])) == (2, 4, {"1"})
  assert set(configs["by_layers"]["1"]) == {"adamw", "adaprelora"}
  scans = json.loads((tmp_path / "scan_tests.json").read_text())
  assert len(scans) == 3 and {c["outcome"] for c in scans} == {"collected"}
  assert "| variant | temp MiB |" in json.loads(
      (tmp_path / "full_stats_cost.json").read_text())["stdout"]
  assert (tmp_path / "finetune" / "finetune.json").exists()


def test_a_failed_step_is_recorded_and_fails_the_script(tmp_path):
  # A 1 s limit stops every step: each is recorded, the script still finishes.
  run = _run(tmp_path, limit=1, timeout=120)
  assert run.returncode == 1
  steps = json.loads((tmp_path / "steps.json").read_text())["steps"]
  assert [s["name"] for s in steps] == STEPS
  assert {s["rc"] for s in steps} == {124}
