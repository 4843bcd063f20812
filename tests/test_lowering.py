"""The whole update lowers for GPU and TPU as well as CPU, without either device.

``jax.jit(...).trace(...).lower(lowering_platforms=(p,))`` runs each
primitive's lowering rule for platform ``p`` on this CPU-only machine. An op
with no lowering there raises, and each platform's solver kernels appear as
``custom_call`` targets (``lapack_*`` on CPU, ``cusolver_*`` on CUDA, XLA's
own ``Eigh`` on TPU), so a CPU-only custom call reaching the GPU or TPU
program fails here too. One train step (the update and ``apply_updates``) of
each optimizer is traced once from abstract inputs and lowered per platform.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from adaprelora_jax import WeightStats, adaprelora, lora_pairs
from adaprelora_jax.baselines import lora_plus, lora_pro, lora_rite, scaled_adamw, scaled_gd

import toy_lora

PLATFORMS = ("cpu", "cuda", "tpu")
# Custom-call targets a platform's program may hold: its own solver kernels and
# XLA's sharding markers. A target of another platform's kernel library fails.
ALLOWED = {
    "cpu": r"lapack_\w+",
    "cuda": r"cu(solver|blas)\w*",
    "tpu": r"Eigh|Qr|LuDecomposition|ProductOfElementaryHouseholderReflectors",
}
SHARDING = r"Sharding|SPMDFullToShardShape|SPMDShardToFullShape"


def _stacked() -> dict:
  """Scanned layers only: every pair carries a leading layer axis."""
  return {"layers": {
      "attn": {"lora_a": jnp.zeros((4, 32, 8)), "lora_b": jnp.zeros((4, 8, 32))},
      "mlp": {"lora_a": jnp.zeros((4, 32, 8)), "lora_b": jnp.zeros((4, 8, 64))}}}


def _toy() -> dict:
  """toy_lora's plain, stacked, N-D and unpaired leaves."""
  return toy_lora.params(with_key=True)


def _full_stats(params) -> dict:
  return {p.key: WeightStats(jnp.zeros((*p.batch_shape, p.m)), jnp.zeros((*p.batch_shape, p.n)))
          for p in lora_pairs(params).pairs}


CASES = {
    "adaprelora": (lambda: adaprelora(1e-2), _toy, False),
    "adaprelora_b1": (lambda: adaprelora(1e-2, b1=0.9, weight_decay=0.01), _toy, False),
    "adaprelora_full": (lambda: adaprelora(1e-2, statistics="full"), _toy, True),
    "adaprelora_stacked": (lambda: adaprelora(1e-2, b1=0.9), _stacked, False),
    "adaprelora_stacked_full": (lambda: adaprelora(1e-2, statistics="full"), _stacked, True),
    "lora_plus": (lambda: lora_plus(1e-2), _toy, False),
    "scaled_gd": (lambda: scaled_gd(1e-2), _toy, False),
    "scaled_adamw": (lambda: scaled_adamw(1e-2), _toy, False),
    "lora_pro": (lambda: lora_pro(1e-2), _toy, False),
    "lora_pro_full": (lambda: lora_pro(1e-2, variant="full"), _toy, False),
    "lora_rite": (lambda: lora_rite(1e-2), _toy, False),
}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def custom_calls(lowered) -> set[str]:
  return set(re.findall(r"stablehlo\.custom_call @([\w.]+)", lowered.as_text()))


def trace_step(make_tx, params_fn, full: bool):
  """The traced step ``(grads, state, params[, weight_stats]) -> (params, state)``."""
  tx, params = make_tx(), params_fn()

  def step(grads, state, params, *stats):
    kwargs = {"weight_stats": stats[0]} if stats else {}
    updates, state = tx.update(grads, state, params, **kwargs)
    return optax.apply_updates(params, updates), state

  args = [params, jax.eval_shape(tx.init, params), params]
  if full:
    args.append(_full_stats(params))
  return jax.jit(step).trace(*map(_abstract, args))


@pytest.mark.parametrize("name", CASES)
def test_update_lowers_for_every_platform(name):
  traced = trace_step(*CASES[name])
  for platform in PLATFORMS:
    targets = custom_calls(traced.lower(lowering_platforms=(platform,)))
    foreign = {t for t in targets
               if not re.fullmatch(f"{ALLOWED[platform]}|{SHARDING}", t)}
    assert not foreign, f"{name} on {platform}: custom calls {sorted(foreign)}"


def test_solver_calls_are_the_platforms_own():
  """The check sees the solves, and one platform's kernels fail another's check."""
  traced = trace_step(*CASES["adaprelora_b1"])
  want = {"cpu": "lapack_ssyevd_ffi", "cuda": "cusolver_syevd_ffi", "tpu": "Eigh"}
  for platform, target in want.items():
    assert target in custom_calls(traced.lower(lowering_platforms=(platform,)))
    for other in PLATFORMS:
      assert (other == platform) == bool(re.fullmatch(ALLOWED[other], target))


@pytest.mark.parametrize("name", CASES)
def test_every_product_asks_for_float32(name):
  """Each dot of the step (it has no model: all are the update's) carries ``HIGHEST`` for
  GPUs and TPUs, also under a user's lower ``jax_default_matmul_precision``."""
  with jax.default_matmul_precision("bfloat16"):
    traced = trace_step(*CASES[name])
  for platform in ("cuda", "tpu"):
    dots = re.findall(r"stablehlo\.dot_general .*", traced.lower(
        lowering_platforms=(platform,)).as_text())
    assert bool(dots) == (name != "lora_plus")  # LoRA+ is Adam: no products
    low = [d for d in dots if "precision = [HIGHEST, HIGHEST]" not in d]
    assert not low, f"{name} on {platform}: {len(low)} of {len(dots)} dots below HIGHEST"
