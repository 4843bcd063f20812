"""One solver call per stage: the lowered GPU and TPU programs of a 7B-sized update.

Every role's ``r × r`` decompositions of one stage share one batched call
(``adaprelora_jax._src.solver_batching``). The count is read from the lowered
module as a device would run it: each function's solver ops, times the
number of times the call graph reaches that function.
"""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaprelora_jax import CHUNKED, adaprelora
from adaprelora_jax.baselines import lora_plus, lora_pro, lora_rite, scaled_adamw, scaled_gd
from adaprelora_jax._src.solver_batching import batch_solves

ROLES = {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
         "gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096)}
LAYERS, RANK = 32, 16

OPTIMIZERS = {
    "adaprelora": lambda: adaprelora(1e-3),
    "adaprelora_b1": lambda: adaprelora(1e-3, b1=0.9),
    "adaprelora_exact": lambda: adaprelora(1e-3, balancing=None, factor_clipping=None),
    "lora_plus": lambda: lora_plus(1e-3),
    "scaled_gd": lambda: scaled_gd(1e-3),
    "scaled_adamw": lambda: scaled_adamw(1e-3),
    "lora_pro": lambda: lora_pro(1e-3),
    "lora_rite": lambda: lora_rite(1e-3),
}

# A factorization or triangular solve, as each platform's lowered module spells it.
SOLVER_OPS = {
    "cuda": r"custom_call @(cusolver_\w+)|stablehlo\.(triangular_solve)",
    "tpu": r"custom_call @(Eigh)|stablehlo\.(cholesky|triangular_solve)",
}
FACTORIZATIONS = {"cusolver_syevd_ffi", "cusolver_potrf_ffi", "Eigh", "cholesky"}


def solver_calls(module: str, platform: str) -> Counter:
  """Solver ops run by the module's entry point, following its call graph."""
  bodies, name = {}, None
  for line in module.splitlines():
    header = re.match(r"\s*func\.func (?:public |private )?@([\w.$-]+)", line)
    if header:
      name = header.group(1)
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)

  def run(function: str) -> Counter:
    counts = Counter()
    for line in bodies[function]:
      for match in re.finditer(SOLVER_OPS[platform], line):
        counts[next(g for g in match.groups() if g)] += 1
      for callee in re.findall(r"(?:func\.)?call @([\w.$-]+)", line):
        if callee in bodies:
          counts += run(callee)
    return counts

  return run("main")


def _stacked_params():
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return {"layers": {role: {"lora_a": f32(LAYERS, m, RANK), "lora_b": f32(LAYERS, RANK, n)}
                     for role, (m, n) in ROLES.items()}}


def lowered_calls(tx: optax.GradientTransformation, platform: str) -> Counter:
  params = _stacked_params()
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  lowered = step.trace(params, jax.eval_shape(tx.init, params), params).lower(
      lowering_platforms=(platform,))
  return solver_calls(lowered.as_text(), platform)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_at_most_three_factorizations_per_update(name, platform):
  calls = lowered_calls(OPTIMIZERS[name](), platform)
  factorizations = sum(n for op, n in calls.items() if op in FACTORIZATIONS)
  assert factorizations <= 3, (name, platform, dict(calls))
  assert sum(calls.values()) <= 5, (name, platform, dict(calls))  # with triangular solves
  if name.startswith("adaprelora"):
    assert factorizations >= 2  # the frames' roots, then the weighted Grams' inverses


def test_the_count_follows_the_call_graph():
  """A function called twice counts twice; a chunked update keeps one call per role."""
  chunked = lowered_calls(adaprelora(1e-3, layout=CHUNKED), "cuda")
  assert sum(chunked.values()) > 3 * len(ROLES)


def test_merged_solves_equal_separate_ones():
  rng = np.random.default_rng(0)
  spd = lambda *batch: (lambda x: x @ np.swapaxes(x, -1, -2) + 0.1 * np.eye(4))(
      rng.normal(size=(*batch, 4, 4)))
  x, y, z = (jnp.asarray(m, jnp.float32) for m in (spd(3), spd(2, 5), spd()))

  def fn(x, y, z):
    first = jnp.linalg.eigh(x)[1], jnp.linalg.cholesky(y)
    return first, jnp.linalg.eigh(z + jnp.sum(first[1]))[0], jnp.linalg.eigh(y)[0]

  merged = jax.jit(batch_solves(fn))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               merged(x, y, z), jax.jit(fn)(x, y, z))
  text = merged.lower(x, y, z).as_text()
  # eigh of x and y share a call; z's depends on the Cholesky, so it is the next stage.
  assert len(re.findall(r"custom_call @lapack_ssyevd", text)) == 2
  assert len(re.findall(r"custom_call @lapack_spotrf", text)) == 1
