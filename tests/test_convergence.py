"""AdaPreLoRA optimises an ill-conditioned LoRA regression."""

import numpy as np
import optax

from adaprelora_jax import adaprelora
from toy_regression import lora_regression, train


def test_reaches_two_percent_of_initial_loss_in_400_steps():
  for seed in range(3):
    params, loss = lora_regression(seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 20, 400)
    for b1 in (None, 0.9):
      curve = train(adaprelora(schedule, b1=b1), params, loss, 400).losses
      assert np.all(np.isfinite(curve))
      assert curve[-1] < 0.02 * curve[0], (seed, b1, curve[0], curve[-1])
