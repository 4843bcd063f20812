"""Baseline LoRA optimizers of the family (``docs/derivation.md``, the family), on the same plumbing.

Each is a ``scale_by_*`` direction and an alias chained like ``optax.adamw``:

* :func:`lora_plus`: Adam on the factors, ``B`` at ``lr_ratio`` times the lr;
* :func:`scaled_gd`, :func:`scaled_adamw`: the Riemannian ``r × r``
  preconditioner of each factor by the other's Gram, then (for ScaledAdamW)
  Adam;
* :func:`lora_pro`: factor gradients whose W-step is the Frobenius projection
  of a W-gradient, with Adam on factor-shaped (``"efficient"``) or ``m × n``
  (``"full"``) moments;
* :func:`lora_rite`: transformation-invariant adaptive matrix
  preconditioning in orthonormal frames of the factors.
"""

from adaprelora_jax._src.baselines.lora_plus import lora_plus, scale_by_lora_plus
from adaprelora_jax._src.baselines.lora_pro import LoRAProState, lora_pro, scale_by_lora_pro
from adaprelora_jax._src.baselines.lora_rite import LoRARITEState, lora_rite, scale_by_lora_rite
from adaprelora_jax._src.baselines.scaled_adamw import (scale_by_scaled_adam, scale_by_scaled_gd,
                                                        scaled_adamw, scaled_gd)

__all__ = [
    "lora_plus", "scale_by_lora_plus",
    "scaled_gd", "scale_by_scaled_gd", "scaled_adamw", "scale_by_scaled_adam",
    "lora_pro", "scale_by_lora_pro", "LoRAProState",
    "lora_rite", "scale_by_lora_rite", "LoRARITEState",
]
