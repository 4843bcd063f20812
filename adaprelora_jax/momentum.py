"""First moment (momentum) for AdaPreLoRA, kept in the factors' frames.

Why not an EMA of the factor directions ``(dA, dB)``? After a zero factor
(``B = 0`` at init) ``B`` is O(lr), so ``Q = B diag(ρ) Bᵀ`` is O(lr²) and
``dA`` is O(1/lr). A stored ``dA`` means ``s · dA B`` in W-space; as ``B``
grows, a stale ``dA`` is amplified by the same factor, and the momentum keeps
pushing a direction the new geometry no longer supports. Averaging raw factor
gradients has the mirror problem: ``grad_a = s G Bᵀ`` is O(lr) early on and
mixes gradients taken at very different factor scales.

Instead we average the W-gradient ``G`` itself, restricted to the tangent
space, through its frame coordinates ``Ŷ = G P_B B̂ᵀ`` and ``X̂ = Âᵀ P_A G``
(:mod:`adaprelora_jax.gram`), which do not change when the factors are
rescaled. Their EMAs, with Adam's bias correction, are mapped back to factor
gradients at the current factors (``s Ŷ L_Bᵀ``, ``s L_A X̂``) and fed to the
exact solve of SPEC §3. So with or without momentum the W-step is the exact
H-projection of an Adafactor direction: of ``G``'s running mean instead of
``G``. Memory: one ``A``-shaped and one ``B``-shaped buffer per pair.
"""

from __future__ import annotations

import jax

from adaprelora_jax.gram import Frames, small_matmul

Array = jax.Array


def update_momentum(mu_y: Array, mu_x: Array, grad_a: Array, grad_b: Array,
                    fr: Frames, a_grad_a: Array, a_mu_y: Array,
                    b1: Array | float, count: Array, *, unrolled: bool = False):
  """EMA of the frame coordinates ``(Ŷ, X̂)`` of the W-gradient.

  Args:
    mu_y, mu_x: the buffers, ``(m, r)`` and ``(r, n)``.
    grad_a, grad_b: this step's factor gradients.
    fr: the slice's frames.
    a_grad_a, a_mu_y: ``Aᵀ grad_a`` and ``Aᵀ mu_y`` (from the Gram stack).
    b1: the EMA coefficient.
    count: the step number (from 0), for bias correction.
    unrolled: see :func:`adaprelora_jax.gram.small_matmul`.

  Returns:
    ``((Ŷ̄, X̂̄), (mu_y, mu_x), Aᵀ Ŷ̄)``: the debiased means, the new buffers,
    and ``Aᵀ`` times the mean, which the solve needs.
  """
  mu_y = b1 * mu_y + (1.0 - b1) * small_matmul(grad_a, fr.to_y, unrolled)
  mu_x = b1 * mu_x + (1.0 - b1) * small_matmul(fr.to_x, grad_b, unrolled)
  debias = 1.0 - b1 ** (count + 1.0)
  a_mean = (b1 * a_mu_y + (1.0 - b1) * a_grad_a @ fr.to_y) / debias
  return (mu_y / debias, mu_x / debias), (mu_y, mu_x), a_mean
