"""Array-only ``r × r`` linear algebra shared by AdaPreLoRA and the baselines.

Every function takes and returns arrays (no pytrees): symmetric
eigendecompositions, damped inverses and roots, and the Sylvester solve. The
eigendecompositions, inverses and roots also take a stack ``(..., r, r)``,
which the accelerators' solvers run as one batched call. ``δ = damping · tr(M)/r + tiny`` is the relative shift of
``docs/derivation.md`` (damping).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from adaprelora_jax._src.base import Array, dot


def _t(x: Array) -> Array:
  return jnp.swapaxes(x, -1, -2)


def symmetric_eigh(matrix: Array) -> tuple[Array, Array]:
  """``(vals, vecs)`` of a symmetric matrix, symmetrised first against rounding."""
  return jnp.linalg.eigh((matrix + _t(matrix)) / 2)


class DampedEigh(NamedTuple):
  """``M + δ I = vecs diag(vals) vecsᵀ`` for an ``r × r`` Gram matrix ``M``."""

  vals: Array
  vecs: Array


def shift(gram: Array, damping: Array | float) -> Array:
  """``δ = damping · tr(gram)/r + tiny``: relative, so rescaling a factor rescales it too."""
  trace = jnp.trace(gram, axis1=-2, axis2=-1)
  return damping * trace / gram.shape[-1] + jnp.sqrt(jnp.finfo(gram.dtype).tiny)


def damped_eigh(gram: Array, damping: Array | float) -> DampedEigh:
  """Eigensystem of ``gram + δ I``.

  Rounding leaves the Gram of a rank-deficient factor slightly indefinite
  (by about ``√n ε tr(gram)``, more than ``δ`` covers), so the eigenvalues
  are clamped at 0 before the shift.
  """
  vals, vecs = symmetric_eigh(gram)
  return DampedEigh(jnp.maximum(vals, 0.0) + shift(gram, damping)[..., None], vecs)


def _zero_floor(dtype) -> Array:
  return 4 * jnp.sqrt(jnp.finfo(dtype).tiny)


def pseudo_reciprocal(x: Array) -> Array:
  """``1/x``, and 0 where ``x`` is at most ``4 √tiny`` (an all-zero Gram's damped eigenvalues).

  A zero factor has no range, so its Gram's inverse acts as the
  pseudo-inverse (0) there, instead of amplifying by ``1/tiny`` a part of a
  gradient that no W-gradient produces.
  """
  floor = _zero_floor(x.dtype)
  return jnp.where(x > floor, 1.0 / jnp.maximum(x, floor), 0.0)


def inverse(eig: DampedEigh) -> Array:
  """``(M + δ I)⁻¹`` from its eigensystem (0 on a numerically zero ``M``)."""
  return dot(eig.vecs * pseudo_reciprocal(eig.vals)[..., None, :], _t(eig.vecs))


def damped_inverse(gram: Array, damping: Array | float) -> Array:
  """``(gram + δ I)⁻¹`` (0 for an all-zero ``gram``), from its eigensystem.

  Right for any damping: the eigenvalues that rounding leaves negative are
  clamped at 0 first, so the inverse's are at most ``1/δ``.
  """
  return inverse(damped_eigh(gram, damping))


_ESCALATED = 1e-3  # relative shift of the retry where rounding defeats a Cholesky factorization


def cholesky_inverse(gram: Array, damping: Array | float) -> Array:
  """:func:`damped_inverse` by Cholesky, for a shift well above the Gram's rounding.

  Cholesky inverts a positive definite matrix to float32 rounding at a
  fraction of an eigendecomposition's cost, and equals :func:`damped_inverse`
  where ``δ`` is far above the Gram's rounding error (``damping`` of ``10⁻⁴``
  and up). Below that, a rank-deficient Gram's rounding is not clamped, so
  use :func:`damped_inverse`. Where rounding leaves ``gram + δ I``
  indefinite and the factor is not finite, the inverse of
  ``gram + (δ + 10⁻³ tr/r) I`` is used instead; both are factored in the same
  call.
  """
  r = gram.shape[-1]
  eye = jnp.eye(r, dtype=gram.dtype)
  mean_eigenvalue = jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None] / r
  delta = shift(gram, damping)[..., None, None]
  shifted = (gram + _t(gram)) / 2 + delta * eye
  factors = lax.linalg.cholesky(jnp.stack([shifted, shifted + _ESCALATED * mean_eigenvalue * eye]),
                                symmetrize_input=False)
  factor = jnp.where(jnp.all(jnp.isfinite(factors[0]), axis=(-2, -1), keepdims=True),
                     factors[0], factors[1])
  inv_factor = lax.linalg.triangular_solve(factor, jnp.broadcast_to(eye, factor.shape),
                                           left_side=True, lower=True)
  inv = dot(_t(inv_factor), inv_factor)
  # An all-zero Gram's inverse acts as the pseudo-inverse, 0 (see pseudo_reciprocal).
  zero = mean_eigenvalue + delta <= _zero_floor(gram.dtype)
  return jnp.where(zero | ~jnp.isfinite(inv), 0.0, inv)


def damped_sqrt(gram: Array, damping: Array | float) -> tuple[Array, Array]:
  """``(L, L⁻¹)`` for the symmetric square root ``L = (gram + δ I)^½`` (``L⁻¹ = 0`` for a zero ``gram``).

  The symmetric root is unique, hence continuous in ``gram``, so frame
  coordinates built from it vary smoothly from step to step.
  """
  eig = damped_eigh(gram, damping)
  return (dot(eig.vecs * jnp.sqrt(eig.vals)[..., None, :], _t(eig.vecs)),
          dot(eig.vecs * jnp.sqrt(pseudo_reciprocal(eig.vals))[..., None, :], _t(eig.vecs)))


def sylvester(eig_p: DampedEigh, eig_q: DampedEigh, c: Array) -> Array:
  """``X`` with ``P X + X Q = C``, diagonal in the eigenbases of ``P`` and ``Q``."""
  rotated = dot(eig_p.vecs.T, c, eig_q.vecs)
  denom = eig_p.vals[:, None] + eig_q.vals[None, :]
  return dot(eig_p.vecs, rotated * pseudo_reciprocal(denom), eig_q.vecs.T)


def inverse_root(matrix: Array, eps: float | Array) -> Array:
  """``U diag(1 / (√λ + ε)) Uᵀ`` for a PSD ``matrix = U diag(λ) Uᵀ``, as Adam places ``ε``."""
  vals, vecs = symmetric_eigh(matrix)
  return dot(vecs / (jnp.sqrt(jnp.maximum(vals, 0.0)) + eps)[..., None, :], _t(vecs))


def eigvals(matrix: Array) -> Array:
  """Ascending eigenvalues of a symmetric matrix."""
  return symmetric_eigh(matrix)[0]
