"""Flax integration: LoRA layers that carry full statistics, and state sharding for NNX.

Needs Flax (``pip install "adaprelora_jax[flax]"``); the rest of the package
does not import it.

* :class:`LoRALinearWithStats` (NNX) and :class:`LoRADenseWithStats` (Linen):
  LoRA layers whose gradient also carries the frozen weight's exact gradient
  statistics, for ``adaprelora(..., statistics="full")`` through
  :func:`~adaprelora_jax.with_weight_stats`;
* :class:`WeightStatsVar`: the NNX variable type that holds them;
* :func:`annotate_opt_state`: an ``nnx.Optimizer``'s state annotated with the
  shardings of the params it trains.
"""

from adaprelora_jax._src.flax_layers import (LoRADenseWithStats, LoRALinearWithStats,
                                             WeightStatsVar)
from adaprelora_jax._src.nnx_sharding import annotate_opt_state

__all__ = ["LoRALinearWithStats", "LoRADenseWithStats", "WeightStatsVar", "annotate_opt_state"]
