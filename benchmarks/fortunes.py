"""Causal language-modelling task: fortune cookies (Debian ``fortunes``), split by category.

Each file under :func:`benchmarks.assets.fortunes_dir` is one category
(``computers``, ``food``, ``science``, ...) holding entries separated by lines
that are just ``%``. Old entries fake underlining with backspaces
(``____^H^H^H^HBODY``); :func:`clean` resolves them as a terminal would.

The split is by category and fixed: :data:`HELDOUT_CATEGORIES` (five everyday
topics, about 5% of the tokens) are never trained on, so held-out perplexity
measures how well a fine-tune keeps to the fortune *style* on unseen subjects
rather than how well it memorised entries. :data:`EXCLUDED_CATEGORIES` are
pictures, not language, and are in neither split.

For language modelling the entries are packed (GPT-style) into rows of
``max_len`` tokens: each entry is preceded by SmolLM2's document separator
``<|endoftext|>`` and the stream is cut into rows, so no compute goes to
padding except in the last row.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from benchmarks.assets import fortunes_dir
from benchmarks.smollm2 import SmolLM2, Tokenizer, token_nll

HELDOUT_CATEGORIES = ("food", "love", "medicine", "pets", "sports")
"""Categories never seen in training (fixed, so every run is scored on the same text)."""

EXCLUDED_CATEGORIES = ("ascii-art",)
"""Categories in neither split: ASCII drawings."""

_SEPARATOR_LINE = re.compile(r"^%[ \t]*$", flags=re.MULTILINE)

Batch = tuple[np.ndarray, np.ndarray]
"""``(input_ids, loss_mask)``, both ``int32 (batch, max_len)``; see :func:`benchmarks.smollm2.token_nll`."""


def clean(entry: str) -> str:
  """An entry without overstrike backspaces (each deletes the character before it) and surrounding blank lines."""
  if "\b" in entry:
    kept: list[str] = []
    for char in entry:
      if char != "\b":
        kept.append(char)
      elif kept:
        kept.pop()
    entry = "".join(kept)
  return entry.strip("\n").rstrip()


def read_category(path: Path) -> tuple[str, ...]:
  """The non-empty, cleaned entries of one fortune file, in file order."""
  entries = (clean(e) for e in _SEPARATOR_LINE.split(path.read_text(encoding="utf-8")))
  return tuple(e for e in entries if e.strip())


def read_fortunes(folder: Path | None = None) -> dict[str, tuple[str, ...]]:
  """``category -> entries`` for every fortune file (not the ``.dat`` indexes nor ``.u8`` links), sorted by name."""
  folder = folder if folder is not None else fortunes_dir()
  files = sorted(
      p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix
  )
  return {p.name: read_category(p) for p in files if p.name not in EXCLUDED_CATEGORIES}


def split_categories(categories: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """``(train, heldout)`` category names, each sorted: held out iff in :data:`HELDOUT_CATEGORIES`."""
  names = sorted(set(categories) - set(EXCLUDED_CATEGORIES))
  missing = set(HELDOUT_CATEGORIES) - set(names)
  if missing:
    raise ValueError(f"held-out categories {sorted(missing)} are not in the fortunes data")
  return (
      tuple(c for c in names if c not in HELDOUT_CATEGORIES),
      tuple(c for c in names if c in HELDOUT_CATEGORIES),
  )


@dataclasses.dataclass(frozen=True)
class LMData:
  """Packed rows: token ids and loss mask, both ``int32 (rows, max_len)``; the mask is 1 on real tokens."""

  input_ids: np.ndarray
  loss_mask: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)

  @property
  def num_targets(self) -> int:
    """Tokens scored by :func:`perplexity` (real tokens not in column 0)."""
    return int(self.loss_mask[:, 1:].sum())

  def head(self, rows: int) -> LMData:
    """The first ``rows`` rows."""
    return LMData(self.input_ids[:rows], self.loss_mask[:rows])

  def batches(self, batch_size: int, seed: int | None = None) -> list[Batch]:
    """All rows in batches of exactly ``batch_size`` (one jit shape), in row order or a ``seed`` permutation.

    The last batch is filled up with copies of row 0 whose loss mask is 0, so
    every row counts once and the filler counts nothing.
    """
    rows = len(self)
    order = np.arange(rows) if seed is None else np.random.default_rng(seed).permutation(rows)
    order = np.concatenate([order, np.zeros(-len(order) % batch_size, dtype=order.dtype)])
    real = np.arange(len(order)) < rows
    mask = self.loss_mask[order] * real[:, None].astype(np.int32)
    return [
        (self.input_ids[order[i : i + batch_size]], mask[i : i + batch_size])
        for i in range(0, len(order), batch_size)
    ]


def pack(texts: Sequence[str], tokenizer: Tokenizer, max_len: int) -> LMData:
  """``<|endoftext|> text_0 <|endoftext|> text_1 ...`` cut into rows of ``max_len`` tokens; the last row is padded."""
  separator = tokenizer.separator_id
  stream = np.array(
      [t for ids in tokenizer.encode_batch(texts) for t in (separator, *ids)], dtype=np.int32
  )
  pad = -len(stream) % max_len
  ids = np.concatenate([stream, np.full(pad, separator, np.int32)]).reshape(-1, max_len)
  mask = (np.arange(ids.size) < len(stream)).astype(np.int32).reshape(-1, max_len)
  return LMData(ids, mask)


def load_fortunes(tokenizer: Tokenizer, max_len: int = 128, seed: int = 0) -> tuple[LMData, LMData]:
  """``(train, heldout)`` packed LM data (see :func:`split_categories`).

  ``train`` packs the train categories' entries in a ``seed``-dependent
  random order, so entries of one category do not cluster in the stream;
  ``heldout`` packs the held-out entries in category then file order and
  never depends on ``seed``.
  """
  fortunes = read_fortunes()
  train_names, heldout_names = split_categories(fortunes)
  train_texts = [e for c in train_names for e in fortunes[c]]
  order = np.random.default_rng(seed).permutation(len(train_texts))
  return (
      pack([train_texts[i] for i in order], tokenizer, max_len),
      pack([e for c in heldout_names for e in fortunes[c]], tokenizer, max_len),
  )


_jit_token_nll = nnx.jit(token_nll)


def perplexity(model: SmolLM2, batches: Sequence[Batch]) -> float:
  """``exp`` of the mean next-token negative log-likelihood over all target tokens of ``batches``."""
  total, count = 0.0, 0.0
  for input_ids, loss_mask in tqdm(batches, desc="perplexity", leave=False):
    nll, n = _jit_token_nll(model, jnp.asarray(input_ids), jnp.asarray(loss_mask))
    total, count = total + float(nll), count + float(n)
  return float(np.exp(total / max(count, 1.0)))
