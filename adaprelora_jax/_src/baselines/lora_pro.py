"""LoRA-Pro: factor gradients whose W-step best matches a W-space gradient.

In this package's layout, ``ΔW = s · A B`` with ``A (m, r)``, ``B (r, n)``,
and the factor gradients ``g_A = s G Bᵀ``, ``g_B = s Aᵀ G`` of a W-gradient
``G``. A factor step ``(g̃_A, g̃_B)`` moves ``W`` (to first order) by the
*equivalent gradient* ``s (g̃_A B + A g̃_B)``. LoRA-Pro picks the factor step
whose equivalent gradient is closest, in Frobenius norm, to a target ``G``.
With ``P = AᵀA`` and ``Q = BBᵀ`` the minimisers are

  ``g̃_A = s⁻² (I − A P⁻¹ Aᵀ) g_A Q⁻¹ − A X``,
  ``g̃_B = s⁻² P⁻¹ g_B + X B``,

for any ``r × r`` ``X``; their equivalent gradient is the Frobenius projection
``P_A G + (I − P_A) G P_B`` of ``G`` onto the tangent space ``{Y B + A Z}``,
whatever ``X``. LoRA-Pro fixes the gauge ``X`` by keeping ``(g̃_A, g̃_B)``
closest to ``(g_A, g_B)``, which is the Sylvester equation

  ``P X + X Q = −s⁻² P⁻¹ g_B Bᵀ``.

Everything here is ``r × r`` algebra on eigendecompositions of ``P`` and
``Q`` plus ``O((m + n) r²)`` products; the ``"full"`` variant also keeps
``m × n`` Adam moments.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import optax

from adaprelora_jax._src.base import Array, dot, vectorized
from adaprelora_jax._src.baselines.factor_adam import FactorMoments, adam_step
from adaprelora_jax._src.chain import Mask, with_decay_and_learning_rate
from adaprelora_jax._src import hyperparams
from adaprelora_jax._src.linalg import damped_eigh, inverse, sylvester
from adaprelora_jax._src.pairing import PairingRule
from adaprelora_jax._src.pairwise import pairwise_transformation

Variant = Literal["efficient", "full"]


def _adjust(a, b, grad_a, grad_b, *, scale, damping, gauge: bool = True):
  """LoRA-Pro's adjusted factor gradients of one slice (module docstring).

  With ``gauge=False`` the Sylvester solve is skipped (``X = 0``), which
  leaves the equivalent gradient unchanged.
  """
  eig_p = damped_eigh(dot(a.T, a), damping)
  eig_q = damped_eigh(dot(b, b.T), damping)
  inv_p, inv_q = inverse(eig_p), inverse(eig_q)
  inv_s2 = 1.0 / (scale * scale)
  grad_a_q = dot(grad_a, inv_q)                   # g_A Q⁻¹
  grad_b_p = inv_s2 * dot(inv_p, grad_b)         # s⁻² P⁻¹ g_B
  # (I − A P⁻¹ Aᵀ) g_A Q⁻¹ − A X, with one (m, r) @ (r, r) product for A.
  coef_a = inv_s2 * dot(inv_p, dot(a.T, grad_a), inv_q)
  adj_b = grad_b_p
  if gauge:
    x = sylvester(eig_p, eig_q, -dot(grad_b_p, b.T))
    coef_a, adj_b = coef_a + x, adj_b + dot(x, b)
  return inv_s2 * grad_a_q - dot(a, coef_a), adj_b


def lora_pro_gradients(
    a: Array,
    b: Array,
    grad_a: Array,
    grad_b: Array,
    *,
    scale: float | Array = 1.0,
    damping: float | Array = 0.0,
) -> tuple[Array, Array]:
  r"""LoRA-Pro's adjusted factor gradients ``(g̃_A, g̃_B)`` for ``ΔW = s · A B``.

  With ``P = AᵀA``, ``Q = BBᵀ`` and ``X`` the solution of
  ``P X + X Q = −s⁻² P⁻¹ g_B Bᵀ``::

    g̃_A = s⁻² (I − A P⁻¹ Aᵀ) g_A Q⁻¹ − A X
    g̃_B = s⁻² P⁻¹ g_B + X B

  ``s (g̃_A B + A g̃_B)`` is the Frobenius projection of the W-gradient behind
  ``(grad_a, grad_b)`` onto the tangent space ``{Y B + A Z}``, and among the
  pairs with that equivalent gradient ``(g̃_A, g̃_B)`` is the closest to
  ``(grad_a, grad_b)``. ``P`` and ``Q`` are damped to ``M + δI`` with
  ``δ = damping · tr(M)/r``, and inverted as pseudo-inverses, so zero factors
  give finite results.

  Args:
    a: ``A``, shape ``(..., m, r)``.
    b: ``B``, shape ``(..., r, n)``.
    grad_a: ``∂L/∂A = s G Bᵀ``, shape of ``a``.
    grad_b: ``∂L/∂B = s Aᵀ G``, shape of ``b``.
    scale: the LoRA scale ``s``.
    damping: relative damping of ``P`` and ``Q`` (``0`` for the exact
      method, which needs full-rank factors).

  Returns:
    ``(g̃_A, g̃_B)``, shaped like ``(a, b)``, in float32 or wider.

  References:
    Wang, Liang, He, Wang & Tan, `LoRA-Pro: Are Low-Rank Adapters Properly
    Optimized? <https://arxiv.org/abs/2407.18242>`_, ICLR 2025.
  """
  return vectorized(lambda *xs: _adjust(*xs, scale=scale, damping=damping),
                    "(m,r),(r,n),(m,r),(r,n)->(m,r),(r,n)")(a, b, grad_a, grad_b)


def solve_sylvester(p: Array, q: Array, c: Array, *,
                    damping: float | Array = 0.0) -> Array:
  """``X`` with ``(P + δ_P I) X + X (Q + δ_Q I) = C`` for symmetric PSD ``P``, ``Q``.

  The equation LoRA-Pro's gauge solves, with ``P = AᵀA``, ``Q = BBᵀ`` and
  ``C = −s⁻² P⁻¹ g_B Bᵀ``. In the eigenbases ``P = U diag(p) Uᵀ`` and
  ``Q = V diag(q) Vᵀ`` it is diagonal: ``X = U [(Uᵀ C V) / (p_i + q_j)] Vᵀ``
  (an entry with ``p_i + q_j = 0`` gets 0). ``δ = damping · tr(M)/r``.

  Shapes: ``p (..., r, r)``, ``q (..., k, k)``, ``c (..., r, k)``.
  """
  def one(p, q, c):
    return sylvester(damped_eigh(p, damping), damped_eigh(q, damping), c)
  return vectorized(one, "(r,r),(k,k),(r,k)->(r,k)")(p, q, c)


LoRAProState = FactorMoments
"""Adam moments of one LoRA pair: ``mu``, ``nu`` of the adjusted factor gradients
(``"efficient"``: ``((…, m, r), (…, r, n))``) or of the equivalent W-gradient
(``"full"``: ``(…, m, n)``), in float32 (or the factors' dtype if wider)."""


def scale_by_lora_pro(
    variant: Variant = "efficient",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    damping: float = 1e-6,
    lora_scale: float = 1.0,
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales LoRA factor gradients into LoRA-Pro's Adam directions.

  For every LoRA pair ``ΔW = s · A B`` (``A (m, r)``, ``B (r, n)``) found by
  :func:`~adaprelora_jax.lora_pairs`, with :func:`lora_pro_gradients`'
  adjustment ``adjust(g_A, g_B) = (g̃_A, g̃_B)`` at the current factors:

  * ``"efficient"`` (the authors' ``mode="efficient"``): Adam on the adjusted
    factor gradients, with factor-shaped moments (state ``O((m + n) r)``)::

      (g̃_A, g̃_B) = adjust(g_A, g_B)
      μ ← b1 μ + (1 − b1) g̃,   ν ← b2 ν + (1 − b2) g̃²,
      direction = μ̂ / (√ν̂ + ε)   (μ̂, ν̂ bias-corrected, per factor)

  * ``"full"`` (the authors' ``mode="full"``): Adam in W-space on the
    equivalent gradient, projected back onto the factors (state ``O(mn)``)::

      Ĝ = s (g̃_A B + A g̃_B) = P_A G + (I − P_A) G P_B
      M ← b1 M + (1 − b1) Ĝ,   V ← b2 V + (1 − b2) Ĝ²,   D = M̂ / (√V̂ + ε)
      direction = adjust(s D Bᵀ, s Aᵀ D)

    whose W-step ``s (dA B + A dB)`` is the Frobenius projection of ``D``; a
    full-rank adapter (``r ≥ min(m, n)``) thus steps ``W`` exactly as Adam.

  The result follows Optax's sign convention (like ``scale_by_adam``): chain
  with a negative learning-rate scaling, as :func:`lora_pro` does.

  Args:
    variant: ``"efficient"`` or ``"full"``, see above.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: added to Adam's denominator ``√ν̂``.
    damping: relative damping ``δ = damping · tr(M)/r`` of ``P = AᵀA`` and
      ``Q = BBᵀ`` before they are inverted and enter the Sylvester equation
      (the reference code takes ``pinv(M + 1e-8 I)``; a relative shift keeps
      the method's invariance to rescaling the factors).
    lora_scale: the LoRA scale ``s`` (``alpha / r`` in Qwix and PEFT, ``1``
      in ``flax.nnx.LoRA``).
    fallback: transformation for the leaves that are not LoRA factors;
      defaults to ``optax.scale_by_adam(b1, b2, eps)``.
    pairing: a rule naming LoRA factors (see :func:`lora_pairs`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``.

  References:
    Wang, Liang, He, Wang & Tan, `LoRA-Pro: Are Low-Rank Adapters Properly
    Optimized? <https://arxiv.org/abs/2407.18242>`_, ICLR 2025.
  """
  if variant not in ("efficient", "full"):
    raise ValueError(f"variant must be 'efficient' or 'full', got {variant!r}.")
  hyperparams.check("scale_by_lora_pro", b1=b1, b2=b2, eps=eps, damping=damping,
                    lora_scale=lora_scale)
  adjust = lambda a, b, ga, gb, **kw: _adjust(a, b, ga, gb, scale=lora_scale,
                                              damping=damping, **kw)
  adam = optax.scale_by_adam(b1, b2, eps)

  def slice_init(m: int, n: int, rank: int, dtype) -> LoRAProState:
    if variant == "full":
      return FactorMoments(jnp.zeros((m, n), dtype), jnp.zeros((m, n), dtype))
    zeros = (jnp.zeros((m, rank), dtype), jnp.zeros((rank, n), dtype))
    return FactorMoments(zeros, zeros)

  def slice_update(a, b, grad_a, grad_b, state: FactorMoments, extra, count):
    del extra
    if variant == "efficient":
      (delta_a, delta_b), state = adam_step(adjust(a, b, grad_a, grad_b), state, count, adam)
      return delta_a, delta_b, state
    # The gauge X does not change the equivalent gradient: skip its solve.
    adj_a, adj_b = adjust(a, b, grad_a, grad_b, gauge=False)
    equivalent = lora_scale * (dot(adj_a, b) + dot(a, adj_b))
    direction, state = adam_step(equivalent, state, count, adam)
    delta_a, delta_b = adjust(a, b, lora_scale * dot(direction, b.T),
                              lora_scale * dot(a.T, direction))
    return delta_a, delta_b, state

  return pairwise_transformation(
      "scale_by_lora_pro", slice_init, slice_update,
      fallback=optax.scale_by_adam(b1, b2, eps) if fallback is None else fallback,
      pairing=pairing)


def lora_pro(
    learning_rate: optax.ScalarOrSchedule,
    *,
    variant: Variant = "efficient",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    damping: float = 1e-6,
    lora_scale: float = 1.0,
    weight_decay: float = 0.0,
    mask: Mask = None,
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LoRA-Pro with Adam, chained like ``optax.adamw``.

  ``chain(scale_by_lora_pro(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``. The decoupled weight decay acts on
  the factors, as in the reference ``"efficient"`` optimizer (its ``"full"``
  mode instead shrinks each factor by ``√(1 − lr·wd)`` and decays the frozen
  base weight, which an optimizer of the adapter alone cannot touch).

  Example::

    tx = lora_pro(optax.warmup_cosine_decay_schedule(0, 2e-4, 50, 1000),
                  lora_scale=2.0)

  Args:
    learning_rate: a float or an Optax schedule.
    variant, b1, b2, eps, damping, lora_scale, fallback, pairing: see
      :func:`scale_by_lora_pro`.
    weight_decay: decoupled weight decay (as in ``optax.adamw``).
    mask: which leaves weight decay applies to, as in ``optax.adamw``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Wang, Liang, He, Wang & Tan, `LoRA-Pro: Are Low-Rank Adapters Properly
    Optimized? <https://arxiv.org/abs/2407.18242>`_, ICLR 2025.
  """
  return with_decay_and_learning_rate(
      scale_by_lora_pro(variant=variant, b1=b1, b2=b2, eps=eps, damping=damping,
                        lora_scale=lora_scale, fallback=fallback,
                        pairing=pairing),
      learning_rate, weight_decay, mask)
