"""The shared r × r linear algebra: damped inverses of rounded Grams, Sylvester solves."""

import jax.numpy as jnp
import numpy as np

from adaprelora_jax._src import linalg


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


def _gram(rng, rows, rank, condition=1.0):
  u = np.linalg.qr(rng.normal(size=(rows, rank)))[0]
  x = u * np.geomspace(1.0, 1.0 / condition, rank)
  return jnp.asarray(x.T @ x, jnp.float32)


def test_cholesky_inverse_equals_the_eigendecomposition_at_the_rule_damping():
  """Well-conditioned, ill-conditioned and rounded rank-deficient Grams, batched."""
  rng = np.random.default_rng(2)
  rank_one = rng.normal(size=(64, 1)) @ rng.normal(size=(1, 8))
  grams = jnp.stack([_gram(rng, 64, 8), _gram(rng, 64, 8, 1e3), _gram(rng, 64, 8, 1e6),
                     jnp.asarray(rank_one.T @ rank_one, jnp.float32)])
  by_eigh = linalg.damped_inverse(grams, 1e-4)
  by_cholesky = linalg.cholesky_inverse(grams, 1e-4)
  for eig, chol in zip(by_eigh, by_cholesky):
    np.testing.assert_allclose(chol, eig, atol=2e-3 * float(jnp.abs(eig).max()))


def test_cholesky_inverse_of_a_zero_gram_is_zero():
  np.testing.assert_array_equal(linalg.cholesky_inverse(jnp.zeros((2, 3, 3)), 1e-4), 0.0)


def test_cholesky_inverse_escalates_the_shift_where_the_factorization_fails():
  """Only the matrix whose factor is not finite takes the larger shift."""
  bad = jnp.diag(jnp.asarray([1.0, 1.0, -1e-4]))  # indefinite by more than δ
  good = jnp.diag(jnp.asarray([1.0, 2.0, 3.0]))
  inv = linalg.cholesky_inverse(jnp.stack([bad, good]), 1e-4)
  delta = 1e-4 * 1.9999 / 3 + np.sqrt(np.finfo(np.float32).tiny)
  escalated = np.diag(1.0 / (np.array([1.0, 1.0, -1e-4]) + delta + 1e-3 * 1.9999 / 3))
  np.testing.assert_allclose(inv[0], escalated, rtol=1e-4)
  np.testing.assert_allclose(inv[1], np.diag(1.0 / (np.array([1.0, 2.0, 3.0]) + 1e-4 * 2)),
                             rtol=1e-5)
