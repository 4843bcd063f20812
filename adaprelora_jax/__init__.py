"""AdaPreLoRA and its family of LoRA optimizers, for JAX and Optax."""

from adaprelora_jax.alias import adaprelora
from adaprelora_jax.pairing import (LoRAPair, LoRAPairing, default_rule,
                                    lora_pairs)
from adaprelora_jax.solve import (solve_factor_update, tangent_mean_squares,
                                  w_step_rms)
from adaprelora_jax.transform import (PairState, ScaleByAdaPreLoRAState,
                                      WeightStats, scale_by_adaprelora)

__all__ = [
    "LoRAPair", "LoRAPairing", "PairState", "ScaleByAdaPreLoRAState",
    "WeightStats", "adaprelora", "default_rule", "lora_pairs",
    "scale_by_adaprelora", "solve_factor_update", "tangent_mean_squares",
    "w_step_rms",
]

__version__ = "0.1.0"
