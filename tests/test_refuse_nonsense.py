"""The library refuses nonsense: one-line ValueErrors for bad inputs, flags for blow-ups.

Each section reproduces one item of the reliability issue (7-11): the input
that used to be accepted (or crashed deep inside JAX) and what happens now.
Value checks run only on concrete inputs; shape/dtype checks run under ``jit``
too (they are static). Non-finite scores get weight 0 while finite inputs keep
today's weights bit for bit (checked against a verbatim copy of the formulas).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdaif_jax import influence, losses, weights
from kdaif_jax.solvers import SolveInfo


def one_line_error(call, match):
  """Runs ``call``; it must raise a ValueError matching ``match`` on a single line."""
  with pytest.raises(ValueError, match=match) as err:
    call()
  assert "\n" not in str(err.value), str(err.value)
  return str(err.value)


def params_and_v():
  rng = np.random.default_rng(0)
  p = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros(2, jnp.float32)}
  v = jax.tree.map(lambda a: jnp.ones_like(a), p)
  return p, v


X = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
Y = jnp.asarray([0, 1, 1, 0, 1])


def logits_fn(p, x=X):
  return x @ p["w"] + p["b"]


def per_example(p):
  return losses.cross_entropy(logits_fn(p), Y)


def mean_loss(p):
  return jnp.mean(per_example(p))


# --------------------------------------------------------------------------
# 7. Options: tol, temperatures, alpha; LiSSA divergence
# --------------------------------------------------------------------------


@pytest.mark.parametrize("tol", [-1.0, float("nan"), float("inf")])
def test_cg_solve_rejects_negative_or_nonfinite_tol(tol):
  # tol enters squared: −1 acted as 1 (0 iterations, x = 0); NaN never stopped
  msg = one_line_error(lambda: influence.cg_solve(lambda u: u, jnp.ones(3), tol=tol), r"^tol\b")
  assert ">= 0" in msg
  with pytest.raises(ValueError, match="tol"):
    influence.inverse_hvp(lambda u: u, jnp.ones(3), tol=tol)
  x, info = influence.cg_solve(lambda u: 2.0 * u, jnp.ones(3), tol=0.0)  # 0 is allowed
  np.testing.assert_allclose(x, 0.5)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_weight_maps_reject_bad_temperature(temperature):
  s = jnp.asarray([-0.5, 0.1, 0.8])
  for call in (
    lambda: weights.sigmoid(s, temperature=temperature),
    lambda: weights.small_loss(s, temperature=temperature),
    lambda: weights.WeightMap("sigmoid", temperature)(s),
  ):
    msg = one_line_error(call, r"^temperature must be a finite number > 0")
    assert str(temperature) in msg
  with pytest.raises(ValueError, match="eps"):
    weights.exp_minmax(s, eps=-1.0)


@pytest.mark.parametrize("temperature", [0.0, -4.0, float("nan")])
def test_kd_loss_rejects_bad_temperature(temperature):
  s, t = jnp.zeros((2, 3)), jnp.ones((2, 3))
  one_line_error(
    lambda: losses.kd_loss(s, t, jnp.asarray([1, -1]), temperature=temperature), "temperature"
  )
  one_line_error(lambda: losses.kl_divergence(t, s, temperature), "temperature")
  one_line_error(lambda: losses.KDOptions(temperature, 0.5)(s, t, None), "temperature")


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_kd_loss_rejects_alpha_outside_unit_interval(alpha):
  s, t = jnp.zeros((2, 3)), jnp.ones((2, 3))
  one_line_error(
    lambda: losses.kd_loss(s, t, jnp.asarray([1, -1]), alpha=alpha), r"alpha.*\[0.0, 1.0\]"
  )
  for ok in (0.0, 1.0):
    assert np.all(np.isfinite(losses.kd_loss(s, t, jnp.asarray([1, -1]), alpha=ok)))


def spd(eigs):
  q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(len(eigs), len(eigs))))
  return jnp.asarray((q * np.asarray(eigs)) @ q.T, jnp.float32)


@pytest.mark.parametrize("unroll", [True, False])
def test_lissa_flags_divergence_when_scale_is_too_small(unroll):
  a = spd([1.0, 3.0, 10.0])
  b = jnp.ones(3)
  # scale below half the largest eigenvalue: the Neumann series explodes (1e21-sized x)
  x, info = influence.lissa(lambda u: a @ u, b, scale=1.0, depth=30, unroll=unroll)
  assert bool(info.diverged) and float(jnp.max(jnp.abs(x))) > 1e10
  # a bit too small: |1 − 10/4.5| = 1.22 grows slowly; still flagged
  _, info = influence.lissa(lambda u: a @ u, b, scale=4.5, depth=20, unroll=unroll)
  assert bool(info.diverged) and bool(info.finite)
  # a safe scale converges and is not flagged, even when stopped early
  for depth in (1, 3, 200):
    _, info = influence.lissa(lambda u: a @ u, b, scale=10.0, depth=depth, unroll=unroll)
    assert not bool(info.diverged) and bool(info.finite)
  # scale just above half the top eigenvalue: slow but convergent, not flagged
  _, info = influence.lissa(lambda u: a @ u, b, scale=5.2, depth=50, unroll=unroll)
  assert not bool(info.diverged)
  # a singular system (A = 0, λ = 0): x grows linearly, the residual stays ||b||; not flagged
  _, info = influence.lissa(lambda u: 0.0 * u, b, scale=1.0, depth=10, unroll=unroll)
  assert not bool(info.diverged)


def test_lissa_divergence_flag_under_jit_and_with_a_sequence_of_matvecs():
  a = spd([1.0, 3.0, 10.0])
  b = jnp.ones(3)
  solve = jax.jit(lambda b, scale: influence.lissa(lambda u: a @ u, b, scale=scale, depth=30)[1])
  assert bool(solve(b, 1.0).diverged) and not bool(solve(b, 12.0).diverged)
  noisy = [lambda u, c=c: (a * c) @ u for c in np.linspace(0.8, 1.2, 30)]
  assert bool(influence.lissa(noisy, b, scale=1.0, depth=30)[1].diverged)
  assert not bool(influence.lissa(noisy, b, scale=13.0, depth=30)[1].diverged)


def test_cg_and_identity_diverged_is_not_finite_and_solveinfo_stays_positional():
  a = spd([1.0, 2.0, 3.0])
  _, info = influence.cg_solve(lambda u: a @ u, jnp.ones(3), maxiter=5)
  assert not bool(info.diverged)
  _, info = influence.cg_solve(lambda u: jnp.full_like(u, jnp.inf), jnp.ones(3), maxiter=2)
  assert bool(info.diverged) and not bool(info.finite)
  _, info = influence.inverse_hvp(None, jnp.ones(3), solver="identity")
  assert not bool(info.diverged)
  old = SolveInfo(jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros((), bool), jnp.ones((), bool))
  assert not bool(old.diverged) and old.diverged.astype(np.float32) == 0.0
  assert SolveInfo._fields[-1] == "diverged"


# --------------------------------------------------------------------------
# 8. Non-finite scores: weight 0, the rest finite with mean 1; huge finite values
# --------------------------------------------------------------------------

MAPS = {
  "sigmoid": weights.sigmoid,
  "sigmoid_down": weights.sigmoid_down,
  "exp_minmax": weights.exp_minmax,
  "small_loss": weights.small_loss,
}
RNG = np.random.default_rng(7)
SCORES = (RNG.normal(size=24) * 2e-3).astype(np.float32)
LOSSES = (RNG.gamma(2.0, size=24)).astype(np.float32)


def sample(name):
  return LOSSES if name == "small_loss" else SCORES


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_scores_get_weight_zero_and_the_rest_mean_one(name, bad):
  fn, s = MAPS[name], sample(name).copy()
  idx = [3, 10, 11]
  s[idx] = bad
  w = np.asarray(fn(jnp.asarray(s)))
  assert np.all(np.isfinite(w)), w
  np.testing.assert_array_equal(w[idx], 0.0)
  keep = np.isfinite(s)
  assert abs(w[keep].mean() - 1.0) < 1e-6
  # the finite entries get the weights the map gives the finite entries alone
  np.testing.assert_allclose(w[keep], np.asarray(fn(jnp.asarray(s[keep]))), rtol=2e-5)
  assert int(weights.num_nonfinite(jnp.asarray(s))) == 3


@pytest.mark.parametrize("name", list(MAPS))
def test_all_or_all_but_one_nonfinite(name):
  fn = MAPS[name]
  np.testing.assert_array_equal(np.asarray(fn(jnp.asarray([np.nan, np.inf, -np.inf]))), 0.0)
  np.testing.assert_array_equal(np.asarray(fn(jnp.asarray([np.nan, 2.0, np.nan]))), [0.0, 1.0, 0.0])


@pytest.mark.parametrize("name", list(MAPS))
def test_nonfinite_with_axis_name_uses_the_finite_entries_of_the_global_batch(name):
  fn, s = MAPS[name], sample(name).copy()
  s[[1, 2, 17]] = [np.nan, np.inf, np.nan]  # shards 0 and 2 hold the bad entries
  expect = np.asarray(fn(jnp.asarray(s)))
  shards = jnp.asarray(s).reshape(4, 6)
  got = jax.vmap(lambda x: fn(x, axis_name="d"), axis_name="d")(shards)
  np.testing.assert_allclose(np.asarray(got).reshape(-1), expect, rtol=1e-6, atol=1e-7)
  count = jax.vmap(lambda x: weights.num_nonfinite(x, axis_name="d"), axis_name="d")(shards)
  np.testing.assert_array_equal(np.asarray(count), 3)
  got_jit = jax.jit(fn)(jnp.asarray(s))
  np.testing.assert_allclose(np.asarray(got_jit), expect, rtol=1e-6, atol=1e-7)


def test_num_nonfinite_counts_and_checks_shape():
  s = jnp.asarray([1.0, np.nan, np.inf, -np.inf, 0.0])
  assert int(weights.num_nonfinite(s)) == 3
  assert int(jax.jit(weights.num_nonfinite)(s)) == 3
  assert weights.num_nonfinite(s).dtype == jnp.int32
  assert int(weights.num_nonfinite(jnp.zeros((0,)))) == 0
  one_line_error(lambda: weights.num_nonfinite(jnp.zeros((2, 2))), "1-D")


def np_exp_minmax(scores):
  h = -np.asarray(scores, np.float64)
  w = np.exp(2.0 * (h - h.min()) / (h.max() - h.min()) - 1.0)
  return w / w.mean()


@pytest.mark.parametrize(
  "scores",
  [[1e38, -1e38, 0.0], [3e38, -3e38, 0.0, 1.0], [-3.4e38, 3.4e38, 1e38], [2e38, -2e38, np.nan]],
)
def test_exp_minmax_stays_finite_and_right_for_huge_finite_values(scores):
  s = np.asarray(scores, np.float32)
  w = np.asarray(weights.exp_minmax(jnp.asarray(s)))
  keep = np.isfinite(s)
  assert np.all(np.isfinite(w)) and abs(w[keep].mean() - 1.0) < 1e-6
  np.testing.assert_allclose(w[keep], np_exp_minmax(s[keep]), rtol=1e-5)
  for name in ("sigmoid", "small_loss"):
    assert np.all(np.isfinite(np.asarray(MAPS[name](jnp.asarray(s)))))


# A verbatim copy of the maps before non-finite handling: finite inputs must keep these
# weights bit for bit (the training runs are compared byte for byte).


def old_moments(x, axis_name=None):
  peak = jnp.max(jnp.abs(x))
  if axis_name is not None:
    peak = jax.lax.pmax(peak, axis_name)
  peak = jnp.where(peak > 0, peak, 1.0)
  xs = x / peak
  mean = jnp.mean(xs)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  var = jnp.mean(jnp.square(xs - mean))
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  return mean * peak, jnp.sqrt(var) * peak


def old_extremes(x, axis_name=None):
  lo, hi = jnp.min(x), jnp.max(x)
  if axis_name is not None:
    lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
  return lo, hi


def old_normalise_log(log_w, axis_name):
  peak = jnp.max(log_w)
  if axis_name is not None:
    peak = jax.lax.pmax(peak, axis_name)
  w = jnp.exp(log_w - peak)
  mean = jnp.mean(w)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  return w / mean


def old_sigmoid(scores, *, temperature=1.0, eps=1e-8, axis_name=None):
  _, std = old_moments(scores, axis_name)
  z = -scores / (temperature * std + eps)
  return old_normalise_log(jax.nn.log_sigmoid(z), axis_name)


def old_exp_minmax(scores, *, eps=1e-12, axis_name=None):
  h = -scores
  lo, hi = old_extremes(h, axis_name)
  scaled = 2.0 * (h - lo) / (hi - lo + eps) - 1.0
  return old_normalise_log(scaled, axis_name)


def old_small_loss(losses, *, temperature=1.0, eps=1e-8, axis_name=None):
  mean, std = old_moments(losses, axis_name)
  z = -(losses - mean) / (temperature * std + eps)
  return old_normalise_log(jax.nn.log_sigmoid(z), axis_name)


def old_sigmoid_down(scores, *, temperature=1.0, eps=1e-8, axis_name=None):
  # The plain formula of sigmoid_down: min(1, 2σ(z)) in log space (the 2 cancels).
  _, std = old_moments(scores, axis_name)
  z = -scores / (temperature * std + eps)
  return old_normalise_log(jnp.minimum(jax.nn.log_sigmoid(z), -jnp.log(2.0)), axis_name)


OLD = {
  "sigmoid": old_sigmoid,
  "sigmoid_down": old_sigmoid_down,
  "exp_minmax": old_exp_minmax,
  "small_loss": old_small_loss,
}


def assert_bits_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape
  np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("name", list(MAPS))
def test_finite_inputs_give_bit_identical_weights(name):
  new, old = MAPS[name], OLD[name]
  kw = {} if name == "exp_minmax" else {"temperature": 0.7}
  rng = np.random.default_rng(11)
  cases = [
    rng.normal(size=n) * scale + shift
    for n in (1, 2, 7, 64, 256)
    for scale, shift in ((3e-3, 0.0), (1.0, 0.5), (1e20, 0.0))
  ]
  cases += [np.full(5, 2.5), [-1e30, 0.0, 1e30, 5e29], [1000.0, 1000.25, 1000.5]]
  jit_new = jax.jit(lambda x: new(x, **kw))
  jit_old = jax.jit(lambda x: old(x, **kw))
  for c in cases:
    s = jnp.asarray(np.abs(c) if name == "small_loss" else c, jnp.float32)
    assert_bits_equal(new(s, **kw), old(s, **kw))
    assert_bits_equal(jit_new(s), jit_old(s))
  # sharded (axis_name) and float64
  s = jnp.asarray(np.abs(cases[9]), jnp.float32).reshape(4, 16)
  vm = lambda fn: jax.vmap(lambda x: fn(x, axis_name="d", **kw), axis_name="d")(s)
  assert_bits_equal(vm(new), vm(old))
  with jax.enable_x64(True):
    s64 = jnp.asarray(np.abs(cases[9]), jnp.float64)
    assert_bits_equal(new(s64, **kw), old(s64, **kw))


def old_cross_entropy(logits, labels):
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  if labels.ndim == logits.ndim:
    return -jnp.sum(labels * logp, axis=-1)
  return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def old_kd_loss(s, t, labels, temperature=4.0, alpha=0.5):
  soft = temperature**2 * losses.kl_divergence(t, s, temperature)
  hard = old_cross_entropy(s, jnp.maximum(labels, 0))
  return jnp.where(labels >= 0, alpha * hard + (1.0 - alpha) * soft, soft)


def test_valid_labels_give_bit_identical_losses_and_gradients():
  rng = np.random.default_rng(3)
  s = jnp.asarray(rng.normal(size=(16, 10)) * 3, jnp.float32)
  t = jnp.asarray(rng.normal(size=(16, 10)) * 3, jnp.float32)
  y = jnp.asarray(rng.integers(-1, 10, size=16), jnp.int32)
  y_lab = jnp.maximum(y, 0)
  assert_bits_equal(losses.cross_entropy(s, y_lab), old_cross_entropy(s, y_lab))
  new_kd = lambda a: jnp.mean(losses.kd_loss(a, t, y, temperature=3.0, alpha=0.3))
  old_kd = lambda a: jnp.mean(old_kd_loss(a, t, y, 3.0, 0.3))
  assert_bits_equal(
    jax.jit(jax.value_and_grad(new_kd))(s)[1], jax.jit(jax.value_and_grad(old_kd))(s)[1]
  )
  assert_bits_equal(jax.jit(new_kd)(s), jax.jit(old_kd)(s))


# --------------------------------------------------------------------------
# 9. Labels: out of range is an error eagerly, NaN (not another class) under jit
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 3, 99])
def test_cross_entropy_rejects_out_of_range_labels_eagerly(bad):
  logits = jnp.zeros((4, 3))
  for labels in (np.asarray([0, 2, bad, 1]), jnp.asarray([0, 2, bad, 1])):
    msg = one_line_error(
      lambda labels=labels: losses.cross_entropy(logits, labels), r"^labels contains"
    )
    assert f"{bad} at index 2" in msg and "0..2" in msg


def test_cross_entropy_out_of_range_labels_under_jit_give_nan_not_another_class():
  logits = jnp.asarray([[0.0, np.log(3.0), 1.0]] * 4)
  y = jnp.asarray([1, -1, 3, 0])
  got = np.asarray(jax.jit(losses.cross_entropy)(logits, y))
  assert np.isnan(got[1]) and np.isnan(got[2])  # −1 used to score the last class, 3 gave NaN
  np.testing.assert_allclose(
    got[[0, 3]],
    np.asarray(losses.cross_entropy(logits[jnp.asarray([0, 3])], y[jnp.asarray([0, 3])])),
  )
  # the gradient stays finite: the invalid rows contribute nothing
  # (labels passed as an argument: closed over, they would be concrete and checked)
  loss = lambda z, y: jnp.sum(jnp.nan_to_num(losses.cross_entropy(z, y)))
  g = jax.jit(jax.grad(loss))(logits, y)
  assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[[1, 2]] == 0.0)


def test_kd_loss_labels_allow_minus_one_only():
  s, t = jnp.zeros((3, 4)), jnp.ones((3, 4))
  assert np.all(np.isfinite(losses.kd_loss(s, t, jnp.asarray([0, -1, 3]))))
  msg = one_line_error(
    lambda: losses.kd_loss(s, t, jnp.asarray([0, 4, 3])), r"^labels contains 4 at index 1"
  )
  assert "-1..3" in msg
  one_line_error(lambda: losses.kd_loss(s, t, jnp.asarray([0, -2, 3])), "-2")
  # an explicit mask: the rows it marks labelled need a real class id
  mask = jnp.asarray([True, True, False])
  one_line_error(
    lambda: losses.kd_loss(s, t, jnp.asarray([0, -1, 3]), labelled=mask), "marked labelled"
  )
  assert np.all(np.isfinite(losses.kd_loss(s, t, jnp.asarray([0, 1, -1]), labelled=mask)))
  # under jit: a labelled row with an out-of-range id is NaN, unlabelled rows stay finite
  got = np.asarray(jax.jit(losses.kd_loss)(s, t, jnp.asarray([0, -1, 7])))
  assert np.isfinite(got[:2]).all() and np.isnan(got[2])


def test_loss_shape_and_dtype_errors_are_one_line_also_under_jit():
  z = jnp.zeros((4, 3))
  for call in (
    lambda: losses.cross_entropy(z, jnp.asarray([0, 1, 2])),
    lambda: jax.jit(losses.cross_entropy)(z, jnp.asarray([0, 1, 2])),
    lambda: losses.kd_loss(z, z, jnp.asarray([0, 1, 2])),
  ):
    one_line_error(call, "labels has 3 examples but the logits have 4")
  one_line_error(lambda: losses.cross_entropy(z, jnp.zeros((4, 2))), r"\[B\] class ids or \[B, K\]")
  one_line_error(lambda: losses.cross_entropy(z, jnp.asarray([0.0, 1.0, 2.0, 1.0])), "integer")
  one_line_error(
    lambda: losses.cross_entropy(jnp.zeros(3), jnp.asarray([0])), r"logits must be \[B, K\]"
  )
  one_line_error(lambda: losses.kl_divergence(z, jnp.zeros((5, 3))), "must match")
  one_line_error(lambda: losses.kd_loss(z, jnp.zeros((4, 2)), None), "must match")


# --------------------------------------------------------------------------
# 10. NaN/inf inputs to the curvature products and scores: named, eagerly
# --------------------------------------------------------------------------


def test_nonfinite_params_v_s_are_named_eagerly():
  p, v = params_and_v()
  bad_p = dict(p, w=p["w"].at[1, 0].set(jnp.nan))
  bad_v = dict(v, b=v["b"].at[0].set(jnp.inf))
  out = lambda q: logits_fn(q)
  ce = lambda o: jnp.mean(losses.cross_entropy(o, Y))
  for call in (
    lambda: influence.hvp(mean_loss, bad_p, v),
    lambda: influence.gnvp(out, ce, bad_p, v),
    lambda: influence.make_hvp(mean_loss, bad_p),
    lambda: influence.make_gnvp(out, ce, bad_p),
    lambda: influence.scores(per_example, bad_p, v),
  ):
    one_line_error(call, r"^params\['w'\] contains NaN or inf")
  for call in (
    lambda: influence.hvp(mean_loss, p, bad_v),
    lambda: influence.gnvp(out, ce, p, bad_v),
  ):
    one_line_error(call, r"^v\['b'\] contains NaN or inf")
  one_line_error(lambda: influence.scores(per_example, p, bad_v), r"^s\['b'\] contains NaN or inf")
  # Closed over by a jitted function the arrays are still concrete: checked while
  # tracing, not turned into an unreadable traced flag.
  mv = influence.make_hvp(mean_loss, p)
  jitted = jax.jit(lambda x0: influence.cg_solve(mv, bad_v, maxiter=2, x0=x0))
  one_line_error(lambda: jitted(v), r"^b\['b'\] contains NaN or inf")
  assert bool(jax.jit(lambda x0: influence.cg_solve(mv, v, maxiter=2, x0=x0))(v)[1].finite)


def test_batch_influence_names_params_not_an_internal_variable():
  p, _ = params_and_v()
  bad_p = dict(p, b=p["b"].at[0].set(jnp.inf))
  train = influence.PerExampleLoss(logits_fn, lambda o: losses.cross_entropy(o, Y))
  for solver in ("cg", "lissa"):
    one_line_error(
      lambda solver=solver: influence.batch_influence(bad_p, train, mean_loss, solver=solver),
      r"^params\['b'\]",
    )


def test_values_are_not_checked_under_jit_but_debug_nans_finds_them():
  p, v = params_and_v()
  bad_p = dict(p, w=p["w"].at[1, 0].set(jnp.nan))
  traces = []

  @jax.jit
  def f(p, v):
    traces.append(1)
    return influence.hvp(mean_loss, p, v), influence.scores(per_example, p, v)

  h, sc = f(bad_p, v)  # no check inside compiled code: NaN flows through
  assert np.isnan(np.asarray(h["w"])).any() and np.isnan(np.asarray(sc)).any()
  f(p, v)
  assert len(traces) == 1
  # jax_debug_nans re-runs the function op by op on concrete values, so the eager
  # checks then name the argument
  with jax.debug_nans(True), pytest.raises(ValueError, match=r"^params\['w'\] contains NaN"):
    f(bad_p, v)
  with jax.debug_nans(True), pytest.raises(FloatingPointError):
    jax.jit(lambda x: jnp.log(x) * 0.0 + jnp.sqrt(-x))(jnp.ones(2))


# --------------------------------------------------------------------------
# 11. Empty, integer, mismatched and 2-D inputs: one-line ValueErrors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sigmoid", "exp_minmax", "small_loss", "none"])
def test_weight_maps_reject_empty_and_2d_inputs_also_under_jit(name):
  fn = {**MAPS, "none": weights.none}[name]
  arg = "losses" if name == "small_loss" else "scores"
  one_line_error(lambda: fn(jnp.zeros((0,))), rf"^{arg} is empty")
  one_line_error(
    lambda: fn(jnp.zeros((4, 2))), rf"^{arg} must be a 1-D vector \[B\], got shape \(4, 2\)"
  )
  one_line_error(lambda: jax.jit(fn)(jnp.zeros((4, 2))), "1-D")
  one_line_error(lambda: fn(jnp.float32(1.0)), "1-D")


def test_integer_params_and_rhs_are_one_line_errors():
  p, _ = params_and_v()
  ip = {"w": jnp.ones((3, 2), jnp.int32), "b": jnp.zeros(2, jnp.int32)}
  for call in (
    lambda: influence.hvp(lambda q: jnp.sum(q["w"] ** 2), ip, ip),
    lambda: influence.scores(lambda q: jnp.sum(q["w"], axis=1), ip, ip),
    lambda: influence.make_hvp(lambda q: jnp.sum(q["w"] ** 2), ip),
    lambda: influence.make_gnvp(lambda q: q["w"], jnp.sum, ip),
  ):
    one_line_error(call, r"^params\['(b|w)'\] has dtype int32; influence needs float32 or float64")
  one_line_error(lambda: influence.cg_solve(lambda u: u, jnp.arange(3)), r"^b has dtype int32")
  one_line_error(lambda: influence.lissa(lambda u: u, {"x": jnp.arange(3)}), r"^b\['x'\] has dtype")
  one_line_error(lambda: influence.inverse_hvp(None, jnp.arange(3), solver="identity"), "dtype")
