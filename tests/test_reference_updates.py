"""Every optimizer's updates on a fixed problem, against values stored before the restructuring.

``tests/data/reference_updates.npz`` holds three steps of each optimizer's updates,
computed from the code as it stood before the modules were reorganised
(``python -m tests.test_reference_updates`` rewrites it). A refactoring that keeps
the math keeps these numbers to float32 rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaprelora_jax import adaprelora
from adaprelora_jax.baselines import lora_plus, lora_pro, lora_rite, scaled_adamw, scaled_gd

REFERENCE = Path(__file__).parent / "data" / "reference_updates.npz"
from conftest import EXACT  # the paper's rule, as the code had it
STEPS = 3


def _params() -> dict:
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(0.3 * rng.normal(size=shape), jnp.float32)
  return {
      "query": {"lora_a": normal(12, 3), "lora_b": normal(3, 10)},
      "layers": {"mlp": {"lora_a": normal(2, 12, 3), "lora_b": normal(2, 3, 8)}},
      "fresh": {"lora_a": normal(10, 2), "lora_b": jnp.zeros((2, 6), jnp.float32)},
      "head": {"kernel": normal(8, 4), "bias": normal(4)},
  }


def _grads(params: dict, step: int) -> dict:
  rng = np.random.default_rng(100 + step)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  # B = 0 makes A's gradient s G Bᵀ zero; a nonzero one there is no W-gradient's.
  fresh_b_is_zero = not np.any(np.asarray(params["fresh"]["lora_b"]))
  if fresh_b_is_zero:
    grads["fresh"]["lora_a"] = jnp.zeros_like(grads["fresh"]["lora_a"])
  return grads


def _weight_stats(step: int) -> dict:
  rng = np.random.default_rng(200 + step)
  positive = lambda *shape: jnp.asarray(rng.uniform(0.5, 2.0, size=shape), jnp.float32)
  return {"query": (positive(12), positive(10)),
          "layers/mlp": (positive(2, 12), positive(2, 8)),
          "fresh": (positive(10), positive(6))}


CASES = {
    "adaprelora": lambda: adaprelora(1e-2, **EXACT),
    "adaprelora_b1": lambda: adaprelora(1e-2, b1=0.9, **EXACT),
    "adaprelora_b2_decay": lambda: adaprelora(1e-2, b2=0.99, weight_decay=0.1, **EXACT),
    "adaprelora_full": lambda: adaprelora(1e-2, statistics="full", **EXACT),
    "lora_plus": lambda: lora_plus(1e-2),
    "scaled_gd": lambda: scaled_gd(1e-2),
    "scaled_adamw": lambda: scaled_adamw(1e-2),
    "lora_pro": lambda: lora_pro(1e-2),
    "lora_pro_full": lambda: lora_pro(1e-2, variant="full"),
    "lora_rite": lambda: lora_rite(1e-2),
}


def trajectory(name: str) -> dict[str, np.ndarray]:
  """The updates of ``STEPS`` steps of ``CASES[name]``, flattened by leaf path."""
  tx = CASES[name]()
  params = _params()
  state = tx.init(params)
  extra = ({"weight_stats": None} if name != "adaprelora_full" else {})
  out = {}
  for step in range(STEPS):
    if name == "adaprelora_full":
      extra = {"weight_stats": _weight_stats(step)}
    updates, state = tx.update(_grads(params, step), state, params, **extra)
    params = optax.apply_updates(params, updates)
    for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
      out[f"{step}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_updates_match_the_stored_reference(name):
  stored = np.load(REFERENCE)
  got = trajectory(name)
  for key, value in got.items():
    want = stored[f"{name}/{key}"]
    np.testing.assert_allclose(value, want, rtol=2e-4, atol=1e-6 * np.abs(want).max(),
                               err_msg=f"{name} {key}")


if __name__ == "__main__":
  arrays = {f"{name}/{key}": value for name in CASES for key, value in trajectory(name).items()}
  np.savez_compressed(REFERENCE, **arrays)
  print(f"wrote {len(arrays)} arrays to {REFERENCE}", file=sys.stderr)
