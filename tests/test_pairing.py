"""The pairing pass: naming schemes, N-D and stacked factors, and errors."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from adaprelora_jax import lora_pairs

S = jax.ShapeDtypeStruct


def _keys(tree, **kw):
  return {p.key: (p.batch_shape, p.in_shape, p.out_shape, p.rank)
          for p in lora_pairs(tree, **kw).pairs}


def test_flax_nnx_lora_state():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.query = nnx.LoRALinear(8, 6, lora_rank=2, rngs=rngs)
      self.norm = nnx.LayerNorm(6, rngs=rngs)

  model = Block(nnx.Rngs(0))
  assert _keys(nnx.state(model, nnx.LoRAParam)) == {
      "query/lora": ((), (8,), (6,), 2)}
  pairing = lora_pairs(nnx.state(model, nnx.Param))
  assert [p.key for p in pairing.pairs] == ["query/lora"]
  assert set(pairing.unpaired) == {"query/bias", "query/kernel", "norm/bias",
                                   "norm/scale"}


def test_qwix_names_with_nd_einsum_factors():
  tree = {"attn": {"q_einsum": {"w": S((4, 8, 16), jnp.float32),
                                "w_lora_a": S((8, 3), jnp.float32),
                                "w_lora_b": S((3, 4, 16), jnp.float32)}},
          "mlp": {"kernel_lora_a": S((8, 3), jnp.float32),
                  "kernel_lora_b": S((3, 32), jnp.float32)}}
  assert _keys(tree) == {"attn/q_einsum/w": ((), (8,), (4, 16), 3),
                         "mlp/kernel": ((), (8,), (32,), 3)}


def test_gemma_peft_names():
  tree = {"layer_0": {"attn": {"q_einsum": {"lora": {
      "a": S((8, 4), jnp.float32), "b": S((4, 2, 16), jnp.float32)}}}}}
  assert _keys(tree) == {"layer_0/attn/q_einsum": ((), (8,), (2, 16), 4)}


def test_hf_names_in_flax_and_torch_layout():
  flax_layout = {"q_proj": {"lora_A": {"kernel": S((8, 4), jnp.float32)},
                            "lora_B": {"kernel": S((4, 6), jnp.float32)}}}
  assert _keys(flax_layout) == {"q_proj": ((), (8,), (6,), 4)}
  torch_layout = {"q_proj": {"lora_A": {"weight": S((4, 8), jnp.float32)},
                             "lora_B": {"weight": S((6, 4), jnp.float32)}}}
  (pair,) = lora_pairs(torch_layout).pairs
  assert (pair.a_path, pair.b_path) == ("q_proj/lora_B/weight",
                                        "q_proj/lora_A/weight")
  assert (pair.m, pair.n, pair.rank) == (6, 8, 4)


def test_stacked_layers_are_batch_axes():
  tree = {"layers": {"lora_a": S((12, 16, 4), jnp.float32),
                     "lora_b": S((12, 4, 16), jnp.float32)}}
  assert _keys(tree) == {"layers": ((12,), (16,), (16,), 4)}
  # batch axes that happen to equal the rank still read as batch axes
  tree = {"layers": {"lora_a": S((4, 16, 4), jnp.float32),
                     "lora_b": S((4, 4, 16), jnp.float32)}}
  assert _keys(tree) == {"layers": ((4,), (16,), (16,), 4)}


def test_user_rule():
  tree = {"enc": {"down": S((8, 2), jnp.float32), "up": S((2, 5), jnp.float32),
                  "bias": S((5,), jnp.float32)}}
  rule = lambda names: ({"down": ("enc", "a"), "up": ("enc", "b")}
                        .get(names[-1]))
  pairing = lora_pairs(tree, rule=rule)
  assert _keys(tree, rule=rule) == {"enc": ((), (8,), (5,), 2)}
  assert pairing.unpaired == ("enc/bias",)
  assert jax.tree.leaves(pairing.fallback_mask()) == [True, False, False]


def test_lone_factor_is_an_error_naming_path_and_shape():
  tree = {"q": {"lora_a": S((8, 2), jnp.float32)}, "k": {
      "lora_a": S((8, 2), jnp.float32), "lora_b": S((2, 8), jnp.float32)}}
  with pytest.raises(ValueError, match=re.escape("q/lora_a with shape (8, 2)")):
    lora_pairs(tree)


def test_rank_mismatch_is_an_error_naming_both_factors():
  tree = {"q": {"lora_a": S((8, 2), jnp.float32),
                "lora_b": S((3, 8), jnp.float32)}}
  with pytest.raises(ValueError, match=r"q/lora_a has shape \(8, 2\) and "
                     r"q/lora_b has shape \(3, 8\)"):
    lora_pairs(tree)


def test_batch_mismatch_is_an_error():
  tree = {"q": {"lora_a": S((3, 8, 2), jnp.float32),
                "lora_b": S((4, 2, 8), jnp.float32)}}
  with pytest.raises(ValueError, match=r"same rank r and batch axes"):
    lora_pairs(tree)


@pytest.mark.parametrize("a_shape, b_shape", [((8, 0), (0, 8)), ((0, 8, 2), (0, 2, 8))])
def test_empty_pair_is_an_error_naming_both_factors(a_shape, b_shape):
  tree = {"q": {"lora_a": S(a_shape, jnp.float32), "lora_b": S(b_shape, jnp.float32)}}
  with pytest.raises(ValueError, match=re.escape(
      f"'q' is empty: q/lora_a has shape {a_shape} and q/lora_b has shape {b_shape}")):
    lora_pairs(tree)


def test_duplicate_role_is_an_error():
  tree = {"q": {"lora_a": S((8, 2), jnp.float32),
                "lora_b": S((2, 8), jnp.float32)},
          "q_lora_a": S((8, 2), jnp.float32)}
  with pytest.raises(ValueError, match=r"two 'a' factors: q/lora_a and q_lora_a"):
    lora_pairs(tree)
