"""Two controlled, ill-conditioned LoRA problems (tasks ``lora_regression`` and ``matrix_sensing``).

* ``lora_regression``: ``min mean ‖X (A B) − X ΔW*‖²`` with anisotropic inputs
  (feature scales 1 … 0.01) and a rank-2 target;
* ``matrix_sensing``: ``min mean_k (⟨S_k, A B⟩ − ⟨S_k, ΔW*⟩)²`` with sensing
  matrices ``S_k = D_m Z_k D_n`` (``Z_k`` Gaussian, ``D`` diagonal scales
  1 … 0.1 on each side) and a rank-2 target.

Both use a rank-4 LoRA initialised as ``nnx.LoRA`` does (``A`` random,
``B = 0``); the seed draws the instance and the init. The metric is the final
loss relative to the initial one; ``steps_to_target`` (in ``Run.extra``) is
the first step below ``target`` of it. Besides the family, the tasks train
the ablations of AdaPreLoRA's own choices (:data:`ABLATIONS`), each changing
one thing against the default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaprelora_jax import WeightStats, adaprelora
from benchmarks.family import METHODS, Factory, warmup_cosine, window
from benchmarks.record import Run, loss_diverged, make_run
from benchmarks.report import Metric
from benchmarks.tasks import Method, Size, Task

WLoss = Callable[[jax.Array], jax.Array]
"""A problem's loss as a function of the adapter's product ``ΔW = A B``."""
Problem = Callable[..., tuple[dict, WLoss]]


def _lora_init(rng: np.random.Generator, m: int, n: int, rank: int) -> dict:
  return {
      "lora_a": jnp.asarray(rng.normal(size=(m, rank)) / np.sqrt(m), jnp.float32),
      "lora_b": jnp.zeros((rank, n), jnp.float32),
  }


def lora_regression(
    seed: int, m: int = 32, n: int = 24, rank: int = 4, samples: int | None = None
) -> tuple[dict, WLoss]:
  """Initial LoRA params and the loss (of ``ΔW``) of one regression instance (``8 m`` samples)."""
  rng = np.random.default_rng(seed)
  samples = samples or 8 * m
  x = rng.normal(size=(samples, m)) * np.logspace(0, -2, m)
  target = rng.normal(size=(m, 2)) @ rng.normal(size=(2, n))
  params = _lora_init(rng, m, n, rank)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(x @ target, jnp.float32)
  return params, lambda w: jnp.mean((x @ w - y) ** 2)


def matrix_sensing(
    seed: int, m: int = 32, n: int = 24, rank: int = 4, samples: int | None = None
) -> tuple[dict, WLoss]:
  """Initial LoRA params and the loss (of ``ΔW``) of one matrix-sensing instance (``16 m`` samples)."""
  rng = np.random.default_rng(seed)
  samples = samples or 16 * m
  sensing = (
      np.logspace(0, -1, m)[:, None]
      * rng.normal(size=(samples, m, n))
      * np.logspace(0, -1, n)[None, :]
  )
  target = rng.normal(size=(m, 2)) @ rng.normal(size=(2, n))
  params = _lora_init(rng, m, n, rank)
  sensing = jnp.asarray(sensing, jnp.float32)
  y = jnp.einsum("kmn,mn->k", sensing, jnp.asarray(target, jnp.float32))
  return params, lambda w: jnp.mean((jnp.einsum("kmn,mn->k", sensing, w) - y) ** 2)


PROBLEMS: dict[str, Problem] = {
    "lora_regression": lora_regression,
    "matrix_sensing": matrix_sensing,
}


class Trained(NamedTuple):
  """One training run: the loss before each step and after the last, the final params, and
  the largest factor norm ``max(|A|, |B|)`` seen after any step."""

  losses: np.ndarray
  params: dict
  largest_factor: float


def train(
    tx: optax.GradientTransformation,
    params: dict,
    w_loss: WLoss,
    steps: int,
    *,
    offset: jax.Array | float = 0.0,
    weight_stats: bool = False,
) -> Trained:
  """``steps`` updates in one jitted scan.

  The adapter's product is ``ΔW = A B − offset`` (a base weight that absorbs a
  nonzero initial product). With ``weight_stats``, every update also gets the
  exact mean squares of the W-gradient (``full``, docs/derivation.md) for the root pair.
  """
  delta = lambda p: p["lora_a"] @ p["lora_b"] - offset
  loss = lambda p: w_loss(delta(p))
  norm = lambda x: jnp.sqrt(jnp.sum(x * x))

  def step(carry, _):
    params, state, largest = carry
    value, grads = jax.value_and_grad(loss)(params)
    extra = {}
    if weight_stats:
      g2 = jax.grad(w_loss)(delta(params)) ** 2
      extra["weight_stats"] = {"": WeightStats(jnp.mean(g2, 1), jnp.mean(g2, 0))}
    updates, state = tx.update(grads, state, params, **extra)
    params = optax.apply_updates(params, updates)
    largest = jnp.maximum(largest, jnp.maximum(norm(params["lora_a"]), norm(params["lora_b"])))
    return (params, state, largest), value

  scan = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p), jnp.float32(0)), length=steps))
  (params, _, largest), values = scan(params)
  return Trained(np.append(np.asarray(values), float(loss(params))), params, float(largest))


def steps_to(relative: np.ndarray, target: float) -> int | None:
  """The first step at which ``relative`` is below ``target``, or ``None``."""
  hit = np.flatnonzero(relative < target)
  return int(hit[0]) if hit.size else None


def toy_floats(values: np.ndarray) -> list[float]:
  """A toy curve as stored: four significant digits (the tables show two), so thousands of
  steps per run stay a small file."""
  return [float(f"{x:.4g}") for x in np.asarray(values, np.float32)]


def balance(params: dict, seed: int) -> tuple[dict, jax.Array]:
  """``A``, ``B`` with i.i.d. entries of variance ``1/m`` and ``1/n`` and the offset ``A B``."""
  rng = np.random.default_rng(seed + 10_000)
  (m, r), n = params["lora_a"].shape, params["lora_b"].shape[1]
  a = jnp.asarray(rng.normal(size=(m, r)) / np.sqrt(m), jnp.float32)
  b = jnp.asarray(rng.normal(size=(r, n)) / np.sqrt(n), jnp.float32)
  return {"lora_a": a, "lora_b": b}, a @ b


def run(factory: Factory, lr: float, seed: int, size: Size, *, progress: bool = True) -> Run:
  """Trains one instance of ``size["problem"]`` with ``factory(family.warmup_cosine(lr, steps), 0)``.

  ``balanced_init`` starts from random ``A`` and ``B`` of equal norm, the base
  weight absorbing their product (the same starting ``W``); ``weight_stats``
  feeds the exact W-gradient statistics. Diverged: the train loss rule of
  :func:`benchmarks.record.loss_diverged`.
  """
  del progress  # one jitted scan: nothing to show while it runs
  start = time.perf_counter()
  params, w_loss = PROBLEMS[size["problem"]](seed, **size["dims"])
  offset = 0.0
  if size["balanced_init"]:
    params, offset = balance(params, seed)
  tx = factory(warmup_cosine(lr, size["steps"]), 0.0)
  curve = train(tx, params, w_loss, size["steps"], offset=offset,
                weight_stats=size["weight_stats"]).losses
  relative = curve / curve[0]
  eval_steps = list(range(0, size["steps"] + 1, size["eval_every"]))
  return make_run(
      "", lr, seed, dict(size), toy_floats(curve), eval_steps, toy_floats(relative[eval_steps]),
      higher_is_better=False,
      stopped=False,
      diverged=loss_diverged(curve),
      wall_s=time.perf_counter() - start,
      extra={"steps_to_target": steps_to(relative, size["target"])},
  )


def _ablation(**kwargs: Any) -> Factory:
  return lambda lr, wd: adaprelora(lr, weight_decay=wd, **kwargs)


ABLATIONS: dict[str, Method] = {
    "full_stats": Method(_ablation(statistics="full"), {"weight_stats": True}),
    "b1=0.9": Method(_ablation(b1=0.9)),
    "no_clipping": Method(_ablation(clipping_threshold=None)),
    "damping=1e-6": Method(_ablation(damping=1e-6)),
    "damping=1e-2": Method(_ablation(damping=1e-2)),
    "b2=0.999": Method(_ablation(b2=0.999)),
    "balanced_init": Method(_ablation(), {"balanced_init": True}),
}
"""AdaPreLoRA with one choice changed (``adaprelora`` is the default they change)."""

_SIZE = dict(target=1e-3, weight_stats=False, balanced_init=False)
SIZES = {
    "cpu": dict(dims=dict(m=32, n=24, rank=4), steps=400, eval_every=10, **_SIZE),
    # 4096 sensing matrices of 256 x 192: 0.8 GB of f32 on the device.
    "gpu": dict(dims=dict(m=256, n=192, rank=8), steps=2000, eval_every=50, **_SIZE),
}

TASKS = {
    problem: Task(
        name=problem,
        metric=Metric("loss / initial", higher_is_better=False, fmt=".2g", log_scale=True),
        sizes={k: {**v, "problem": problem} for k, v in SIZES.items()},
        run=run,
        methods={**{name: Method(make) for name, make in METHODS.items()}, **ABLATIONS},
        # Unit-scaled problems: the window of the grid above the real tasks'.
        window=lambda name: window(0.01, 6),
    )
    for problem in PROBLEMS
}
