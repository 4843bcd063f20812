"""Text classification task: WordNet noun definition -> lexicographer category (26 classes).

Each noun synset in WordNet 3.0's ``data.noun`` is filed under one of 26
lexicographer files (``noun.animal``, ``noun.artifact``, ...). The input is the
synset's *definition only*: the gloss with its quoted usage examples cut off,
and without the synset's lemmas. Examples often repeat the headword and are
mostly truncated at 32 tokens anyway; the lemma alone gives the category away
for many synsets. Without them the model must read the definition, which
leaves real headroom for fine-tuning over a frozen-encoder baseline.

The held-out split is fixed: a definition is held out iff a SHA-256 bucket of
its text says so, independently of any seed; identical definitions (a few
synsets share one) therefore always land in the same split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np

from benchmarks.assets import wordnet_dir
from benchmarks.minilm import Tokenizer, load_tokenizer

NOUN_LEXNAMES = (
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
)
"""Class names; class ``i`` is lexicographer file ``i + FIRST_NOUN_LEXFILE`` (WordNet's ``lexnames``)."""

FIRST_NOUN_LEXFILE = 3
HELDOUT_BUCKETS = 10  # one definition in ten is held out
_HELDOUT_SUBSAMPLE_SEED = 12345  # fixed, so a capped held-out split is seed-independent too
_EXAMPLES = re.compile(r'[;:]\s*"')  # start of the quoted usage examples in a gloss


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: definitions, their labels ``int32 (n,)`` and tokens ``int32 (n, max_len)``."""

  texts: tuple[str, ...]
  labels: np.ndarray
  input_ids: np.ndarray
  attention_mask: np.ndarray

  def __len__(self) -> int:
    return len(self.texts)


def read_noun_definitions(folder: Path | None = None) -> list[tuple[str, int]]:
  """``(definition, class index)`` for every noun synset in ``data.noun``, in file order."""
  path = (folder if folder is not None else wordnet_dir()) / "data.noun"
  items = []
  with path.open(encoding="utf-8") as lines:
    for line in lines:
      if line.startswith("  "):  # license header
        continue
      fields, gloss = line.split(" | ", 1)
      definition = _EXAMPLES.split(gloss, maxsplit=1)[0].strip().rstrip(";").strip()
      items.append((definition, int(fields.split()[1]) - FIRST_NOUN_LEXFILE))
  return items


def is_heldout(text: str) -> bool:
  """Fixed, seed-independent split membership from a stable hash of the text."""
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % HELDOUT_BUCKETS == 0


def _make_split(items: list[tuple[str, int]], order: np.ndarray, tokenizer: Tokenizer) -> Split:
  texts = tuple(items[i][0] for i in order)
  encoded = tokenizer(texts)
  labels = np.array([items[i][1] for i in order], dtype=np.int32)
  return Split(texts, labels, encoded.input_ids, encoded.attention_mask)


def load_wordnet_nouns(
    max_per_split: int | None = None, seed: int = 0, max_len: int = 32
) -> tuple[Split, Split, tuple[str, ...]]:
  """``(train, heldout, class_names)`` for the definition -> category task.

  ``train`` is in a ``seed``-dependent random order (the file is grouped by
  class) and, with ``max_per_split``, is the first ``max_per_split`` of that
  order. ``heldout`` is in file order and never depends on ``seed``; when
  capped, it is a fixed random subset.
  """
  items = read_noun_definitions()
  heldout_mask = np.array([is_heldout(text) for text, _ in items])
  train_idx = np.random.default_rng(seed).permutation(np.flatnonzero(~heldout_mask))
  heldout_idx = np.flatnonzero(heldout_mask)
  if max_per_split is not None:
    train_idx = train_idx[:max_per_split]
    if len(heldout_idx) > max_per_split:
      keep = np.random.default_rng(_HELDOUT_SUBSAMPLE_SEED).choice(
          len(heldout_idx), max_per_split, replace=False
      )
      heldout_idx = heldout_idx[np.sort(keep)]
  tokenizer = load_tokenizer(max_len)
  return (
      _make_split(items, train_idx, tokenizer),
      _make_split(items, heldout_idx, tokenizer),
      NOUN_LEXNAMES,
  )
