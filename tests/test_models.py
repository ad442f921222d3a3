"""Tests for the model registry and the Flax models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdaif_jax import models

DIGIT_MODELS = ("cnn_small", "cnn_large", "mlp")

# Published parameter counts: CRD (Tian et al., 2020) for the ResNets and
# WRN-16-2/40-2, FixMatch (Sohn et al., 2020) for WRN-28-2/28-8.
PUBLISHED = [
  ("resnet8x4", 100, 1.23e6),
  ("resnet32x4", 100, 7.43e6),
  ("resnet20", 100, 0.28e6),
  ("resnet20", 10, 0.27e6),
  ("resnet56", 100, 0.86e6),
  ("resnet110", 100, 1.74e6),
  ("wrn_28_2", 10, 1.47e6),
  ("wrn_28_8", 10, 23.4e6),
  ("wrn_16_2", 100, 0.70e6),
  ("wrn_40_2", 100, 2.26e6),
]


def _input_shape(name: str, batch: int) -> tuple[int, ...]:
  return (batch, 8, 8, 1) if name in DIGIT_MODELS else (batch, 32, 32, 3)


def _inputs(name: str, batch: int, seed: int = 0) -> jax.Array:
  # numpy, not jax.random: each new shape would cost an RNG compile.
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(_input_shape(name, batch)), jnp.float32)


def _max_abs_diff(a, b) -> float:
  diffs = jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b)
  return float(max(jax.tree.leaves(diffs)))


def test_names_lists_every_required_model():
  required = {
    "cnn_small",
    "cnn_large",
    "mlp",
    "resnet20",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_28_2",
    "wrn_28_8",
    "wrn_16_2",
    "wrn_40_2",
  }
  assert required <= set(models.names())
  assert models.names() == sorted(models.names())


@pytest.mark.parametrize("name", models.names())
def test_init_and_apply_every_model(name):
  model = models.create(name, 10)
  x = _inputs(name, 2)
  params, state = model.init(jax.random.key(0), x)
  logits, new_state = model.apply(params, state, x, train=False)
  assert logits.shape == (2, 10)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert new_state is state
  # Models with BatchNorm carry its statistics; the others carry nothing.
  assert set(state) <= {"batch_stats"}
  assert ("batch_stats" in state) == (name not in DIGIT_MODELS)


@pytest.mark.parametrize(("name", "num_classes", "published"), PUBLISHED)
def test_param_counts_match_published(name, num_classes, published):
  model = models.create(name, num_classes)
  sample = jax.ShapeDtypeStruct(_input_shape(name, 1), jnp.float32)
  params, _ = jax.eval_shape(model.init, jax.random.key(0), sample)
  count = models.param_count(params)
  assert abs(count - published) / published < 0.02, f"{name}: {count:,}"


def test_digit_model_sizes():
  sample = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)

  def count(name, **kwargs):
    params, _ = jax.eval_shape(models.create(name, 10, **kwargs).init, jax.random.key(0), sample)
    return models.param_count(params)

  assert 10_000 <= count("cnn_small") <= 20_000
  assert 100_000 <= count("cnn_large") <= 200_000
  # hidden=16: 64*16 + 16 + 16*10 + 10.
  assert count("mlp", hidden=16) == 64 * 16 + 16 + 16 * 10 + 10


def test_cnn_runs_on_cifar_sized_input():
  model = models.create("cnn_small", 10)
  x = _inputs("resnet20", 2)
  params, state = model.init(jax.random.key(0), x)
  logits, _ = model.apply(params, state, x, train=True)
  assert logits.shape == (2, 10)
  assert state == {}


@pytest.mark.parametrize(
  ("name", "kwargs"),
  [("resnet20", {}), ("wrn_16_2", {}), ("cnn_small", {"batch_norm": True})],
)
def test_batch_norm_state(name, kwargs):
  model = models.create(name, 10, **kwargs)
  # Batch 2, as in the test above, so the eager per-op compiles are reused.
  x = _inputs(name, 2)
  params, state = model.init(jax.random.key(0), x)
  assert "batch_stats" in state

  _, train_state = model.apply(params, state, x, train=True)
  assert jax.tree.structure(train_state) == jax.tree.structure(state)
  assert _max_abs_diff(train_state, state) > 0

  # Give the running averages non-trivial values before the eval checks.
  logits, eval_state = model.apply(params, train_state, x, train=False)
  assert _max_abs_diff(eval_state, train_state) == 0
  # In eval mode an example's logits do not depend on the rest of the batch.
  alone, _ = model.apply(params, train_state, x[:1], train=False)
  np.testing.assert_allclose(alone, logits[:1], rtol=1e-5, atol=1e-5)
  # In train mode they do (batch statistics), which the check above would catch.
  train_logits, _ = model.apply(params, train_state, x, train=True)
  train_alone, _ = model.apply(params, train_state, x[:1], train=True)
  assert not np.allclose(train_alone, train_logits[:1], atol=1e-3)


# Compiling a ResNet's gradient costs XLA:CPU ~10 s; a small CNN with BatchNorm
# exercises the same paths (params and mutable batch_stats under jit).
@pytest.mark.parametrize(("name", "kwargs"), [("mlp", {}), ("cnn_small", {"batch_norm": True})])
def test_apply_jits_and_differentiates(name, kwargs):
  model = models.create(name, 10, **kwargs)
  x = _inputs(name, 2)
  params, state = model.init(jax.random.key(0), x)

  @jax.jit
  def loss_and_grad(params, state, x):
    def loss(params):
      logits, new_state = model.apply(params, state, x, train=True)
      return jnp.sum(logits[:, 0] ** 2), new_state

    return jax.value_and_grad(loss, has_aux=True)(params)

  (value, new_state), grads = loss_and_grad(params, state, x)
  assert bool(jnp.isfinite(value))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  # The jitted forward agrees with the eager one.
  eager, _ = model.apply(params, state, x, train=True)
  jitted, _ = jax.jit(model.apply, static_argnames="train")(params, state, x, train=True)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cnn_small", "wrn_16_2"])
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
  model = models.create(name, 10, dtype="bfloat16")
  x = _inputs(name, 2)
  params, state = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits, _ = model.apply(params, state, x, train=True)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_unknown_name_lists_allowed_names():
  with pytest.raises(ValueError, match="nope") as info:
    models.create("nope", 10)
  for name in models.names():
    assert name in str(info.value)


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_classes"):
    models.create("mlp", 0)
  with pytest.raises(TypeError):
    models.create("mlp", 10, no_such_option=1)
