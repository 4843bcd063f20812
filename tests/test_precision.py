"""Every optimizer's update is accurate to float32 on GPUs and TPUs, not only on CPU.

A GPU runs a float32 matmul at TF32 and a TPU in one bfloat16 pass unless the
dot asks for more (``precision_emulation``). The update's ``r × r`` algebra
inverts Grams whose condition number is the factors' squared, so rounding
its operands to 8 or 11 bits turns the step into noise on ill-conditioned
factors, which training produces. Each case runs two updates of one
``64 × 48`` pair at ``r = 8`` whose factors have the given condition number,
emulated as each hardware would run it, and compares the W-step
``s (dA B + A dB)`` with the same updates in float64.

``python tests/test_precision.py`` prints the table of errors, also with the
products that contract over ``m`` or ``n`` at the hardware's default precision.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from adaprelora_jax import adaprelora
from adaprelora_jax.functional import linear_with_weight_stats, weight_stats_probe
from adaprelora_jax.baselines import lora_plus, lora_pro, lora_rite, scaled_adamw, scaled_gd

import precision_emulation as emulation

M, N, RANK, SCALE = 64, 48, 8, 0.5
CONDITIONS = (1.0, 1e3, 1e6)
BUDGET = 1e-2  # relative W-step error against float64

OPTIMIZERS = {
    "adaprelora": lambda: adaprelora(1.0, lora_scale=SCALE),
    "adaprelora_b1": lambda: adaprelora(1.0, b1=0.9, lora_scale=SCALE),
    "adaprelora_exact": lambda: adaprelora(1.0, lora_scale=SCALE, balancing=None,
                                           factor_clipping=None),
    "lora_plus": lambda: lora_plus(1.0),
    "scaled_gd": lambda: scaled_gd(1.0),
    "scaled_adamw": lambda: scaled_adamw(1.0),
    "lora_pro": lambda: lora_pro(1.0, lora_scale=SCALE),
    "lora_pro_full": lambda: lora_pro(1.0, lora_scale=SCALE, variant="full"),
    "lora_rite": lambda: lora_rite(1.0),
}


@contextlib.contextmanager
def float64():
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", False)


def _factor(rng, rows: int, cols: int, condition: float) -> np.ndarray:
  """A random ``rows × cols`` matrix with singular values from 1 down to ``1/condition``."""
  u = np.linalg.qr(rng.normal(size=(rows, RANK)))[0]
  v = np.linalg.qr(rng.normal(size=(cols, RANK)))[0]
  return (u * np.geomspace(1.0, 1.0 / condition, RANK)) @ v.T


def problem(condition: float, seed: int = 0):
  """Params and two steps' gradients of one LoRA pair, float32 numbers held in float64.

  Both runs see the same inputs, so the comparison measures the update's
  arithmetic, not the rounding of its inputs to float32.
  """
  rng = np.random.default_rng(seed)
  a, b = _factor(rng, M, RANK, condition), _factor(rng, RANK, N, condition)
  grads = []
  for _ in range(2):
    g = rng.normal(size=(M, N))
    grads.append({"lora_a": SCALE * g @ b.T, "lora_b": SCALE * a.T @ g})
  representable = lambda tree: jax.tree.map(lambda x: x.astype(np.float32).astype(np.float64),
                                            tree)
  return representable({"lora_a": a, "lora_b": b}), representable(grads)


def updates(tx: optax.GradientTransformation, params, grads, step=jax.jit):
  """The second of two updates at ``params``, each input cast to ``params``' dtype."""
  update = step(lambda g, s, p: tx.update(g, s, p))
  state = tx.init(params)
  for g in grads:
    out, state = update(g, state, params)
  return out


def w_step(params, out) -> np.ndarray:
  a, b = (np.asarray(params[k], np.float64) for k in ("lora_a", "lora_b"))
  da, db = (np.asarray(out[k], np.float64) for k in ("lora_a", "lora_b"))
  return SCALE * (da @ b + a @ db)


@functools.cache
def exact_w_step(name: str, condition: float) -> np.ndarray:
  params, grads = problem(condition)
  with float64():
    return w_step(params, updates(OPTIMIZERS[name](), params, grads))


def error(name: str, condition: float, hardware: emulation.Hardware,
          policy: emulation.Policy = emulation.carried_precision) -> float:
  """Relative W-step error of ``name``'s emulated float32 update against float64."""
  params, grads = problem(condition)
  as32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  params32 = as32(params)
  emulated = w_step(params32, updates(OPTIMIZERS[name](), params32, as32(grads),
                                      step=lambda f: emulation.emulate(f, hardware, policy)))
  exact = exact_w_step(name, condition)
  return float(np.linalg.norm(emulated - exact) / np.linalg.norm(exact))


@functools.cache
def float32_error(name: str, condition: float) -> float:
  """The error of the same update with every product in float32, as on a CPU."""
  return error(name, condition, "gpu", lambda eqn: lax.Precision.HIGHEST)


@pytest.mark.parametrize("hardware", ["gpu", "tpu"])
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_w_step_is_float32_accurate_on_accelerators(name, condition, hardware):
  """Within the budget where float32 arithmetic is; elsewhere no worse than float32.

  The baselines' own formulas (inverses of Grams damped by 1e-6 of their
  trace, and Adam's normalisation of what is left) lose more than the budget
  to float32 rounding alone on ill-conditioned factors, on any hardware.
  """
  limit = BUDGET if name.startswith("adaprelora") else max(BUDGET, float32_error(name, condition))
  assert error(name, condition, hardware) <= limit


def test_emulation_rounds_default_dots():
  """The emulator itself: a DEFAULT dot loses bits on both, a HIGHEST one none."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 16)), jnp.float32)
  exact = np.asarray(x, np.float64) @ np.asarray(x, np.float64)
  for hardware, bits in (("gpu", 10), ("tpu", 7)):
    default = emulation.emulate(lambda y: y @ y, hardware)(x)
    highest = emulation.emulate(lambda y: jnp.matmul(y, y, precision="highest"), hardware)(x)
    assert np.max(np.abs(default - exact)) > 2.0 ** -(bits + 3)
    assert np.max(np.abs(highest - exact)) < 1e-5


def test_gram_route_statistics_are_float32_accurate_on_a_tpu():
  """The ``"gram"`` route regroups ``G = xᵀδ``'s sums, which cancel here (token pairs with
  nearly equal inputs and opposite cotangents), so its products must not round to bfloat16."""
  rng = np.random.default_rng(0)
  tokens, m, n = 8, 64, 48
  x = rng.normal(size=(tokens, m))
  x[1::2] = x[0::2] + 1e-2 * rng.normal(size=(tokens // 2, m))
  delta = rng.normal(size=(tokens, n))
  delta[1::2] = -delta[0::2]
  x, delta = (np.asarray(v, np.float32) for v in (x, delta))
  g = x.astype(np.float64).T @ delta.astype(np.float64)
  exact = np.concatenate([np.mean(g * g, 1), np.mean(g * g, 0)])

  def stats(x, delta):
    loss = lambda probe: jnp.sum(delta * linear_with_weight_stats(
        x, jnp.zeros((m, n)), probe, method="gram"))
    return jnp.concatenate(jax.grad(loss)(weight_stats_probe(m, n)))

  error = lambda policy: float(np.max(np.abs(
      emulation.emulate(stats, "tpu", policy)(jnp.asarray(x), jnp.asarray(delta)) - exact))
      / np.max(exact))
  on_tpu, in_float32 = error(emulation.carried_precision), error(lambda eqn: lax.Precision.HIGHEST)
  assert on_tpu == in_float32 <= 1e-2
  assert error(lambda eqn: lax.Precision.DEFAULT) > 10 * in_float32  # one bfloat16 pass


def _contracts_large_axis(eqn) -> bool:
  """Whether a dot contracts over ``m`` or ``n`` (not over ``r`` or ``2r``)."""
  (contract, _), _ = eqn.params["dimension_numbers"]
  return any(eqn.invars[0].aval.shape[d] > 2 * RANK for d in contract)


def large_at_default(eqn) -> lax.Precision:
  """The policy that keeps the products over ``m`` or ``n`` at the hardware's default."""
  return lax.Precision.DEFAULT if _contracts_large_axis(eqn) else emulation.carried_precision(eqn)


POLICIES = {"as carried": emulation.carried_precision, "m, n at default": large_at_default,
            "all float32": lambda eqn: lax.Precision.HIGHEST}


def main(argv: list[str] | None = None) -> dict:
  """Prints the table of errors (and writes it as JSON with ``--out``)."""
  parser = argparse.ArgumentParser(description="W-step error of each optimizer, emulated")
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args(argv)
  print(f"W-step error against float64, {M} x {N}, r = {RANK}, two updates")
  print("| optimizer | products | " + " | ".join(
      f"κ={c:g} {hw}" for c in CONDITIONS for hw in ("gpu", "tpu")) + " |")
  print("|---|---|" + "---|" * 2 * len(CONDITIONS))
  table = {}
  for name in OPTIMIZERS:
    for label, policy in POLICIES.items():
      cells = {f"{c:g} {hw}": error(name, c, hw, policy) for c in CONDITIONS for hw in ("gpu", "tpu")}
      table.setdefault(name, {})[label] = cells
      print(f"| {name} | {label} | " + " | ".join(f"{e:.1e}" for e in cells.values()) + " |",
            flush=True)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shape": [M, N, RANK], "budget": BUDGET, "errors": table},
                                   indent=1))
  return table


if __name__ == "__main__":
  sys.exit(main())
