"""How the plumbing lays LoRA pairs out into one program: which are solved together.

A :class:`Layout` groups pairs into ``vmap``-ed groups and, optionally, into
chunks solved one after another. The default, :data:`JOINED`, suits
accelerators: the same projection of every layer (``layers/3/q`` and
``layers/7/q``) is one group, so the program, its kernel count and its
compile time stay flat in depth, and everything is one program for XLA to
schedule. :data:`CHUNKED` is an explicit choice for XLA's CPU runtime, where
large programs' temporaries are allocated afresh on every call: pairs are
solved alone (joined only when a chunk would hold many small ones), in chunks
of a bounded size (``benchmarks/RESULTS.md``, "Layouts").
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp

from adaprelora_jax._src.base import PyTree, compute_dtype
from adaprelora_jax._src.pairing import LoRAPair

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which pairs one ``vmap`` solves, and in how many sequential chunks.

  Attributes:
    join_layers_above: join the same projection of every unscanned layer
      into one group when more than this many pairs would otherwise be
      solved together (in a chunk, or in the whole update); ``None``: never.
      Joining copies the pairs' inputs, and keeps XLA's compile time flat in
      depth for rules with ``r × r`` algebra.
    chunk_bytes: solve the groups in chunks of about this many bytes of
      factors, gradients and state, one chunk after another (a group larger
      than a chunk is split); ``None``: all at once. Each chunk is a
      ``lax.cond`` whose predicate depends on the previous chunk's results,
      so only one chunk's temporaries are live at a time.
  """

  join_layers_above: int | None = 0
  chunk_bytes: int | None = None


JOINED = Layout()
"""Every role's layers joined, no chunks: the fewest and largest kernels (the default)."""

CHUNKED = Layout(join_layers_above=32, chunk_bytes=24 * 2**20)
"""Pairs alone in chunks of 24 MiB (two 7B layers at ``r = 16``), for XLA's CPU runtime."""

ELEMENTWISE = Layout(join_layers_above=None)
"""Pairs alone, no chunks: for element-wise rules, which joining would only copy."""


class Member(NamedTuple):
  """A pair to solve: its factors and factor gradients, and their size with its state."""

  pair: LoRAPair
  inputs: tuple[jax.Array, jax.Array, jax.Array, jax.Array]
  nbytes: int


def input_bytes(arrays: Sequence[jax.Array], state: PyTree) -> int:
  """Bytes of a pair's factors, gradients and state, as its slice update computes with them."""
  itemsize = jnp.dtype(compute_dtype(*(x.dtype for x in arrays))).itemsize
  return sum(x.size for x in (*arrays, *jax.tree.leaves(state))) * itemsize


_LAYER_INDEX = re.compile(r"\d+")


def _role_key(member: Member, extra: PyTree) -> tuple:
  """One group per role (pair key up to layer numbers), shape, dtype and extra-input structure."""
  pair = member.pair
  return (_LAYER_INDEX.sub("#", pair.key), pair.m, pair.n, pair.rank,
          tuple(x.dtype for x in member.inputs), jax.tree.structure(extra))


def _pack(items: list[T], nbytes: Callable[[T], int], limit: int) -> list[list[T]]:
  """``items`` in order, in runs of at most ``limit`` bytes (at least one item each)."""
  runs, filled = [[]], 0
  for item in items:
    if runs[-1] and filled + nbytes(item) > limit:
      runs.append([])
      filled = 0
    runs[-1].append(item)
    filled += nbytes(item)
  return runs


def _chunks(groups: list[list[Member]], chunk_bytes: int | None) -> list[list[list[Member]]]:
  if chunk_bytes is None:
    return [groups]
  group_bytes = lambda group: sum(member.nbytes for member in group)
  groups = [run for group in groups for run in _pack(group, lambda m: m.nbytes, chunk_bytes)]
  return _pack(groups, group_bytes, chunk_bytes)


def plan(layout: Layout, members: list[Member], extras: dict[str, PyTree]
         ) -> list[list[list[Member]]]:
  """``members`` in chunks (solved one after another) of groups (each one ``vmap``)."""
  alone = _chunks([[member] for member in members], layout.chunk_bytes)
  most = max(sum(map(len, chunk)) for chunk in alone)
  if layout.join_layers_above is None or most <= layout.join_layers_above:
    return alone
  by_role = defaultdict(list)
  for member in members:
    by_role[_role_key(member, extras.get(member.pair.key))].append(member)
  return _chunks(list(by_role.values()), layout.chunk_bytes)
