"""annotate_opt_state: an nnx.Optimizer's AdaPreLoRA state follows the params' annotations.

``nnx.Optimizer`` keeps the sharding metadata only of state leaves made from
Variables (Adam's ``mu``/``nu``); AdaPreLoRA's buffers are plain arrays. The
metadata is checked in this process; the arrays, the Flax recipes and sharded
training run on 8 host CPU devices in a child process (see isolated.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from adaprelora_jax import adaprelora
from adaprelora_jax.flax import annotate_opt_state

from isolated import isolated
from test_sharding import _assert_close

WRT = nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))  # LoRA factors and a full head
B_INIT = nnx.initializers.normal(0.5)  # B ≠ 0, so that A moves from step 1


class Model(nnx.Module):
  """A tensor-parallel LoRA MLP, an FSDP-style adapter and a trained head."""

  def __init__(self, rngs: nnx.Rngs):
    kernel = nnx.initializers.lecun_normal()
    # column-parallel: kernel and B split on their out axis
    self.up = nnx.LoRALinear(
        16,
        32,
        lora_rank=4,
        rngs=rngs,
        b_initializer=B_INIT,
        kernel_init=nnx.with_partitioning(kernel, (None, "model")),
        b_metadata={"out_sharding": (None, "model")},
    )
    # row-parallel: kernel and A split on their in axis
    self.down = nnx.LoRALinear(
        32,
        16,
        lora_rank=4,
        rngs=rngs,
        b_initializer=B_INIT,
        kernel_init=nnx.with_partitioning(kernel, ("model", None)),
        a_metadata={"out_sharding": ("model", None)},
    )
    self.adapter = nnx.LoRA(
        16,
        2,
        8,
        rngs=rngs,
        b_initializer=B_INIT,
        a_metadata={"out_sharding": ("data", None)},
        b_metadata={"out_sharding": (None, "model")},
    )
    self.head = nnx.Linear(
        16,
        8,
        rngs=rngs,
        kernel_init=nnx.with_partitioning(kernel, (None, "model")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)),
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.down(jnp.tanh(self.up(x)))) + self.adapter(x)


PAIRS = {  # pair -> (v_row, v_col, mu_a, mu_b)
    "up/lora": ((None,), ("model",), (None, None), (None, "model")),
    "down/lora": (("model",), (None,), ("model", None), (None, None)),
    "adapter": (("data",), ("model",), ("data", None), (None, "model")),
}


def _expected() -> dict[str, tuple]:
  """Every array leaf of ``nnx.state(optimizer, OptState)``, with its spec's entries."""
  want = {
      "['step']": (),
      "['opt_state'][0]['count']": (),
      "['opt_state'][0]['fallback']['inner_state']['count']": (),
  }
  for key, entries in PAIRS.items():
    for field, e in zip(("v_row", "v_col", "mu_a", "mu_b"), entries):
      want[f"['opt_state'][0]['pairs']['{key}']['{field}']"] = e
    for field in ("applied", "skipped"):  # per-slice step counts: no batch axes here
      want[f"['opt_state'][0]['counts']['{key}']['{field}']"] = ()
  for moment in ("mu", "nu"):  # the fallback's Adam buffers follow their params
    prefix = f"['opt_state'][0]['fallback']['inner_state']['{moment}']['head']"
    want.update({f"{prefix}['kernel']": (None, "model"), f"{prefix}['bias']": ("model",)})
  return want


def _padded(spec: P, ndim: int) -> tuple:
  return (*spec, *(None,) * (ndim - len(spec)))


def _array_leaves(optimizer: nnx.Optimizer) -> dict[str, nnx.Variable]:
  """The leaves of the optimizer's state that hold arrays (not optax.MaskedNode)."""
  state = nnx.state(optimizer, nnx.optimizer.OptState)
  leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {jax.tree_util.keystr(path): v for path, v in leaves if hasattr(v.get_value(), "shape")}


def _annotated(optimizer: nnx.Optimizer) -> dict[str, tuple]:
  """The entries ``nnx.get_partition_spec`` gives each leaf."""
  return {
      k: _padded(nnx.get_partition_spec(v).get_value(), v.ndim)
      for k, v in _array_leaves(optimizer).items()
  }


def _placed(optimizer: nnx.Optimizer) -> dict[str, tuple]:
  """The entries of each leaf's actual sharding."""
  return {
      k: _padded(v.get_value().sharding.spec, v.ndim) for k, v in _array_leaves(optimizer).items()
  }


def _mesh(shape: tuple[int, int] = (2, 4)) -> jax.sharding.Mesh:
  devices = jax.devices()[: math.prod(shape)]
  return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=devices)


def _create() -> tuple[Model, nnx.Optimizer]:
  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, adaprelora(1e-2, b1=0.9), wrt=WRT)
  annotate_opt_state(optimizer, model)
  return model, optimizer


def _batch(t: int) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(t)
  return (
      jnp.asarray(rng.normal(size=(16, 16)), jnp.float32),
      jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
  )


def _train(mesh: jax.sharding.Mesh, batches) -> tuple[Model, nnx.Optimizer]:
  """The README snippet: three steps on ``mesh``."""

  # --- README snippet ---
  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss = lambda model: jnp.mean((model(x) - y) ** 2)
    optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, WRT))(model))
    for node in (model, optimizer):  # keep every array where its annotation says
      state = nnx.state(node)
      nnx.update(node, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))

  with jax.set_mesh(mesh):
    model = Model(rngs=nnx.Rngs(0))  # LoRA factors annotated with a_metadata/b_metadata
    optimizer = nnx.Optimizer(model, adaprelora(1e-2, b1=0.9), wrt=WRT)
    annotate_opt_state(optimizer, model)  # v_row, v_col, momentum: split like A and B
    for x, y in batches:
      train_step(model, optimizer, x, y)
  # --- end of snippet ---
  return model, optimizer


def test_state_is_annotated_like_the_params():
  with nnx.use_eager_sharding(False):  # metadata only: no mesh needed
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adaprelora(1e-2, b1=0.9), wrt=WRT)
    # nnx.Optimizer alone: the fallback's Adam buffers follow, AdaPreLoRA's do not
    before = _annotated(optimizer)
    assert before["['opt_state'][0]['fallback']['inner_state']['nu']['head']['bias']"] == ("model",)
    assert before["['opt_state'][0]['pairs']['down/lora']['v_row']"] == (None,)
    annotate_opt_state(optimizer, model)
    assert _annotated(optimizer) == _expected()
    # nnx.eval_shape: the abstract optimizer (e.g. to restore a checkpoint) is annotated too
    abstract = nnx.eval_shape(_create)[1]
    assert _annotated(abstract) == _expected()

  # eager sharding, as by default: the optimizer is made and annotated on a mesh
  with jax.set_mesh(_mesh((1, 1))):
    without_momentum = nnx.Optimizer(model, adaprelora(1e-2), wrt=WRT)
    annotate_opt_state(without_momentum, model)
  assert _annotated(without_momentum) == {k: e for k, e in _expected().items() if "['mu_" not in k}


@pytest.mark.slow  # a subprocess with eight CPU devices
@isolated(host_devices=8)
def test_readme_snippet_shards_like_unsharded_training():
  batches = [_batch(t) for t in range(3)]
  plain_model, plain = _train(_mesh((1, 1)), batches)
  model, optimizer = _train(_mesh(), batches)
  assert _placed(optimizer) == _expected()  # after three jitted steps
  v_row = optimizer.opt_state[0].pairs["down/lora"].v_row.get_value()
  assert {s.data.shape for s in v_row.addressable_shards} == {(8,)}  # 32 / 4
  _assert_close(nnx.pure(nnx.state(optimizer)), nnx.pure(nnx.state(plain)))
  _assert_close(nnx.pure(nnx.state(model, WRT)), nnx.pure(nnx.state(plain_model, WRT)))
  assert int(optimizer.opt_state[0].count.get_value()) == 3


@pytest.mark.slow  # a subprocess with eight CPU devices
@isolated(host_devices=8)
def test_flax_sharding_recipes():
  mesh = _mesh()

  @nnx.jit
  def create_sharded():
    model, optimizer = _create()
    for node in (model, optimizer):
      state = nnx.state(node)
      nnx.update(node, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
    return model, optimizer

  with jax.set_mesh(mesh):  # eager sharding: placed as annotated at once
    _, eager = _create()
  assert _placed(eager) == _expected()

  with nnx.use_eager_sharding(False):
    with jax.set_mesh(mesh):
      _, constrained = create_sharded()
    assert _placed(constrained) == _expected()

    _, placed = _create()
    state = nnx.state(placed)
    nnx.update(placed, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    assert _placed(placed) == _expected()
