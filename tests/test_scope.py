"""Influence restricted to a parameter subset (``kdaif.scope``) against float64 oracles.

Oracles: ``jax.jacobian`` of the logits in the kept parameters (dense Gauss-Newton
J_Sᵀ H J_S), ``np.linalg.solve``, ``jax.vmap(jax.grad(...))`` per-example gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from kdaif_jax import config as config_lib
from kdaif_jax import influence, models, objectives, online
from kdaif_jax import step as step_lib

N, D, H, K = 24, 4, 6, 3


@pytest.fixture
def problem():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    params = {
      "body": {"w": jnp.asarray(rng.normal(size=(D, H))), "b": jnp.asarray(rng.normal(size=H))},
      "head": {"w": jnp.asarray(rng.normal(size=(H, K))), "b": jnp.asarray(rng.normal(size=K))},
    }
    x = jnp.asarray(rng.normal(size=(N, D)))
    y = jnp.asarray(rng.integers(0, K, N))
    xv = jnp.asarray(rng.normal(size=(10, D)))
    yv = jnp.asarray(rng.integers(0, K, 10))
    yield params, x, y, xv, yv


def _logits(p, x):
  return jnp.tanh(x @ p["body"]["w"] + p["body"]["b"]) @ p["head"]["w"] + p["head"]["b"]


def _ce(logits, y):
  return (
    jax.scipy.special.logsumexp(logits, axis=1)
    - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  )


def _losses(params, x, y, xv, yv):
  train = influence.PerExampleLoss(lambda p: _logits(p, x), lambda out: _ce(out, y))
  val = lambda p: jnp.mean(_ce(_logits(p, xv), yv))
  return train, val


def test_scope_all_keys_equals_unrestricted(problem):
  params, x, y, xv, yv = problem
  train, val = _losses(params, x, y, xv, yv)
  full = influence.batch_influence(params, train, val, maxiter=60, tol=1e-14, damping=0.1)
  r = influence.restrict(params, train, val, tuple(params))
  sub = influence.batch_influence(r.params, r.train_loss, r.val_loss_fn, maxiter=60, tol=1e-14)
  np.testing.assert_allclose(sub.scores, full.scores, rtol=1e-10, atol=1e-12)


def test_head_scope_matches_dense_oracle(problem):
  params, x, y, xv, yv = problem
  train, val = _losses(params, x, y, xv, yv)
  r = influence.restrict(params, train, val, ("head",))
  got = influence.batch_influence(
    r.params, r.train_loss, r.val_loss_fn, damping=0.1, maxiter=100, tol=1e-14
  )
  # Oracle in the head's flat space, the body held fixed.
  flat, unravel = ravel_pytree(params["head"])
  logits_of = lambda v: _logits({**params, "head": unravel(v)}, x)
  jac = jax.jacobian(lambda v: logits_of(v).reshape(-1))(flat)  # [N*K, P]
  probs = jax.nn.softmax(logits_of(flat))
  h_out = jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p))(probs)  # CE Hessian per example
  j3 = jac.reshape(N, K, -1)
  ggn = jnp.einsum("nkp,nkl,nlq->pq", j3, h_out, j3) / N
  g_v = jax.grad(lambda v: jnp.mean(_ce(_logits({**params, "head": unravel(v)}, xv), yv)))(flat)
  s = np.linalg.solve(np.asarray(ggn) + 0.1 * np.eye(flat.size), np.asarray(g_v))
  per_ex = jax.vmap(
    lambda xi, yi: jax.grad(
      lambda v: _ce(_logits({**params, "head": unravel(v)}, xi[None]), yi[None])[0]
    )(flat)
  )(x, y)
  expect = -np.asarray(per_ex) @ s
  np.testing.assert_allclose(got.scores, expect, rtol=1e-8, atol=1e-10)
  # It is not the full-network answer.
  full = influence.batch_influence(params, train, val, damping=0.1, maxiter=100, tol=1e-14)
  assert not np.allclose(full.scores, got.scores, rtol=1e-3)


def test_restrict_rejects_unknown_keys(problem):
  params, x, y, xv, yv = problem
  train, val = _losses(params, x, y, xv, yv)
  with pytest.raises(ValueError, match="nope"):
    influence.restrict(params, train, val, ("nope",))


@pytest.mark.parametrize(
  "name, shape, head",
  [
    ("cnn_small", (1, 8, 8, 1), "Dense_0"),
    ("mlp", (1, 8, 8, 1), "Dense_1"),
    ("resnet8x4", (1, 32, 32, 3), "Dense_0"),
    ("wrn_16_2", (1, 32, 32, 3), "Dense_0"),
  ],
)
def test_head_keys_is_the_classifier(name, shape, head):
  m = models.create(name, 10)
  params, _ = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros(shape))
  assert models.head_keys(params) == (head,)
  assert params[head]["kernel"].shape[-1] == 10


def test_head_scope_step_equals_restricted_batch_influence():
  """The training step with kdaif.scope=head computes the restricted influence of its batch."""
  k_ = 3
  teacher, student = models.create("mlp", k_, hidden=16), models.create("mlp", k_, hidden=8)
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.randint(keys[0], (16, 4, 4, 1), 0, 256).astype(jnp.uint8)
  y = jax.random.randint(keys[1], (16,), 0, k_)
  xv = jax.random.randint(keys[2], (8, 4, 4, 1), 0, 256).astype(jnp.uint8)
  yv = jax.random.randint(keys[3], (8,), 0, k_)
  tp, tms = teacher.init(keys[4], jnp.zeros((1, 4, 4, 1)))
  sp, sms = student.init(keys[5], jnp.zeros((1, 4, 4, 1)))
  tx = optax.sgd(0.1)
  state = step_lib.new_train_state(
    key=jax.random.key_data(jax.random.key(1)),
    student=step_lib.NetState(sp, sms, tx.init(sp)),
    teacher=step_lib.NetState(tp, tms, tx.init(tp)),
    num_examples=16,
  )
  cfg = config_lib.base_config()
  cfg.kdaif.scope = "head"
  cfg.kdaif.cg_iters = 4
  opts = config_lib.step_options(cfg)
  prepare = lambda im: im.astype(jnp.float32) / 255.0 - 0.5
  fn = step_lib.make_kd_step(student, teacher, tx, None, prepare, opts, axis_name=None)
  batch = {"images": x, "labels": y, "noisy": jnp.zeros((16,), bool), "weights": jnp.ones(16)}
  new, _, (scores, w, _) = jax.jit(fn)(state, batch, {"images": xv, "labels": yv})

  t_logits = teacher.apply(tp, tms, prepare(x), False)[0]
  train = objectives.training_loss(student, sms, prepare(x), lambda o: opts.kd(o, t_logits, y))
  val = objectives.validation_loss(student, sms, prepare(xv), yv)
  r = online.scope_restrict("head", sp, train, val)
  assert tuple(r.params) == ("Dense_1",)
  ref = influence.batch_influence(
    r.params, r.train_loss, r.val_loss_fn, x0=None, **opts.influence.solver._asdict()
  )
  np.testing.assert_allclose(scores, ref.scores, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(w, opts.influence.weights(ref.scores), rtol=1e-4, atol=1e-6)
  for key in new.s:  # s keeps the student's shape; zero outside the head
    leaves = jax.tree.leaves(new.s[key])
    if key == "Dense_1":
      assert any(np.any(np.asarray(a) != 0) for a in leaves)
    else:
      assert all(np.all(np.asarray(a) == 0) for a in leaves)
