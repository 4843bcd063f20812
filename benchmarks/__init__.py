"""Real-model, real-data benchmarks for `adaprelora_jax` (offline: assets come from PyPI and apt)."""
