"""kdaif_jax.weights and kdaif_jax.losses on hand-made cases (numpy formulas)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdaif_jax import losses, weights

MAPS = {
  "sigmoid": weights.sigmoid,
  "sigmoid_down": weights.sigmoid_down,
  "exp_minmax": weights.exp_minmax,
  "none": weights.none,
}
RNG_SCORES = np.random.default_rng(0).normal(size=128).astype(np.float32) * 3e-3


def np_log_sigmoid(z):
  return -np.logaddexp(0.0, -z)


def np_sigmoid_weights(scores, temperature=1.0, eps=1e-8):
  """docs/method.md §2 written out: w = 2σ(−I/(τ·std(I)+ε)), divided by its mean."""
  s = np.asarray(scores, np.float64)
  log_w = np.log(2.0) + np_log_sigmoid(-s / (temperature * s.std() + eps))
  w = np.exp(log_w - log_w.max())  # same ratio, no underflow when every σ is tiny
  return w / w.mean()


def np_exp_minmax_weights(scores, eps=1e-12):
  """w = exp(minmax_[-1,1](−I)), divided by its mean."""
  h = -np.asarray(scores, np.float64)
  w = np.exp(2.0 * (h - h.min()) / (h.max() - h.min() + eps) - 1.0)
  return w / w.mean()


# --------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("n", [2, 7, 128])
def test_mean_is_one_and_finite(name, n):
  w = np.asarray(MAPS[name](jnp.asarray(RNG_SCORES[:n])))
  assert w.shape == (n,)
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  assert abs(w.mean() - 1.0) < 1e-6


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("value", [0.0, -3.5, 1e-20, 2e4])
def test_constant_and_single_inputs_give_ones(name, value):
  for n in (1, 5, 64):
    w = np.asarray(MAPS[name](jnp.full((n,), value, jnp.float32)))
    assert w.shape == (n,)
    np.testing.assert_allclose(w, 1.0, atol=1e-6)


EXTREME = [
  [-1e30, 0.0, 1e30, 5e29],
  [0.0, 1e30],
  [1e30, 2e30, 3e30],
  [-3e30, -1e30, 0.0],
  [1e-30, -1e-30, 0.0, 3e-30],
]


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("scores", EXTREME, ids=[f"case{i}" for i in range(len(EXTREME))])
def test_extreme_inputs_stay_finite_and_ordered(name, scores):
  s = jnp.asarray(scores, jnp.float32)
  w = np.asarray(MAPS[name](s))
  assert np.all(np.isfinite(w)), w
  assert abs(w.mean() - 1.0) < 1e-6
  if name != "none" and np.ptp(scores) > 1.0:  # (for tiny spreads ε makes all weights 1)
    # the most helpful (most negative I) example weighs more than the most harmful
    if name == "sigmoid_down" and max(scores) <= 0:  # no harmful example: all alike
      np.testing.assert_allclose(w, 1.0)
    else:
      assert w[int(np.argmin(scores))] > w[int(np.argmax(scores))]


@pytest.mark.parametrize("name", ["sigmoid", "exp_minmax"])  # sigmoid_down ties the helpful
def test_monotone_more_negative_influence_gets_larger_weight(name):
  s = RNG_SCORES[:32]
  w = np.asarray(MAPS[name](jnp.asarray(s)))
  order = np.argsort(s)  # most helpful first
  assert np.all(np.diff(w[order]) <= 1e-7)  # non-increasing in I
  assert w[order[0]] > 1.0 > w[order[-1]]
  assert len(np.unique(w)) > 16  # not flat


def test_sigmoid_down_caps_the_helpful_examples_at_one_weight():
  scores = np.array([-2.0, -0.5, 0.1, 0.8, 1.5])
  std = scores.std()
  for temperature in (1.0, 0.25):
    raw = np.minimum(1.0, 2.0 / (1.0 + np.exp(scores / (temperature * std))))
    got = np.asarray(
      weights.sigmoid_down(jnp.asarray(scores, jnp.float32), temperature=temperature)
    )
    np.testing.assert_allclose(got, raw / raw.mean(), rtol=1e-5)
    assert got[0] == got[1] and got[1] > got[2] > got[3] > got[4] > 0
  w = weights.WeightMap("sigmoid_down", 0.25)(jnp.asarray(scores, jnp.float32))
  np.testing.assert_allclose(np.asarray(w), got, rtol=1e-6)  # τ reaches the map
  # Every score helpful: all alike; the uncapped map would spread them.
  np.testing.assert_allclose(np.asarray(weights.sigmoid_down(jnp.asarray(-np.abs(scores)))), 1.0)


def test_sigmoid_hand_computed_three_examples():
  scores = np.array([-0.5, 0.1, 0.8])
  for temperature in (1.0, 0.7, 3.0):
    got = np.asarray(weights.sigmoid(jnp.asarray(scores, jnp.float32), temperature=temperature))
    np.testing.assert_allclose(got, np_sigmoid_weights(scores, temperature), rtol=1e-5)
  # the literal numbers for τ = 1: std = 0.53125..., z = −I/std
  std = np.sqrt(np.mean((scores - scores.mean()) ** 2))
  raw = 2.0 / (1.0 + np.exp(scores / std))
  np.testing.assert_allclose(
    np.asarray(weights.sigmoid(jnp.asarray(scores, jnp.float32))), raw / raw.mean(), rtol=1e-5
  )
  # a larger temperature flattens the weights towards 1
  spread = lambda t: np.ptp(np.asarray(weights.sigmoid(jnp.asarray(scores), temperature=t)))
  assert spread(3.0) < spread(1.0) < spread(0.3)


def test_sigmoid_is_scale_invariant_but_not_shift_invariant():
  s = jnp.asarray([-0.5, 0.1, 0.8, 0.3])
  np.testing.assert_allclose(weights.sigmoid(s), weights.sigmoid(1e4 * s), rtol=1e-5)
  np.testing.assert_allclose(
    weights.sigmoid(s + 1.0), np_sigmoid_weights(np.asarray(s) + 1.0), rtol=1e-5
  )


def test_std_accurate_for_a_large_common_offset():
  # A common offset 3600x the spread: std as E[x²]−E[x]² cancels catastrophically in
  # float32 (ulp of 1e6 is 0.06 while the variance is 0.08); the sigmoid weights then
  # depend on exp(−(I_i − I_min)/std), so a wrong std shows.
  scores = np.array([1000.0, 1000.25, 1000.5, 1000.75], np.float32)
  got = np.asarray(weights.sigmoid(jnp.asarray(scores)))
  np.testing.assert_allclose(got, np_sigmoid_weights(scores), rtol=1e-3)
  # small_loss on nearly equal losses (1 ± 0.003): same cancellation
  loss = (1.0 + 3e-3 * RNG_SCORES[:32] / RNG_SCORES[:32].std()).astype(np.float32)
  z = -(loss - loss.mean()) / (loss.astype(np.float64).std() + 1e-8)
  expect = np.exp(np_log_sigmoid(z))
  got = np.asarray(weights.small_loss(jnp.asarray(loss)))
  np.testing.assert_allclose(got, expect / expect.mean(), rtol=1e-3)


def test_exp_minmax_hand_computed_three_examples():
  scores = np.array([-0.5, 0.1, 0.8])
  got = np.asarray(weights.exp_minmax(jnp.asarray(scores, jnp.float32)))
  np.testing.assert_allclose(got, np_exp_minmax_weights(scores), rtol=1e-5)
  # literal: −I = [0.5, −0.1, −0.8] → minmax [1, 1 − 2·0.6/1.3, −1]
  raw = np.exp(np.array([1.0, 1.0 - 1.2 / 1.3, -1.0]))
  np.testing.assert_allclose(got, raw / raw.mean(), rtol=1e-5)
  assert got[0] / got[2] == pytest.approx(np.e**2, rel=1e-5)


def test_none_is_ones():
  s = jnp.asarray(RNG_SCORES[:9])
  np.testing.assert_array_equal(np.asarray(weights.none(s)), np.ones(9, np.float32))
  assert weights.none(s, temperature=2.0, axis_name=None).shape == (9,)


def test_small_loss_hand_computed_and_monotone():
  loss = np.array([0.2, 0.5, 2.5, 0.1])
  std = loss.std()
  raw = 1.0 / (1.0 + np.exp((loss - loss.mean()) / (2.0 * std + 1e-8)))
  expect = raw / raw.mean()
  got = np.asarray(weights.small_loss(jnp.asarray(loss, jnp.float32), temperature=2.0))
  np.testing.assert_allclose(got, expect, rtol=1e-5)
  assert abs(got.mean() - 1.0) < 1e-6
  order = np.argsort(loss)
  assert np.all(np.diff(got[order]) < 0)  # larger loss, smaller weight
  np.testing.assert_allclose(weights.small_loss(jnp.full((6,), 0.7)), 1.0, atol=1e-6)
  w = np.asarray(weights.small_loss(jnp.asarray([0.0, 1e30, 3e30], jnp.float32)))
  assert np.all(np.isfinite(w)) and w[0] > w[2]


def test_oracle_zeroes_the_flipped_labels_with_mean_one():
  noisy = np.array([False, True, False, False, True])
  w = np.asarray(weights.oracle(noisy))
  np.testing.assert_allclose(w, [5 / 3, 0, 5 / 3, 5 / 3, 0], rtol=1e-6)
  assert w.dtype == np.float32 and abs(w.mean() - 1.0) < 1e-6
  np.testing.assert_array_equal(np.asarray(weights.oracle(np.ones(4, bool))), np.ones(4))
  np.testing.assert_array_equal(np.asarray(weights.oracle(np.zeros(3, bool))), np.ones(3))
  for bad in (np.zeros((2, 2), bool), np.zeros(0, bool)):
    with pytest.raises(ValueError, match="noisy must be a non-empty 1-D mask"):
      weights.oracle(bad)


@pytest.mark.parametrize("name", ["sigmoid", "sigmoid_down", "exp_minmax", "small_loss", "none"])
def test_axis_name_under_vmap_equals_global_batch(name):
  fn = {"small_loss": weights.small_loss, **MAPS}[name]
  s = jnp.asarray(RNG_SCORES[:32]) * 300.0 + (2.0 if name == "small_loss" else 0.0)
  expect = np.asarray(fn(s))
  shards = s.reshape(4, 8)
  got = jax.vmap(lambda x: fn(x, axis_name="d"), axis_name="d")(shards)
  np.testing.assert_allclose(np.asarray(got).reshape(-1), expect, rtol=1e-5, atol=1e-7)
  if name != "none":
    # without the axis name each shard is normalised on its own: different answer
    local = jax.vmap(fn)(shards)
    assert not np.allclose(np.asarray(local).reshape(-1), expect, rtol=1e-3)


def test_get_and_unknown_name():
  assert weights.get("sigmoid") is weights.sigmoid
  assert weights.get("exp_minmax") is weights.exp_minmax
  assert weights.get("none") is weights.none
  assert weights.get("sigmoid_down") is weights.sigmoid_down
  with pytest.raises(ValueError, match="sigmoid, sigmoid_down, exp_minmax, none"):
    weights.get("softmax")


def test_weights_jit_and_stop_gradient_friendly():
  s = jnp.asarray(RNG_SCORES[:16])
  w = jax.jit(weights.sigmoid)(s)
  np.testing.assert_allclose(np.asarray(w), np_sigmoid_weights(np.asarray(s)), rtol=1e-5)
  g = jax.grad(lambda x: jnp.sum(jax.lax.stop_gradient(weights.sigmoid(x)) * x))(s)
  np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


# --------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(axis=-1, keepdims=True)
  return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def np_kl(t, s, tau):
  lt, ls = np_log_softmax(np.asarray(t) / tau), np_log_softmax(np.asarray(s) / tau)
  return np.sum(np.exp(lt) * (lt - ls), axis=-1)


@pytest.fixture
def logits():
  rng = np.random.default_rng(1)
  student = rng.normal(size=(6, 5)).astype(np.float32) * 2.0
  teacher = rng.normal(size=(6, 5)).astype(np.float32) * 3.0
  labels = rng.integers(0, 5, size=6).astype(np.int32)
  return student, teacher, labels


def test_cross_entropy_hand_computed(logits):
  s, _, y = logits
  got = np.asarray(losses.cross_entropy(jnp.asarray(s), jnp.asarray(y)))
  assert got.shape == (6,)
  np.testing.assert_allclose(got, -np_log_softmax(s)[np.arange(6), y], rtol=1e-5)
  # literal case: logits [0, ln 3] → p = [1/4, 3/4]
  two = jnp.asarray([[0.0, np.log(3.0)]])
  np.testing.assert_allclose(losses.cross_entropy(two, jnp.asarray([0])), [np.log(4.0)], rtol=1e-6)
  np.testing.assert_allclose(
    losses.cross_entropy(two, jnp.asarray([1])), [np.log(4 / 3)], rtol=1e-6
  )
  # soft targets [B, K]
  q = np.random.default_rng(2).dirichlet(np.ones(5), size=6).astype(np.float32)
  got_soft = np.asarray(losses.cross_entropy(jnp.asarray(s), jnp.asarray(q)))
  np.testing.assert_allclose(got_soft, -np.sum(q * np_log_softmax(s), axis=-1), rtol=1e-5)
  # large logits stay finite
  big = jnp.asarray([[1e4, -1e4, 0.0]], jnp.float32)
  np.testing.assert_allclose(losses.cross_entropy(big, jnp.asarray([1])), [2e4], rtol=1e-6)


def test_cross_entropy_keeps_float64():
  """Under x64 a float64 model must get float64 losses (oracle tests rely on it)."""
  with jax.enable_x64(True):
    z = np.array([[1.0, 1.0 + 1e-9, -2.0]])
    got = losses.cross_entropy(jnp.asarray(z), jnp.asarray([1]))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), -np_log_softmax(z)[:, 1], rtol=1e-13)
    g = jax.grad(lambda a: losses.cross_entropy(a, jnp.asarray([1]))[0])(jnp.asarray(z))
    assert g.dtype == jnp.float64


def test_cross_entropy_bfloat16_computed_in_float32():
  z = jnp.asarray([[3.0, 1.0, -2.0]], jnp.bfloat16)
  got = losses.cross_entropy(z, jnp.asarray([2]))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), -np_log_softmax([[3.0, 1.0, -2.0]])[:, 2], rtol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 4.0, 7.0])
def test_kl_divergence_formula_and_zero_for_identical(logits, tau):
  s, t, _ = logits
  got = np.asarray(losses.kl_divergence(jnp.asarray(t), jnp.asarray(s), tau))
  assert got.shape == (6,)
  np.testing.assert_allclose(got, np_kl(t, s, tau), rtol=1e-4, atol=1e-7)
  assert np.all(got >= 0)
  same = np.asarray(losses.kl_divergence(jnp.asarray(s), jnp.asarray(s), tau))
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  # shifting logits by a constant changes nothing; direction matters (KL is asymmetric)
  shifted = np.asarray(losses.kl_divergence(jnp.asarray(t + 5.0), jnp.asarray(s), tau))
  np.testing.assert_allclose(shifted, got, rtol=1e-4, atol=1e-6)
  rev = np.asarray(losses.kl_divergence(jnp.asarray(s), jnp.asarray(t), tau))
  assert not np.allclose(rev, got, rtol=1e-3)


def test_kl_teacher_with_vanishing_probabilities_is_finite():
  t = jnp.asarray([[200.0, -200.0, 0.0]])
  s = jnp.asarray([[1.0, 2.0, 3.0]])
  got = np.asarray(losses.kl_divergence(t, s, 1.0))
  np.testing.assert_allclose(got, np_kl(np.asarray(t), np.asarray(s), 1.0), rtol=1e-5)
  g = jax.grad(lambda a: losses.kl_divergence(t, a, 1.0)[0])(s)
  assert np.all(np.isfinite(np.asarray(g)))


def test_kd_loss_limits_and_mixture(logits):
  s, t, y = (jnp.asarray(a) for a in logits)
  tau = 4.0
  ce = np.asarray(losses.cross_entropy(s, y))
  kd = tau**2 * np_kl(logits[1], logits[0], tau)
  np.testing.assert_allclose(losses.kd_loss(s, t, y, temperature=tau, alpha=1.0), ce, rtol=1e-6)
  np.testing.assert_allclose(losses.kd_loss(s, t, y, temperature=tau, alpha=0.0), kd, rtol=1e-4)
  mix = losses.kd_loss(s, t, y, temperature=tau, alpha=0.3)
  assert mix.shape == (6,)
  np.testing.assert_allclose(mix, 0.3 * ce + 0.7 * kd, rtol=1e-4)
  # teacher == student: only the hard term is left
  np.testing.assert_allclose(
    losses.kd_loss(s, s, y, temperature=tau, alpha=0.3), 0.3 * ce, rtol=1e-5, atol=1e-6
  )


def test_kd_loss_unlabelled_uses_kd_term_only(logits):
  s, t, y = (jnp.asarray(a) for a in logits)
  tau = 7.0
  kd = tau**2 * np_kl(logits[1], logits[0], tau)
  ce = np.asarray(losses.cross_entropy(s, y))
  y_part = y.at[jnp.asarray([1, 4])].set(-1)
  got = np.asarray(losses.kd_loss(s, t, y_part, temperature=tau, alpha=0.6))
  expect = 0.6 * ce + 0.4 * kd
  expect[[1, 4]] = kd[[1, 4]]
  np.testing.assert_allclose(got, expect, rtol=1e-4)
  # labels=None: every example unlabelled
  np.testing.assert_allclose(losses.kd_loss(s, t, None, temperature=tau, alpha=0.6), kd, rtol=1e-4)
  # an explicit mask overrides labels >= 0
  mask = jnp.asarray([True, True, False, True, True, False])
  got_mask = np.asarray(losses.kd_loss(s, t, y, temperature=tau, alpha=0.6, labelled=mask))
  expect_mask = np.where(np.asarray(mask), 0.6 * ce + 0.4 * kd, kd)
  np.testing.assert_allclose(got_mask, expect_mask, rtol=1e-4)
  # gradients through unlabelled rows are finite and ignore the (dummy) label
  g = jax.grad(lambda a: jnp.sum(losses.kd_loss(a, t, y_part, temperature=tau)))(s)
  assert np.all(np.isfinite(np.asarray(g)))


def test_accuracy():
  z = jnp.asarray([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 5.0, 2.0]])
  got = losses.accuracy(z, jnp.asarray([1, 1, 2, 0]))
  assert got.shape == (4,) and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), [1.0, 0.0, 1.0, 0.0])
