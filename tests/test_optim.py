"""Optimisers and schedules built from configs."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdaif_jax import optim


def _cfg(**kw):
  c = optim.default_optimizer_config(0.1)
  c.update(kw)
  return c


def test_clip_norm_bounds_the_first_update():
  tx = optim.make_optimizer(
    _cfg(momentum=0.0, weight_decay=0.0, schedule="constant", clip_norm=1.0), 10, 1
  )
  params = {"w": jnp.zeros(4)}
  grads = {"w": jnp.array([300.0, 400.0, 0.0, 0.0])}  # norm 500
  upd, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.tree_utils.tree_norm(upd), 0.1, rtol=1e-6)
  unclipped = optim.make_optimizer(_cfg(momentum=0.0, weight_decay=0.0, schedule="constant"), 10, 1)
  upd, _ = unclipped.update(grads, unclipped.init(params), params)
  np.testing.assert_allclose(optax.tree_utils.tree_norm(upd), 50.0, rtol=1e-6)


@pytest.mark.parametrize(
  "schedule,step,expect",
  [
    ("constant", 95, 0.1),
    ("step", 49, 0.1),
    ("step", 50, 0.01),  # decay at epoch 5 of 10 steps each
    ("step", 80, 0.001),  # and at epoch 8
    ("cosine", 0, 0.1),
    ("cosine", 100, 0.0),
  ],
)
def test_schedules(schedule, step, expect):
  sched = optim.make_schedule(_cfg(schedule=schedule, decay_epochs=(5, 8)), 10, 10)
  np.testing.assert_allclose(float(sched(step)), expect, atol=1e-7)


def test_warmup_is_linear_then_main_schedule():
  sched = optim.make_schedule(_cfg(schedule="constant", warmup_epochs=2.0), 10, 10)
  np.testing.assert_allclose(
    [float(sched(s)) for s in (0, 10, 20, 50)], [0.0, 0.05, 0.1, 0.1], atol=1e-7
  )


def test_every_k_updates_once_per_k_calls_with_the_mean_gradient():
  tx = optax.sgd(0.5)
  acc = optim.every_k(tx, 3)
  params = {"w": jnp.zeros(2)}
  grads = [
    {"w": jnp.array([1.0, 2.0])},
    {"w": jnp.array([3.0, -2.0])},
    {"w": jnp.array([5.0, 6.0])},
  ]
  state = acc.init(params)
  updates = []
  for g in grads:
    u, state = acc.update(g, state, params)
    updates.append(u["w"])
  np.testing.assert_array_equal(updates[0], 0.0)
  np.testing.assert_array_equal(updates[1], 0.0)
  # Plain SGD on the mean of the three gradients: -0.5 * [3, 2].
  np.testing.assert_allclose(updates[2], [-1.5, -1.0], rtol=1e-6)
  assert optim.every_k(tx, 1) is tx
