"""LoRA-RITE: transformation-invariant matrix preconditioning of LoRA factors."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import optax

from adaprelora_jax._src import linalg
from adaprelora_jax._src.base import Array, dot
from adaprelora_jax._src.chain import Mask, with_decay_and_learning_rate
from adaprelora_jax._src import hyperparams
from adaprelora_jax._src.pairing import PairingRule
from adaprelora_jax._src.pairwise import pairwise_transformation


class LoRARITEState(NamedTuple):
  """Per-pair state of :func:`scale_by_lora_rite` (the pair's batch axes first).

  ``A``'s moments are kept in the coordinates of ``B``'s orthonormal row frame
  and ``B``'s in those of ``A``'s column frame, which is what makes them
  independent of how ``ΔW`` is split between the factors. Moments are raw
  EMAs, bias-corrected when used (as in ``optax.scale_by_adam``).

  Attributes:
    basis_a: ``A``'s column frame ``Q_A = A R_A⁻¹ (m, r)`` at the last step.
    basis_b: ``B``'s row frame ``Q_Bᵀ = R_B⁻ᵀ B (r, n)`` at the last step.
    mu_a: first moment of ``A``'s preconditioned unmagnified gradient ``(m, r)``.
    mu_b: the same for ``B``, ``(r, n)``.
    nu_a: second moment of ``A``'s unmagnified gradient, ``(r, r)``.
    nu_b: the same for ``B``, ``(r, r)``.
    escaped_a: ``A``'s escaped mass ``ρ_A``, a scalar.
    escaped_b: ``B``'s escaped mass ``ρ_B``, a scalar.
  """

  basis_a: Array
  basis_b: Array
  mu_a: Array
  mu_b: Array
  nu_a: Array
  nu_b: Array
  escaped_a: Array
  escaped_b: Array

  def axes(self) -> LoRARITEState:
    """Each buffer's axes, for :mod:`adaprelora_jax._src.sharding`."""
    return LoRARITEState(("m", "r"), ("r", "n"), ("m", "r"), ("r", "n"), ("r", "r"),
                         ("r", "r"), (), ())


def _escaped_mass(nu: Array, moved: Array) -> Array:
  """``max_i λ_i(ν) − λ_i(P ν Pᵀ)``: the spectrum a basis change projected away.

  ``P`` is a contraction, so every sorted eigenvalue can only shrink.
  """
  lost = linalg.eigvals(nu) - linalg.eigvals(moved)
  return jnp.maximum(jnp.max(lost), 0.0)


def _rms(x: Array) -> Array:
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def scale_by_lora_rite(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    damping: float = 1e-6,
    escaped_mass: bool = True,
    clipping_threshold: float | None = None,
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales LoRA factor gradients by LoRA-RITE's invariant matrix preconditioner.

  For every LoRA pair ``ΔW = s · A B`` (``A (m, r)``, ``B (r, n)``) found by
  :func:`~adaprelora_jax.lora_pairs`, each factor's gradient is
  preconditioned in an orthonormal frame of the *other* factor. With
  factorisations ``A = Q_A R_A`` and ``Bᵀ = Q_B R_B`` (``Q`` orthonormal,
  ``R`` invertible ``r × r``), the update of ``A`` at step ``t`` is

  .. math::

    ḡ_A &= g_A R_B^{-1} \quad (= s\, G Q_B, \text{ the unmagnified gradient}) \\
    P_A &= Q_{B,t}ᵀ Q_{B,t-1} \\
    V_A &← β_2 P_A V_A P_Aᵀ + (1 − β_2)\, ḡ_Aᵀ ḡ_A / m \\
    ρ_A &← β_2 \big(ρ_A + \max_i [λ_i(V_A) − λ_i(P_A V_A P_Aᵀ)]\big) \\
    S_A &= ḡ_A\, (\hat V_A + \hat ρ_A I)^{-1/2}_ε \\
    M_A &← β_1 M_A P_Aᵀ + (1 − β_1)\, S_A \\
    Δ_A &= \hat M_A R_B^{-ᵀ}

  and ``B``'s is its mirror image (``ḡ_B = R_A^{-ᵀ} g_B = s Q_Aᵀ G``,
  ``V_B ← … + ḡ_B ḡ_Bᵀ / n``, ``Δ_B = R_A^{-1} \hat M_B``). Hats are Adam's
  bias corrections, ``X^{-1/2}_ε = U diag(1/(√λ + ε)) Uᵀ``, and ``ρ``, the
  *escaped mass*, keeps the second moment from shrinking when the frame turns
  out of its old span. The W-step ``s (Δ_A B + A Δ_B) = s (\hat M_A Q_Bᵀ + Q_A
  \hat M_B)`` is invariant under every reparametrisation ``(A, B) → (A S,
  S⁻¹ B)``. The state is ``O((m + n) r + r²)`` per pair.

  Any orthonormal frames give the same W-step (the moments turn with them),
  so the choice is numerical. The authors' code takes QR and pseudo-inverses
  of ``R``; here ``R`` is the damped symmetric root, ``R_A = (AᵀA + δ I)^½``
  with ``δ = damping · tr(AᵀA)/r + tiny`` (``docs/derivation.md``, damping), and ``Q_A = A R_A⁻¹``,
  the polar factor (:func:`~adaprelora_jax._src.linalg.damped_sqrt`). The
  pseudo-inverse inverts round-off when a factor is numerically
  rank-deficient (as a low-rank gradient at ``B = 0`` init makes ``B``): the
  partner then takes huge steps whose second-order term ``Δ_A Δ_B`` wrecks
  ``W``. Damping caps the magnification at ``1/√δ`` and keeps the update
  exactly invariant to scaled rotations ``S = c O``, and to any ``S`` up to
  about ``damping`` times its squared condition number; ``damping = 0`` is
  the paper's algorithm.
  A zero factor (``B = 0`` at ``flax.nnx.LoRA`` init) has the zero frame, so
  its partner's step is zero (as its gradient is) and its moments start afresh
  at the first nonzero frame, as with the authors' zero-initialised frames.

  Also unlike the authors' PyTorch port, its global clipping of the
  unmagnified gradients' norm and its skipping of steps with a large one are
  left out (they need every pair at once; chain ``optax.clip_by_global_norm``
  or ``optax.apply_if_finite`` instead), and the escaped mass, off by default
  there, is on here as in the paper's algorithm.

  The result follows Optax's sign convention (like ``scale_by_adam``): chain
  with a negative learning-rate scaling, as :func:`lora_rite` does.

  Args:
    b1: first-moment decay.
    b2: second-moment decay, also the decay of the escaped mass.
    eps: added to the square roots of the second moment's eigenvalues (the
      authors' default).
    damping: relative damping of the factors' Gram matrices (see above).
    escaped_mass: whether to add the escaped mass ``ρ I`` to the second moment.
    clipping_threshold: if set, ``\hat M`` of each factor is scaled down to
      this RMS before mapping back (the port's ``update_capping``; invariant).
    fallback: transformation for the leaves that are not LoRA factors;
      defaults to ``optax.scale_by_adam(b1, b2, eps)``.
    pairing: a rule naming LoRA factors (see :func:`lora_pairs`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``.

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  hyperparams.check("scale_by_lora_rite", optional=("clipping_threshold",), b1=b1, b2=b2,
                    eps=eps, damping=damping, clipping_threshold=clipping_threshold)

  def slice_init(m: int, n: int, rank: int, dtype) -> LoRARITEState:
    zeros = lambda *shape: jnp.zeros(shape, dtype)
    return LoRARITEState(
        basis_a=zeros(m, rank), basis_b=zeros(rank, n), mu_a=zeros(m, rank),
        mu_b=zeros(rank, n), nu_a=zeros(rank, rank), nu_b=zeros(rank, rank),
        escaped_a=zeros(), escaped_b=zeros())

  def factor_step(grad, mu, nu, escaped, frame, old_frame, inverse, count):
    """A factor, tall ``(d, r)``; its partner (``r × k``) is ``inverse⁻¹ frame``."""
    unmagnified = dot(grad, inverse.T)
    move = dot(frame, old_frame.T)
    moved = dot(move, nu, move.T)
    if escaped_mass:
      escaped = b2 * (escaped + _escaped_mass(nu, moved))
    nu = b2 * moved + (1.0 - b2) * dot(unmagnified.T, unmagnified) / grad.shape[0]
    steps = optax.safe_increment(count)
    second = optax.tree_utils.tree_bias_correction(
        nu + escaped * jnp.eye(nu.shape[0], dtype=nu.dtype), b2, steps)
    mu = b1 * dot(mu, move.T) + (1.0 - b1) * dot(unmagnified, linalg.inverse_root(second, eps))
    direction = optax.tree_utils.tree_bias_correction(mu, b1, steps)
    if clipping_threshold is not None:
      direction = direction / jnp.maximum(1.0, _rms(direction) / clipping_threshold)
    return dot(direction, inverse), mu, nu, escaped

  def slice_update(a, b, grad_a, grad_b, state: LoRARITEState, extra, count):
    """``A`` in ``B``'s row frame, ``B`` (transposed) in ``A``'s column frame."""
    del extra
    _, inv_a = linalg.damped_sqrt(dot(a.T, a), damping)
    _, inv_b = linalg.damped_sqrt(dot(b, b.T), damping)
    frame_a, frame_b = dot(a, inv_a.T), dot(inv_b, b)
    delta_a, mu_a, nu_a, escaped_a = factor_step(
        grad_a, state.mu_a, state.nu_a, state.escaped_a, frame_b,
        state.basis_b, inv_b, count)
    delta_b, mu_b, nu_b, escaped_b = factor_step(
        grad_b.T, state.mu_b.T, state.nu_b, state.escaped_b, frame_a.T,
        state.basis_a.T, inv_a, count)
    return delta_a, delta_b.T, LoRARITEState(
        basis_a=frame_a, basis_b=frame_b, mu_a=mu_a, mu_b=mu_b.T, nu_a=nu_a,
        nu_b=nu_b, escaped_a=escaped_a, escaped_b=escaped_b)

  return pairwise_transformation(
      "scale_by_lora_rite", slice_init, slice_update,
      fallback=optax.scale_by_adam(b1, b2, eps) if fallback is None else fallback,
      pairing=pairing)


def lora_rite(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    damping: float = 1e-6,
    escaped_mass: bool = True,
    clipping_threshold: float | None = None,
    weight_decay: float = 0.0,
    mask: Mask = None,
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
) -> optax.GradientTransformationExtraArgs:
  """LoRA-RITE (Yen et al., 2025), chained like ``optax.adamw``.

  ``chain(scale_by_lora_rite(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``.

  Args:
    learning_rate: a float or an Optax schedule.
    b1, b2, eps, damping, escaped_mass, clipping_threshold, fallback, pairing: see
      :func:`scale_by_lora_rite`.
    weight_decay: decoupled weight decay (as in ``optax.adamw``).
    mask: which leaves weight decay applies to, as in ``optax.adamw``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  return with_decay_and_learning_rate(
      scale_by_lora_rite(b1=b1, b2=b2, eps=eps, damping=damping,
                         escaped_mass=escaped_mass,
                         clipping_threshold=clipping_threshold,
                         fallback=fallback, pairing=pairing),
      learning_rate, weight_decay, mask)
