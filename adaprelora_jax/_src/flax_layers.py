"""Flax LoRA layers whose backward pass emits exact W-gradient statistics.

Drop-in counterparts of ``flax.nnx.LoRALinear`` (NNX) and of a LoRA
``nn.Dense`` (Linen): ``y = x @ W + s · (x @ A) @ B (+ bias)`` with the kernel
``W`` frozen, where differentiating with respect to the layer's
``weight_stats`` leaf returns ``WeightStats(row=mean_j G_ij², col=mean_i
G_ij²)`` of the true kernel gradient ``G`` (see
:mod:`adaprelora_jax._src.full_stats`). :func:`~adaprelora_jax.functional.split_weight_stats`
keys them like :func:`~adaprelora_jax.lora_pairs` keys the layer's
factors, so AdaPreLoRA runs with ``statistics="full"``::

  wrt = nnx.Any(nnx.LoRAParam, WeightStatsVar)
  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
  lora_grads, stats = split_weight_stats(grads)
  updates, opt_state = tx.update(lora_grads, opt_state, lora_params,
                                 weight_stats=stats)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx
from jax import lax

from adaprelora_jax._src.full_stats import (Method, linear_with_weight_stats,
                                       weight_stats_probe)

Array = jax.Array


class WeightStatsVar(nnx.Variable):
  """Holds a :class:`~adaprelora_jax.WeightStats` probe of zeros.

  Its value is never read; its gradient is the statistics. It is not a
  ``Param``, so ``nnx.Param`` and ``nnx.LoRAParam`` filters leave it out;
  select it with ``nnx.Any(nnx.LoRAParam, WeightStatsVar)``.
  """


class LoRALinearWithStats(nnx.LoRALinear):
  """``nnx.LoRALinear`` whose gradient also carries ``G``'s mean squares.

  Same constructor, parameters and state layout as ``nnx.LoRALinear``
  (``kernel``, ``bias``, ``lora/lora_a``, ``lora/lora_b``), plus
  ``lora/weight_stats``, a :class:`WeightStatsVar` next to the factors, so
  its statistics are keyed like the pair, ``…/lora``.

  Args:
    in_features, out_features: ``m`` and ``n``.
    lora_rank: ``r``.
    lora_scale: ``s`` in ``y = x W + s (x A) B``; ``nnx.LoRALinear`` has
      ``s = 1``. Pass the same value to the optimizer's ``lora_scale``.
    stats_method: ``"auto"``, ``"dense"`` or ``"gram"``, see
      :func:`~adaprelora_jax.functional.linear_with_weight_stats`.
    stats_dtype: dtype of the statistics.
    **kwargs: the other ``nnx.LoRALinear`` arguments (``rngs``, ``use_bias``,
      ``b_initializer``, ...). A custom ``dot_general`` is not supported: the
      frozen matmul is this layer's own custom VJP.
  """

  def __init__(self, in_features: int, out_features: int, *, lora_rank: int,
               lora_scale: float = 1.0, stats_method: Method = "auto",
               stats_dtype: Any = jnp.float32, **kwargs):
    if kwargs.get("dot_general", lax.dot_general) is not lax.dot_general:
      raise ValueError("LoRALinearWithStats computes the frozen matmul in its "
                       "own custom VJP; a custom dot_general is not supported.")
    super().__init__(in_features, out_features, lora_rank=lora_rank, **kwargs)
    self.lora_scale = lora_scale
    self.stats_method = stats_method
    self.lora.weight_stats = WeightStatsVar(
        weight_stats_probe(in_features, out_features, stats_dtype))

  def __call__(self, x: Array, out_sharding: Any = None) -> Array:
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype(
        (x, self.kernel[...], bias), dtype=self.dtype)
    y = linear_with_weight_stats(
        inputs, kernel, self.lora.weight_stats.get_value(),
        precision=self.precision,
        preferred_element_type=self.preferred_element_type,
        out_sharding=out_sharding, method=self.stats_method)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y + self.lora_scale * self.lora(x)


class LoRADenseWithStats(linen.Module):
  """Linen ``Dense`` with a LoRA adapter and exact W-gradient statistics.

  Parameters (collection ``params``): ``kernel (m, n)`` (to be kept frozen),
  ``bias (n,)``, ``lora_a (m, r)``, ``lora_b (r, n)``; their pair key is the
  module's path. Collection ``weight_stats`` holds the probe, named
  ``weight_stats``; differentiate with respect to that collection and pass
  the result to :func:`~adaprelora_jax.functional.split_weight_stats`.

  Attributes:
    features: ``n``.
    lora_rank: ``r``.
    lora_scale: ``s`` in ``y = x W + s (x A) B``.
    use_bias: whether to add a bias.
    dtype: computation dtype (default: inferred).
    param_dtype: parameter dtype.
    precision: matmul precision.
    kernel_init, bias_init, a_init, b_init: initialisers.
    stats_method: ``"auto"``, ``"dense"`` or ``"gram"``.
  """

  features: int
  lora_rank: int
  lora_scale: float = 1.0
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: lax.PrecisionLike = None
  kernel_init: Any = linen.initializers.lecun_normal()
  bias_init: Any = linen.initializers.zeros_init()
  a_init: Any = linen.initializers.he_uniform()
  b_init: Any = linen.initializers.zeros_init()
  stats_method: Method = "auto"

  @linen.compact
  def __call__(self, x: Array) -> Array:
    m, n, r = x.shape[-1], self.features, self.lora_rank
    kernel = self.param("kernel", self.kernel_init, (m, n), self.param_dtype)
    lora_a = self.param("lora_a", self.a_init, (m, r), self.param_dtype)
    lora_b = self.param("lora_b", self.b_init, (r, n), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (n,), self.param_dtype)
            if self.use_bias else None)
    probe = self.variable("weight_stats", "weight_stats", weight_stats_probe,
                          m, n).value
    x, kernel, lora_a, lora_b, bias = linen.dtypes.promote_dtype(
        x, kernel, lora_a, lora_b, bias, dtype=self.dtype)
    y = linear_with_weight_stats(x, kernel, probe, precision=self.precision,
                                 method=self.stats_method)
    low = jnp.matmul(jnp.matmul(x, lora_a, precision=self.precision), lora_b,
                     precision=self.precision)
    y = y + self.lora_scale * low
    return y if bias is None else y + bias
