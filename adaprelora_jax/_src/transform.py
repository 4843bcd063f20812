"""``scale_by_adaprelora``: the AdaPreLoRA direction as an Optax transformation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaprelora_jax._src import adaprelora_slice as one_slice
from adaprelora_jax._src import hyperparams
from adaprelora_jax._src.base import Array, PairState, WeightStats
from adaprelora_jax._src.hyperparams import DEFAULTS, OPTIONAL, Hyperparams
from adaprelora_jax._src.layout import JOINED, Layout
from adaprelora_jax._src.pairing import LoRAPair, LoRAPairing, PairingRule
from adaprelora_jax._src.pairwise import PairwiseState, pairwise_transformation

Statistics = Literal["auto", "tangent", "full"]

ScaleByAdaPreLoRAState = PairwiseState
"""State of :func:`scale_by_adaprelora`: ``count``, a :class:`PairState` per pair key in
``pairs``, and the ``fallback`` transformation's state."""


def _weight_stats(pair: LoRAPair, stats: WeightStats | tuple[Array, Array]
                  ) -> tuple[Array, Array]:
  """``stats`` checked against ``pair`` and shaped ``(*batch, m)``, ``(*batch, n)``.

  Values already on the host (NumPy, Python) are checked here. Device arrays
  are not read back, which would cost a transfer and a sync per step: the
  update clamps negative ones at 0, and a non-finite one skips the slice's step
  and counts it (:func:`~adaprelora_jax.skipped_steps`).
  """
  batch = pair.batch_shape
  out = []
  for name, value, size in zip(("row", "col"), stats, (pair.m, pair.n)):
    concrete = None if isinstance(value, jax.Array) else np.asarray(value)
    value = jnp.asarray(value)
    where = f"weight_stats[{pair.key!r}].{name}"
    if value.shape[: len(batch)] != batch or value.size != math.prod(batch) * size:
      raise ValueError(
          f"{where} has shape {value.shape}; expected "
          f"{(*batch, size)} for A {pair.a_path} and B {pair.b_path}.")
    if concrete is not None and not (np.all(np.isfinite(concrete)) and np.all(concrete >= 0)):
      raise ValueError(f"{where} must be finite and >= 0 (mean squares); its smallest entry "
                       f"is {np.nanmin(concrete)!r} and it has "
                       f"{np.count_nonzero(~np.isfinite(concrete))} non-finite entries.")
    out.append(value.reshape(*batch, size))
  return out[0], out[1]


def scale_by_adaprelora(
    b1: float | None = DEFAULTS.b1,
    decay_rate: float = DEFAULTS.decay_rate,
    b2: float | None = DEFAULTS.b2,
    eps: float = DEFAULTS.eps,
    damping: float = DEFAULTS.damping,
    lora_scale: float = DEFAULTS.lora_scale,
    clipping_threshold: float | None = DEFAULTS.clipping_threshold,
    statistics: Statistics = "auto",
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
    balancing: float | None = DEFAULTS.balancing,
    factor_clipping: float | None = DEFAULTS.factor_clipping,
    layout: Layout = JOINED,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales LoRA factor gradients into AdaPreLoRA's factor directions.

  For every LoRA pair ``ΔW = s · A B`` found by :func:`lora_pairs`, keeps
  Adafactor's factored second moments ``v_row (…, m)``, ``v_col (…, n)`` of a
  W-space gradient statistic ``S`` and returns the factor directions
  ``(dA, dB)`` of :func:`solve_factor_update`: the factor step whose W-space
  effect is the ``H``-orthogonal projection of Adafactor's direction
  ``diag(ℓ)⁻¹ G diag(ρ)⁻¹`` onto the LoRA tangent space, with minimal
  ``H``-weighted imbalance between the two factors' contributions
  (``docs/derivation.md``; :mod:`adaprelora_jax._src.adaprelora_slice` runs it step by step).

  Statistics (``statistics``):

  * ``"full"``: ``S = G``, exact Adafactor statistics. ``update`` then needs
    ``weight_stats={pair_key: WeightStats(row, col)}``, the row and column
    mean squares of the true W-gradient.
  * ``"tangent"``: ``S = P_T(G)``, the minimum-norm W-gradient consistent with
    the factor gradients, computed in factored form (rank ``≤ 2r``) at no
    extra cost and with any LoRA library.
  * ``"auto"``: ``full`` for the pairs present in ``weight_stats``, else
    ``tangent``.

  The learning rate controls every factor's step, not only the W-step's
  (``docs/derivation.md``, "The learning rate and the factors"): where one
  factor is near zero (``B = 0`` at init) the exact update moves the other by
  ``O(|D| / |B|)`` whatever the learning rate, and along directions the
  target does not use that feeds a drift of ``|A|`` up and ``|B|`` down. Two
  additions control it: a gauge term ``(A Ω, −Ω B)`` that moves no ``W`` and
  pulls ``AᵀA`` and ``BBᵀ`` towards balance (``balancing``), and a bound on
  each factor direction's RMS (``factor_clipping``), so no factor entry moves
  faster in RMS than ``lr · factor_clipping`` per step. On balanced factors
  the first is zero, and the second binds only on steps larger than that;
  ``balancing=None, factor_clipping=None`` is the paper's update exactly.

  Inputs anywhere in the float range are handled: each slice is computed at
  unit scale (powers of two), and a slice whose step or state would not be
  representable keeps its state and steps by zero.

  The result follows Optax's sign convention (like ``scale_by_adam``): chain
  with a negative learning-rate scaling, as :func:`adaprelora` does.

  Args:
    b1: momentum coefficient in ``[0, 1)``, or ``None`` for none (the
      default, as in Adafactor). The average is of the W-gradient in
      scale-free factor frames, not of factor directions.
    decay_rate: Adafactor's second-moment schedule
      ``β̂_t = 1 − (t+1)^(−decay_rate)``, used when ``b2`` is ``None``.
    b2: a constant second-moment decay, with bias correction, instead.
    eps: added to the squared statistic, as in Adafactor.
    damping: relative damping of the ``r × r`` solves: ``M + δ I`` with
      ``δ = damping · tr(M)/r``. It bounds the gain of a factor's
      near-zero singular values on its partner's step.
    lora_scale: the LoRA scale ``s`` (``alpha / r`` in Qwix, ``1`` in
      ``flax.nnx.LoRA``).
    clipping_threshold: Adafactor's update clipping: the factor directions are
      scaled down so that the RMS of their first-order W-step is at most this
      (``None`` to disable).
    statistics: ``"auto"``, ``"tangent"`` or ``"full"``, see above.
    fallback: transformation for the leaves that are not LoRA factors
      (biases, norms, heads); defaults to ``optax.scale_by_adam()``.
    pairing: a rule naming LoRA factors (see :func:`lora_pairs`). Under
      ``optax.inject_hyperparams``, list it in ``static_args``.
    balancing: the rate ``γ`` of the balancing gauge term, per unit of
      learning rate (``None``: none, the paper's update).
    factor_clipping: the largest RMS of each factor's direction (``None``:
      no bound, the paper's update). Where it binds, the W-step is the exact
      one scaled down factor by factor, and the invariances to the factors'
      scale and to ``lora_scale`` hold only up to it, as for Adam.
    layout: how pairs are laid out into one program
      (:mod:`adaprelora_jax._src.layout`): :data:`~adaprelora_jax.JOINED`
      (the default, for accelerators) or
      :data:`~adaprelora_jax.CHUNKED` (for XLA's CPU runtime). Same
      updates either way.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``params`` (required) and an optional ``weight_stats``.

  Raises:
    TypeError: for a hyperparameter that is not a float (a bool, a schedule:
      wrap the optimizer in ``optax.inject_hyperparams`` for one), naming it.
    ValueError: for an out-of-range hyperparameter, naming it.

  References:
    Liu, Bian & Cai, `AdaPreLoRA: Adafactor Preconditioned Low-Rank Adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.

    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  hyper = Hyperparams(**{name: value for name, value in locals().items()
                         if name in Hyperparams._fields})
  if statistics not in ("auto", "tangent", "full"):
    raise ValueError(f"statistics must be 'auto', 'tangent' or 'full', got "
                     f"{statistics!r}.")
  hyperparams.check("scale_by_adaprelora", optional=OPTIONAL, **hyper._asdict())

  def slice_init(m: int, n: int, rank: int, dtype) -> PairState:
    return one_slice.init(m, n, rank, dtype, with_momentum=b1 is not None)

  def slice_update(a, b, grad_a, grad_b, state: PairState, stats, count):
    return one_slice.update(hyper, one_slice.Slice(a, b, grad_a, grad_b), state, stats, count)

  def pair_extras(pairs: LoRAPairing, extra_args: Mapping[str, Any]
                  ) -> dict[str, tuple[Array, Array]]:
    """The exact statistics per pair, from ``update(..., weight_stats=...)``."""
    weight_stats = dict(extra_args.get("weight_stats") or {})
    keys = {p.key for p in pairs.pairs}
    unknown = set(weight_stats) - keys
    if unknown:
      raise ValueError(f"weight_stats has unknown pair keys {sorted(unknown)}; "
                       f"the LoRA pairs are {sorted(keys)}.")
    if statistics == "full":
      missing = sorted(keys - set(weight_stats))
      if missing:
        raise ValueError(f"statistics='full' needs weight_stats for every "
                         f"LoRA pair; missing: {missing}.")
    if statistics == "tangent":
      return {}
    return {p.key: _weight_stats(p, weight_stats[p.key])
            for p in pairs.pairs if p.key in weight_stats}

  return pairwise_transformation(
      "scale_by_adaprelora", slice_init, slice_update,
      fallback=optax.scale_by_adam() if fallback is None else fallback,
      pairing=pairing, pair_extras=pair_extras, layout=layout)
