"""Array-level functions: the closed-form solve, its diagnostics, and full statistics.

The optimizer uses these on pytrees; here they take the factors and
gradients of one LoRA pair (``A (m×r)``, ``B (r×n)``, with any leading batch
axes). Math in ``docs/derivation.md``.
"""

from adaprelora_jax._src.full_stats import (linear_with_weight_stats, split_weight_stats,
                                            weight_stats_probe)
from adaprelora_jax._src.functional import solve_factor_update, tangent_mean_squares, w_step_rms

__all__ = [
    "solve_factor_update", "tangent_mean_squares", "w_step_rms",
    "linear_with_weight_stats", "weight_stats_probe", "split_weight_stats",
]
