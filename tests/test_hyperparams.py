"""Float hyperparameters are type- and range-checked by name, for AdaPreLoRA and every baseline.

A bool (``b1=True`` once froze every pair) or a schedule where a float is
expected (once a cryptic ``TypeError`` inside ``update``) is a ``TypeError``
at construction; floats and arrays (as ``optax.inject_hyperparams`` passes
them) are accepted.
"""

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaprelora_jax import adaprelora, baselines, scale_by_adaprelora
from adaprelora_jax._src import hyperparams

ADAPRELORA = ("b1", "b2", "decay_rate", "eps", "damping", "lora_scale",
              "clipping_threshold", "balancing", "factor_clipping")
ADAM = ("b1", "b2", "eps")
# Every public constructor, and the float hyperparameters it takes.
FLOATS = {
    scale_by_adaprelora: ADAPRELORA,
    adaprelora: ADAPRELORA + ("weight_decay",),
    baselines.scale_by_lora_plus: ("lr_ratio",) + ADAM,
    baselines.lora_plus: ("lr_ratio",) + ADAM + ("weight_decay",),
    baselines.scale_by_lora_pro: ADAM + ("damping", "lora_scale"),
    baselines.lora_pro: ADAM + ("damping", "lora_scale", "weight_decay"),
    baselines.scale_by_lora_rite: ADAM + ("damping", "clipping_threshold"),
    baselines.lora_rite: ADAM + ("damping", "clipping_threshold", "weight_decay"),
    baselines.scale_by_scaled_adam: ADAM + ("damping",),
    baselines.scaled_adamw: ADAM + ("damping", "weight_decay"),
    baselines.scale_by_scaled_gd: ("damping",),
    baselines.scaled_gd: ("damping", "weight_decay"),
}
ALIASES = [adaprelora, baselines.lora_plus, baselines.lora_pro, baselines.lora_rite,
           baselines.scaled_adamw, baselines.scaled_gd]
CASES = [pytest.param(make, name, id=f"{make.__name__}-{name}")
         for make, names in FLOATS.items() for name in names]
# Optax takes a schedule for the weight decay as for the learning rate.
NO_SCHEDULE = [case for case in CASES if case.values[1] != "weight_decay"]


def _make(make, **hyperparams):
  """``make(**hyperparams)``, with a learning rate for an alias."""
  if make in ALIASES:
    hyperparams = {"learning_rate": 1e-2, **hyperparams}
  return make(**hyperparams)


def _params():
  rng = np.random.default_rng(0)
  return {"q": {"lora_a": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
                "lora_b": jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)},
          "head": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}


def _step(tx, update=lambda tx: tx.update):
  params = _params()
  grads = jax.tree.map(lambda x: 0.1 * x + 0.05, params)
  updates, _ = update(tx)(grads, tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("make, name", CASES)
def test_a_bool_is_a_type_error_naming_the_argument(make, name):
  with pytest.raises(TypeError, match=re.escape(f"{name}=True is a bool")):
    _make(make, **{name: True})


@pytest.mark.parametrize("make, name", NO_SCHEDULE)
def test_a_schedule_is_a_type_error_naming_the_argument(make, name):
  with pytest.raises(TypeError, match=rf"{name}=.* is a callable.*inject_hyperparams"):
    _make(make, **{name: optax.linear_schedule(0.9, 0.5, 10)})


@pytest.mark.parametrize("make, value", [
    (scale_by_adaprelora, "eps"), (baselines.scale_by_lora_rite, "b1"),
    (baselines.scale_by_scaled_gd, "damping"), (baselines.lora_pro, "weight_decay"),
])
def test_none_where_none_is_not_allowed_is_a_type_error(make, value):
  with pytest.raises(TypeError, match=re.escape(f"{value}=None is a NoneType")):
    _make(make, **{value: None})


@pytest.mark.parametrize("alias", ALIASES, ids=lambda f: f.__name__)
def test_aliases_reject_a_bool_learning_rate(alias):
  with pytest.raises(TypeError, match=re.escape("learning_rate=True is a bool")):
    alias(True)


@pytest.mark.parametrize("value", [0.9, jnp.asarray(0.9)], ids=["float", "array"])
@pytest.mark.parametrize("make", FLOATS, ids=lambda f: f.__name__)
def test_floats_and_arrays_are_accepted(make, value):
  _step(_make(make, **dict.fromkeys(FLOATS[make], value)))


@pytest.mark.parametrize("alias", ALIASES, ids=lambda f: f.__name__)
def test_schedules_for_the_learning_rate_and_weight_decay_are_accepted(alias):
  _step(alias(optax.linear_schedule(1e-2, 1e-3, 10),
              weight_decay=optax.linear_schedule(1e-2, 0.0, 10)))


@pytest.mark.parametrize("alias", ALIASES, ids=lambda f: f.__name__)
def test_a_schedule_goes_through_inject_hyperparams(alias):
  name = FLOATS[alias][0]
  tx = optax.inject_hyperparams(alias)(
      learning_rate=1e-2, **{name: optax.linear_schedule(0.9, 0.5, 10)})
  _step(tx, update=lambda tx: jax.jit(tx.update))


# Out of range: a ValueError naming the argument and the range, for every constructor.
OUT_OF_RANGE = {"b1": 1.0, "b2": -0.1, "decay_rate": -1.0, "eps": float("inf"),
                "damping": -1e-3, "lora_scale": 0.0, "clipping_threshold": 0.0,
                "balancing": float("nan"), "factor_clipping": -1.0, "lr_ratio": 0.0}
RANGE_CASES = [pytest.param(make, name, id=f"{make.__name__}-{name}")
               for make, names in FLOATS.items() for name in names if name in OUT_OF_RANGE]


@pytest.mark.parametrize("make, name", RANGE_CASES)
def test_out_of_range_is_a_value_error_naming_the_argument_and_range(make, name):
  expected = hyperparams.RANGES[name].words
  with pytest.raises(ValueError, match=rf"{name}=.*expected a float {re.escape(expected)}"):
    _make(make, **{name: OUT_OF_RANGE[name]})


def test_the_transformation_takes_its_defaults_from_the_one_definition():
  params = inspect.signature(scale_by_adaprelora).parameters
  assert {name: params[name].default for name in hyperparams.Hyperparams._fields} == (
      hyperparams.DEFAULTS._asdict())


def test_the_alias_forwards_every_option_of_the_transformation():
  alias = dict(inspect.signature(adaprelora).parameters)
  assert [alias.pop(name).name for name in ("learning_rate", "weight_decay", "mask")]
  direction = inspect.signature(scale_by_adaprelora).parameters
  assert {name: p.default for name, p in alias.items()} == {
      name: p.default for name, p in direction.items()}
  # A value given to the alias reaches the transformation (an out-of-range one is named there).
  for name in direction:
    if name in OUT_OF_RANGE:
      with pytest.raises(ValueError, match=rf"scale_by_adaprelora: {name}="):
        adaprelora(1e-2, **{name: OUT_OF_RANGE[name]})
