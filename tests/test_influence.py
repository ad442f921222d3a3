"""kdaif_jax.influence against independent float64 oracles.

Oracles: ``jax.hessian`` / ``jax.jacobian`` of the flattened parameter vector
(dense curvature), ``jnp.linalg.solve`` / ``np.linalg.solve`` (inverse),
``jax.vmap(jax.grad(...))`` (per-example gradients). Never our own code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from kdaif_jax import influence, weights

# --------------------------------------------------------------------------
# Fixtures and a tiny model with a mixed-shape parameter pytree
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def x64():
  """Every test here runs in float64; the global setting is restored afterwards."""
  with jax.enable_x64(True):
    yield


def init_params(seed):
  """Matrices, vectors, a nested dict and a scalar leaf (39 parameters)."""
  rng = np.random.default_rng(seed)
  return {
    "w1": jnp.asarray(rng.normal(size=(3, 5))),
    "b1": jnp.asarray(0.3 * rng.normal(size=5)),
    "head": {
      "w2": jnp.asarray(rng.normal(size=(5, 3))),
      "b2": jnp.asarray(0.3 * rng.normal(size=3)),
    },
    "gain": jnp.asarray(np.float64(1.3)),  # not weakly typed, like the other leaves
  }


def logits_fn(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return params["gain"] * (h @ params["head"]["w2"]) + params["head"]["b2"]


def ce_of_logits(logits, y):
  """Per-example cross-entropy written out (independent of kdaif_jax.losses)."""
  picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  return jax.scipy.special.logsumexp(logits, axis=1) - picked


def per_example_loss(params, x, y):
  return ce_of_logits(logits_fn(params, x), y)


def mean_loss(params, x, y):
  return jnp.mean(per_example_loss(params, x, y))


def make_data(seed, n, d=3, k=3):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.integers(0, k, size=n))


@pytest.fixture
def problem():
  params = init_params(0)
  x, y = make_data(1, 8)
  xv, yv = make_data(2, 6)
  theta, unravel = ravel_pytree(params)
  v = unravel(jnp.asarray(np.random.default_rng(3).normal(size=theta.shape)))
  return dict(params=params, x=x, y=y, xv=xv, yv=yv, v=v, unravel=unravel, flat=theta)


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@jax.jit
def _dense_hessian(params, x, y):
  theta, unravel = ravel_pytree(params)
  return jax.hessian(lambda t: mean_loss(unravel(t), x, y))(theta)


def dense_hessian(params, x, y):
  """Oracle: jax.hessian of the mean loss in the flat parameter vector, [P, P]."""
  return np.asarray(_dense_hessian(params, x, y))


@jax.jit
def _dense_ggn(params, x, y):
  theta, unravel = ravel_pytree(params)
  out = lambda t: logits_fn(unravel(t), x).reshape(-1)
  jac = jax.jacobian(out)(theta)  # [B*K, P]
  shape = (x.shape[0], -1)
  h_out = jax.hessian(lambda z: jnp.mean(ce_of_logits(z.reshape(shape), y)))(out(theta))
  return jac.T @ h_out @ jac


def dense_ggn(params, x, y):
  """Oracle: Jᵀ H_out J from jax.jacobian of the outputs and jax.hessian of the loss."""
  return np.asarray(_dense_ggn(params, x, y))


@jax.jit
def _per_example_grads(params, x, y):
  single = lambda p, xi, yi: per_example_loss(p, xi[None], yi[None])[0]
  g = jax.vmap(jax.grad(single), in_axes=(None, 0, 0))(params, x, y)
  return jax.vmap(lambda t: ravel_pytree(t)[0])(g)


def per_example_grads(params, x, y):
  """Oracle: [B, P] per-example gradients by vmap(grad)."""
  return np.asarray(_per_example_grads(params, x, y))


def matrix_matvec(a, unravel=None):
  """A linear map from an explicit matrix (on a flat vector or on a pytree)."""
  a = jnp.asarray(a)
  if unravel is None:
    return lambda v: a @ v
  return lambda v: unravel(a @ ravel_pytree(v)[0])


def random_spd(seed, eigs):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(len(eigs), len(eigs))))
  return (q * np.asarray(eigs)) @ q.T, q


# --------------------------------------------------------------------------
# Curvature products
# --------------------------------------------------------------------------


def test_hvp_matches_jax_hessian(problem):
  p, x, y, v = problem["params"], problem["x"], problem["y"], problem["v"]
  h = dense_hessian(p, x, y)
  expect = h @ flat(v)
  got = influence.hvp(mean_loss, p, v, x, y)
  assert jax.tree.structure(got) == jax.tree.structure(p)
  assert rel_err(flat(got), expect) < 1e-8
  # keyword arguments are passed through too
  got_kw = influence.hvp(lambda q, *, xs, ys: mean_loss(q, xs, ys), p, v, xs=x, ys=y)
  assert rel_err(flat(got_kw), expect) < 1e-8
  # make_hvp: linearised once, many products
  mv = influence.make_hvp(lambda q: mean_loss(q, x, y), p)
  assert rel_err(flat(mv(v)), expect) < 1e-8
  v2 = jax.tree.map(lambda a: jnp.cos(3.0 * a), v)
  assert rel_err(flat(mv(v2)), h @ flat(v2)) < 1e-8


def test_gnvp_matches_explicit_ggn_and_is_psd_where_hessian_is_not(problem):
  p, x, y, v = problem["params"], problem["x"], problem["y"], problem["v"]
  g = dense_ggn(p, x, y)
  outputs_fn = lambda q: logits_fn(q, x)
  loss_fn = lambda z: jnp.mean(ce_of_logits(z, y))
  expect = g @ flat(v)
  assert rel_err(flat(influence.gnvp(outputs_fn, loss_fn, p, v)), expect) < 1e-8
  mv = influence.make_gnvp(outputs_fn, loss_fn, p)
  assert rel_err(flat(mv(v)), expect) < 1e-8
  v2 = jax.tree.map(lambda a: jnp.sin(2.0 * a) + 1.0, v)
  assert rel_err(flat(mv(v2)), g @ flat(v2)) < 1e-8
  # G is PSD, the Hessian of the same net at the same point is indefinite.
  assert np.linalg.eigvalsh(0.5 * (g + g.T)).min() >= -1e-10
  eig_h = np.linalg.eigvalsh(dense_hessian(p, x, y))
  assert eig_h.min() < -1e-4 and eig_h.max() > 1e-4


# --------------------------------------------------------------------------
# Conjugate gradient
# --------------------------------------------------------------------------


@pytest.fixture
def ggn_system(problem):
  p, x, y = problem["params"], problem["x"], problem["y"]
  g = dense_ggn(p, x, y)
  b = jax.grad(mean_loss)(p, problem["xv"], problem["yv"])
  damping = 0.05
  x_star = np.linalg.solve(g + damping * np.eye(g.shape[0]), flat(b))
  mv = influence.make_gnvp(lambda q: logits_fn(q, x), lambda z: jnp.mean(ce_of_logits(z, y)), p)
  return dict(problem, g=g, b=b, damping=damping, x_star=x_star, matvec=mv)


@pytest.mark.parametrize("unroll", [True, False])
def test_cg_matches_dense_solve(ggn_system, unroll):
  s = ggn_system
  # the GGN has rank B(K-1) = 16 < P = 39: CG needs about 17 steps
  x, info = influence.cg_solve(
    s["matvec"], s["b"], damping=s["damping"], maxiter=30, tol=1e-12, unroll=unroll
  )
  assert jax.tree.structure(x) == jax.tree.structure(s["b"])
  assert rel_err(flat(x), s["x_star"]) < 1e-8
  assert info.residual < 1e-10
  assert 10 <= int(info.iterations) < 30
  assert not bool(info.negative_curvature)
  assert bool(info.finite)


def test_cg_unroll_modes_agree_and_info_is_true_residual(ggn_system):
  s = ggn_system
  a = s["g"] + s["damping"] * np.eye(s["g"].shape[0])
  out = {}
  for unroll in (True, False):
    out[unroll] = influence.cg_solve(
      s["matvec"], s["b"], damping=s["damping"], maxiter=4, tol=1e-12, unroll=unroll
    )
  (x_u, info_u), (x_w, info_w) = out[True], out[False]
  assert rel_err(flat(x_u), flat(x_w)) < 1e-10
  assert int(info_u.iterations) == int(info_w.iterations) == 4  # not converged in 4
  bf = flat(s["b"])
  true_res = np.linalg.norm(bf - a @ flat(x_u)) / np.linalg.norm(bf)
  assert true_res > 1e-6  # really unconverged, so the check below means something
  np.testing.assert_allclose(float(info_u.residual), true_res, rtol=1e-6)
  np.testing.assert_allclose(float(info_w.residual), true_res, rtol=1e-6)
  # 4 CG steps minimise the A-norm error over the Krylov space: better than 3 steps.
  x3, _ = influence.cg_solve(s["matvec"], s["b"], damping=s["damping"], maxiter=3, tol=0.0)
  err = lambda z: (flat(z) - s["x_star"]) @ a @ (flat(z) - s["x_star"])
  assert err(x_u) < err(x3)


@pytest.mark.parametrize("unroll", [True, False])
def test_cg_warm_start_from_answer(ggn_system, unroll):
  s = ggn_system
  x0 = s["unravel"](jnp.asarray(s["x_star"]))
  x, info = influence.cg_solve(
    s["matvec"], s["b"], damping=s["damping"], maxiter=20, tol=1e-8, x0=x0, unroll=unroll
  )
  assert int(info.iterations) in (0, 1)
  assert rel_err(flat(x), s["x_star"]) < 1e-10
  assert info.residual < 1e-8


def test_cg_flat_arrays_and_explicit_spd():
  a, _ = random_spd(1, np.linspace(0.5, 4.0, 12))
  b = np.random.default_rng(2).normal(size=12)
  x, info = influence.cg_solve(matrix_matvec(a), jnp.asarray(b), damping=0.3, maxiter=40, tol=1e-13)
  np.testing.assert_allclose(
    np.asarray(x), np.linalg.solve(a + 0.3 * np.eye(12), b), rtol=1e-9, atol=1e-12
  )
  assert not bool(info.negative_curvature)
  # b = 0: nothing to do, x = 0 and no NaN from 0/0
  x0, info0 = influence.cg_solve(matrix_matvec(a), jnp.zeros(12), maxiter=5)
  assert np.all(np.asarray(x0) == 0.0) and int(info0.iterations) == 0
  assert bool(info0.finite) and np.isfinite(float(info0.residual))


@pytest.mark.parametrize("unroll", [True, False])
def test_cg_flags_negative_curvature_on_indefinite_matrix(unroll):
  eigs = np.array([3.0, 2.0, 1.0, 0.5, -1.0, -2.0])
  a, q = random_spd(3, eigs)
  mv = matrix_matvec(a)
  # b along a negative eigenvector: p0ᵀ(A + λI)p0 < 0 at the first step.
  b = jnp.asarray(q[:, -1])
  x, info = influence.cg_solve(mv, b, damping=0.01, maxiter=10, unroll=unroll)
  assert bool(info.negative_curvature)
  assert int(info.iterations) == 0
  assert bool(info.finite) and np.all(np.asarray(x) == 0.0)  # keeps the last iterate
  # A generic right-hand side also meets it within a few steps.
  b2 = jnp.asarray(np.random.default_rng(4).normal(size=6))
  x2, info2 = influence.cg_solve(mv, b2, damping=0.01, maxiter=10, unroll=unroll)
  assert bool(info2.negative_curvature) and bool(info2.finite)
  assert int(info2.iterations) < 10
  # Enough damping makes the same matrix PD: no flag, and the exact answer.
  x3, info3 = influence.cg_solve(mv, b2, damping=2.5, maxiter=30, tol=1e-13, unroll=unroll)
  assert not bool(info3.negative_curvature)
  np.testing.assert_allclose(np.asarray(x3), np.linalg.solve(a + 2.5 * np.eye(6), b2), rtol=1e-9)


def _counting(solve_chunk):
  """``solve_chunk`` that records the iterations of every call."""
  calls = []

  def run(x0):
    x, info = solve_chunk(x0)
    calls.append(np.asarray(info.iterations))
    return x, info

  return run, calls


def test_restarted_cg_reaches_dense_solve_and_stops_when_converged(ggn_system):
  s = ggn_system
  chunk = jax.jit(
    lambda x0: influence.cg_solve(
      s["matvec"], s["b"], damping=s["damping"], maxiter=4, tol=1e-10, x0=x0
    )
  )
  run, calls = _counting(chunk)
  x, info = influence.restarted(
    run, jax.tree.map(jnp.zeros_like, s["b"]), chunk_iters=4, total_iters=400
  )
  assert rel_err(flat(x), s["x_star"]) < 1e-8
  assert info.residual < 1e-10
  # Stopped on its own, long before the budget of 100 calls; the count is the sum.
  assert 5 <= len(calls) < 100 and int(calls[-1]) < 4
  assert int(info.iterations) == sum(int(c) for c in calls)


@pytest.mark.parametrize("unroll", [True, False])
def test_cg_with_a_nan_curvature_product_is_diverged(unroll):
  # Warm-started, the first residual is NaN. The while loop (the GPU default) then
  # never runs and x stays x0, finite; an H200 run reported such a solve as not
  # diverged. Both loop forms must report it, and the restarted loop stop on it.
  b = jnp.asarray(np.random.default_rng(5).normal(size=6))

  def chunk(x0):
    return influence.cg_solve(lambda v: v * jnp.nan, b, maxiter=2, tol=0.0, x0=x0, unroll=unroll)

  _, info = chunk(jnp.zeros(6))
  assert bool(info.diverged) and not np.isfinite(float(info.residual))
  run, calls = _counting(chunk)
  _, info = influence.restarted(run, jnp.ones(6), chunk_iters=2, total_iters=20)
  assert len(calls) == 1 and bool(info.diverged)


def test_restarted_spends_the_budget_and_stops_on_negative_curvature_or_nan():
  a, q = random_spd(3, np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1]))
  b = jnp.asarray(np.random.default_rng(4).normal(size=6))
  chunk = lambda mv, b: lambda x0: influence.cg_solve(mv, b, maxiter=2, tol=0.0, x0=x0)
  # Budget 5 in chunks of 2: three calls, 6 iterations (never converged with tol 0).
  run, calls = _counting(chunk(matrix_matvec(a), b))
  _, info = influence.restarted(run, jnp.zeros(6), chunk_iters=2, total_iters=5)
  assert len(calls) == 3 and int(info.iterations) == 6
  # Indefinite: CG stops at the negative direction, so does the loop.
  indef, qi = random_spd(3, np.array([3.0, 2.0, 1.0, 0.5, -1.0, -2.0]))
  run, calls = _counting(chunk(matrix_matvec(indef), jnp.asarray(qi[:, -1])))
  _, info = influence.restarted(run, jnp.zeros(6), chunk_iters=2, total_iters=20)
  assert len(calls) == 1 and bool(info.negative_curvature)
  # A non-finite iterate ends the loop too (the caller reads info.diverged).
  run, calls = _counting(chunk(lambda v: v * jnp.nan, b))
  _, info = influence.restarted(run, jnp.zeros(6), chunk_iters=2, total_iters=20)
  assert len(calls) == 1 and bool(info.diverged)
  with pytest.raises(ValueError, match="chunk_iters"):
    influence.restarted(run, jnp.zeros(6), chunk_iters=0, total_iters=20)
  # LiSSA (and the identity) cannot continue from an iterate: one call, whatever the budget.
  lissa = lambda x0: influence.lissa(matrix_matvec(a), b, damping=0.1, scale=4.0, depth=2)
  run, calls = _counting(lissa)
  _, info = influence.restarted(run, jnp.zeros(6), chunk_iters=2, total_iters=20, solver="lissa")
  assert len(calls) == 1
  with pytest.raises(ValueError, match="solver"):
    influence.restarted(run, jnp.zeros(6), chunk_iters=2, total_iters=20, solver="newton")


def test_restarted_vmapped_runs_until_every_right_hand_side_stops():
  a, q = random_spd(5, np.linspace(0.5, 3.0, 10))
  # Column 0 is an eigenvector (one CG step); column 1 needs ~10 steps.
  bs = jnp.asarray(np.stack([q[:, 0], np.random.default_rng(6).normal(size=10)]))
  solve = jax.vmap(
    lambda b, x0: influence.cg_solve(matrix_matvec(a), b, maxiter=3, tol=1e-12, x0=x0)
  )
  run, calls = _counting(lambda x0: solve(bs, x0))
  x, info = influence.restarted(run, jnp.zeros_like(bs), chunk_iters=3, total_iters=60)
  assert info.iterations.shape == (2,) and int(info.iterations[0]) == 1
  assert int(info.iterations[1]) >= 9 and len(calls) >= 4
  np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, np.asarray(bs).T).T, rtol=1e-8)


# --------------------------------------------------------------------------
# LiSSA
# --------------------------------------------------------------------------


@pytest.fixture
def spd_problem():
  a, _ = random_spd(5, np.linspace(0.5, 3.0, 10))
  b = np.random.default_rng(6).normal(size=10)
  damping = 0.1
  return a, b, damping, np.linalg.solve(a + damping * np.eye(10), b)


@pytest.mark.parametrize("unroll", [True, False])
def test_lissa_single_matvec_converges(spd_problem, unroll):
  a, b, damping, x_star = spd_problem
  x, info = influence.lissa(
    matrix_matvec(a), jnp.asarray(b), damping=damping, scale=4.0, depth=250, unroll=unroll
  )
  assert rel_err(x, x_star) < 1e-8
  assert int(info.iterations) == 250
  assert info.residual < 1e-8 and bool(info.finite)
  assert not bool(info.diverged)
  # too few steps: visibly not converged (the test above can fail)
  x_short, _ = influence.lissa(
    matrix_matvec(a), jnp.asarray(b), damping=damping, scale=4.0, depth=5, unroll=unroll
  )
  assert rel_err(x_short, x_star) > 1e-2


def test_lissa_sequence_of_matvecs_uses_each_once(spd_problem):
  a, b, damping, x_star = spd_problem
  depth = 250
  calls = np.zeros(depth, int)

  def make(j):
    def mv(v):
      calls[j] += 1
      return jnp.asarray(a) @ v

    return mv

  x, info = influence.lissa(
    [make(j) for j in range(depth)], jnp.asarray(b), damping=damping, scale=4.0, depth=depth
  )
  assert rel_err(x, x_star) < 1e-8
  assert not bool(info.diverged)
  assert calls[1:].tolist() == [1] * (depth - 1)
  assert calls[0] in (1, 2)  # the first map may also measure the residual


def test_lissa_batches_average_to_mean_matrix_solution(spd_problem):
  a, b, damping, x_star = spd_problem
  rng = np.random.default_rng(7)
  # Four symmetric "batch" matrices whose mean is exactly A.
  noise = [0.5 * (e + e.T) for e in rng.normal(scale=0.05, size=(4, 10, 10))]
  mean_noise = sum(noise) / 4
  mats = [jnp.asarray(a + e - mean_noise) for e in noise]
  np.testing.assert_allclose(sum(np.asarray(m) for m in mats) / 4, a, atol=1e-12)
  for m in mats:
    assert np.linalg.eigvalsh(np.asarray(m)).min() > 0

  def mv(v, batch):
    return mats[batch] @ v

  x_single = np.linalg.solve(np.asarray(mats[0]) + damping * np.eye(10), b)
  assert rel_err(x_single, x_star) > 0.02  # one batch alone is visibly different
  depth, calls = 150, 20
  runs = []
  for _ in range(calls):
    seq = iter(rng.integers(0, 4, size=depth + 5).tolist())
    x, info = influence.lissa(
      mv, jnp.asarray(b), damping=damping, scale=4.0, depth=depth, batches=seq
    )
    assert int(info.iterations) == depth and bool(info.finite)
    assert not bool(info.diverged)  # stochastic but convergent: never flagged
    runs.append(np.asarray(x))
  assert rel_err(np.mean(runs, axis=0), x_star) < 0.02


# --------------------------------------------------------------------------
# Scores and batch influence
# --------------------------------------------------------------------------


def test_scores_equal_minus_per_example_gradient_dot_s(problem):
  p, x, y, v = problem["params"], problem["x"], problem["y"], problem["v"]
  expect = -per_example_grads(p, x, y) @ flat(v)
  got = influence.scores(per_example_loss, p, v, x, y)
  assert got.shape == (x.shape[0],)
  assert rel_err(got, expect) < 1e-10
  got_kw = influence.scores(lambda q, *, xs, ys: per_example_loss(q, xs, ys), p, v, xs=x, ys=y)
  assert rel_err(got_kw, expect) < 1e-10


def _oracle_influence(p, x, y, xv, yv, curvature, solver, damping):
  c = dense_ggn(p, x, y) if curvature == "ggn" else dense_hessian(p, x, y)
  g_v = flat(jax.grad(mean_loss)(p, xv, yv))
  if solver == "identity":
    s = g_v
  else:
    s = np.linalg.solve(c + damping * np.eye(c.shape[0]), g_v)
  return -per_example_grads(p, x, y) @ s, s, g_v, c


def _train_loss(x, y):
  return influence.PerExampleLoss(lambda q: logits_fn(q, x), lambda z: ce_of_logits(z, y))


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("solver", ["cg", "lissa", "identity"])
def test_batch_influence_matches_dense_oracle(problem, curvature, solver):
  p, x, y, xv, yv = (problem[k] for k in ("params", "x", "y", "xv", "yv"))
  c = dense_ggn(p, x, y) if curvature == "ggn" else dense_hessian(p, x, y)
  eig = np.linalg.eigvalsh(0.5 * (c + c.T))
  if curvature == "hessian":
    assert eig.min() < 0  # indefinite: damping must lift it
  damping = max(0.5, 0.5 - eig.min())
  lam_min, lam_max = eig.min() + damping, eig.max() + damping
  scale = 1.05 * lam_max
  depth = int(np.ceil(np.log(1e-11) / np.log(1.0 - lam_min / scale)))
  assert depth < 600, depth
  maxiter = {"cg": 3 * c.shape[0], "lissa": depth, "identity": 1}[solver]
  expect, s_oracle, g_v, _ = _oracle_influence(p, x, y, xv, yv, curvature, solver, damping)
  res = influence.batch_influence(
    p,
    _train_loss(x, y),
    lambda q: mean_loss(q, xv, yv),
    curvature=curvature,
    solver=solver,
    damping=damping,
    maxiter=maxiter,
    tol=1e-13,
    lissa_scale=scale,
    unroll=False,
  )
  assert res.scores.shape == (x.shape[0],)
  assert rel_err(flat(res.val_grad), g_v) < 1e-12
  assert rel_err(flat(res.s), s_oracle) < 1e-8
  assert rel_err(res.scores, expect) < 1e-8
  assert bool(res.info.finite)


def test_batch_influence_curvature_and_solver_change_the_answer(problem):
  """Guards the parametrised oracle test against a solver that ignores its options."""
  p, x, y, xv, yv = (problem[k] for k in ("params", "x", "y", "xv", "yv"))
  kw = dict(damping=2.0, maxiter=80, tol=1e-13)
  val = lambda q: mean_loss(q, xv, yv)
  ggn = influence.batch_influence(p, _train_loss(x, y), val, curvature="ggn", **kw).scores
  hes = influence.batch_influence(p, _train_loss(x, y), val, curvature="hessian", **kw).scores
  ide = influence.batch_influence(p, _train_loss(x, y), val, solver="identity", **kw).scores
  assert rel_err(ggn, hes) > 1e-3 and rel_err(ggn, ide) > 1e-3


# --------------------------------------------------------------------------
# Sign: a flipped label is harmful and gets the lowest weight
# --------------------------------------------------------------------------


def _two_gaussians(rng, n):
  y = rng.integers(0, 2, size=n)
  centres = np.array([[-2.0, -1.0], [2.0, 1.0]])
  return jnp.asarray(centres[y] + rng.normal(size=(n, 2))), jnp.asarray(y)


def _linear_logits(params, x):
  return x @ params["w"] + params["b"]


@jax.jit
def _train_and_score(x, y, xv, yv):
  """60 gradient steps of 2-class logistic regression, then the library's influence."""
  train_mean = lambda p: jnp.mean(ce_of_logits(_linear_logits(p, x), y))
  sgd = lambda p: jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(train_mean)(p))
  params = {"w": jnp.zeros((2, 2), x.dtype), "b": jnp.zeros((2,), x.dtype)}
  params = jax.lax.fori_loop(0, 60, lambda _, q: sgd(q), params)
  val_loss = lambda p: jnp.mean(ce_of_logits(_linear_logits(p, xv), yv))
  train = influence.PerExampleLoss(lambda p: _linear_logits(p, x), lambda z: ce_of_logits(z, y))
  # library defaults: Gauss-Newton, CG, damping 0.1
  return influence.batch_influence(params, train, val_loss).scores, val_loss(params)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flipped_label_is_harmful_and_gets_lowest_weight(seed):
  rng = np.random.default_rng(seed)
  x, y = _two_gaussians(rng, 40)
  xv, yv = _two_gaussians(rng, 200)
  # flip the label of the training point deepest inside its class
  margin = (x @ jnp.array([2.0, 1.0])) * (2 * y - 1)
  bad = int(jnp.argmax(margin))
  y = y.at[bad].set(1 - y[bad])
  scores, val_loss = _train_and_score(x, y, xv, yv)
  assert float(val_loss) < 0.3  # trained a bit
  scores = np.asarray(scores)
  assert scores[bad] > 0  # harmful
  assert int(np.argmax(scores)) == bad
  assert np.sum(scores < 0) > len(scores) // 2  # most clean points help
  w = np.asarray(weights.sigmoid(jnp.asarray(scores, jnp.float32)))
  assert int(np.argmin(w)) == bad
  assert w[bad] < 1.0


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(problem):
  p, x, y, v = problem["params"], problem["x"], problem["y"], problem["v"]
  other = {"w1": v["w1"], "b1": v["b1"]}
  with pytest.raises(ValueError, match="structure"):
    influence.hvp(mean_loss, p, other, x, y)
  with pytest.raises(ValueError, match="structure"):
    influence.gnvp(lambda q: logits_fn(q, x), lambda z: jnp.mean(ce_of_logits(z, y)), p, other)
  with pytest.raises(ValueError, match="structure"):
    influence.make_hvp(lambda q: mean_loss(q, x, y), p)(other)
  with pytest.raises(ValueError, match="structure"):
    influence.scores(per_example_loss, p, other, x, y)
  wrong = dict(v, head={"w2": jnp.zeros((3, 5)), "b2": v["head"]["b2"]})
  for call in (
    lambda: influence.hvp(mean_loss, p, wrong, x, y),
    lambda: influence.scores(per_example_loss, p, wrong, x, y),
    lambda: influence.make_gnvp(
      lambda q: logits_fn(q, x), lambda z: jnp.mean(ce_of_logits(z, y)), p
    )(wrong),
    lambda: influence.cg_solve(lambda u: u, v, x0=wrong),
  ):
    with pytest.raises(ValueError, match=r"\['head'\]\['w2'\].*\(3, 5\)"):
      call()
  with pytest.raises(ValueError, match="scalar"):
    influence.hvp(per_example_loss, p, v, x, y)
  with pytest.raises(ValueError, match="scalar"):
    influence.make_hvp(lambda q: per_example_loss(q, x, y), p)
  with pytest.raises(ValueError, match="1-D"):
    influence.scores(mean_loss, p, v, x, y)
  ident = lambda u: u
  with pytest.raises(ValueError, match="damping"):
    influence.cg_solve(ident, v, damping=-0.1)
  with pytest.raises(ValueError, match="damping"):
    influence.lissa(ident, v, damping=-1.0)
  with pytest.raises(ValueError, match="damping"):
    influence.cg_solve(ident, v, damping=float("nan"))
  with pytest.raises(ValueError, match="maxiter"):
    influence.cg_solve(ident, v, maxiter=0)
  with pytest.raises(ValueError, match="maxiter"):
    influence.cg_solve(ident, v, maxiter=2.0)
  with pytest.raises(ValueError, match="depth"):
    influence.lissa(ident, v, depth=0)
  with pytest.raises(ValueError, match="scale"):
    influence.lissa(ident, v, scale=0.0)
  nan_b = dict(v, b1=v["b1"].at[2].set(jnp.nan))
  with pytest.raises(ValueError, match=r"b\['b1'\].*NaN"):
    influence.cg_solve(ident, nan_b)
  with pytest.raises(ValueError, match="NaN"):
    influence.lissa(ident, nan_b)
  with pytest.raises(ValueError, match="NaN"):
    influence.inverse_hvp(ident, nan_b, solver="identity")
  train, val = _train_loss(x, y), (lambda q: mean_loss(q, x, y))
  with pytest.raises(ValueError, match="cg, lissa, identity"):
    influence.batch_influence(p, train, val, solver="newton")
  with pytest.raises(ValueError, match="ggn, hessian"):
    influence.batch_influence(p, train, val, curvature="fisher")
  with pytest.raises(ValueError, match="ggn, hessian"):
    influence.curvature_matvec(train, p, "diag")
  with pytest.raises(ValueError, match="damping"):
    influence.batch_influence(p, train, val, damping=-1.0)
  with pytest.raises(ValueError, match="scalar"):
    influence.batch_influence(p, train, lambda q: per_example_loss(q, x, y))
  # the identity solver ignores damping and maxiter, but a wrong value is still refused
  with pytest.raises(ValueError, match="damping"):
    influence.inverse_hvp(None, v, solver="identity", damping=-1.0)
  with pytest.raises(ValueError, match="maxiter"):
    influence.inverse_hvp(None, v, solver="identity", maxiter=0)
  with pytest.raises(ValueError, match="damping must be a scalar"):
    influence.cg_solve(ident, v, damping=jnp.array([0.1, 0.2]))
  with pytest.raises(ValueError, match=r"x0\['b1'\].*NaN"):
    influence.cg_solve(ident, v, x0=nan_b)
  int_params = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.int32), p)
  with pytest.raises(ValueError, match="params"):
    influence.solve_direction(int_params, train, val)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_cg_on_a_singular_system_without_damping_is_diverged(dtype):
  """A batch Gauss-Newton matrix of rank < P, damping 0: the system has no solution.

  Softmax regression, 2 examples, 4 features, 3 classes: C has rank 4 in 12
  dimensions and g_V lies outside its range. CG's iterate grows by 1e6 (float32)
  to 1e16 (float64) while staying finite; the solve must be marked diverged rather
  than hand back such scores as if they were usable.
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4)), dtype)
  xv = jnp.asarray(rng.normal(size=(6, 4)), dtype)
  y, yv = jnp.array([0, 1]), jnp.asarray(rng.integers(0, 3, 6))
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)) * 0.1, dtype)}
  ce = lambda z, t: -jax.nn.log_softmax(z)[jnp.arange(t.shape[0]), t]
  train = influence.PerExampleLoss(lambda q: x @ q["w"], lambda z: ce(z, y))
  val = lambda q: jnp.mean(ce(xv @ q["w"], yv))
  c = influence.dense_matrix(influence.curvature_matvec(train, params), params)
  assert np.linalg.matrix_rank(np.asarray(c, np.float64), tol=1e-6) == 4
  for unroll in (True, False):
    res = influence.batch_influence(
      params, train, val, damping=0.0, maxiter=50, tol=1e-10, unroll=unroll
    )
    assert bool(res.info.diverged), res.info
  # with damping the same system is regular: solved, not flagged
  res = influence.batch_influence(params, train, val, damping=0.1, maxiter=50, tol=1e-10)
  assert not bool(res.info.diverged)
  g = np.asarray(res.val_grad["w"], np.float64).ravel()
  want = np.linalg.solve(np.asarray(c, np.float64) + 0.1 * np.eye(12), g)
  tol = 1e-3 if dtype == jnp.float32 else 1e-8
  np.testing.assert_allclose(np.asarray(res.s["w"]).ravel(), want, rtol=tol, atol=tol)


def test_lissa_with_too_few_batches_is_a_value_error(spd_problem):
  a, b, damping, _ = spd_problem
  with pytest.raises(ValueError):
    influence.lissa(lambda v, bt: jnp.asarray(a) @ v, jnp.asarray(b), depth=10, batches=[0, 1, 2])


# --------------------------------------------------------------------------
# Under jax.jit: same answers, one trace for new values of the same shapes
# --------------------------------------------------------------------------


def _new_values(problem, seed):
  params = init_params(100 + seed)
  x, y = make_data(200 + seed, 8)
  xv, yv = make_data(300 + seed, 6)
  v = problem["unravel"](jnp.asarray(np.random.default_rng(400 + seed).normal(size=39)))
  return params, x, y, xv, yv, v


def test_hvp_and_scores_under_jit_trace_once(problem):
  traces = []

  @jax.jit
  def f(params, v, x, y):
    traces.append(1)
    return influence.hvp(mean_loss, params, v, x, y), influence.scores(
      per_example_loss, params, v, x, y
    )

  for seed in (0, 1):
    params, x, y, _, _, v = _new_values(problem, seed)
    h, sc = f(params, v, x, y)
    assert rel_err(flat(h), dense_hessian(params, x, y) @ flat(v)) < 1e-8
    assert rel_err(sc, -per_example_grads(params, x, y) @ flat(v)) < 1e-10
  assert len(traces) == 1


@pytest.mark.parametrize("unroll", [True, False])
def test_cg_solve_under_jit_traces_once(problem, unroll):
  traces = []

  @jax.jit
  def solve(params, x, y, b, damping):
    traces.append(1)
    mv = influence.make_gnvp(
      lambda q: logits_fn(q, x), lambda z: jnp.mean(ce_of_logits(z, y)), params
    )
    # the GGN has rank B(K-1) = 16, so CG converges within 20 steps
    return influence.cg_solve(mv, b, damping=damping, maxiter=20, tol=1e-12, unroll=unroll)

  for seed, damping in ((0, 0.5), (1, 0.7)):
    params, x, y, _, _, v = _new_values(problem, seed)
    sol, info = solve(params, x, y, v, jnp.asarray(damping))
    g = dense_ggn(params, x, y)
    assert rel_err(flat(sol), np.linalg.solve(g + damping * np.eye(g.shape[0]), flat(v))) < 1e-8
    assert not bool(info.negative_curvature)
  assert len(traces) == 1


def test_batch_influence_under_jit_traces_once(problem):
  traces = []
  damping = 0.5

  @jax.jit
  def run(params, x, y, xv, yv, x0):
    traces.append(1)
    res = influence.batch_influence(
      params,
      _train_loss(x, y),
      lambda q: mean_loss(q, xv, yv),
      damping=damping,
      maxiter=20,
      tol=1e-12,
      x0=x0,
      unroll=False,
    )
    return res.scores, res.info.iterations

  for seed in (0, 1):
    params, x, y, xv, yv, _ = _new_values(problem, seed)
    expect, s_oracle, _, _ = _oracle_influence(params, x, y, xv, yv, "ggn", "cg", damping)
    sc, it = run(params, x, y, xv, yv, jax.tree.map(jnp.zeros_like, params))
    assert rel_err(sc, expect) < 1e-8
    # warm start from the answer inside jit: at most one iteration
    sc2, it2 = run(params, x, y, xv, yv, problem["unravel"](jnp.asarray(s_oracle)))
    assert int(it) > 1 and int(it2) <= 1
    assert rel_err(sc2, expect) < 1e-8
  assert len(traces) == 1
