"""MiniLM with statistics probes: same function, and the probes' gradient is the exact G statistics."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaprelora_jax import WeightStats
from adaprelora_jax.functional import split_weight_stats
from benchmarks.minilm import TRAINABLE, Frozen, load_minilm


def test_probes_leave_outputs_alone_and_carry_the_kernel_gradient_statistics():
  plain, tokenizer = load_minilm(4, ("query", "value"), rngs=nnx.Rngs(3))
  probed, _ = load_minilm(4, ("query", "value"), rngs=nnx.Rngs(3), weight_stats=True)
  batch = tokenizer(["a small dog", "the theory of numbers and their properties"])
  ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
  np.testing.assert_allclose(probed(ids, mask), plain(ids, mask), rtol=1e-5, atol=1e-5)
  # Give B a value so the kernels' gradients are not the LoRA-free ones by construction.
  for model in (plain, probed):
    lora = model.layers[1].value.lora
    lora.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(0), lora.lora_b.shape)

  loss = lambda model: jnp.sum(jnp.sin(model(ids, mask)))
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, TRAINABLE))(probed)
  lora_grads, stats = split_weight_stats(grads)
  assert set(stats) == {f"layers/{i}/{p}/lora" for i in range(6) for p in ("query", "value")}

  kernel_grads = nnx.grad(loss, argnums=nnx.DiffState(0, Frozen))(plain)
  g = np.asarray(kernel_grads["layers"][1]["value"]["kernel"][...])
  got = stats["layers/1/value/lora"]
  assert isinstance(got, WeightStats)
  np.testing.assert_allclose(got.row, np.mean(g**2, 1), rtol=1e-4, atol=1e-12)
  np.testing.assert_allclose(got.col, np.mean(g**2, 0), rtol=1e-4, atol=1e-12)
  plain_grads = nnx.grad(loss, argnums=nnx.DiffState(0, TRAINABLE))(plain)
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
      nnx.to_pure_dict(lora_grads),
      nnx.to_pure_dict(plain_grads),
  )
