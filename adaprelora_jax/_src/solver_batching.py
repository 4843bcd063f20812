"""One solver call per stage: a program's independent matrix decompositions merged.

An update solves ``r × r`` problems for every role and layer. Each group of
same-shaped pairs is one ``vmap``, so each decomposition a slice update makes is one
batched solver call per group. On an accelerator every call has a fixed cost
(a cuSOLVER launch sequence on a GPU, a Jacobi loop on a TPU), but
decompositions that do not depend on each other's results can share one.

:func:`batch_solves` traces a function and gives each decomposition a
*stage*: the number of decompositions its inputs depend on, one after
another. It then runs the function with every decomposition of one stage,
primitive and matrix size as one call over the concatenated matrices. The
other equations run as traced, in an order their dependencies allow. It
knows nothing of the math: slice updates stay written per slice.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core

SOLVERS = frozenset({lax.linalg.eigh_p, lax.linalg.cholesky_p, lax.linalg.triangular_solve_p})
"""The decompositions merged: each is one solver call on every platform."""

# Calls whose bodies are inlined, so that the decompositions inside them are seen.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}


class _Node(NamedTuple):
  eqn: core.JaxprEqn
  inputs: list[int]
  outputs: list[int]


class _Program:
  """A traced function as one flat list of equations over numbered values."""

  def __init__(self) -> None:
    self.nodes: list[_Node] = []
    self.constants: dict[int, Any] = {}
    self._next = itertools.count()

  def fresh(self) -> int:
    return next(self._next)

  def constant(self, value: Any) -> int:
    key = self.fresh()
    self.constants[key] = value
    return key

  def add(self, jaxpr: core.Jaxpr, consts: list, inputs: list[int]) -> list[int]:
    """Appends ``jaxpr``'s equations, calls inlined; returns its outputs' keys."""
    env = dict(zip(jaxpr.invars, inputs))
    env.update((var, self.constant(c)) for var, c in zip(jaxpr.constvars, consts))
    read = lambda v: self.constant(v.val) if isinstance(v, core.Literal) else env[v]
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      body = eqn.params.get(_CALLS.get(eqn.primitive.name, ""))
      if body is not None:
        body = body if isinstance(body, core.ClosedJaxpr) else core.ClosedJaxpr(body, ())
        outs = self.add(body.jaxpr, body.consts, ins)
      else:
        outs = [self.fresh() for _ in eqn.outvars]
        self.nodes.append(_Node(eqn, ins, outs))
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn: core.JaxprEqn, inputs: list) -> list:
  """``eqn``'s primitive on ``inputs``, its outputs as a list."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ([], bind_params)
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*subfuns, *inputs, **bind_params)
  return outs if eqn.primitive.multiple_results else [outs]


def _signature(node: _Node, values: dict[int, Any]) -> tuple:
  """What decompositions must share to be one call: primitive, parameters, matrix shapes."""
  params = tuple(sorted((k, repr(v)) for k, v in node.eqn.params.items()))
  matrices = tuple((values[k].dtype, values[k].shape[-2:]) for k in node.inputs)
  return node.eqn.primitive, params, matrices


def _run_merged(nodes: list[_Node], values: dict[int, Any]) -> None:
  """Runs same-signature decompositions as one call over their stacked matrices."""
  eqn = nodes[0].eqn
  if len(nodes) == 1:
    values.update(zip(nodes[0].outputs, _bind(eqn, [values[k] for k in nodes[0].inputs])))
    return
  batches = [values[node.inputs[0]].shape[:-2] for node in nodes]
  matrices = lambda x: x.reshape(-1, *x.shape[-2:])
  stacked = [jnp.concatenate([matrices(values[node.inputs[i]]) for node in nodes])
             for i in range(len(eqn.invars))]
  outs = _bind(eqn, stacked)
  start = 0
  for node, batch in zip(nodes, batches):
    size = math.prod(batch)
    for key, out in zip(node.outputs, outs):
      values[key] = out[start:start + size].reshape(*batch, *out.shape[1:])
    start += size


def _evaluate(program: _Program, inputs: dict[int, Any]) -> dict[int, Any]:
  values = {**program.constants, **inputs}
  depth: dict[int, int] = defaultdict(int)
  level = []
  for node in program.nodes:
    d = max((depth[k] for k in node.inputs), default=0)
    level.append(d)
    for k in node.outputs:
      depth[k] = d + (node.eqn.primitive in SOLVERS)
  for stage in range(max(level, default=-1) + 1):
    solves = defaultdict(list)
    for node, d in zip(program.nodes, level):
      if d != stage:
        continue
      if node.eqn.primitive in SOLVERS:
        solves[_signature(node, values)].append(node)
        continue
      values.update(zip(node.outputs, _bind(node.eqn, [values[k] for k in node.inputs])))
    for group in solves.values():
      _run_merged(group, values)
  return values


def batch_solves(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with its decompositions of each stage, primitive and size merged into one call.

  Same results as ``fn`` (each matrix is solved on its own within a batched
  call); for functions of arrays and pytrees of arrays, with no effects.
  """

  def run(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    program = _Program()
    in_keys = [program.fresh() for _ in closed.jaxpr.invars]
    out_keys = program.add(closed.jaxpr, closed.consts, in_keys)
    values = _evaluate(program, dict(zip(in_keys, jax.tree.leaves(args))))
    return jax.tree.unflatten(jax.tree.structure(out_shape), [values[k] for k in out_keys])

  return run
