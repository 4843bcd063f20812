"""Per-step W-step diagnostics of LoRA pairs: factor norms and the first- and second-order W-step.

Measured from the applied updates inside the training step
(:func:`pair_diagnostics` as a :data:`benchmarks.train_loop.Extra`), with the
pairs found from the ``nnx.LoRAParam`` type rather than the library's own
pairing, so the diagnostics do not depend on the code they measure.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DIAGNOSTICS = ("a_norm", "b_norm", "w1_rms", "w2_rms")


def lora_factors(tree: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``{"encoder/layers/0/query": (A (in, r), B (r, out)), ...}`` for the ``nnx.LoRA`` adapters in an ``nnx.State``."""
  found: dict[str, dict[str, jax.Array]] = defaultdict(dict)
  for path, var in jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  ):
    if isinstance(var, nnx.LoRAParam):
      names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
      found["/".join(names[:-2])][names[-1]] = var[...]  # drop ".../lora/lora_a"
  return {key: (f["lora_a"], f["lora_b"]) for key, f in found.items()}


def pair_diagnostics(before: Any, after: Any, scale: float = 1.0) -> dict[str, jax.Array]:
  """Per LoRA pair, stacked to ``(pairs,)``: factor norms after the step and the W-step's parts.

  With the applied updates ``dA = A' - A``, ``dB = B' - B`` the step is
  ``s(A'B' - AB) = s(dA B + A dB) + s dA dB``: ``w1_rms`` is the RMS of the
  first-order part (what the optimizer's W-space reasoning controls),
  ``w2_rms`` of the second-order part (what it ignores). Dense, 384 x 384.
  """
  old, new = lora_factors(before), lora_factors(after)
  rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x)))
  rows = []
  for key, (a, b) in old.items():
    a_new, b_new = new[key]
    da, db = a_new - a, b_new - b
    rows.append(
        (
            jnp.linalg.norm(a_new),
            jnp.linalg.norm(b_new),
            rms(scale * (da @ b + a @ db)),
            rms(scale * (da @ db)),
        )
    )
  return {name: jnp.stack(column) for name, column in zip(DIAGNOSTICS, zip(*rows))}


def diagnostics_summary(result: dict, early: int = 30) -> dict[str, dict[str, float]]:
  """Medians over steps (the first ``early`` and all) of the pair-median and pair-max of each diagnostic.

  ``ratio`` is ``w2_rms / w1_rms`` per pair and step (steps with no update,
  such as step 0 at lr 0, are skipped).
  """
  per = {k: np.asarray(v, dtype=float) for k, v in result["diagnostics"]["per_pair"].items()}
  with np.errstate(divide="ignore", invalid="ignore"):
    per["ratio"] = np.where(per["w1_rms"] > 0, per["w2_rms"] / per["w1_rms"], np.nan)
  out = {}
  for name, values in per.items():
    for span, rows in (("early", values[:early]), ("all", values)):
      rows = rows[~np.all(np.isnan(rows), axis=1)]
      out.setdefault(name, {})[f"{span}_median"] = float(np.median(np.nanmedian(rows, axis=1)))
      out[name][f"{span}_max"] = float(np.median(np.nanmax(rows, axis=1)))
      out[name][f"{span}_peak"] = float(np.nanmax(rows))
  return out
