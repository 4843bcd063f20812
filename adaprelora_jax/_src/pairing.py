"""Finding the LoRA factor pairs ``(A, B)`` in a parameter pytree.

A pair is two leaves whose paths a naming rule maps to the same pair key, one
with role ``"a"`` and one with role ``"b"``. Out of the box these namings are
recognised (the leaf path is read as a tuple of names; a trailing ``value``,
as NNX variables add, is ignored):

=====================  ================================  =================
scheme                 leaf path ends with               pair key
=====================  ================================  =================
``flax.nnx.LoRA``      ``…/lora_a``, ``…/lora_b``        ``…``
Qwix                   ``…/<name>_lora_a``, ``_lora_b``  ``…/<name>``
Gemma peft             ``…/lora/a``, ``…/lora/b``        ``…``
Hugging Face style     ``…/lora_A[/weight|kernel]``,     ``…``
                       ``…/lora_B[/weight|kernel]``
=====================  ================================  =================

Factors may be N-D (Qwix and Gemma einsum layers) and may carry leading batch
axes (stacked or scanned layers, experts) shared by both factors::

  A: (*batch, *in_dims, r)        B: (*batch, r, *out_dims)

The pair is then solved as ``m = prod(in_dims)`` by ``n = prod(out_dims)``
matrices, batched over ``batch``. The batch axes are the longest common
leading axes for which the rank axes line up. A pair stored in the PyTorch
layout (``lora_A (*batch, r, in)``, ``lora_B (*batch, out, r)``) is
recognised when only that reading fits (with ``r ≤ in, out``), and is solved
as ``ΔW = lora_B lora_A``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax

Role = Literal["a", "b"]
PairingRule = Callable[[tuple[str, ...]], "tuple[str, Role] | None"]

_HF_SUFFIXES = ("weight", "kernel")


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """A JAX key path as a tuple of plain names, without NNX's ``value``."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  if names and names[-1] in ("value", "raw_value"):
    names.pop()
  return tuple(names)


def default_rule(names: tuple[str, ...]) -> tuple[str, Role] | None:
  """Recognises the NNX, Qwix, Gemma-peft and Hugging Face namings.

  Args:
    names: a leaf path as plain names (:func:`path_names`).

  Returns:
    ``(pair_key, "a" | "b")`` for a LoRA factor (see the module table), else
    ``None``. A user rule has the same signature.
  """
  if names and names[-1] in _HF_SUFFIXES and len(names) >= 2:
    if names[-2] in ("lora_A", "lora_B"):
      names = names[:-1]
  if not names:
    return None
  *parents, last = names
  if last in ("lora_a", "lora_b", "lora_A", "lora_B"):
    return "/".join(parents), last[-1].lower()
  for role in ("a", "b"):
    suffix = f"_lora_{role}"
    if last.endswith(suffix) and len(last) > len(suffix):
      return "/".join([*parents, last[: -len(suffix)]]), role
  if len(parents) >= 1 and parents[-1] == "lora" and last in ("a", "b"):
    return "/".join(parents[:-1]), last
  return None


@dataclasses.dataclass(frozen=True)
class LoRAPair:
  """One LoRA pair: where its factors live and how they are read as matrices.

  Attributes:
    key: the pair's name, e.g. ``"layers/0/attention/query"``.
    a_path, b_path: the leaf paths of the factors playing ``A`` and ``B``.
    a_index, b_index: positions of those leaves in the flattened tree.
    batch_shape: leading axes shared by both factors.
    in_shape: ``A``'s axes between the batch axes and the rank.
    out_shape: ``B``'s axes after the rank.
    rank: ``r``.
  """

  key: str
  a_path: str
  b_path: str
  a_index: int
  b_index: int
  batch_shape: tuple[int, ...]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  rank: int

  @property
  def m(self) -> int:
    return math.prod(self.in_shape)

  @property
  def n(self) -> int:
    return math.prod(self.out_shape)

  @property
  def a_matrix_shape(self) -> tuple[int, ...]:
    return (*self.batch_shape, self.m, self.rank)

  @property
  def b_matrix_shape(self) -> tuple[int, ...]:
    return (*self.batch_shape, self.rank, self.n)


@dataclasses.dataclass(frozen=True)
class LoRAPairing:
  """The result of :func:`lora_pairs`.

  Attributes:
    pairs: the pairs found, in tree order of their ``A`` leaves.
    unpaired: paths of the leaves that are not LoRA factors (they go to the
      fallback transformation).
    treedef: the structure of the tree that was paired.
  """

  pairs: tuple[LoRAPair, ...]
  unpaired: tuple[str, ...]
  treedef: Any

  def fallback_mask(self) -> Any:
    """A tree of bools, ``True`` on the leaves that are not LoRA factors."""
    paired = {i for p in self.pairs for i in (p.a_index, p.b_index)}
    return jax.tree_util.tree_unflatten(
        self.treedef, [i not in paired for i in range(self.treedef.num_leaves)]
    )


def _split_axes(a_shape, b_shape) -> tuple[int, ...] | None:
  """The batch shape under which ``A`` ends and ``B`` starts with the rank."""
  if len(a_shape) < 2 or len(b_shape) < 2:
    return None
  rank = a_shape[-1]
  for k in range(min(len(a_shape), len(b_shape)) - 2, -1, -1):
    if a_shape[:k] == b_shape[:k] and b_shape[k] == rank:
      return tuple(a_shape[:k])
  return None


def _is_low_rank(a_shape, b_shape) -> bool:
  """Whether the rank is at most the in and out sizes (a plausible reading)."""
  k = len(_split_axes(a_shape, b_shape))
  rank = a_shape[-1]
  return rank <= math.prod(a_shape[k:-1]) and rank <= math.prod(b_shape[k + 1:])


def _make_pair(key, found) -> LoRAPair:
  (a_path, a_index, a_shape), (b_path, b_index, b_shape) = found["a"], found["b"]
  batch = _split_axes(a_shape, b_shape)
  swapped = _split_axes(b_shape, a_shape)
  if batch is None and swapped is not None and _is_low_rank(b_shape, a_shape):
    # PyTorch layout: ``lora_B (out, r) @ lora_A (r, in)``.
    (a_path, a_index, a_shape), (b_path, b_index, b_shape) = (
        found["b"], found["a"])
    batch = swapped
  if batch is None:
    raise ValueError(
        f"LoRA pair {key!r}: factor shapes do not fit together. "
        f"{found['a'][0]} has shape {found['a'][2]} and {found['b'][0]} has "
        f"shape {found['b'][2]}; expected A (*batch, *in, r) and "
        "B (*batch, r, *out) with the same rank r and batch axes."
    )
  if 0 in a_shape or 0 in b_shape:
    raise ValueError(
        f"LoRA pair {key!r} is empty: {a_path} has shape {a_shape} and {b_path} has "
        f"shape {b_shape}; expected every axis, the rank included, to be at least 1.")
  k = len(batch)
  return LoRAPair(
      key=key, a_path=a_path, b_path=b_path, a_index=a_index, b_index=b_index,
      batch_shape=batch, in_shape=tuple(a_shape[k:-1]),
      out_shape=tuple(b_shape[k + 1:]), rank=a_shape[-1],
  )


def lora_pairs(params: Any, rule: PairingRule | None = None) -> LoRAPairing:
  """Finds every LoRA pair ``(A, B)`` in ``params``.

  Args:
    params: a pytree of arrays (or anything with ``.shape``, such as
      ``jax.ShapeDtypeStruct``), e.g. ``nnx.state(model, nnx.LoRAParam)``.
    rule: maps a leaf path (a tuple of names) to ``(pair_key, "a" | "b")`` for
      LoRA factors and to ``None`` for other leaves. Defaults to
      :func:`default_rule`.

  Returns:
    A :class:`LoRAPairing`.

  Raises:
    ValueError: for a lone factor, two leaves claiming the same role of a pair,
      or factors whose shapes do not fit together; the message names the
      paths and shapes.
  """
  rule = default_rule if rule is None else rule
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  found: dict[str, dict[str, tuple[str, int, tuple[int, ...]]]] = {}
  unpaired = []
  for index, (path, leaf) in enumerate(leaves):
    names = path_names(path)
    shown = "/".join(names)
    match = rule(names)
    if match is None:
      unpaired.append(shown)
      continue
    key, role = match
    if role not in ("a", "b"):
      raise ValueError(f"pairing rule returned role {role!r} for {shown}; "
                       "expected 'a' or 'b'.")
    slot = found.setdefault(key, {})
    if role in slot:
      raise ValueError(
          f"LoRA pair {key!r} has two '{role}' factors: {slot[role][0]} and "
          f"{shown}.")
    slot[role] = (shown, index, tuple(leaf.shape))
  lone = [(key, next(iter(s.values()))) for key, s in found.items() if len(s) == 1]
  if lone:
    described = "; ".join(
        f"{path} with shape {shape} (pair {key!r}, role "
        f"{'a' if 'a' in found[key] else 'b'})"
        for key, (path, _, shape) in lone)
    raise ValueError(f"LoRA factor(s) without a partner: {described}.")
  pairs = sorted((_make_pair(key, s) for key, s in found.items()),
                 key=lambda p: p.a_index)
  return LoRAPairing(tuple(pairs), tuple(unpaired), treedef)
