"""``adaprelora``: the ready-to-use optimizer, chained like ``optax.adamw``."""

from __future__ import annotations

import optax

from adaprelora_jax._src.chain import Mask, with_decay_and_learning_rate
from adaprelora_jax._src.hyperparams import DEFAULTS
from adaprelora_jax._src.layout import JOINED, Layout
from adaprelora_jax._src.pairing import PairingRule
from adaprelora_jax._src.transform import Statistics, scale_by_adaprelora


def adaprelora(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float | None = DEFAULTS.b1,
    decay_rate: float = DEFAULTS.decay_rate,
    b2: float | None = DEFAULTS.b2,
    eps: float = DEFAULTS.eps,
    damping: float = DEFAULTS.damping,
    lora_scale: float = DEFAULTS.lora_scale,
    clipping_threshold: float | None = DEFAULTS.clipping_threshold,
    weight_decay: float = 0.0,
    mask: Mask = None,
    statistics: Statistics = "auto",
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
    balancing: float | None = DEFAULTS.balancing,
    factor_clipping: float | None = DEFAULTS.factor_clipping,
    layout: Layout = JOINED,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaPreLoRA: Adafactor-preconditioned LoRA (Liu, Bian & Cai, 2026).

  ``chain(scale_by_adaprelora(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``. LoRA pairs get AdaPreLoRA's
  closed-form factor step, the exact lift of Adafactor's W-space direction;
  other leaves get ``fallback`` (``scale_by_adam`` by default), then the same
  decoupled weight decay and learning rate.

  Example::

    tx = adaprelora(optax.warmup_cosine_decay_schedule(0, 3e-4, 50, 1000))
    opt_state = tx.init(lora_params)
    updates, opt_state = tx.update(grads, opt_state, lora_params)

  Args:
    learning_rate: a float or an Optax schedule.
    b1, decay_rate, b2, eps, damping, lora_scale, clipping_threshold,
      statistics, fallback, pairing, balancing, factor_clipping, layout: see
      :func:`scale_by_adaprelora`.
    weight_decay: decoupled weight decay (as in ``optax.adamw``).
    mask: which leaves weight decay applies to (a tree of bools or a
      function of the params), as in ``optax.adamw``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and accepts ``weight_stats`` (see :func:`scale_by_adaprelora`).

  References:
    Liu, Bian & Cai, `AdaPreLoRA: Adafactor Preconditioned Low-Rank Adaptation
    <https://arxiv.org/abs/2605.08734>`_, 2026.

    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  direction = {name: value for name, value in locals().items()
               if name not in ("learning_rate", "weight_decay", "mask")}
  return with_decay_and_learning_rate(scale_by_adaprelora(**direction), learning_rate,
                                      weight_decay, mask)
