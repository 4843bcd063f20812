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

from adaprelora_jax.base import Array


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


def pseudo_reciprocal(x: Array) -> Array:
  """``1/x``, and 0 where ``x`` is at most ``4 √tiny`` (an all-zero Gram's damped eigenvalues).

  A zero factor has no range, so its Gram's inverse acts as the
  pseudo-inverse (0) there, instead of amplifying by ``1/tiny`` a part of a
  gradient that no W-gradient produces.
  """
  floor = 4 * jnp.sqrt(jnp.finfo(x.dtype).tiny)
  return jnp.where(x > floor, 1.0 / jnp.maximum(x, floor), 0.0)


def inverse(eig: DampedEigh) -> Array:
  """``(M + δ I)⁻¹`` from its eigensystem (0 on a numerically zero ``M``)."""
  return (eig.vecs * pseudo_reciprocal(eig.vals)[..., None, :]) @ _t(eig.vecs)


def damped_inverse(gram: Array, damping: Array | float) -> Array:
  """``(gram + δ I)⁻¹`` (0 for an all-zero ``gram``)."""
  return inverse(damped_eigh(gram, damping))


def damped_sqrt(gram: Array, damping: Array | float) -> tuple[Array, Array]:
  """``(L, L⁻¹)`` for the symmetric square root ``L = (gram + δ I)^½`` (``L⁻¹ = 0`` for a zero ``gram``).

  The symmetric root is unique, hence continuous in ``gram``, so frame
  coordinates built from it vary smoothly from step to step.
  """
  eig = damped_eigh(gram, damping)
  return ((eig.vecs * jnp.sqrt(eig.vals)[..., None, :]) @ _t(eig.vecs),
          (eig.vecs * jnp.sqrt(pseudo_reciprocal(eig.vals))[..., None, :]) @ _t(eig.vecs))


def sylvester(eig_p: DampedEigh, eig_q: DampedEigh, c: Array) -> Array:
  """``X`` with ``P X + X Q = C``, diagonal in the eigenbases of ``P`` and ``Q``."""
  rotated = eig_p.vecs.T @ c @ eig_q.vecs
  denom = eig_p.vals[:, None] + eig_q.vals[None, :]
  return eig_p.vecs @ (rotated * pseudo_reciprocal(denom)) @ eig_q.vecs.T


def inverse_root(matrix: Array, eps: float | Array) -> Array:
  """``U diag(1 / (√λ + ε)) Uᵀ`` for a PSD ``matrix = U diag(λ) Uᵀ``, as Adam places ``ε``."""
  vals, vecs = symmetric_eigh(matrix)
  return (vecs / (jnp.sqrt(jnp.maximum(vals, 0.0)) + eps)[..., None, :]) @ _t(vecs)


def eigvals(matrix: Array) -> Array:
  """Ascending eigenvalues of a symmetric matrix."""
  return symmetric_eigh(matrix)[0]
