"""Multi-process SPMD: two JAX processes of 4 CPU devices each, one mesh.

``jax.distributed`` runs on CPU with gloo collectives, so two processes on this
machine form a real 2-host × 4-device mesh, as two hosts of a TPU pod do.
``multiprocess_worker.py`` is the program each host runs (init on the mesh,
training on its own rows of the batch, a multi-process Orbax save, a restore
into a fresh optimizer with ``restore_state``); it asserts in each process
that every state leaf holds only the blocks ``state_shardings`` gives it
(from ``addressable_shards``) and that resuming is bit-identical. Here the
two-process run is compared with one process training on the whole batch.

The two processes are watched together: one that exits with an error kills
the other and fails the test at once with both outputs, and a run past
``TIMEOUT`` seconds fails the same way, so a dead peer never leaves the test
waiting on a collective.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import test_nnx_sharding as nnx_models
import toy_lora
from adaprelora_jax import adaprelora
from multiprocess_worker import STEPS, pure
from test_sharding import _assert_close

pytestmark = pytest.mark.slow  # several processes, each compiling its own program

PROCESSES, DEVICES_PER_PROCESS = 2, 4
TIMEOUT = 300  # s; the run takes 30-60 s on 2 idle cores
WORKER = Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _outputs(logs: list[Path]) -> str:
  """Every process's output, without gloo's connection chatter."""
  parts = []
  for i, log in enumerate(logs):
    lines = [l for l in log.read_text().splitlines() if not l.startswith("[Gloo]")]
    parts.append(f"--- process {i} ---\n" + "\n".join(lines))
  return "\n".join(parts)


def _worker(port: int, i: int, processes: int, out: Path) -> list[str]:
  return [sys.executable, str(WORKER), str(port), str(i), str(processes), str(out)]


def launch(out: Path, *, processes: int = PROCESSES, timeout: float = TIMEOUT,
           command: Callable[[int, int, int, Path], list[str]] = _worker) -> None:
  """Runs ``command(port, i, processes, out)`` for each process ``i``.

  Fails at the first process that exits with an error, or at ``timeout``,
  and kills the others either way.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(  # the checkout's package and tests/ first
      [str(WORKER.parent.parent), str(WORKER.parent), env.get("PYTHONPATH", "")])
  env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
                      f"{DEVICES_PER_PROCESS}")
  port = _free_port()
  logs = [out / f"process_{i}.log" for i in range(processes)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, "w") as f:  # the child keeps its own copy of the handle
        procs.append(subprocess.Popen(
            command(port, i, processes, out), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=WORKER.parent.parent))
    deadline = time.monotonic() + timeout
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        pytest.fail(f"process {failed[0]} exited with {codes[failed[0]]}:\n{_outputs(logs)}",
                    pytrace=False)
      if all(c == 0 for c in codes):
        return
      if time.monotonic() > deadline:
        pytest.fail(f"the processes ran past {timeout} s:\n{_outputs(logs)}", pytrace=False)
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _one_process_runs() -> dict:
  """Both runs in this process on one device, over the whole batch of every step."""
  tx = adaprelora(1e-2, b1=0.9, weight_decay=0.01)
  step = jax.jit(toy_lora.train_step(tx))
  params = toy_lora.params()
  run = (params, tx.init(params))
  for t in range(STEPS):
    run = step(*run, *toy_lora.batch(t))
  model, optimizer = nnx_models._train(nnx_models._mesh((1, 1)),
                                       [nnx_models._batch(t) for t in range(STEPS)])
  return {"optax": run, "nnx": {"model": pure(nnx.state(model, nnx_models.WRT)),
                                "optimizer": pure(nnx.state(optimizer))}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
  """The two-process run's folder, and the one-process runs, computed meanwhile."""
  out = tmp_path_factory.mktemp("multiprocess")
  one: dict = {}

  def compute() -> None:
    try:
      one.update(_one_process_runs())
    except Exception as e:  # reported by the tests that need the runs
      one["error"] = e

  thread = threading.Thread(target=compute, daemon=True)
  thread.start()  # compiles while the processes do; launch() keeps watching them
  launch(out)
  thread.join()
  if "error" in one:
    raise one["error"]
  return out, one


def _reports(out: Path) -> list[dict]:
  return [json.loads((out / f"process_{i}.json").read_text()) for i in range(PROCESSES)]


def _by_path(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_run(npz: Path, want) -> None:
  got = dict(np.load(npz))
  want = _by_path(want)
  assert sorted(got) == sorted(want)
  _assert_close([got[k] for k in sorted(want)], [want[k] for k in sorted(want)])


def test_optax_two_processes_equal_one(runs):
  out, one = runs
  for i, report in enumerate(_reports(out)):
    # v_row/v_col/momentum of the stacked 'layers/mlp' pair, its params, ...
    assert report["optax"]["split_across_processes"] >= 4, (i, report)
    assert report["optax"]["resumed_bit_identical"], (i, report)
  _assert_same_run(out / "optax.npz", one["optax"])


def test_nnx_optimizer_two_processes_equal_one(runs):
  out, one = runs
  for i, report in enumerate(_reports(out)):
    # the 'adapter' pair splits A's in axis on 'data': its v_row and mu_a
    assert report["nnx"]["split_across_processes"] >= 2, (i, report)
    assert report["nnx"]["resumed_bit_identical"], (i, report)
  _assert_same_run(out / "nnx.npz", one["nnx"])


def test_a_dead_process_fails_the_run_at_once(tmp_path):
  def second_dies(port, i, processes, out):
    if i == 1:
      return [sys.executable, "-c", "print('exiting'); raise SystemExit(3)"]
    return _worker(port, i, processes, out)  # waits for process 1 in initialize

  with pytest.raises(pytest.fail.Exception, match=r"(?s)^process 1 exited with 3:\n"
                     r"--- process 0 ---.*--- process 1 ---\nexiting$"):
    launch(tmp_path, timeout=TIMEOUT, command=second_dies)
