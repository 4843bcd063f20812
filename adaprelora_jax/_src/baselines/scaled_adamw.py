"""ScaledGD and ScaledAdamW: Riemannian-preconditioned LoRA optimizers."""

from __future__ import annotations

import optax

from adaprelora_jax._src.base import Array, dot
from adaprelora_jax._src.baselines.factor_adam import adam_slice_functions
from adaprelora_jax._src.chain import Mask, with_decay_and_learning_rate
from adaprelora_jax._src import hyperparams
from adaprelora_jax._src.linalg import damped_inverse
from adaprelora_jax._src.pairing import PairingRule
from adaprelora_jax._src.pairwise import pairwise_transformation


def scaled_gradients(a: Array, b: Array, grad_a: Array, grad_b: Array,
                     damping: float | Array) -> tuple[Array, Array]:
  """``(g_A (BBᵀ + δ)⁻¹, (AᵀA + δ)⁻¹ g_B)`` for one ``(m,r)``/``(r,n)`` slice."""
  return (dot(grad_a, damped_inverse(dot(b, b.T), damping)),
          dot(damped_inverse(dot(a.T, a), damping), grad_b))


def scale_by_scaled_gd(
    damping: float = 1e-6,
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales LoRA factor gradients by the Riemannian ``r × r`` preconditioner.

  For every LoRA pair ``ΔW = s · A B`` (``A (m, r)``, ``B (r, n)``) found by
  :func:`~adaprelora_jax.lora_pairs`, returns the scaled gradients::

    dA = g_A (B Bᵀ + δ_B I)⁻¹,    dB = (Aᵀ A + δ_A I)⁻¹ g_B,
    δ_M = damping · tr(M) / r + tiny.

  With ``g_A = s G Bᵀ`` and ``g_B = s Aᵀ G`` (``G = ∂L/∂W``) and no damping,
  the first-order W-step is ``s (dA B + A dB) = s² (G P_B + P_A G)``, with
  ``P_A``, ``P_B`` the orthogonal projections onto ``A``'s columns and
  ``B``'s rows: the gradient projected onto the fixed-rank manifold's
  tangent space, the same for every factorisation ``(A S, S⁻¹ B)`` of ``ΔW``.

  Choices (the authors' code does the same unless noted):

  * the preconditioner omits the LoRA scale ``s``, so the W-step carries
    ``s²``; fold it into the learning rate;
  * the damping is relative to the Gram's trace (the authors add an absolute
    ``1e-6``), so ``(A, B) → (cA, B/c)`` does not change the W-step. A zero
    ``B`` (LoRA's init) still gives a finite step: its ``g_A = s G Bᵀ`` is
    zero, so only ``B`` moves (a part of a factor gradient that no
    W-gradient produces would be amplified by ``1/δ`` there);
  * both preconditioners use the current factors (the authors' GPT-2 code
    preconditions ``B``'s gradient with the already-updated ``A``).

  Args:
    damping: relative damping ``δ`` of the ``r × r`` inverses (``0`` for the
      exact method, which needs full-rank factors).
    fallback: transformation for the leaves that are not LoRA factors;
      defaults to ``optax.identity()`` (plain gradient descent).
    pairing: a rule naming LoRA factors (see
      :func:`~adaprelora_jax.lora_pairs`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``.

  References:
    Zhang & Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models <https://arxiv.org/abs/2402.02347>`_, ICML 2024.
  """
  hyperparams.check("scale_by_scaled_gd", damping=damping)

  def slice_update(a, b, grad_a, grad_b, state, extra, count):
    del extra, count
    return *scaled_gradients(a, b, grad_a, grad_b, damping), state

  return pairwise_transformation(
      "scale_by_scaled_gd", lambda m, n, rank, dtype: (), slice_update,
      fallback=optax.identity() if fallback is None else fallback,
      pairing=pairing)


def scale_by_scaled_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    damping: float = 1e-6,
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam on the Riemannian-preconditioned LoRA factor gradients.

  For every LoRA pair ``ΔW = s · A B``, keeps Adam's moments of the scaled
  gradients of :func:`scale_by_scaled_gd` and returns Adam's direction::

    g̃_A = g_A (B Bᵀ + δ_B I)⁻¹,    g̃_B = (Aᵀ A + δ_A I)⁻¹ g_B,
    (dA, dB) = scale_by_adam(b1, b2, eps)(g̃_A, g̃_B).

  State per slice: Adam's ``mu`` and ``nu`` for ``A (m, r)`` and
  ``B (r, n)``. Adam's normalisation makes the scale ``s`` (left out of the
  preconditioner, as in the authors' code) irrelevant, up to ``eps``.

  Args:
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: added to the root of the second moment, as in ``optax.adam``.
    damping: relative damping of the ``r × r`` inverses, see
      :func:`scale_by_scaled_gd`.
    fallback: transformation for the leaves that are not LoRA factors;
      defaults to ``optax.scale_by_adam(b1, b2, eps)``.
    pairing: a rule naming LoRA factors (see
      :func:`~adaprelora_jax.lora_pairs`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``.

  References:
    Zhang & Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models <https://arxiv.org/abs/2402.02347>`_, ICML 2024.
  """
  hyperparams.check("scale_by_scaled_adam", b1=b1, b2=b2, eps=eps, damping=damping)
  slice_init, slice_update = adam_slice_functions(
      lambda a, b, grad_a, grad_b: scaled_gradients(a, b, grad_a, grad_b,
                                                    damping), b1, b2, eps)
  return pairwise_transformation(
      "scale_by_scaled_adam", slice_init, slice_update,
      fallback=(optax.scale_by_adam(b1, b2, eps) if fallback is None
                else fallback),
      pairing=pairing)


def scaled_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    damping: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Mask = None,
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ScaledAdamW: AdamW on Riemannian-preconditioned LoRA factor gradients.

  ``chain(scale_by_scaled_adam(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``, in the shape of ``optax.adamw``.

  Args:
    learning_rate: a float or an Optax schedule.
    b1, b2, eps, damping, fallback, pairing: see :func:`scale_by_scaled_adam`.
    weight_decay: decoupled weight decay (as in ``optax.adamw``).
    mask: which leaves weight decay applies to, as in ``optax.adamw``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Zhang & Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models <https://arxiv.org/abs/2402.02347>`_, ICML 2024.
  """
  return with_decay_and_learning_rate(
      scale_by_scaled_adam(b1=b1, b2=b2, eps=eps, damping=damping,
                           fallback=fallback, pairing=pairing),
      learning_rate, weight_decay, mask)


def scaled_gd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Mask = None,
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ScaledGD: gradient descent on Riemannian-preconditioned LoRA factors.

  ``chain(scale_by_scaled_gd(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``. Non-LoRA leaves get plain
  gradient descent unless ``fallback`` says otherwise.

  Args:
    learning_rate: a float or an Optax schedule.
    damping, fallback, pairing: see :func:`scale_by_scaled_gd`.
    weight_decay: decoupled weight decay (as in ``optax.adamw``).
    mask: which leaves weight decay applies to, as in ``optax.adamw``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Zhang & Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models <https://arxiv.org/abs/2402.02347>`_, ICML 2024.
  """
  return with_decay_and_learning_rate(
      scale_by_scaled_gd(damping=damping, fallback=fallback, pairing=pairing),
      learning_rate, weight_decay, mask)
