"""The README's "Extending" example runs, and its slice update steps as its docstring says."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from adaprelora_jax import skipped_steps

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _example() -> dict:
  section = README.read_text().split("## Extending: a new LoRA optimizer on the plumbing")[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (the README's own code)
  return namespace


def test_the_extending_example_trains_each_pair_by_its_slice_update():
  example = _example()
  rng = np.random.default_rng(0)
  params = {"layers": {"lora_a": rng.normal(size=(3, 8, 2)), "lora_b": rng.normal(size=(3, 2, 5))},
            "head": rng.normal(size=(4,))}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  tx = example["tx"]
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  a, b = (np.asarray(params["layers"][k], np.float64) for k in ("lora_a", "lora_b"))
  g_a, g_b = (np.asarray(grads["layers"][k], np.float64) for k in ("lora_a", "lora_b"))
  eye = 1e-6 * np.eye(2)
  want_a = -1e-2 * g_a @ np.linalg.inv(b @ np.swapaxes(b, -1, -2) + eye)
  want_b = -1e-2 * np.linalg.inv(np.swapaxes(a, -1, -2) @ a + eye) @ g_b
  np.testing.assert_allclose(updates["layers"]["lora_a"], want_a, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(updates["layers"]["lora_b"], want_b, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(updates["head"], -1e-2 * grads["head"])  # the fallback
  assert skipped_steps(state)["layers"].tolist() == [0, 0, 0]
