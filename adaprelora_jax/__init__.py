"""AdaPreLoRA and its family of LoRA optimizers, for JAX and Optax.

The optimizer and what a training loop calls with it live here; the
other members of the family are in :mod:`adaprelora_jax.baselines`, the
array-level functions in :mod:`adaprelora_jax.functional`, and the Flax
layers and ``nnx.Optimizer`` helpers in :mod:`adaprelora_jax.flax` (which
needs the ``[flax]`` extra; nothing else imports Flax).
"""

from adaprelora_jax import baselines, functional
from adaprelora_jax._src.alias import adaprelora
from adaprelora_jax._src.base import PairState, WeightStats
from adaprelora_jax._src.chain import with_decay_and_learning_rate
from adaprelora_jax._src.checkpoint import restore_state
from adaprelora_jax._src.full_stats import with_weight_stats
from adaprelora_jax._src.layout import CHUNKED, JOINED, Layout
from adaprelora_jax._src.pairing import LoRAPair, LoRAPairing, default_rule, lora_pairs
from adaprelora_jax._src.pairwise import SliceCounts, pairwise_transformation, skipped_steps
from adaprelora_jax._src.sharding import state_shardings
from adaprelora_jax._src.transform import ScaleByAdaPreLoRAState, scale_by_adaprelora

__all__ = [
    # The optimizer.
    "adaprelora", "scale_by_adaprelora", "ScaleByAdaPreLoRAState", "PairState",
    "WeightStats", "with_weight_stats", "skipped_steps", "SliceCounts",
    # Which leaves are LoRA factors, and how their updates are grouped.
    "lora_pairs", "default_rule", "LoRAPair", "LoRAPairing",
    "Layout", "JOINED", "CHUNKED",
    # Sharding and checkpoints.
    "state_shardings", "restore_state",
    # A new LoRA optimizer on the same plumbing.
    "pairwise_transformation", "with_decay_and_learning_rate",
    # Submodules.
    "baselines", "functional",
]

__version__ = "0.1.0"
