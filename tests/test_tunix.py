"""adaprelora drops into Tunix's PEFT trainer (``tunix.sft.peft_trainer.PeftTrainer``).

On a model with ``nnx.LoRAParam`` s the trainer wraps the optax optimizer it is
given as ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and jits a step that
takes the loss's gradient with respect to those params and calls
``optimizer.update``: the step of a hand-written ``nnx.Optimizer`` loop. So
the trainer must land where that loop lands on the same batches, with an
AdaPreLoRA state for every LoRA pair and the base weights untouched. With no
checkpoint directory and no metrics-logging options it writes no files.
"""

import numpy as np
import pytest
from flax import nnx

pytest.importorskip(
    "tunix", reason="google-tunix is not installed: it comes with the [tunix] extra "
    "(pip install -e '.[tunix]'; `bash scripts/setup.sh test` installs it on the oldest set)")
from tunix.sft import peft_trainer  # noqa: E402

from adaprelora_jax import PairState, adaprelora

import flax_models as fm
from flax_models import (
    D,
    FROZEN,
    TOKENS,
    assert_learned,
    assert_trees_equal,
    lm_loss,
    snapshot,
    train_nnx,
)

pytestmark = pytest.mark.slow  # a Tunix PEFT trainer end to end


def test_readme_snippet_peft_trainer_matches_an_nnx_optimizer_loop():
  model = fm.TinyLM(d=D, lora_rank=4, rngs=fm.rngs(0))
  reference = nnx.clone(model)
  frozen = snapshot(nnx.state(model, FROZEN))
  batches = [{"tokens": x, "targets": y} for x, y in TOKENS]

  # README "Using with Tunix" begins
  config = peft_trainer.TrainingConfig(eval_every_n_steps=len(batches), max_steps=len(batches))
  trainer = peft_trainer.PeftTrainer(model, adaprelora(3e-2), config).with_loss_fn(lm_loss)
  trainer.train(batches)  # batches: dicts of the loss's keyword arguments
  pairs = trainer.optimizer.opt_state[0].pairs  # one PairState per LoRA pair
  # README "Using with Tunix" ends

  want = {
      f"blocks/{i}/{name}"
      for i in range(2)
      for name in ("q_lora", "v_lora", "up/lora", "down/lora")
  }
  assert set(pairs) == want
  assert all(isinstance(state, PairState) for state in pairs.values())
  assert int(trainer.optimizer.opt_state[0].count) == len(batches)
  losses = trainer.metrics_logger.get_metric_history("", "loss", "train")
  assert_learned(list(losses))
  assert_trees_equal(nnx.state(model, FROZEN), frozen)

  # The same jitted ops on the same batches (Tunix's extra gradient norm is an
  # output, not an input of the update): equal bit for bit.
  optimizer, ref_losses, _ = train_nnx(reference, adaprelora(3e-2), lm_loss, TOKENS)
  np.testing.assert_array_equal(losses, ref_losses)
  assert_trees_equal(nnx.state(model), nnx.state(reference))
  assert_trees_equal(nnx.state(trainer.optimizer), nnx.state(optimizer))
