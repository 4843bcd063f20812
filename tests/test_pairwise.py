"""The pairwise plumbing and its layouts: joined roles, pairs alone, chunks (``Layout``)."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaprelora_jax import CHUNKED, JOINED, Layout, WeightStats, scale_by_adaprelora
from adaprelora_jax._src import pairwise
from conftest import count_primitive

# Decoder-like shapes: four square projections and three MLP matrices.
SHAPES = {
    "q": (256, 256),
    "k": (256, 256),
    "v": (256, 256),
    "o": (256, 256),
    "gate": (256, 768),
    "up": (256, 768),
    "down": (768, 256),
}
RANK = 8
EIGHS_PER_SLICE = 2  # the two roots, the balancing term (the weighted Grams are Cholesky)
EIGHS_MERGED = 1  # one chunk: one call for every slice's, at the one stage they depend on


def _model(layers: int, seed: int = 0) -> tuple[dict, dict]:
  rng = np.random.default_rng(seed)
  params, grads = {}, {}
  for layer in range(layers):
    for name, (m, n) in SHAPES.items():
      key = f"layer_{layer}/{name}"
      params[key] = {
          "lora_a": jnp.asarray(rng.normal(size=(m, RANK)) / np.sqrt(m), jnp.float32),
          "lora_b": jnp.asarray(0.1 * rng.normal(size=(RANK, n)), jnp.float32),
      }
      grads[key] = jax.tree.map(
          lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params[key]
      )
  return params, grads


def _optimizer(chunk_bytes: int | None, b1=None, join_layers_above=CHUNKED.join_layers_above
               ) -> optax.GradientTransformation:
  """AdaPreLoRA with pairs alone (up to ``join_layers_above``) in chunks of ``chunk_bytes``."""
  return scale_by_adaprelora(b1=b1, layout=Layout(join_layers_above, chunk_bytes))


def _one_pair_bytes(name: str) -> int:
  """Factors, gradients and ``v_row``/``v_col``, in float32."""
  m, n = SHAPES[name]
  return (2 * RANK + 1) * (m + n) * 4


@pytest.mark.slow  # compiles both layouts of a deep model
@pytest.mark.parametrize("b1", [None, 0.9])
def test_chunks_change_the_order_not_the_values(b1):
  """Three steps with every group its own chunk equal the unchunked steps bit for bit."""
  params, grads = _model(layers=2)
  runs = []
  for chunk_bytes in (None, 1):
    tx = _optimizer(chunk_bytes, b1)
    p, state, updates = params, tx.init(params), None
    step = jax.jit(tx.update)
    for _ in range(3):
      updates, state = step(grads, state, p)
      p = optax.apply_updates(p, updates)
    runs.append((updates, state))
  jax.tree.map(np.testing.assert_array_equal, *runs)


def _temp_bytes(tx, params, grads, weight_stats=None) -> int:
  step = lambda g, s, p: tx.update(g, s, p, weight_stats=weight_stats)
  compiled = jax.jit(step).lower(grads, tx.init(params), params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _weight_stats(params: dict) -> dict:
  return {key: WeightStats(jnp.ones(p["lora_a"].shape[0]), jnp.ones(p["lora_b"].shape[1]))
          for key, p in params.items()}


@pytest.mark.slow  # compiles both layouts of a deep model
@pytest.mark.parametrize("statistics", ["tangent", "full"])
def test_chunks_bound_the_live_temporaries(statistics):
  """One chunk per group: the compiled update needs far fewer temporary bytes.

  Unchunked, XLA overlaps every group and keeps all their ``(m, r)``
  temporaries live; chunked, the temporaries of one chunk are live at a time.
  Exact statistics skip the Grams, so the ordering must reach the moments too.
  """
  params, grads = _model(layers=4)
  stats = _weight_stats(params) if statistics == "full" else None
  temp_bytes = lambda chunk_bytes: _temp_bytes(
      _optimizer(chunk_bytes), params, grads, stats)
  together, chunked = temp_bytes(None), temp_bytes(1)
  assert chunked < 0.5 * together, (chunked, together)
  # Chunks of one MLP pair's size hold the same bound.
  assert temp_bytes(4 * _one_pair_bytes("gate")) < 0.5 * together


@pytest.mark.slow  # compiles both layouts of a deep model
def test_joined_layers_are_split_into_chunks():
  """Joined layers of a role come in groups of at most a chunk: one group of all twelve
  MLP pairs would hold all their temporaries at once."""
  params, grads = _model(layers=12)
  split = _temp_bytes(_optimizer(3 * _one_pair_bytes("gate"), join_layers_above=0),
                      params, grads)
  whole = _temp_bytes(scale_by_adaprelora(layout=JOINED), params, grads)
  assert split < 0.5 * whole, (split, whole)


def _traced(tx, params, grads):
  return jax.make_jaxpr(tx.update)(grads, tx.init(params), params).jaxpr


def test_pairs_are_joined_when_a_chunk_would_hold_too_many():
  """XLA's compile time grows with the square of the pairs solved together, so past
  ``join_layers_above`` pairs in one chunk each role's layers are joined; with fewer per
  chunk every pair is solved alone, however deep the model."""
  layers = 6
  params, grads = _model(layers)
  assert len(SHAPES) * layers > CHUNKED.join_layers_above
  eighs = lambda chunk_bytes: count_primitive(
      _traced(_optimizer(chunk_bytes), params, grads), "eigh")
  one_chunk = eighs(None)
  per_layer = eighs(sum(map(_one_pair_bytes, SHAPES)))
  # Alone: per pair; in one chunk: one call per stage for every role and layer.
  assert per_layer == layers * len(SHAPES) * EIGHS_PER_SLICE and one_chunk == EIGHS_MERGED


def test_the_slice_update_is_traced_once_per_slice_shape():
  """Same-shaped pairs share one trace of the slice update, so tracing does not grow with depth."""
  traced = []

  def slice_update(a, b, grad_a, grad_b, state, extra, count):
    traced.append((a.shape, b.shape))
    return grad_a, grad_b, state

  tx = pairwise.pairwise_transformation(
      "toy", lambda m, n, r, dtype: (), slice_update, fallback=optax.identity())
  params, grads = _model(layers=2)
  updates = jax.jit(tx.update)(grads, tx.init(params), params)[0]
  assert sorted(traced) == sorted({((m, RANK), (RANK, n)) for m, n in SHAPES.values()})
  jax.tree.map(np.testing.assert_array_equal, updates, grads)


def test_a_non_finite_pair_stays_out_of_later_chunks():
  """The predicate that orders the chunks is true whatever the earlier chunks computed, and the
  poisoned pair itself skips its step (zero update) instead of passing NaN on."""
  params, grads = _model(layers=1)
  tx = _optimizer(1)
  step = jax.jit(tx.update)
  clean, _ = step(grads, tx.init(params), params)
  first = next(iter(grads))
  for bad in (jnp.nan, jnp.inf):
    poisoned = {
        **grads,
        first: {**grads[first], "lora_a": grads[first]["lora_a"].at[0, 0].set(bad)},
    }
    updates, _ = step(poisoned, tx.init(params), params)
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, np.zeros_like(u)), updates[first])
    for key in list(grads)[1:]:
      jax.tree.map(np.testing.assert_array_equal, updates[key], clean[key])


def _producers(jaxpr, var) -> set:
  """The equations of ``jaxpr`` that ``var`` is computed from."""
  made_by = {out: eqn for eqn in jaxpr.eqns for out in eqn.outvars}
  seen, todo = set(), [var]
  while todo:
    eqn = made_by.get(todo.pop())
    if eqn is not None and id(eqn) not in seen:
      seen.add(id(eqn))
      todo += [v for v in eqn.invars if not isinstance(v, jax.extend.core.Literal)]
  return seen


def test_each_chunk_is_one_conditional_after_the_previous():
  """A chunk is solved inside a ``lax.cond``, which XLA runs as a unit and compiles on its
  own, and its predicate is computed from the previous chunk's results. Without that
  dependency XLA orders the chunks as it likes (8 layers of 7B shapes: 90 ms a step
  instead of 72)."""
  params, grads = _model(layers=2)
  jaxpr = _traced(_optimizer(1), params, grads)  # a chunk per pair
  conds = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
  assert len(conds) == 2 * len(SHAPES)
  for previous, cond in zip(conds, conds[1:]):
    assert id(previous) in _producers(jaxpr, cond.invars[0])
  for cond in conds:
    skip, solve = cond.params["branches"]
    assert count_primitive(skip.jaxpr, "eigh") == 0
    assert count_primitive(solve.jaxpr, "eigh") == EIGHS_PER_SLICE
  assert count_primitive(jaxpr, "eigh") == EIGHS_PER_SLICE * len(conds)
  assert count_primitive(_traced(_optimizer(None), params, grads), "cond") == 0


@pytest.mark.slow  # compiles both layouts of a deep model
def test_the_layouts_trace_different_programs_for_the_same_updates():
  """Joined roles (the default) and pairs alone in chunks (``CHUNKED``) give the same updates."""
  params, grads = _model(layers=2)

  def run(tx):
    jaxpr = _traced(tx, params, grads)
    p, state, step = params, tx.init(params), jax.jit(tx.update)
    for _ in range(3):
      updates, state = step(grads, state, p)
      p = optax.apply_updates(p, updates)
    return count_primitive(jaxpr, "eigh"), p

  (joined_eighs, joined_params), (alone_eighs, alone_params) = (
      run(scale_by_adaprelora()), run(scale_by_adaprelora(layout=CHUNKED)))
  # 7 groups of 2 layers, or 14 pairs alone: one chunk either way, so one call per stage.
  assert joined_eighs == alone_eighs == EIGHS_MERGED
  # Batched and single products round differently: float32 rounding (relative to the
  # largest parameter), after three steps that move the factors by O(1) each (no learning rate).
  largest = max(float(np.abs(y).max()) for y in jax.tree.leaves(alone_params))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=5e-5 * largest),
               joined_params, alone_params)
