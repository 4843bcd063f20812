"""Properties of the closed-form solve (docs/derivation.md), against brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaprelora_jax.functional import solve_factor_update, tangent_mean_squares, w_step_rms
from conftest import h_projection, random_pair


def _solve(p, damping=0.0, dtype=None):
  cast = (lambda x: jnp.asarray(x, dtype)) if dtype else jnp.asarray
  da, db = solve_factor_update(
      *(cast(p[k]) for k in ("a", "b", "grad_a", "grad_b", "row", "col")),
      scale=p["scale"], damping=damping)
  return np.asarray(da, np.float64), np.asarray(db, np.float64)


def _contributions(p, da, db):
  return p["scale"] * da @ p["b"], p["scale"] * p["a"] @ db


@pytest.mark.parametrize("m,n,r", [(7, 5, 2), (9, 12, 3), (6, 6, 1)])
def test_w_step_is_h_projection_of_adafactor_direction(x64, m, n, r):
  p = random_pair(m * n + r, m, n, r)
  c_a, c_b = _contributions(p, *_solve(p))
  d = p["g"] / p["row"][:, None] / p["col"][None, :]
  want = h_projection(d, p["a"], p["b"], p["row"], p["col"])
  np.testing.assert_allclose(c_a + c_b, want, atol=1e-10 * np.abs(want).max())


def test_projection_in_float32():
  p = random_pair(3, 10, 8, 3)
  c_a, c_b = _contributions(p, *_solve(p, dtype=jnp.float32))
  d = p["g"] / p["row"][:, None] / p["col"][None, :]
  want = h_projection(d, p["a"], p["b"], p["row"], p["col"])
  np.testing.assert_allclose(c_a + c_b, want, atol=2e-4 * np.abs(want).max())


def test_minimal_imbalance_over_null_space(x64):
  """No Ω in the Jacobian's null space (AΩ, −ΩB) reduces ‖C_A − C_B‖_H."""
  p = random_pair(5, 8, 6, 3)
  da, db = _solve(p)
  a, b, s = p["a"], p["b"], p["scale"]
  w = np.sqrt(np.outer(p["row"], p["col"])).ravel()
  residual = (s * (da @ b - a @ db)).ravel() * w
  r = a.shape[1]
  # C_A − C_B moves by 2 s A Ω B along the null space: least squares over Ω.
  basis = np.stack([(2 * s * a @ np.eye(r * r)[i].reshape(r, r) @ b).ravel() * w
                    for i in range(r * r)], axis=1)
  omega = np.linalg.lstsq(basis, -residual, rcond=None)[0]
  assert np.abs(omega).max() < 1e-9
  # and a random null-space move strictly increases the imbalance
  om = np.random.default_rng(0).normal(size=(r, r))
  moved = (s * ((da + a @ om) @ b - a @ (db - om @ b))).ravel() * w
  assert np.sum(moved**2) > np.sum(residual**2)


def test_invariant_to_factor_gauge_and_lora_scale(x64):
  p = random_pair(7, 9, 7, 3)
  c_a, c_b = _contributions(p, *_solve(p))
  gauge = np.random.default_rng(1).normal(size=(3, 3)) + 3 * np.eye(3)
  for a, b, s in [(p["a"] @ gauge, np.linalg.solve(gauge, p["b"]), p["scale"]),
                  (p["a"] / 4.0, p["b"], p["scale"] * 4.0)]:
    q = dict(p, a=a, b=b, scale=s, grad_a=s * p["g"] @ b.T,
             grad_b=s * a.T @ p["g"])
    q_a, q_b = _contributions(q, *_solve(q))
    np.testing.assert_allclose(q_a, c_a, atol=1e-9)
    np.testing.assert_allclose(q_b, c_b, atol=1e-9)


def test_full_rank_reduces_to_adafactor_direction(x64):
  p = random_pair(11, 6, 4, 4)  # r = n = min(m, n), full rank
  c_a, c_b = _contributions(p, *_solve(p))
  d = p["g"] / p["row"][:, None] / p["col"][None, :]
  np.testing.assert_allclose(c_a + c_b, d, atol=1e-10)


def test_zero_b_gives_projection_onto_column_space_of_a(x64):
  p = random_pair(13, 8, 5, 2)
  p.update(b=np.zeros((2, 5)), grad_a=np.zeros((8, 2)))
  da, db = _solve(p, damping=1e-12)
  assert np.all(np.isfinite(da)) and np.all(np.isfinite(db))
  np.testing.assert_array_equal(da, 0.0)
  # s A dB must be argmin_Y ‖D − A Y‖_H: weighted least squares per column.
  d = p["g"] / p["row"][:, None] / p["col"][None, :]
  wa = np.sqrt(p["row"])[:, None] * p["a"]
  y = np.linalg.lstsq(wa, np.sqrt(p["row"])[:, None] * d, rcond=None)[0]
  np.testing.assert_allclose(p["scale"] * p["a"] @ db, p["a"] @ y, rtol=1e-9)


@pytest.mark.parametrize("case", ["both_zero", "rank_deficient", "tiny", "huge"])
def test_degenerate_factors_give_finite_steps(case):
  p = random_pair(17, 12, 10, 4)
  if case == "both_zero":
    p.update(a=0 * p["a"], b=0 * p["b"], grad_a=0 * p["grad_a"],
             grad_b=0 * p["grad_b"])
  elif case == "rank_deficient":
    p["a"][:, 2:] = p["a"][:, :2]
    p["b"][2:] = 0.0
  elif case == "tiny":
    p.update(a=p["a"] * 1e-20, b=p["b"] * 1e-20)
  else:
    p.update(grad_a=p["grad_a"] * 1e15, grad_b=p["grad_b"] * 1e15)
  p["grad_a"] = p["scale"] * p["g"] @ p["b"].T
  p["grad_b"] = p["scale"] * p["a"].T @ p["g"]
  da, db = _solve(p, damping=1e-6, dtype=jnp.float32)
  assert np.all(np.isfinite(da)) and np.all(np.isfinite(db))


def test_batch_axes_are_solved_slice_by_slice():
  p = random_pair(19, 6, 5, 2, batch=(3, 2))
  da, db = _solve(p)
  for i in range(3):
    for j in range(2):
      q = {k: (v[i, j] if isinstance(v, np.ndarray) else v) for k, v in p.items()}
      qa, qb = _solve(q)
      np.testing.assert_allclose(da[i, j], qa, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(db[i, j], qb, rtol=1e-5, atol=1e-5)


def _dense_tangent(p):
  a, b, g = p["a"], p["b"], p["g"]
  pa = a @ np.linalg.solve(a.T @ a, a.T)
  pb = b.T @ np.linalg.solve(b @ b.T, b)
  return pa @ g + g @ pb - pa @ g @ pb


@pytest.mark.parametrize("batch", [(), (3,)])
def test_tangent_mean_squares_match_dense_projection(x64, batch):
  p = random_pair(23, 9, 7, 2, batch=batch)
  dense = _dense_tangent(p) if not batch else np.stack(
      [_dense_tangent({k: (v[i] if isinstance(v, np.ndarray) else v)
                       for k, v in p.items()}) for i in range(batch[0])])
  rows, cols = tangent_mean_squares(p["a"], p["b"], p["grad_a"], p["grad_b"],
                                    scale=p["scale"])
  np.testing.assert_allclose(rows, np.mean(dense**2, axis=-1), rtol=1e-10)
  np.testing.assert_allclose(cols, np.mean(dense**2, axis=-2), rtol=1e-10)


def test_tangent_statistic_is_the_full_gradient_at_full_rank(x64):
  p = random_pair(29, 5, 4, 4)
  rows, cols = tangent_mean_squares(p["a"], p["b"], p["grad_a"], p["grad_b"],
                                    scale=p["scale"])
  np.testing.assert_allclose(rows, np.mean(p["g"]**2, 1), rtol=1e-10)
  np.testing.assert_allclose(cols, np.mean(p["g"]**2, 0), rtol=1e-10)


def test_tangent_statistic_stays_finite_for_a_vanishing_factor():
  """B → 0 with gradients far from consistent: no overflow to inf/NaN."""
  p = random_pair(30, 12, 10, 3)
  rows, cols = tangent_mean_squares(
      jnp.asarray(p["a"], jnp.float32), jnp.zeros((3, 10)),
      jnp.asarray(1e6 * p["grad_a"], jnp.float32),
      jnp.asarray(1e6 * p["grad_b"], jnp.float32), scale=1.0, damping=1e-6)
  assert np.all(np.isfinite(rows)) and np.all(np.isfinite(cols))


def test_w_step_rms_matches_dense(x64):
  p = random_pair(31, 8, 6, 3, batch=(2,))
  da, db = _solve(p)
  dense = p["scale"] * (da @ p["b"] + p["a"] @ db)
  rms = w_step_rms(p["a"], p["b"], da, db, scale=p["scale"])
  np.testing.assert_allclose(rms, np.sqrt(np.mean(dense**2, axis=(1, 2))), rtol=1e-9)


def test_solve_runs_in_float32_for_bfloat16_inputs():
  p = random_pair(37, 6, 5, 2)
  out = solve_factor_update(
      *(jnp.asarray(p[k], jnp.bfloat16) for k in ("a", "b", "grad_a", "grad_b")),
      jnp.asarray(p["row"], jnp.bfloat16), jnp.asarray(p["col"], jnp.bfloat16),
      scale=p["scale"])
  assert all(o.dtype == jnp.float32 for o in out)
  assert jax.jit(lambda: out)() is not None


def test_extreme_magnitudes_are_solved_as_exactly_as_unit_ones():
  """A → 2⁷⁰A, B → 2⁻⁷⁰B, G → 2²⁰G (float32): the steps and statistics scale by
  powers of two and nothing overflows, as in the optimizer (P = Aᵀ diag(ℓ) A
  alone is ~1e42 here)."""
  p = random_pair(41, 9, 7, 3)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  k, j = 70, 20
  unit = [f32(p[key]) for key in ("a", "b", "grad_a", "grad_b")]
  extreme = [f32(p["a"] * 2.0**k), f32(p["b"] * 2.0**-k), f32(p["grad_a"] * 2.0**(j - k)),
             f32(p["grad_b"] * 2.0**(j + k))]
  metric = (f32(p["row"]), f32(p["col"]))
  want_a, want_b = solve_factor_update(*unit, *metric, scale=p["scale"], damping=1e-6)
  got_a, got_b = solve_factor_update(*extreme, *metric, scale=p["scale"], damping=1e-6)
  np.testing.assert_allclose(got_a, want_a * 2.0**(j + k), rtol=1e-5)
  np.testing.assert_allclose(got_b, want_b * 2.0**(j - k), rtol=1e-5)
  want = tangent_mean_squares(*unit, scale=p["scale"], damping=1e-6)
  got = tangent_mean_squares(*extreme, scale=p["scale"], damping=1e-6)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w * 2.0**(2 * j), rtol=1e-5)
