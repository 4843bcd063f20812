"""The WordNet noun-category task: 26 classes and a fixed, leak-free held-out split."""

from __future__ import annotations

import numpy as np

from benchmarks.wordnet import load_wordnet_nouns


def test_classes_and_fixed_disjoint_split():
  train, heldout, names = load_wordnet_nouns(seed=0)
  other_train, other_heldout, _ = load_wordnet_nouns(seed=1)

  assert len(names) == 26 and names[0] == "noun.Tops" and names[-1] == "noun.time"
  assert set(np.unique(train.labels)) == set(range(26))
  assert heldout.texts == other_heldout.texts
  np.testing.assert_array_equal(heldout.input_ids, other_heldout.input_ids)
  assert train.texts != other_train.texts and sorted(train.texts) == sorted(other_train.texts)
  assert not set(train.texts) & set(heldout.texts)
  assert 0.08 < len(heldout) / (len(train) + len(heldout)) < 0.12


def test_capped_heldout_ignores_seed():
  train, heldout, _ = load_wordnet_nouns(max_per_split=500, seed=0)
  _, other_heldout, _ = load_wordnet_nouns(max_per_split=500, seed=7)
  assert len(train) == len(heldout) == 500
  assert heldout.texts == other_heldout.texts
