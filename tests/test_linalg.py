"""The shared r × r linear algebra: damped inverses of rounded Grams, Sylvester solves."""

import jax.numpy as jnp
import numpy as np

from adaprelora_jax import linalg


def test_damped_inverse_of_a_rounded_rank_one_gram_is_finite():
  rng = np.random.default_rng(0)
  for _ in range(20):
    b = jnp.asarray(rng.normal(size=(16, 1)) @ rng.normal(size=(1, 256)), jnp.float32)
    gram_b = b @ b.T
    assert np.linalg.eigvalsh(np.asarray(gram_b, np.float64)).min() < 0  # rounding
    inv = linalg.damped_inverse(gram_b, 1e-6)
    assert np.all(np.isfinite(np.asarray(inv)))
    # A PSD Gram plus δI has an inverse with eigenvalues in (0, 1/δ], up to rounding.
    delta = 1e-6 * float(jnp.trace(gram_b)) / 16
    evals = np.linalg.eigvalsh(np.asarray(inv, np.float64))
    assert evals.min() > -1e-6 * evals.max() and evals.max() <= 1.001 / delta


def test_sylvester_solves_the_damped_equation():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(2, 5, 5))
  p, q, c = jnp.asarray(x @ x.T), jnp.asarray(y @ y.T), jnp.asarray(rng.normal(size=(5, 5)))
  eig_p, eig_q = linalg.damped_eigh(p, 1e-3), linalg.damped_eigh(q, 1e-3)
  sol = linalg.sylvester(eig_p, eig_q, c)
  eye = jnp.eye(5)
  shifted = lambda m: m + linalg.shift(m, 1e-3) * eye
  np.testing.assert_allclose(shifted(p) @ sol + sol @ shifted(q), c, atol=1e-4)


def test_zero_gram_has_a_zero_pseudo_inverse():
  inv = linalg.damped_inverse(jnp.zeros((3, 3)), 1e-6)
  np.testing.assert_array_equal(inv, np.zeros((3, 3)))
