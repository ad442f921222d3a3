"""The model-bound losses the influence pipeline differentiates.

Influence uses a network in inference mode (frozen batch statistics), so every
example stays independent of the others in its batch (docs/method.md §1), and in
float32 whatever the run's compute dtype. The
steps and the whole-set scorer build their losses here, once.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from kdaif_jax import losses
from kdaif_jax.influence import PerExampleLoss

PyTree = Any

__all__ = ["inference_logits", "training_loss", "validation_loss"]


def inference_logits(model, model_state: PyTree, inputs: jax.Array) -> Callable[[PyTree], Any]:
  """``params -> logits [B, K]`` of ``model`` in inference mode on ``inputs``.

  Always in float32 (``Model.in_float32``): a bfloat16 run's influence maths
  (g_V, curvature products, CG, scores) does not inherit its compute dtype.
  """
  model = model.in_float32()
  return lambda params: model.apply(params, model_state, inputs, False)[0]


def training_loss(
  model, model_state: PyTree, inputs: jax.Array, per_example: Callable[[jax.Array], jax.Array]
) -> PerExampleLoss:
  """The per-example training loss ℓ_B(θ), split at the logits (for the Gauss-Newton).

  Args:
    model: ``models.Model`` (the student).
    model_state: its non-trainable collections (batch statistics), held fixed.
    inputs: [B, ...] prepared inputs.
    per_example: ``logits [B, K] -> [B]`` losses (targets closed over).

  Returns:
    ``influence.PerExampleLoss``.
  """
  return PerExampleLoss(inference_logits(model, model_state, inputs), per_example)


def validation_loss(
  model, model_state: PyTree, inputs: jax.Array, labels: jax.Array
) -> Callable[[PyTree], jax.Array]:
  """``params -> []``: L_V(θ), the mean cross-entropy (squared error for float
  labels: regression) on a validation batch.

  Args:
    model: ``models.Model`` (the student).
    model_state: its non-trainable collections, held fixed.
    inputs: [V, ...] prepared validation inputs.
    labels: [V] int labels (float scores for regression).

  Returns:
    The scalar validation loss as a function of the params.
  """
  logits = inference_logits(model, model_state, inputs)
  return lambda params: jnp.mean(losses.supervised_loss(logits(params), labels))
