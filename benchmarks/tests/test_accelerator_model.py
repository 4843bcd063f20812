"""benchmarks/accelerator_model.py reads the programs XLA builds for the update: its counting."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from adaprelora_jax import adaprelora
from benchmarks import accelerator_model as am


def _traced_step():
  """One traced step (update and ``apply_updates``) of AdaPreLoRA with momentum on two pairs."""
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  params = {"attn": {"lora_a": spec(32, 8), "lora_b": spec(8, 32)},
            "mlp": {"lora_a": spec(32, 8), "lora_b": spec(8, 64)}}
  tx = adaprelora(1e-2, b1=0.9, weight_decay=0.01)

  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step).trace(params, jax.eval_shape(tx.init, params), params)


def test_model_counts_each_solver_call_site_once():
  """The jaxpr walk finds every decomposition the compiled program runs (the lowered module
  holds one body per jitted function, however many call sites it has)."""
  traced = _traced_step()
  calls = am.solver_calls(traced)
  compiled = traced.lower(lowering_platforms=("cpu",)).compile().as_text()
  assert {c[0] for c in calls} == {"eigh", "cholesky", "triangular_solve"}
  for primitive, target in (("eigh", "lapack_ssyevd"), ("cholesky", "lapack_spotrf"),
                            ("triangular_solve", "lapack_strsm")):
    assert sum(c[0] == primitive for c in calls) == len(
        re.findall(rf"custom-call\(.*custom_call_target=\"{target}", compiled)), primitive


def test_model_kernels_and_terms():
  """Fusions count as kernels, not the ops inside them; the terms add up as the docstring says."""
  def kernels(f, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return am.kernel_count(jax.jit(f).lower(*args).compile().as_text())[0]

  elementwise = kernels(lambda x: jnp.tanh(2 * x + 1), (64, 64))
  assert elementwise == 1  # one fusion; its body's ops are not kernels
  assert kernels(lambda x, y: jnp.tanh(x @ y) @ y, (64, 64), (64, 64)) >= 2
  chip = am.Chip("toy", hbm_bytes_per_s=1e9, peak_flops_per_s=1e12, launch_s=1e-6,
                 solver=lambda primitive, batch, n: 1e-3 * batch, highest_dot_flops_per_s=1e11,
                 default_dot_flops_per_s=1e12)
  program = {"flops": 2e9, "dot_flops": 1e9, "bytes": 1e6, "kernels": 10,
             "solver_calls": [("eigh", 3, 4)]}
  t = am.predict(program, chip)
  assert t["roofline_s"] == pytest.approx(1e-3 + 1e-2)  # compute-bound, dots at HIGHEST's rate
  assert t["dots_default_s"] == pytest.approx(1e-3)
  assert t["total_s"] == pytest.approx(1.1e-2 + 10e-6 + 3e-3)
  assert am.dot_flops(jax.jit(lambda x, y: x @ y).trace(
      jax.ShapeDtypeStruct((3, 5), jnp.float32), jax.ShapeDtypeStruct((5, 7), jnp.float32))
  ) == 2 * 3 * 5 * 7
