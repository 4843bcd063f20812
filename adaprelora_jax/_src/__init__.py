"""The implementation; the public API is ``adaprelora_jax`` and its public submodules."""
