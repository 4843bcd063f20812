"""LoRA+: Adam on both LoRA factors, with a larger learning rate for ``B``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from adaprelora_jax._src.baselines.factor_adam import adam_slice_functions
from adaprelora_jax._src.chain import Mask, with_decay_and_learning_rate
from adaprelora_jax._src import hyperparams
from adaprelora_jax._src.layout import ELEMENTWISE
from adaprelora_jax._src.pairing import PairingRule, default_rule, path_names
from adaprelora_jax._src.pairwise import pairwise_transformation

PyTree = Any


def _b_leaves(pairing: PairingRule | None) -> Callable[[PyTree], PyTree]:
  """A mask function: ``True`` on the leaves the pairing rule names ``b``.

  The rule's naming, not the pair's matrix reading, says which factor is
  LoRA's ``B``: a PyTorch-layout pair is read as ``ΔW = lora_B lora_A``, so
  its ``lora_B`` plays the matrix role ``A``, yet it is still the zero-init,
  output-side factor that LoRA+ speeds up.
  """
  rule = default_rule if pairing is None else pairing

  def is_b(path, _) -> bool:
    match = rule(path_names(path))
    return match is not None and match[1] == "b"

  return lambda tree: jax.tree_util.tree_map_with_path(is_b, tree)


def _adam_on_factors(b1: float, b2: float, eps: float,
                     fallback: optax.GradientTransformation | None,
                     pairing: PairingRule | None
                     ) -> optax.GradientTransformationExtraArgs:
  """Adam on every LoRA factor (pairs checked as for every method here)."""
  slice_init, slice_update = adam_slice_functions(
      lambda a, b, grad_a, grad_b: (grad_a, grad_b), b1, b2, eps)
  return pairwise_transformation(
      "scale_by_lora_plus", slice_init, slice_update,
      fallback=(optax.scale_by_adam(b1, b2, eps) if fallback is None
                else fallback),
      pairing=pairing, layout=ELEMENTWISE)


def scale_by_lora_plus(
    lr_ratio: float = 16.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam on both LoRA factors, with ``B``'s step ``lr_ratio`` times ``A``'s.

  For every LoRA pair found by :func:`~adaprelora_jax.lora_pairs`, each factor
  gets ``optax.scale_by_adam``'s direction, element by element, and the
  factor the pairing rule names ``b`` (``lora_b``, ``<name>_lora_b``,
  ``lora/b``, ``lora_B``) is multiplied by ``λ = lr_ratio``::

    dA = adam(∂L/∂A),    dB = λ · adam(∂L/∂B).

  In every supported naming, ``b`` is the factor LoRA+ calls ``B``: the one
  initialised to zero, next to the layer's output (``(r, n)`` in the Flax
  layout, ``lora_B (out, r)`` in the PyTorch layout). Other leaves get
  ``fallback`` and are not scaled.

  Args:
    lr_ratio: ``λ = η_B / η_A``; the paper recommends ``2⁴ = 16``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: added to the root of the second moment, as in ``optax.adam``.
    fallback: transformation for the leaves that are not LoRA factors;
      defaults to ``optax.scale_by_adam(b1, b2, eps)``.
    pairing: a rule naming LoRA factors (see
      :func:`~adaprelora_jax.lora_pairs`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``.

  References:
    Hayou, Ghosh & Yu, `LoRA+: Efficient Low Rank Adaptation of Large Models
    <https://arxiv.org/abs/2402.12354>`_, 2024.
  """
  hyperparams.check("scale_by_lora_plus", lr_ratio=lr_ratio, b1=b1, b2=b2, eps=eps)
  return optax.chain(_adam_on_factors(b1, b2, eps, fallback, pairing),
                     optax.masked(optax.scale(lr_ratio), _b_leaves(pairing)))


def lora_plus(
    learning_rate: optax.ScalarOrSchedule,
    *,
    lr_ratio: float = 16.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Mask = None,
    fallback: optax.GradientTransformation | None = None,
    pairing: PairingRule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LoRA+ (Hayou, Ghosh & Yu, 2024): AdamW with ``η_B = lr_ratio · η_A``.

  AdamW on every leaf, in the shape of ``optax.adamw``, where the LoRA ``B``
  factors (see :func:`scale_by_lora_plus`) use the learning rate
  ``lr_ratio · learning_rate``. As with PyTorch parameter groups, ``B``'s
  larger learning rate scales its decoupled weight decay too.

  Example::

    tx = lora_plus(optax.warmup_cosine_decay_schedule(0, 2e-4, 50, 1000))
    updates, opt_state = tx.update(grads, opt_state, lora_params)

  Args:
    learning_rate: ``η_A``, a float or an Optax schedule.
    lr_ratio, b1, b2, eps, fallback, pairing: see :func:`scale_by_lora_plus`.
    weight_decay: decoupled weight decay (as in ``optax.adamw``).
    mask: which leaves weight decay applies to (a tree of bools or a
      function of the params), as in ``optax.adamw``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Hayou, Ghosh & Yu, `LoRA+: Efficient Low Rank Adaptation of Large Models
    <https://arxiv.org/abs/2402.12354>`_, 2024.
  """
  hyperparams.check("lora_plus", lr_ratio=lr_ratio, b1=b1, b2=b2, eps=eps)
  # The ratio is applied last; scalings commute, so it multiplies B's whole
  # step, decay included, like a larger learning rate.
  return optax.chain(
      with_decay_and_learning_rate(
          _adam_on_factors(b1, b2, eps, fallback, pairing), learning_rate,
          weight_decay, mask),
      optax.masked(optax.scale(lr_ratio), _b_leaves(pairing)))
