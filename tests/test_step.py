"""The KD-AIF step functions on one device (axis_name=None), tiny MLPs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdaif_jax import config as config_lib
from kdaif_jax import losses, models, online
from kdaif_jax import step as step_lib

B, K = 16, 3


def _setup(mechanism, key=0):
  cfg = config_lib.base_config()
  cfg.kdaif.mechanism = mechanism
  cfg.kdaif.cg_iters = 3
  teacher = models.create("mlp", K, hidden=16)
  student = models.create("mlp", K, hidden=8)
  k = jax.random.split(jax.random.key(key), 6)
  x = jax.random.randint(k[0], (B, 4, 4, 1), 0, 256).astype(jnp.uint8)
  y = jax.random.randint(k[1], (B,), 0, K)
  xv = jax.random.randint(k[2], (8, 4, 4, 1), 0, 256).astype(jnp.uint8)
  yv = jax.random.randint(k[3], (8,), 0, K)
  sample = jnp.zeros((1, 4, 4, 1))
  tp, tms = teacher.init(k[4], sample)
  sp, sms = student.init(k[5], sample)
  tx = optax.sgd(0.1)
  state = step_lib.new_train_state(
    key=jax.random.key_data(jax.random.key(1)),
    student=step_lib.NetState(sp, sms, tx.init(sp)),
    teacher=step_lib.NetState(tp, tms, tx.init(tp)),
    num_examples=B,
  )
  prepare = lambda im: im.astype(jnp.float32) / 255.0 - 0.5
  batch = {
    "images": x,
    "labels": y,
    "noisy": jnp.zeros((B,), bool),
    "weights": jnp.linspace(0.5, 1.5, B),
  }
  val = {"images": xv, "labels": yv}
  opts = config_lib.step_options(cfg)
  fn = step_lib.make_kd_step(student, teacher, tx, tx, prepare, opts, axis_name=None)
  return cfg, student, teacher, tx, prepare, state, batch, val, fn


def _changed(a, b):
  return any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize(
  "mechanism", ["none", "static", "periodic", "online", "joint", "small_loss"]
)
def test_every_mechanism_updates_the_student(mechanism):
  *_, state, batch, val, fn = _setup(mechanism)
  new, metrics, (scores, w, _) = jax.jit(fn)(state, batch, val)
  assert int(new.step) == 1
  assert _changed(state.student.params, new.student.params)
  assert np.all(np.isfinite(np.asarray(metrics["loss"])))
  assert np.isclose(float(jnp.mean(w)), 1.0, atol=1e-5) or mechanism in ("static", "periodic")
  if mechanism == "small_loss":  # the largest training loss gets the smallest weight
    assert int(jnp.argmax(scores)) == int(jnp.argmin(w))
  if mechanism in ("online", "joint"):
    assert float(jnp.std(scores)) > 0 and float(jnp.std(w)) > 0
    assert int(metrics["cg_iterations"]) >= 1
    assert _changed(state.s, new.s)
  assert _changed(state.teacher.params, new.teacher.params) == (mechanism == "joint")


def test_none_equals_plain_kd():
  cfg, student, teacher, tx, prepare, state, batch, val, fn = _setup("none")
  new, _, _ = fn(state, batch, val)
  x = prepare(batch["images"])
  t = teacher.apply(state.teacher.params, {}, x, False)[0]

  def plain(p):
    out = student.apply(p, {}, x, True)[0]
    return jnp.mean(
      losses.kd_loss(out, t, batch["labels"], temperature=cfg.kd.temperature, alpha=cfg.kd.alpha)
    )

  grads = jax.grad(plain)(state.student.params)
  upd, _ = tx.update(grads, state.student.opt_state, state.student.params)
  expect = optax.apply_updates(state.student.params, upd)
  for a, b in zip(jax.tree.leaves(expect), jax.tree.leaves(new.student.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_static_weights_are_used_normalised():
  cfg, student, teacher, tx, prepare, state, batch, val, fn = _setup("static")
  new, metrics, (_, w, _) = fn(state, batch, val)
  np.testing.assert_allclose(w, batch["weights"])
  x = prepare(batch["images"])
  t = teacher.apply(state.teacher.params, {}, x, False)[0]
  out = student.apply(state.student.params, {}, x, True)[0]
  per = losses.kd_loss(out, t, batch["labels"], temperature=cfg.kd.temperature, alpha=cfg.kd.alpha)
  expect = jnp.sum(batch["weights"] * per) / jnp.sum(batch["weights"])
  np.testing.assert_allclose(metrics["loss"], expect, rtol=1e-5)


def test_refresh_false_reuses_s():
  cfg, student, teacher, tx, prepare, state, batch, val, _ = _setup("online")
  s = jax.tree.map(lambda a: jnp.full_like(a, 0.01), state.s)
  state = state.replace(s=s)
  stale = step_lib.make_kd_step(
    student, teacher, tx, None, prepare, config_lib.step_options(cfg), refresh=False, axis_name=None
  )
  state = state.replace(solve_stats=jnp.array([7.0, 0.5, 0.0]))
  new, metrics, _ = stale(state, batch, val)
  assert float(metrics["cg_iterations"]) == 7.0  # the newest solve's, carried over
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(new.s)):
    np.testing.assert_array_equal(a, b)


def test_joint_feedback_sign_moves_pseudo_label_probabilities():
  # Teacher logits for 2 examples whose pseudo-labels are class 0; the student
  # found example 0 helpful (I < 0) and example 1 harmful (I > 0).
  logits = jnp.array([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]])
  pseudo = jnp.array([0, 0])
  scores = jnp.array([-1.0, 1.0])
  h = online.feedback_weights(scores)
  assert h[0] > 0 > h[1]
  g = jax.grad(lambda lg: online.teacher_feedback_loss(lg, pseudo, h))(logits)
  new = logits - 1.0 * g  # one gradient step on the teacher's outputs
  p_old, p_new = jax.nn.softmax(logits), jax.nn.softmax(new)
  assert p_new[0, 0] > p_old[0, 0]  # helpful pseudo-label more likely
  assert p_new[1, 0] < p_old[1, 0]  # harmful (wrong) pseudo-label less likely


def test_supervised_step_trains_the_teacher():
  cfg, student, teacher, tx, prepare, state, batch, val, _ = _setup("none")
  fn = jax.jit(step_lib.make_supervised_step(teacher, tx, prepare, axis_name=None))
  losses_seen = []
  for _ in range(30):
    state, m = fn(state, {"images": batch["images"], "labels": batch["labels"]})
    losses_seen.append(float(m["loss"]))
  assert losses_seen[-1] < losses_seen[0]


def test_eval_step_counts():
  cfg, student, teacher, tx, prepare, state, batch, val, _ = _setup("none")
  ev = step_lib.make_eval_step(student, prepare, axis_name=None)
  mask = jnp.arange(B) < 10
  sums, logits = ev(state.student.params, {}, batch["images"], batch["labels"], mask)
  assert float(sums["count"]) == 10
  acc = losses.accuracy(logits, batch["labels"])[:10].sum()
  np.testing.assert_allclose(sums["correct"], acc)


def test_remember_is_a_running_mean_of_standardised_scores():
  rng = np.random.default_rng(3)
  scores = rng.normal(size=8) * 5.0
  memory, visits = rng.normal(size=8), np.array([0, 1, 2, 0, 5, 1, 0, 3], np.float32)
  got = online.remember(
    jnp.asarray(scores, jnp.float32), jnp.asarray(memory, jnp.float32), jnp.asarray(visits), 0.7
  )
  z = scores / scores.std()  # float64 oracle; population std, as the weight maps use
  expect = np.where(visits > 0, 0.7 * memory + 0.3 * z, z)
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
  # A non-finite score stays non-finite (weight 0); the others are unaffected.
  bad = online.remember(
    jnp.asarray(scores, jnp.float32).at[2].set(jnp.nan),
    jnp.asarray(memory, jnp.float32),
    jnp.asarray(visits),
    0.7,
  )
  assert not np.isfinite(bad[2]) and np.all(np.isfinite(np.delete(np.asarray(bad), 2)))


@pytest.mark.parametrize("beta", [0.0, 0.6])
def test_online_step_weighs_by_the_memory_and_returns_it(beta):
  cfg, student, teacher, tx, prepare, state, batch, val, _ = _setup("online")
  cfg.kdaif.score_memory = beta
  opts = config_lib.step_options(cfg)
  fn = step_lib.make_kd_step(student, teacher, tx, None, prepare, opts, axis_name=None)
  memory = jnp.linspace(-2.0, 2.0, B)
  visits = (jnp.arange(B) % 3).astype(jnp.float32)
  _, _, (scores, w, new_memory) = jax.jit(fn)(
    state, {**batch, "memory": memory, "visits": visits}, val
  )
  if beta == 0:  # no memory: today's weights, the memory passes through unchanged
    np.testing.assert_array_equal(new_memory, memory)
    np.testing.assert_allclose(w, opts.influence.weights(scores), rtol=1e-6)
  else:
    expect = online.remember(scores, memory, visits, beta)
    np.testing.assert_allclose(new_memory, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w, opts.influence.weights(expect), rtol=1e-5, atol=1e-6)
    # The memory moved the weights: they differ from this step's scores alone.
    assert not np.allclose(w, opts.influence.weights(scores), atol=1e-3)


def test_the_loop_records_the_memory_and_skips_non_finite_scores():
  from kdaif_jax import loop
  from kdaif_jax.options import Mechanism

  *_, state, batch, val, _ = _setup("online")
  state = state.replace(
    score_memory=jnp.arange(B, dtype=jnp.float32), score_visits=jnp.ones((B,), jnp.float32)
  )
  idx = jnp.array([1, 4, 7])
  memory = jnp.array([10.0, jnp.nan, 30.0])
  new = loop._record(Mechanism("online"), state, idx, (memory, jnp.ones(3), memory))
  np.testing.assert_array_equal(new.score_memory[jnp.array([1, 4, 7])], [10.0, 4.0, 30.0])
  np.testing.assert_array_equal(new.score_visits[jnp.array([1, 4, 7])], [2.0, 1.0, 2.0])
  assert float(jnp.sum(new.score_visits)) == B + 2  # nobody else was visited
  batch = loop._with_memory(new, {"images": None}, idx)
  np.testing.assert_array_equal(batch["visits"], [2.0, 1.0, 2.0])
