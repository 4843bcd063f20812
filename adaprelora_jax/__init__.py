"""AdaPreLoRA and its family of LoRA optimizers, for JAX and Optax."""

from adaprelora_jax.alias import adaprelora
from adaprelora_jax.base import PairState, WeightStats
from adaprelora_jax.flax_layers import (LoRADenseWithStats,
                                        LoRALinearWithStats, WeightStatsVar)
from adaprelora_jax.full_stats import (linear_with_weight_stats,
                                       split_weight_stats, weight_stats_probe,
                                       with_weight_stats)
from adaprelora_jax.functional import (solve_factor_update, tangent_mean_squares,
                                       w_step_rms)
from adaprelora_jax.layout import CHUNKED, JOINED, Layout
from adaprelora_jax.pairing import (LoRAPair, LoRAPairing, default_rule,
                                    lora_pairs)
from adaprelora_jax.pairwise import SliceCounts, pairwise_transformation, skipped_steps
from adaprelora_jax.sharding import annotate_opt_state, state_shardings
from adaprelora_jax.transform import ScaleByAdaPreLoRAState, scale_by_adaprelora

__all__ = [
    "CHUNKED", "JOINED", "LoRADenseWithStats", "LoRALinearWithStats", "LoRAPair",
    "LoRAPairing", "Layout", "PairState", "ScaleByAdaPreLoRAState", "WeightStats",
    "WeightStatsVar", "adaprelora", "annotate_opt_state", "default_rule",
    "linear_with_weight_stats", "lora_pairs", "pairwise_transformation",
    "SliceCounts", "scale_by_adaprelora", "skipped_steps", "solve_factor_update",
    "split_weight_stats",
    "state_shardings",
    "tangent_mean_squares", "w_step_rms", "weight_stats_probe",
    "with_weight_stats",
]

__version__ = "0.1.0"
