"""Shared fixtures: float64 brute-force references for the closed-form solve (docs/derivation.md)."""

import jax
import numpy as np
import pytest


EXACT: dict[str, None] = dict(balancing=None, factor_clipping=None)
"""AdaPreLoRA's arguments for the paper's rule: no balancing term, no bound on the factor steps."""


@pytest.fixture
def x64():
  """Runs a test with float64 enabled (checks at full precision)."""
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def random_pair(seed, m, n, r, *, batch=(), scale=0.7):
  """Factors, a W-gradient, its factor gradients and positive metric diagonals."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(*batch, m, r))
  b = rng.normal(size=(*batch, r, n))
  g = rng.normal(size=(*batch, m, n))
  row = rng.uniform(0.3, 3.0, size=(*batch, m))
  col = rng.uniform(0.3, 3.0, size=(*batch, n))
  grad_a = scale * g @ np.swapaxes(b, -1, -2)
  grad_b = scale * np.swapaxes(a, -1, -2) @ g
  return dict(a=a, b=b, g=g, row=row, col=col, grad_a=grad_a, grad_b=grad_b,
              scale=scale)


def h_projection(d, a, b, row, col):
  """Dense H-orthogonal projection of ``d`` onto ``{X B + A Y}`` (one slice)."""
  m, r = a.shape
  n = b.shape[1]
  basis = [(np.eye(m * r)[i].reshape(m, r) @ b).ravel() for i in range(m * r)]
  basis += [(a @ np.eye(r * n)[i].reshape(r, n)).ravel() for i in range(r * n)]
  jac = np.stack(basis, axis=1)
  w = np.sqrt(np.outer(row, col)).ravel()
  coef = np.linalg.lstsq(jac * w[:, None], d.ravel() * w, rcond=None)[0]
  return (jac @ coef).reshape(m, n)


def primitive_equations(jaxpr, name: str) -> list:
  """The equations of primitive ``name`` in ``jaxpr`` and the jaxprs nested in its equations."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(eqn)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          found += primitive_equations(sub, name)
  return found


def count_primitive(jaxpr, name: str) -> int:
  """Occurrences of primitive ``name`` in ``jaxpr`` and the jaxprs nested in its equations."""
  return len(primitive_equations(jaxpr, name))
