"""First-moment (momentum) for AdaPreLoRA, kept in orthonormal factor frames.

Why not an EMA of the factor directions ``(dA, dB)``? After a zero factor
(``B = 0`` at init) ``B`` is O(lr), so ``Q = B diag(ρ) Bᵀ`` is O(lr²) and ``dA``
is O(1/lr). The W-space meaning of a stored ``dA`` is ``s · dA B``; as ``B``
grows, a stale ``dA`` is amplified by the same factor, and the momentum keeps
pushing a direction the new geometry no longer supports. Averaging raw factor
gradients has the mirror problem: ``grad_a = s G Bᵀ`` is O(lr) early on and
under-weighted later.

Instead we average the W-gradient ``G`` itself, restricted to the tangent
space, in coordinates that do not depend on the factors' scale: with
``BBᵀ + δ = L_B L_Bᵀ`` and ``AᵀA + δ = L_A L_Aᵀ`` (Cholesky), the rows of
``L_B⁻¹ B`` and the columns of ``A L_A⁻ᵀ`` are orthonormal frames, and

  ``c_a = G Bᵀ L_B⁻ᵀ = grad_a L_B⁻ᵀ / s``,  ``c_b = L_A⁻¹ Aᵀ G = L_A⁻¹ grad_b / s``

are ``G``'s coordinates in them. Their EMAs (with Adam's bias correction) are
mapped back to factor gradients at the current factors,
``grad_a = s m_a L_Bᵀ`` and ``grad_b = s L_A m_b``, and fed to the exact
solve of SPEC §3. With ``b1 = 0`` this is the plain solve; for any ``b1`` the
step is still the exact H-projection of an (averaged) Adafactor direction.
Memory: one ``A``-shaped and one ``B``-shaped float32 buffer per pair.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from adaprelora_jax.solve import damped_cholesky

Array = jax.Array


def _momentum_2d(a, b, grad_a, grad_b, mu_a, mu_b, *, scale, damping, b1,
                 debias):
  chol_a, _ = damped_cholesky(a.T @ a, damping)  # lower L_A
  chol_b, _ = damped_cholesky(b @ b.T, damping)  # lower L_B
  coord_a = solve_triangular(chol_b, grad_a.T, lower=True).T / scale
  coord_b = solve_triangular(chol_a, grad_b, lower=True) / scale
  mu_a = b1 * mu_a + (1.0 - b1) * coord_a
  mu_b = b1 * mu_b + (1.0 - b1) * coord_b
  eff_a = scale * (mu_a / debias) @ chol_b.T
  eff_b = scale * chol_a @ (mu_b / debias)
  return eff_a, eff_b, mu_a, mu_b


def averaged_gradients(
    a: Array, b: Array, grad_a: Array, grad_b: Array, mu_a: Array, mu_b: Array,
    *, scale: float | Array, damping: float | Array, b1: float | Array,
    count: Array,
) -> tuple[Array, Array, Array, Array]:
  """Updates the frame-coordinate momentum and returns averaged factor grads.

  Args:
    a, b, grad_a, grad_b: the factors and their gradients,
      ``(..., m, r)`` and ``(..., r, n)``.
    mu_a, mu_b: the momentum buffers, shaped like ``a`` and ``b``.
    scale: the LoRA scale ``s``.
    damping: relative damping of the frames' Gram matrices.
    b1: the EMA coefficient.
    count: the step number (from 0), for bias correction.

  Returns:
    ``(grad_a, grad_b, mu_a, mu_b)``: factor gradients of the averaged
    W-gradient at the current factors, and the new buffers.
  """
  debias = 1.0 - b1 ** (count + 1.0)
  fn = jnp.vectorize(
      functools.partial(_momentum_2d, scale=scale, damping=damping, b1=b1,
                        debias=debias),
      signature="(m,r),(r,n),(m,r),(r,n),(m,r),(r,n)->(m,r),(r,n),(m,r),(r,n)",
  )
  return fn(a, b, grad_a, grad_b, mu_a, mu_b)
