"""Runs a test body in a fresh Python process, optionally on N host CPU devices.

JAX fixes the number of CPU devices when it initialises, from
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, and the pytest process
has long initialised it with one. A test that needs a mesh, or a fresh
process (restoring a checkpoint), runs its body in a child interpreter
instead: the child imports the test module and calls the body, and a failure
there fails the test with the child's output.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable

import pytest


def run_isolated(body: Callable[..., None], *args: str | int,
                 host_devices: int | None = None, timeout: float = 300) -> None:
  """Calls ``body(*args)`` in a fresh process (``args`` are plain literals)."""
  here = os.path.dirname(os.path.abspath(sys.modules[body.__module__].__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  code = [f"import sys; sys.path[:0] = {[here, os.getcwd()]!r}"]
  if host_devices is not None:
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                        f"--xla_force_host_platform_device_count={host_devices}")
    code += ["import jax",
             f"assert jax.device_count() == {host_devices}, jax.devices()"]
  code += [f"from {body.__module__} import {body.__name__} as body",
           f"getattr(body, '__wrapped__', body)(*{args!r})"]
  child = subprocess.run([sys.executable, "-c", "\n".join(code)], env=env,
                         capture_output=True, text=True, timeout=timeout)
  if child.returncode:
    pytest.fail(f"{body.__name__}{args!r} failed in a subprocess:\n"
                f"{child.stdout}\n{child.stderr}", pytrace=False)


def isolated(*, host_devices: int | None = None):
  """Decorates a test whose body runs in :func:`run_isolated`."""
  def decorate(body: Callable[[], None]) -> Callable[[], None]:
    @functools.wraps(body)
    def test() -> None:
      run_isolated(body, host_devices=host_devices)
    return test
  return decorate
