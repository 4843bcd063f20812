"""Restoring an optimizer state from an Orbax checkpoint, checked leaf by leaf.

Save the state with Orbax as it is::

  ocp.StandardCheckpointer().save(path, opt_state)

and restore it with :func:`restore_state`. Orbax restores into whatever target
tree it is given, and a checkpoint written for another optimizer does not
always fail: a state saved *with* momentum restores into one *without* by
silently dropping the momentum buffers, and a shape mismatch is reported
without saying which buffer. :func:`restore_state` first compares the stored
tree with ``jax.eval_shape(tx.init, params)`` and names the first leaf that
differs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import optax

if TYPE_CHECKING:
  import orbax.checkpoint as ocp

from adaprelora_jax._src.pairing import path_names

PyTree = Any


def restore_state(
    path: str | os.PathLike,
    tx: optax.GradientTransformation,
    params: PyTree,
    shardings: PyTree | None = None,
    *,
    checkpointer: ocp.AbstractCheckpointer | None = None,
) -> optax.OptState:
  """Restores ``tx``'s state for ``params`` from an Orbax checkpoint.

  Args:
    path: the checkpoint directory given to ``save``.
    tx: the optimizer whose state was saved.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``); they fix the
      expected state through ``jax.eval_shape(tx.init, params)``.
    shardings: a sharding per state leaf, e.g. from
      :func:`~adaprelora_jax.state_shardings`; ``None`` puts the state
      on the default device.
    checkpointer: an Orbax checkpointer whose ``restore(path, target)`` takes a
      target tree (``StandardCheckpointer``, ``PyTreeCheckpointer``);
      defaults to ``ocp.StandardCheckpointer()``.

  Returns:
    The restored state, with the structure of ``tx.init(params)``.

  Raises:
    FileNotFoundError: if there is no checkpoint at ``path``.
    NotADirectoryError: if ``path`` is a file, not a checkpoint directory.
    ValueError: if its metadata cannot be read (a damaged checkpoint, or one
      another checkpointer wrote); if the checkpoint holds a leaf the state
      lacks, lacks one it has, or stores one with another shape or dtype (the
      message names the first such leaf path, with both shapes and dtypes);
      or if its array data is missing or damaged (the message gives the
      first line of TensorStore's reason).
  """
  import orbax.checkpoint as ocp  # here: slow to import, and only restoring needs it

  checkpointer = ocp.StandardCheckpointer() if checkpointer is None else checkpointer
  expected = jax.eval_shape(tx.init, params)
  _check_matches(_leaves(_stored_tree(checkpointer, path)), expected, path)
  if shardings is None:
    shardings = jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), expected)
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      expected, shardings)
  try:
    return checkpointer.restore(path, target)
  except Exception as error:
    # Orbax wraps TensorStore's read error in a bare Exception quoting the whole spec.
    if type(error) is not Exception or not isinstance(error.__cause__, ValueError):
      raise
    raise ValueError(f"checkpoint {path}: its array data is missing or damaged "
                     f"({_first_line(error.__cause__, path)})") from error.__cause__


def _first_line(error: BaseException, path: str | os.PathLike, limit: int = 160) -> str:
  """``error``'s first line, without the checkpoint's path (said already), cut to ``limit``."""
  line = str(error).strip().split("\n", 1)[0].replace(os.path.abspath(path), "…")
  return line if len(line) <= limit else line[:limit - 1] + "…"


def _stored_tree(checkpointer: ocp.AbstractCheckpointer, path: str | os.PathLike) -> PyTree:
  """The stored tree's metadata, or the reason it cannot be read."""
  from etils import epath  # Orbax's paths, gs:// included

  if not epath.Path(path).exists():
    raise FileNotFoundError(f"Checkpoint at {path} not found.")
  if not epath.Path(path).is_dir():
    raise NotADirectoryError(f"checkpoint {path} is a file, not a checkpoint directory "
                             "(restore from the directory given to save).")
  stored = checkpointer.metadata(path)
  stored = getattr(stored, "item_metadata", stored)
  if stored is None:
    raise ValueError(
        f"checkpoint {path}: {type(checkpointer).__name__} could not read its metadata; it is "
        "damaged or was written by another kind of checkpointer (Orbax logs the cause).")
  return stored


Leaves = dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]


def _leaves(tree: PyTree) -> Leaves:
  """``{leaf path: (shape, dtype)}`` in tree order, a path as a tuple of names.

  Works on a state and on Orbax's metadata tree alike: the metadata stores
  NamedTuples as dicts and empty nodes as ``None``, which give the same paths
  and no leaves.
  """
  return {path_names(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_matches(stored: Leaves, expected: PyTree, path: Any) -> None:
  """Raises if ``stored`` (leaf path → shape, dtype) differs from ``expected``."""
  want = _leaves(expected)
  describe = lambda leaf: f"{leaf[0]} {leaf[1].name}"
  shown = "/".join
  for name, leaf in want.items():
    if name not in stored:
      raise ValueError(
          f"checkpoint {path} has no leaf {shown(name)}, which the optimizer state "
          f"for these params has ({describe(leaf)}): it was saved for another "
          "optimizer configuration or other LoRA pairs.")
    if stored[name] != leaf:
      raise ValueError(
          f"checkpoint {path} stores {shown(name)} as {describe(stored[name])}, but "
          f"the optimizer state for these params has {describe(leaf)}.")
  for name, leaf in stored.items():
    if name not in want:
      raise ValueError(
          f"checkpoint {path} has a leaf {shown(name)} ({describe(leaf)}) that the "
          "optimizer state for these params does not have: it was saved for "
          "another optimizer configuration or other LoRA pairs.")
