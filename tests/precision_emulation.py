"""Evaluates a function as a GPU or a TPU would round its float32 matmuls, on CPU.

A float32 ``dot_general`` runs, unless it asks for more, at TF32 on an NVIDIA
GPU (operands rounded to 10 mantissa bits) and in one bfloat16 pass on a TPU
(7 bits); ``HIGH`` is TF32 on a GPU and three bfloat16 passes on a TPU;
``HIGHEST`` is float32 on both. CPU computes every one in float32, so a test
there cannot see the difference. :func:`emulate` interprets the function's
jaxpr and, at each float32 ``dot_general``, rounds the operands as the chosen
hardware would for the precision that dot carries, then multiplies exactly.
Control flow is run eagerly (a ``cond`` takes the branch its index names), so
every dot of the program is reached, however deeply nested.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.extend import core

Hardware = Literal["gpu", "tpu"]
Policy = Callable[[core.JaxprEqn], lax.Precision]
"""The precision a dot is emulated at, from its equation (default: the one it carries)."""


def _tf32(x: np.ndarray) -> np.ndarray:
  """``x`` rounded to TF32's 10 mantissa bits, to nearest even."""
  bits = np.asarray(x, np.float32).view(np.uint32)
  bits = (bits + np.uint32(0x0FFF) + ((bits >> 13) & 1)) & np.uint32(0xFFFFE000)
  return bits.view(np.float32)


def _bf16(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def carried_precision(eqn: core.JaxprEqn) -> lax.Precision:
  """The precision a ``dot_general`` equation asks for (the lower of its two operands')."""
  precision = eqn.params["precision"]
  if precision is None:
    return lax.Precision.DEFAULT
  if isinstance(precision, lax.Precision):
    return precision
  if isinstance(precision, tuple):
    return min((p if p is not None else lax.Precision.DEFAULT for p in precision),
               key=lambda p: p.value)
  raise NotImplementedError(f"dot precision {precision!r} (an algorithm) is not emulated")


def _dot(eqn: core.JaxprEqn, x: Any, y: Any, hardware: Hardware, policy: Policy) -> Any:
  exact = lambda u, v: lax.dot_general(
      jnp.asarray(u, x.dtype), jnp.asarray(v, y.dtype), **{
          **eqn.params, "precision": lax.Precision.HIGHEST})
  if x.dtype != jnp.float32 or y.dtype != jnp.float32:
    return exact(x, y)
  precision = policy(eqn)
  if precision == lax.Precision.HIGHEST:
    return exact(x, y)
  x, y = np.asarray(x), np.asarray(y)
  if hardware == "gpu":  # DEFAULT and HIGH are both TF32
    return exact(_tf32(x), _tf32(y))
  if precision == lax.Precision.DEFAULT:
    return exact(_bf16(x), _bf16(y))
  # HIGH on a TPU: three bfloat16 passes, the low-order product dropped.
  x_hi, y_hi = _bf16(x), _bf16(y)
  x_lo, y_lo = _bf16(x - x_hi), _bf16(y - y_hi)
  return exact(x_hi, y_hi) + exact(x_hi, y_lo) + exact(x_lo, y_hi)


_CALL_JAXPR = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _eval(jaxpr: core.Jaxpr, consts: list, args: list, hardware: Hardware, policy: Policy
          ) -> list:
  env: dict = {}
  read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    sub = lambda closed, vals: _eval(closed.jaxpr, closed.consts, vals, hardware, policy)
    if eqn.primitive is lax.dot_general_p:
      outs = [_dot(eqn, *invals, hardware, policy)]
    elif eqn.primitive.name == "cond":
      outs = sub(eqn.params["branches"][int(invals[0])], invals[1:])
    elif eqn.primitive.name == "while":
      p = eqn.params
      cond_consts, body_consts = invals[:p["cond_nconsts"]], invals[
          p["cond_nconsts"]:p["cond_nconsts"] + p["body_nconsts"]]
      carry = invals[p["cond_nconsts"] + p["body_nconsts"]:]
      while bool(sub(p["cond_jaxpr"], [*cond_consts, *carry])[0]):
        carry = sub(p["body_jaxpr"], [*body_consts, *carry])
      outs = carry
    elif any(name in eqn.params for name in _CALL_JAXPR):
      closed = next(eqn.params[name] for name in _CALL_JAXPR if name in eqn.params)
      closed = closed if isinstance(closed, core.ClosedJaxpr) else core.ClosedJaxpr(closed, ())
      outs = sub(closed, invals)
    elif any(isinstance(v, (core.Jaxpr, core.ClosedJaxpr)) for v in eqn.params.values()):
      raise NotImplementedError(f"no emulation of {eqn.primitive.name}'s inner jaxpr")
    else:
      outs = eqn.primitive.bind(*invals, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    for var, value in zip(eqn.outvars, outs):
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


def emulate(fn: Callable[..., Any], hardware: Hardware, policy: Policy = carried_precision
            ) -> Callable[..., Any]:
  """``fn`` with every float32 ``dot_general`` rounded as ``hardware`` rounds it.

  Args:
    fn: a function of arrays and pytrees of arrays.
    hardware: ``"gpu"`` (TF32) or ``"tpu"`` (bfloat16 passes).
    policy: the precision each dot is emulated at; by default the one it
      carries, as the hardware would run it.
  """

  def run(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args), hardware, policy)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return run

