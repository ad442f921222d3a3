"""Semi-supervised pieces: unlabelled losses, UDA, the joint feedback sign with
real influence, and the SSL step on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdaif_jax import config as config_lib
from kdaif_jax import influence, losses, models, online, optim, ssl
from kdaif_jax import step as step_lib


def test_unlabelled_loss_soft_and_hard():
  s = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
  t = jnp.array([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
  hard = ssl.unlabelled_loss(s, t, targets="hard", temperature=1.0)
  np.testing.assert_allclose(hard, losses.cross_entropy(s, jnp.array([1, 0])), rtol=1e-6)
  soft = ssl.unlabelled_loss(s, t, targets="soft", temperature=2.0)
  pt, ps = jax.nn.softmax(t / 2), jax.nn.softmax(s / 2)
  np.testing.assert_allclose(soft, 4 * jnp.sum(pt * jnp.log(pt / ps), -1), rtol=1e-5)


def test_uda_consistency_masks_unconfident_and_is_kl():
  t_weak = jnp.array([[5.0, 0.0], [0.1, 0.0]])  # confident, unconfident
  t_strong = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  per, mask = ssl.uda_consistency(t_weak, t_strong, threshold=0.8, temperature=0.5)
  np.testing.assert_array_equal(mask, [1.0, 0.0])
  q = jax.nn.softmax(t_weak[0] / 0.5)
  p = jax.nn.softmax(t_strong[0])
  np.testing.assert_allclose(per[0], jnp.sum(q * jnp.log(q / p)), rtol=1e-5)
  assert per[1] == 0.0


def test_joint_feedback_sign_with_real_influence():
  # Student: logistic regression early in training (zero weights), validation data
  # from two well-separated Gaussian classes. Teacher: one free logit vector per
  # unlabelled example, so one update moves each example's pseudo-label probability
  # by its own feedback term only. Pseudo-label of example 0 is wrong, of 1 right.
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    mu = np.array([[-2.0, 0.0], [2.0, 0.0]])
    yv = rng.integers(0, 2, 200)
    xv = jnp.asarray(mu[yv] + rng.normal(size=(200, 2)))
    out = lambda p, x: x @ p["w"] + p["b"]
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    xu = jnp.array([[2.5, 0.3], [-2.5, -0.2]])  # true classes 1 and 0
    t_logits = jnp.array([[2.0, 0.0], [2.0, 0.0]])  # both pseudo-labels: class 0
    pseudo = jnp.argmax(t_logits, -1)
    train_loss = influence.PerExampleLoss(
      lambda p: out(p, xu), lambda o: losses.cross_entropy(o, pseudo)
    )
    val_loss = lambda p: jnp.mean(losses.cross_entropy(out(p, xv), jnp.asarray(yv)))
    for curvature in ("ggn", "hessian"):
      res = influence.batch_influence(
        params, train_loss, val_loss, curvature=curvature, damping=0.1, maxiter=20
      )
      assert res.scores[0] > 0 > res.scores[1]  # wrong label harmful, right one helpful
      h = online.feedback_weights(res.scores)
      grad = jax.grad(lambda lg: online.teacher_feedback_loss(lg, pseudo, h))(t_logits)
      new = t_logits - 0.5 * grad
      p_old, p_new = jax.nn.softmax(t_logits), jax.nn.softmax(new)
      assert p_new[0, 0] < p_old[0, 0]  # wrong pseudo-label became less likely
      assert p_new[1, 0] > p_old[1, 0]  # helpful pseudo-label became more likely


def _ssl_setup(mechanism, teacher_tx=None, **ssl_overrides):
  cfg = config_lib.base_config()
  cfg.kdaif.mechanism = mechanism
  cfg.kdaif.cg_iters = 2
  cfg.ssl.update(ssl_overrides)
  teacher, student = models.create("mlp", 3, hidden=16), models.create("mlp", 3, hidden=8)
  k = jax.random.split(jax.random.key(0), 5)
  sample = jnp.zeros((1, 4, 4, 1))
  tp, tms = teacher.init(k[0], sample)
  sp, sms = student.init(k[1], sample)
  tx = optax.sgd(0.1)
  tx_t = teacher_tx or tx
  state = step_lib.new_train_state(
    key=jax.random.key_data(k[2]),
    student=step_lib.NetState(sp, sms, tx.init(sp)),
    teacher=step_lib.NetState(tp, tms, tx_t.init(tp)),
    num_examples=8,
  )
  img = lambda kk, n: jax.random.randint(kk, (n, 4, 4, 1), 0, 256).astype(jnp.uint8)
  batch = {
    "lab_images": img(k[3], 4),
    "lab_labels": jnp.array([0, 1, 2, 0]),
    "unl_weak": img(k[4], 8),
    "unl_strong": 255 - img(k[4], 8),
  }
  val = {"images": img(k[2], 6), "labels": jnp.array([0, 1, 2, 0, 1, 2])}
  prepare = lambda im: im.astype(jnp.float32) / 255.0
  fn = ssl.make_ssl_step(
    student, teacher, tx, tx_t, prepare, config_lib.step_options(cfg), axis_name=None
  )
  return state, batch, val, jax.jit(fn)


def _differ(a, b):
  return any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mechanism", ["none", "online", "joint"])
def test_ssl_step_updates(mechanism):
  state, batch, val, fn = _ssl_setup(
    mechanism, uda_weight=1.0 if mechanism == "joint" else 0.0, ema=0.9
  )
  new, metrics, (scores, w, _) = fn(state, batch, val)
  assert scores.shape == (8,) and w.shape == (8,)
  assert _differ(state.student.params, new.student.params)
  assert _differ(state.ema, new.ema)
  assert _differ(state.teacher.params, new.teacher.params) == (mechanism == "joint")
  assert np.isfinite(float(metrics["loss"]))
  if mechanism != "none":
    assert float(jnp.std(w)) > 0
    np.testing.assert_allclose(float(jnp.mean(w)), 1.0, atol=1e-5)
  if mechanism == "joint":
    assert "teacher_uda" in metrics


def test_joint_teacher_every_k_steps_moves_only_on_the_kth():
  # kdaif.joint.every = 2: the teacher's optimiser is optim.every_k(tx, 2).
  state, batch, val, fn = _ssl_setup("joint", teacher_tx=optim.every_k(optax.sgd(0.1), 2))
  one, _, _ = fn(state, batch, val)
  two, _, _ = fn(one, batch, val)
  assert not _differ(state.teacher.params, one.teacher.params)
  assert _differ(one.teacher.params, two.teacher.params)
  assert _differ(state.student.params, one.student.params)


def test_ssl_labelled_only_ignores_unlabelled_images():
  state, batch, val, fn = _ssl_setup("none", unlabelled_weight=0.0)
  a, _, _ = fn(state, batch, val)
  batch2 = dict(batch, unl_weak=255 - batch["unl_weak"], unl_strong=255 - batch["unl_strong"])
  b, _, _ = fn(state, batch2, val)
  _assert_same(a.student.params, b.student.params)


def test_fixmatch_loss_keeps_only_confident_pseudo_labels():
  s = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.0, 3.0]])
  own = jnp.array([[0.0, 9.0, 0.0], [1.0, 1.2, 1.0], [0.0, 0.0, 9.0]])  # confident, not, confident
  got = ssl.unlabelled_loss(s, own, targets="fixmatch", temperature=1.0, threshold=0.95)
  ce = losses.cross_entropy(s, jnp.array([1, 1, 2]))
  np.testing.assert_allclose(got, [ce[0], 0.0, ce[2]], rtol=1e-6)


def test_fixmatch_step_equals_the_fixmatch_loss_on_the_students_own_weak_views():
  state, batch, val, fn = _ssl_setup("none", targets="fixmatch", fixmatch_threshold=0.0)
  new, metrics, _ = fn(state, batch, val)
  # Oracle: written out from the definition (one forward, weak views as constants).
  student = models.create("mlp", 3, hidden=8)
  prepare = lambda im: im.astype(jnp.float32) / 255.0
  xl, xs, xw = (prepare(batch[k]) for k in ("lab_images", "unl_strong", "unl_weak"))
  p = state.student.params
  own = student.apply(p, {}, xw, True)[0]
  expect = jnp.mean(losses.cross_entropy(student.apply(p, {}, xl, True)[0], batch["lab_labels"]))
  expect += jnp.mean(
    losses.cross_entropy(student.apply(p, {}, xs, True)[0], jnp.argmax(own, axis=-1))
  )
  np.testing.assert_allclose(metrics["loss"], expect, rtol=1e-5)
  # The teacher takes no part: other teacher params give the same student.
  other = state.replace(
    teacher=state.teacher.replace(params=jax.tree.map(jnp.zeros_like, state.teacher.params))
  )
  again, _, _ = fn(other, batch, val)
  _assert_same(new.student.params, again.student.params)


def test_labels_reference_learns_the_hidden_labels_and_ignores_the_teacher():
  # ssl.targets=labels (a reference arm): CE against the hidden true labels of the
  # unlabelled examples, written out from the definition; the teacher takes no part.
  state, batch, val, fn = _ssl_setup("none", targets="labels")
  truth = jnp.array([2, 0, 1, 1, 0, 2, 2, 0])
  new, metrics, _ = fn(state, {**batch, "unl_true_labels": truth}, val)
  student = models.create("mlp", 3, hidden=8)
  prepare = lambda im: im.astype(jnp.float32) / 255.0
  xl, xs = prepare(batch["lab_images"]), prepare(batch["unl_strong"])
  p = state.student.params
  expect = jnp.mean(losses.cross_entropy(student.apply(p, {}, xl, True)[0], batch["lab_labels"]))
  expect += jnp.mean(losses.cross_entropy(student.apply(p, {}, xs, True)[0], truth))
  np.testing.assert_allclose(metrics["loss"], expect, rtol=1e-5)
  other = state.replace(
    teacher=state.teacher.replace(params=jax.tree.map(jnp.zeros_like, state.teacher.params))
  )
  again, _, _ = fn(other, {**batch, "unl_true_labels": truth}, val)
  _assert_same(new.student.params, again.student.params)
  with pytest.raises(ValueError, match="ssl.targets=labels needs the batch's unl_true_labels"):
    fn(state, batch, val)


@pytest.mark.parametrize(
  "option, value, refused, fix, fixed",
  [
    # FixMatch has no teacher: mechanism none only.
    ("ssl.targets", "fixmatch", r"ssl.targets='fixmatch'.*with none", "kdaif.mechanism", "none"),
    # The oracle needs a known answer: injected flips or the hidden SSL labels.
    (
      "kdaif.mechanism",
      "oracle",
      r"mechanism='oracle'.*semi-supervised split",
      "data.num_labelled",
      100,
    ),
  ],
)
def test_ssl_options_refused_until_their_requirement_is_set(option, value, refused, fix, fixed):
  cfg = config_lib.base_config()
  section, key = option.split(".")
  cfg[section][key] = value
  with pytest.raises(ValueError, match=refused):
    config_lib.validate(cfg)
  section, key = fix.split(".")
  cfg[section][key] = fixed
  config_lib.validate(cfg)


def test_labels_reference_is_refused_without_a_semi_supervised_split():
  cfg = config_lib.base_config()
  cfg.kdaif.mechanism, cfg.ssl.targets = "none", "labels"
  with pytest.raises(ValueError, match=r"ssl.targets='labels'.*needs data.num_labelled > 0"):
    config_lib.validate(cfg)
  cfg.data.num_labelled = 100
  config_lib.validate(cfg)
  cfg.kdaif.mechanism = "online"  # a reference arm, not a method to weight
  with pytest.raises(ValueError, match=r"ssl.targets='labels'.*\(labels: with none\)"):
    config_lib.validate(cfg)


def test_semi_supervised_oracle_is_refused_with_injected_noise():
  # It weighs the unlabelled examples only; flipped labelled ones would stay at 1.
  cfg = config_lib.base_config()
  cfg.kdaif.mechanism, cfg.data.num_labelled, cfg.data.noise.rate = "oracle", 100, 0.2
  with pytest.raises(ValueError, match=r"mechanism='oracle'.*both data.num_labelled and noise"):
    config_lib.validate(cfg)


def test_teachers_pseudo_label_accuracy_is_logged_against_the_hidden_labels():
  state, batch, val, fn = _ssl_setup("none")
  t = models.create("mlp", 3, hidden=16)
  pseudo = jnp.argmax(t.apply(state.teacher.params, {}, batch["unl_weak"] / 255.0, False)[0], -1)
  truth = pseudo.at[:3].set((pseudo[:3] + 1) % 3)  # 5 of 8 right
  _, metrics, _ = fn(state, {**batch, "unl_true_labels": truth}, val)
  np.testing.assert_allclose(metrics["pseudo_label_accuracy"], 5 / 8)


def test_ssl_oracle_drops_exactly_the_wrong_pseudo_labels():
  state, batch, val, fn = _ssl_setup("oracle")
  t = models.create("mlp", 3, hidden=16)
  prepare = lambda im: im.astype(jnp.float32) / 255.0
  t_weak = t.apply(state.teacher.params, {}, prepare(batch["unl_weak"]), False)[0]
  pseudo = jnp.argmax(t_weak, -1)
  truth = pseudo.at[:3].set((pseudo[:3] + 1) % 3)  # the first 3 pseudo-labels wrong
  new, metrics, (_, w, _) = fn(state, {**batch, "unl_true_labels": truth}, val)
  np.testing.assert_array_equal(w, [0, 0, 0, 1, 1, 1, 1, 1])
  # Oracle: the loss written out from its definition, the right examples' mean KD term.
  student = models.create("mlp", 3, hidden=8)
  p = state.student.params
  xl, xs = prepare(batch["lab_images"]), prepare(batch["unl_strong"])
  lab = jnp.mean(losses.cross_entropy(student.apply(p, {}, xl, True)[0], batch["lab_labels"]))
  c = config_lib.base_config()
  kd = losses.kd_loss(student.apply(p, {}, xs, True)[0], t_weak, None, temperature=c.kd.temperature)
  expect = lab + c.ssl.unlabelled_weight * jnp.mean(kd[3:])
  np.testing.assert_allclose(metrics["loss"], expect, rtol=1e-5)
  with pytest.raises(ValueError, match="oracle needs the batch's unl_true_labels"):
    fn(state, batch, val)  # a caller without the hidden labels
  # Every pseudo-label wrong: a labelled-only step, not 0/0.
  *_, lab_only = _ssl_setup("none", unlabelled_weight=0.0)
  expect, _, _ = lab_only(state, batch, val)
  got, _, _ = fn(state, {**batch, "unl_true_labels": (pseudo + 1) % 3}, val)
  _assert_same(got.student.params, expect.student.params)
