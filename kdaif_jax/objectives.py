"""The model-bound losses the influence pipeline differentiates.

Influence uses a network in inference mode (frozen batch statistics), so every
example stays independent of the others in its batch (docs/method.md §1), and in
float32 whatever the run's compute dtype, with float32 matrix products (not
TensorFloat-32, which NVIDIA GPUs use for float32 by default). The steps and the
whole-set scorer build their losses here, once.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kdaif_jax import _checks, losses
from kdaif_jax.influence import PerExampleLoss

PyTree = Any

# "highest": every matrix product and convolution of the influence maths in full
# float32. "default": the backend's default, TensorFloat-32 (10-bit mantissa) on
# NVIDIA GPUs since Ampere: faster, but on an H200 its rounding moved scores by up
# to 2.8e-4 (0.56% relative on small ones; BENCHMARKS.md §6). The same on CPU.
PRECISIONS = ("highest", "default")

__all__ = ["PRECISIONS", "inference_logits", "training_loss", "validation_loss"]


def _precision(precision: str):
  """The context the influence maths is traced in (``jax.default_matmul_precision``)."""
  if precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)


def inference_logits(
  model, model_state: PyTree, inputs: jax.Array, precision: str = "highest"
) -> Callable[[PyTree], Any]:
  """``params -> logits [B, K]`` of ``model`` in inference mode on ``inputs``.

  Always in float32 (``Model.in_float32``): a bfloat16 run's influence maths
  (g_V, curvature products, CG, scores) does not inherit its compute dtype.
  ``precision`` (one of ``PRECISIONS``) is the matrix-product precision the
  network is traced with; derivatives (jvp, vjp) inherit it.
  """
  model = model.in_float32()
  _checks.check_choice(precision, "precision", PRECISIONS)  # here, not inside a trace

  def logits(params):
    with _precision(precision):
      return model.apply(params, model_state, inputs, False)[0]

  return logits


def training_loss(
  model,
  model_state: PyTree,
  inputs: jax.Array,
  per_example: Callable[[jax.Array], jax.Array],
  precision: str = "highest",
) -> PerExampleLoss:
  """The per-example training loss ℓ_B(θ), split at the logits (for the Gauss-Newton).

  Args:
    model: ``models.Model`` (the student).
    model_state: its non-trainable collections (batch statistics), held fixed.
    inputs: [B, ...] prepared inputs.
    per_example: ``logits [B, K] -> [B]`` losses (targets closed over).
    precision: matrix-product precision, one of ``PRECISIONS``.

  Returns:
    ``influence.PerExampleLoss``.
  """
  return PerExampleLoss(inference_logits(model, model_state, inputs, precision), per_example)


def validation_loss(
  model, model_state: PyTree, inputs: jax.Array, labels: jax.Array, precision: str = "highest"
) -> Callable[[PyTree], jax.Array]:
  """``params -> []``: L_V(θ), the mean cross-entropy (squared error for float
  labels: regression) on a validation batch.

  Args:
    model: ``models.Model`` (the student).
    model_state: its non-trainable collections, held fixed.
    inputs: [V, ...] prepared validation inputs.
    labels: [V] int labels (float scores for regression).
    precision: matrix-product precision, one of ``PRECISIONS``.

  Returns:
    The scalar validation loss as a function of the params.
  """
  logits = inference_logits(model, model_state, inputs, precision)
  return lambda params: jnp.mean(losses.supervised_loss(logits(params), labels))
