"""Exact W-gradient statistics from the backward pass (``docs/derivation.md``, statistics).

AdaPreLoRA's paper preconditions with Adafactor statistics of the true
gradient of the frozen weight, ``G = ∂L/∂W = xᵀ δ`` (``x`` the layer inputs
and ``δ`` the output cotangents, both flattened over batch and sequence). A
LoRA-only gradient tree does not contain ``G``. This module gets its row and
column mean squares

  ``row_i = mean_j G_ij²``  (shape ``m``)      ``col_j = mean_i G_ij²``  (shape ``n``)

out of the backward pass at ``O(m + n)`` memory per layer, by a "gradient as
a side channel": the frozen matmul takes a third input, a *probe* of zeros
shaped like :class:`~adaprelora_jax.WeightStats`, which the forward
pass ignores and whose cotangent the custom VJP defines to be ``(row, col)``.
Differentiating the loss with respect to the probe then returns the
statistics in the gradient tree, next to the LoRA factor gradients.

Two exact ways to compute them, chosen per layer from static shapes:

* ``"dense"``: form ``G = xᵀ δ`` (``N m n`` multiply-adds, one ``m × n``
  float32 temporary that lives only inside this layer's backward step), then
  reduce ``G²`` along each axis. ``G`` doubles as the kernel's cotangent, so
  differentiating the frozen kernel too costs nothing extra; when the kernel
  is not differentiated XLA drops that output.
* ``"gram"``: never form ``G``. ``row = diag(xᵀ (δ δᵀ) x) / n`` and
  ``col = diag(δᵀ (x xᵀ) δ) / m``, ``2 N² (m + n)`` multiply-adds and an
  ``N × N`` temporary. Cheaper in time *and* memory exactly when
  ``2 N (m + n) < m n``, i.e. for few tokens per step (``N < 256`` for a
  ``1024 × 1024`` kernel). ``"auto"`` picks the cheaper one. Sums are
  regrouped, so it can lose a few more bits than ``"dense"`` when ``G`` is
  much smaller than ``Σ_k |x_k| |δ_k|``.

Semantics to know:

* The statistics are those of the gradient of the loss that was
  differentiated, per call of the layer. A layer applied ``c`` times in one
  forward pass (weight sharing) gets ``Σ_calls ms(G_call)``, not
  ``ms(Σ_calls G_call)``.
* Under ``jax.jit`` with a sharded batch (data parallelism), ``x`` and ``δ``
  are global arrays, so the statistics are those of the global ``G``. XLA
  all-reduces ``G`` (or the kernel's shard of it) across the batch shards:
  per layer the same ``m × n`` traffic as a full fine-tune's kernel
  gradient, but transient. With explicit sharding the cotangent ``G`` takes
  the kernel's layout, as JAX's own ``dot_general`` transpose does, and
  ``"auto"`` never picks ``"gram"`` for explicitly sharded token axes.
  Averaging per-device statistics (``pmean`` under ``shard_map``) would
  instead give the mean of per-shard mean squares, which is larger.
* Gradient accumulation (``optax.MultiSteps``) averages gradients over ``k``
  micro-batches, ``Ḡ = mean_t G_t``; ``ms(Ḡ)`` needs ``Ḡ`` itself, an
  ``m × n`` accumulator, which is what this module exists to avoid. So under
  :func:`with_weight_stats` the statistics are averaged like every other
  leaf, giving ``mean_t ms(G_t) = ms(Ḡ) + mean_t ms(G_t − Ḡ) ≥ ms(Ḡ)``: the
  statistics of a micro-batch gradient, not of the accumulated one. (Passing
  ``weight_stats=`` to ``MultiSteps.update`` directly is worse: the inner
  update only keeps the last micro-batch's statistics.) For exact statistics
  of a large batch, run it in one step.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax

from adaprelora_jax._src.base import WeightStats

Array = jax.Array
PyTree = Any
Method = Literal["auto", "dense", "gram"]


def weight_stats_probe(in_features: int, out_features: int,
                       dtype: jnp.dtype = jnp.float32) -> WeightStats:
  """The zeros whose gradient :func:`linear_with_weight_stats` defines.

  Args:
    in_features: ``m``, the kernel's input size.
    out_features: ``n``, the kernel's output size.
    dtype: dtype of the statistics (float32 by default, whatever the kernel's).

  Returns:
    ``WeightStats(row=zeros(m), col=zeros(n))``.
  """
  return WeightStats(row=jnp.zeros((in_features,), dtype),
                     col=jnp.zeros((out_features,), dtype))


def _gram_route(method: Method, x: Array, n: int) -> bool:
  """Whether to use the Gram route for inputs ``x (..., m)`` and ``n`` outputs.

  ``"auto"`` takes it when it is cheaper, ``2 N² (m + n) < N m n``
  multiply-adds, and the token axes carry no explicit sharding (the
  ``N × N`` Grams of a sharded batch have no single good layout).
  """
  if method != "auto":
    return method == "gram"
  tokens, m = math.prod(x.shape[:-1]), x.shape[-1]
  return 2 * tokens * (m + n) < m * n and not _tokens_sharded(x)


def _tokens_sharded(x: Array) -> bool:
  """Whether ``x``'s token (leading) axes are explicitly sharded."""
  return any(axis is not None for axis in tuple(jax.typeof(x).sharding.spec)[:-1])


def _kernel_sharding(kernel: Array, x: Array) -> jax.sharding.NamedSharding:
  """The kernel's sharding; replicated on ``x``'s mesh if it has none."""
  sharding, x_mesh = jax.typeof(kernel).sharding, jax.typeof(x).sharding.mesh
  if sharding.mesh.empty and not x_mesh.empty:
    return jax.sharding.NamedSharding(x_mesh, jax.sharding.PartitionSpec())
  return sharding


def _cast_like(value: Array, like: Array) -> Array:
  """``value`` in ``like``'s dtype and, under explicit sharding, its layout."""
  value = value.astype(like.dtype)
  sharding = jax.typeof(like).sharding
  if sharding.mesh.empty or jax.typeof(value).sharding == sharding:
    return value
  return jax.sharding.reshard(value, sharding)


def _dot(x: Array, y: Array, contract: tuple[int, int], precision, dtype) -> Array:
  """The product contracting ``x``'s axis ``contract[0]`` with ``y``'s ``contract[1]``."""
  return lax.dot_general(x, y, (((contract[0],), (contract[1],)), ((), ())),
                         precision=precision, preferred_element_type=dtype)


def _gram_mean_squares(x: Array, delta: Array, dtype) -> tuple[Array, Array]:
  """``G``'s row and column mean squares from ``x (N, m)`` and ``δ (N, n)``, without ``G``.

  ``Σ_j G_ij² = (xᵀ (δ δᵀ) x)_ii`` and ``Σ_i G_ij² = (δᵀ (x xᵀ) δ)_jj``. The
  regrouped sums cancel down to ``G``'s size from ``Σ_k |x_k| |δ_k|``, so their
  products are float32 on every backend (``HIGHEST``), whatever the layer's.
  """
  precision = lax.Precision.HIGHEST
  m, n = x.shape[1], delta.shape[1]
  gram_d = _dot(delta, delta, (1, 1), precision, dtype)      # (N, N)
  gram_x = _dot(x, x, (1, 1), precision, dtype)              # (N, N)
  row = jnp.sum(x * _dot(gram_d, x, (1, 0), precision, dtype), 0) / n
  col = jnp.sum(delta * _dot(gram_x, delta, (1, 0), precision, dtype), 0) / m
  return row, col


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _linear(x, kernel, probe, precision, preferred_element_type, out_sharding,
            method):
  del probe  # only its cotangent matters
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                         precision=precision,
                         preferred_element_type=preferred_element_type,
                         out_sharding=out_sharding)


def _linear_fwd(x, kernel, probe, precision, preferred_element_type,
                out_sharding, method):
  y = _linear(x, kernel, probe, precision, preferred_element_type,
              out_sharding, method)
  return y, (x, kernel, probe)


def _linear_bwd(precision, preferred_element_type, out_sharding, method, res,
                dy):
  del preferred_element_type, out_sharding
  x, kernel, probe = res
  (m, n), lead = kernel.shape, tuple(range(x.ndim - 1))
  # Cotangents take their primal's sharding, as in JAX's own dot transpose,
  # so explicitly sharded batches reduce G onto the kernel's layout.
  dx = lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())),
                       precision=precision,
                       out_sharding=jax.typeof(x).sharding).astype(x.dtype)
  dtype = jnp.result_type(jnp.float32, x.dtype, dy.dtype)
  # G is also the kernel's cotangent. XLA drops it when the kernel is not
  # differentiated and the gram route does not need it.
  g = lax.dot_general(x, dy, ((lead, lead), ((), ())), precision=precision,
                      preferred_element_type=dtype,
                      out_sharding=_kernel_sharding(kernel, x))
  if _gram_route(method, x, n):
    row, col = _gram_mean_squares(x.reshape(-1, m), dy.reshape(-1, n), dtype)
  else:
    row, col = jnp.mean(g * g, 1), jnp.mean(g * g, 0)
  stats = WeightStats(_cast_like(row, probe.row), _cast_like(col, probe.col))
  return dx, g.astype(kernel.dtype), stats


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_with_weight_stats(
    x: Array,
    kernel: Array,
    probe: WeightStats,
    *,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    out_sharding: Any = None,
    method: Method = "auto",
) -> Array:
  """``x @ kernel`` whose VJP also returns ``G``'s mean squares as ``probe``'s cotangent.

  The forward pass is ``lax.dot_general`` over ``x``'s last axis. In the
  backward pass, with ``δ`` the output cotangent and ``G = xᵀ δ`` (all of
  ``x``'s leading axes contracted), the cotangents are
  ``x: δ kernelᵀ``, ``kernel: G`` and
  ``probe: WeightStats(row=mean_j G_ij², col=mean_i G_ij²)``.

  Args:
    x: inputs ``(..., m)``.
    kernel: the frozen weight ``(m, n)``.
    probe: ``WeightStats(row (m,), col (n,))`` of zeros (its value is not
      read), e.g. :func:`weight_stats_probe`.
    precision, preferred_element_type, out_sharding: as in
      ``lax.dot_general`` (``precision`` also applies to ``G`` on the
      ``"dense"`` route; the ``"gram"`` route's products are ``HIGHEST``).
    method: ``"dense"`` forms ``G``, ``"gram"`` uses the ``N × N`` Grams of
      ``x`` and ``δ`` instead, ``"auto"`` takes the cheaper (module docstring).

  Returns:
    ``x @ kernel``, shape ``(..., n)``.
  """
  if method not in ("auto", "dense", "gram"):
    raise ValueError(f"method must be 'auto', 'dense' or 'gram', got {method!r}.")
  if kernel.ndim != 2 or x.shape[-1:] != kernel.shape[:1]:
    raise ValueError(f"linear_with_weight_stats: x has shape {x.shape} and "
                     f"kernel {kernel.shape}; expected x (..., m) and kernel "
                     "(m, n).")
  if method == "gram" and _tokens_sharded(x):
    raise ValueError(
        f"linear_with_weight_stats: method='gram' needs unsharded token axes, "
        f"but x {x.shape} is sharded as {jax.typeof(x).sharding.spec}; use "
        "'dense' or 'auto'.")
  m, n = kernel.shape
  if tuple(probe.row.shape) != (m,) or tuple(probe.col.shape) != (n,):
    raise ValueError(
        f"linear_with_weight_stats: probe has row {probe.row.shape} and col "
        f"{probe.col.shape}; expected ({m},) and ({n},) for kernel {kernel.shape}.")
  return _linear(x, kernel, probe, precision, preferred_element_type,
                 out_sharding, method)


def _nnx() -> Any:
  """``flax.nnx`` if imported: only then can a tree hold its types, and Flax stays optional."""
  return sys.modules.get("flax.nnx")


def _stats_of(node: Any) -> WeightStats | None:
  """The statistics held by ``node`` (bare or in an NNX variable), else None."""
  nnx = _nnx()
  if nnx is not None and isinstance(node, nnx.Variable):
    node = node.get_value()
  return node if isinstance(node, WeightStats) else None


def _contains_stats(tree: PyTree) -> bool:
  leaves = jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, WeightStats))
  return any(isinstance(x, WeightStats) for x in leaves)


def split_weight_stats(grads: PyTree) -> tuple[PyTree, dict[str, WeightStats]]:
  """Takes the statistics out of a gradient tree, keyed like their LoRA pair.

  A statistics node (a :class:`WeightStats`, bare or held by an NNX
  variable) is keyed by the path of the mapping that holds it, which is the
  key :func:`~adaprelora_jax.lora_pairs` gives the layer's factors
  when they sit next to it: ``…/lora/weight_stats`` beside
  ``…/lora/lora_a`` in :class:`~adaprelora_jax.flax.LoRALinearWithStats`,
  ``…/weight_stats`` in the ``weight_stats`` collection for a Linen
  ``LoRADenseWithStats`` whose factors are ``…/lora_a``. Scanned layers give
  statistics with the same leading axes as their factors.

  Args:
    grads: nested mappings (dicts, ``FrozenDict``, ``nnx.State``), e.g. from
      ``nnx.grad(..., argnums=nnx.DiffState(0, nnx.Any(nnx.LoRAParam,
      WeightStatsVar)))``.

  Returns:
    ``(rest, stats)``: ``grads`` without the statistics nodes, same mapping
    types, and ``{pair_key: WeightStats}`` for
    ``update(rest, state, params, weight_stats=stats)``.

  Raises:
    ValueError: if statistics sit outside a mapping, or two share a key.
  """
  stats: dict[str, WeightStats] = {}

  nnx = _nnx()

  def walk(node, path):
    if nnx is not None and isinstance(node, nnx.State):  # nested levels are plain dicts inside
      return nnx.State(walk(node.raw_mapping, path))
    if not isinstance(node, Mapping):
      return node
    kept = {}
    for name, child in node.items():
      found = _stats_of(child)
      if found is None:
        kept[name] = walk(child, (*path, str(name)))
        continue
      key = "/".join(path)
      if key in stats:
        raise ValueError(f"two weight statistics nodes under {key!r}; expected "
                         "one per LoRA pair.")
      stats[key] = found
    return type(node)(kept)

  rest = walk(grads, ())
  if _contains_stats(rest):
    raise ValueError("split_weight_stats: found WeightStats outside a mapping "
                     "(e.g. in a list or tuple); they must be a mapping entry "
                     "next to their LoRA factors.")
  return rest, stats


def _put_zero_stats(full: PyTree, rest: PyTree) -> PyTree:
  """``rest`` with zeros restored where ``full`` holds statistics."""
  nnx = _nnx()
  if nnx is not None and isinstance(full, nnx.State):
    return nnx.State(_put_zero_stats(full.raw_mapping, rest.raw_mapping))
  if not isinstance(full, Mapping):
    return rest
  merged = {}
  for name, child in full.items():
    if _stats_of(child) is None:
      merged[name] = _put_zero_stats(child, rest[name])
    else:
      merged[name] = jax.tree.map(jnp.zeros_like, child)
  return type(full)(merged)


def with_weight_stats(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Feeds the statistics carried in the gradient tree to ``inner``.

  ``update(grads, state, params)`` splits the statistics off ``grads`` with
  :func:`split_weight_stats` and calls
  ``inner.update(rest, state, rest_params, weight_stats=stats)``. The
  statistics leaves get zero updates (their value is never read). This lets
  ``nnx.Optimizer`` hand everything over in one tree::

    wrt = nnx.Any(nnx.LoRAParam, WeightStatsVar)
    opt = nnx.Optimizer(model, with_weight_stats(adaprelora(1e-3,
                        statistics="full")), wrt=wrt)
    opt.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model))

  Wrap the whole chain, ``with_weight_stats(optax.chain(clip, adaprelora(...)))``,
  so that no other transformation mistakes the statistics for gradients
  (``clip_by_global_norm`` would count them). ``optax.MultiSteps`` goes
  outside: it averages the statistics over micro-batches like the gradients,
  which is the mean of micro-batch mean squares, not the mean square of the
  accumulated gradient (see the module docstring).

  Args:
    inner: a transformation whose ``update`` takes ``weight_stats``, e.g.
      :func:`~adaprelora_jax.adaprelora`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over the full tree.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(split_weight_stats(params)[0])

  def update_fn(updates, state, params=None, **extra_args):
    if "weight_stats" in extra_args:
      raise ValueError("with_weight_stats reads the statistics from the "
                       "gradient tree; do not also pass weight_stats=.")
    rest, stats = split_weight_stats(updates)
    rest_params = None if params is None else split_weight_stats(params)[0]
    new, state = inner.update(rest, state, rest_params, weight_stats=stats,
                              **extra_args)
    return _put_zero_stats(updates, new), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
