"""Known answers for the LDS (kdaif_jax.lds) and self-influence (kdaif_jax.self_influence).

LDS: a model whose retrained output is exactly linear in the subset mask has
LDS 1 with the library's influence scores; random scores give ≈ 0; a noisy
output's split-half ceiling is the square root of its reliability. Self-
influence: equal to a float64 dense oracle (explicit per-example gradients G
and jnp.linalg.solve with C + λI). The weights.csv column: tests/test_trainer.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdaif_jax import influence, lds, losses
from kdaif_jax import self_influence as si

M, N, T, D = 50, 40, 30, 5


def test_masks_have_equal_size_and_differ():
  masks = lds.sample_masks(jax.random.key(0), M, N, 0.5)
  assert masks.shape == (M, N) and masks.dtype == jnp.bool_
  np.testing.assert_array_equal(np.sum(masks, axis=1), N // 2)
  assert len({tuple(np.asarray(r)) for r in masks}) == M
  idx = lds.subset_indices(masks)
  assert idx.shape == (M, N // 2)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(masks), np.asarray(idx), 1), True)
  with pytest.raises(ValueError, match="fraction"):
    lds.sample_masks(jax.random.key(0), M, N, 1.5)


def test_linear_model_has_lds_one_with_library_influence():
  """θ(S) = argmin Σ_{i∈S} ½‖θ − z_i‖² + ½λ‖θ‖² = Σ_{i∈S} z_i / (k + λ): linear in the mask
  for equal-size subsets; with linear test outputs f_t = a_tᵀθ the influence prediction
  is an increasing affine map of the truth, so every per-test Spearman correlation is 1."""
  kz, ka, km = jax.random.split(jax.random.key(1), 3)
  z = jax.random.normal(kz, (N, D))
  a = jax.random.normal(ka, (T, D))
  lam = 0.5
  masks = lds.sample_masks(km, M, N, 0.5)
  k = N // 2
  theta_s = (masks.astype(jnp.float32) @ z) / (k + lam)  # exact retraining, [M, D]
  outputs = theta_s @ a.T  # [M, T]
  theta = jnp.sum(z, axis=0) / (N + lam)  # the whole-set optimum
  # Mean-form training loss: (1/N) Σ ½‖θ − z_i‖² + (λ/2N)‖θ‖², split at its outputs.
  train = influence.PerExampleLoss(
    lambda p: (p - z, p),
    lambda o: 0.5 * jnp.sum(o[0] ** 2, -1) + 0.5 * lam / N * jnp.sum(o[1] ** 2),
  )
  data_term = lambda p: 0.5 * jnp.sum((p - z) ** 2, -1)

  def scores_for(at):
    res = influence.batch_influence(
      theta, train, lambda p: jnp.dot(at, p), curvature="hessian", damping=0.0, maxiter=D, tol=0.0
    )
    return influence.scores(data_term, theta, res.s)

  scores = jax.vmap(scores_for)(a).T  # [N, T]
  res = lds.lds(scores, masks, outputs)
  assert res.per_test.shape == (T,)
  np.testing.assert_allclose(res.per_test, 1.0, atol=1e-6)
  assert float(res.mean) == pytest.approx(1.0, abs=1e-6)
  # The opposite sign ranks every subset backwards.
  assert float(lds.lds(-scores, masks, outputs).mean) == pytest.approx(-1.0, abs=1e-6)
  # Exact on every subset: no uncertainty from the test examples or the subsets drawn.
  assert float(res.stderr_tests) == pytest.approx(0.0, abs=1e-6)
  boot = lds.bootstrap_subsets(scores, masks, outputs, jax.random.key(9), num=20)
  np.testing.assert_allclose(boot, 1.0, atol=1e-6)


def test_random_scores_give_about_zero():
  k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
  masks = lds.sample_masks(k1, M, 200, 0.5)
  outputs = jax.random.normal(k2, (M, 200))
  scores = jax.random.normal(k3, (200, 200))
  res = lds.lds(scores, masks, outputs)
  # Each term has sd ≈ 1/√(M−1) = 0.14; the mean of 200 has sd ≈ 0.01.
  assert abs(float(res.mean)) < 0.05
  per_test = np.asarray(res.per_test)
  assert float(res.stderr_tests) == pytest.approx(per_test.std(ddof=1) / np.sqrt(200), rel=1e-5)
  assert 0.005 < float(res.stderr_tests) < 0.02
  # Resampling the subsets: centred on the LDS, with about the same spread here
  # (every term's randomness comes from which subsets were drawn).
  boot = np.asarray(lds.bootstrap_subsets(scores, masks, outputs, jax.random.key(4), num=100))
  assert boot.shape == (100,) and abs(boot.mean() - float(res.mean)) < 0.01
  assert 0.5 < boot.std() / float(res.stderr_tests) < 2.0


def test_noise_ceiling_is_the_square_root_of_reliability_and_reachable():
  """y = f(S) + ε with Var f = Var ε: reliability 1/2, ceiling √½ ≈ 0.71 (Pearson; the
  Spearman versions of Gaussian data are within 0.02 of these)."""
  kf, ka, kb, kc, km = jax.random.split(jax.random.key(3), 5)
  masks = lds.sample_masks(km, 400, N, 0.5)
  tau = jax.random.normal(kf, (N, 100))
  f = lds.predictions(tau, masks)
  f = (f - f.mean(0)) / f.std(0)
  noisy = lambda key: f + jax.random.normal(key, f.shape)
  nc = lds.noise_ceiling(noisy(ka), noisy(kb))
  assert float(nc.mean_reliability) == pytest.approx(0.5, abs=0.03)
  assert float(nc.mean_ceiling) == pytest.approx(np.sqrt(0.5), abs=0.03)
  # The true attribution against one noisy retraining reaches the ceiling.
  assert float(lds.lds(tau, masks, noisy(kc)).mean) == pytest.approx(
    float(nc.mean_ceiling), abs=0.03
  )
  with pytest.raises(ValueError, match="fit together"):
    lds.lds(tau, masks, f[:, :3])


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _tiny_mlp(key):
  kx, ky, k1, k2 = jax.random.split(key, 4)
  x = jax.random.normal(kx, (24, 4))
  y = jax.random.randint(ky, (24,), 0, 3)
  params = {
    "Dense_0": {"kernel": 0.7 * jax.random.normal(k1, (4, 6)), "bias": jnp.zeros(6)},
    "Dense_1": {"kernel": 0.7 * jax.random.normal(k2, (6, 3)), "bias": jnp.zeros(3)},
  }

  def apply(p, xb):
    h = jnp.tanh(xb @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

  train = influence.PerExampleLoss(lambda p: apply(p, x), lambda o: losses.cross_entropy(o, y))
  return params, train


@pytest.mark.parametrize("curvature,damping", [("ggn", 1e-3), ("hessian", 0.5)])
def test_self_influence_equals_dense_float64_oracle(x64, curvature, damping):
  params, train = _tiny_mlp(jax.random.key(4))
  factor = lambda p: si.damped_cholesky(
    p, train, curvature=curvature, damping=damping, column_chunk=7
  )
  chol = jax.jit(factor)(params)
  got = jax.jit(lambda p, c: si.self_influence(train, p, c))(params, chol)
  # Oracle: the explicit gradient matrix G [N, P] of the flat params and a dense solve.
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  g = jax.jit(jax.jacrev(lambda t: train(unravel(t))))(flat)
  c = influence.dense_matrix(influence.curvature_matvec(train, params, curvature), params)
  c = jnp.asarray(c) + damping * jnp.eye(flat.size)
  want = jnp.einsum("np,np->n", g, jnp.linalg.solve(c, g.T).T)
  assert got.dtype == jnp.float64 and got.shape == (24,)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
  assert np.all(np.asarray(got) > 0)


def test_self_influence_in_the_head_and_refusal():
  params, train = _tiny_mlp(jax.random.key(5))
  head = influence.restrict(params, train, lambda p: jnp.zeros(()), ("Dense_1",))
  chol = jax.jit(lambda p: si.damped_cholesky(p, head.train_loss, damping=1e-2))(head.params)
  assert chol.shape == (21, 21)
  got = jax.jit(lambda p, c: si.self_influence(head.train_loss, p, c))(head.params, chol)
  # Head gradient of example i: outer(h_i, p_i − e_{y_i}) and the bias part p_i − e_{y_i}.
  g = jax.jit(jax.jacrev(head.train_loss))(head.params)
  gm = jnp.concatenate([g["Dense_1"]["bias"], g["Dense_1"]["kernel"].reshape(24, -1)], axis=1)
  c = influence.dense_matrix(influence.curvature_matvec(head.train_loss, head.params), head.params)
  want = jnp.einsum("np,np->n", gm, jnp.linalg.solve(c + 1e-2 * np.eye(21), gm.T).T)
  np.testing.assert_allclose(got, want, rtol=2e-3)
  with pytest.raises(ValueError, match="max_params"):
    si.damped_cholesky(params, train, max_params=10)
  with pytest.raises(ValueError, match="column_chunk"):
    si.damped_cholesky(head.params, head.train_loss, column_chunk=0)
  with pytest.raises(ValueError, match="lower-triangular"):  # Lᵀ would give wrong values
    si.self_influence(head.train_loss, head.params, chol.T)


def test_lds_refuses_inputs_that_would_silently_distort_the_score():
  key = jax.random.key(0)
  masks = lds.sample_masks(key, M, N)
  scores = jax.random.normal(jax.random.key(1), (N, T))
  outputs = jax.random.normal(jax.random.key(2), (M, T))
  assert np.isfinite(float(lds.lds(scores, masks, outputs).mean))
  # one failed retraining (a NaN row) would drop every test example from the mean
  with pytest.raises(ValueError, match="outputs.*NaN"):
    lds.lds(scores, masks, outputs.at[3].set(jnp.nan))
  with pytest.raises(ValueError, match="scores.*NaN"):
    lds.lds(scores.at[0, 0].set(jnp.inf), masks, outputs)
  with pytest.raises(ValueError, match="no True entry"):
    lds.lds(scores, jnp.zeros_like(masks), outputs)
  with pytest.raises(ValueError, match="scores must be a 2-D array"):
    lds.lds(scores[:, 0], masks, outputs)
  with pytest.raises(ValueError, match="masks must be a 2-D array"):
    lds.subset_indices(masks[0])
  with pytest.raises(ValueError, match="one shape"):
    lds.spearman(outputs, outputs[:, :3])
  with pytest.raises(ValueError, match="outputs_b.*NaN"):
    lds.noise_ceiling(outputs, outputs.at[0, 0].set(jnp.nan))
  uneven = jnp.array([[True, False, False], [True, True, False]])
  with pytest.raises(ValueError, match="same number of True entries.*1 to 2"):
    lds.subset_indices(uneven)
