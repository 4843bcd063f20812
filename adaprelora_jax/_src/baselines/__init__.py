"""The family's baselines; the public names are in ``adaprelora_jax.baselines``."""
