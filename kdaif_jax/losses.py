"""Per-example losses (each returns one value per example, shape [B]).

docs/method.md §3:
  ℓ_i = α·CE(y_i, S(x_i)) + (1−α)·τ²·KL(softmax(T(x_i)/τ) ‖ softmax(S(x_i)/τ))
for labelled examples and the KD term alone (α = 0) for unlabelled ones.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _at_least_f32(x: jax.Array) -> jax.Array:
  """bfloat16/float16 logits are promoted to float32; float64 stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """CE(y, softmax(logits)) per example.

  Args:
    logits: [B, K].
    labels: [B] integer class ids, or [B, K] target probabilities.

  Returns:
    [B] losses (nats).
  """
  logp = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
  if labels.ndim == logits.ndim:
    return -jnp.sum(labels * logp, axis=-1)
  return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def kl_divergence(
  teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
  """KL(softmax(T/τ) ‖ softmax(S/τ)) per example (no τ² factor).

  Args:
    teacher_logits: [B, K] (treated as constants by the caller if desired).
    student_logits: [B, K].
    temperature: τ > 0.

  Returns:
    [B] non-negative divergences.
  """
  log_t = jax.nn.log_softmax(_at_least_f32(teacher_logits) / temperature, axis=-1)
  log_s = jax.nn.log_softmax(_at_least_f32(student_logits) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)


def kd_loss(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  labels: jax.Array | None = None,
  *,
  temperature: float = 4.0,
  alpha: float = 0.5,
  labelled: jax.Array | None = None,
) -> jax.Array:
  """Hinton et al. (2015) distillation loss per example.

  ℓ_i = α·CE(y_i, S) + (1−α)·τ²·KL(softmax(T/τ) ‖ softmax(S/τ)); the τ² keeps
  the soft term's gradient scale independent of τ. Unlabelled examples
  (``labelled`` false, or label −1) use the KD term alone with weight 1.

  Args:
    student_logits: [B, K].
    teacher_logits: [B, K]; wrap in ``stop_gradient`` to keep the teacher fixed.
    labels: [B] int labels (−1 = unlabelled) or None (all unlabelled).
    temperature: τ > 0.
    alpha: weight of the hard-label CE in [0, 1].
    labelled: optional [B] bool mask; defaults to ``labels >= 0``.

  Returns:
    [B] losses.
  """
  soft = temperature**2 * kl_divergence(teacher_logits, student_logits, temperature)
  if labels is None:
    return soft
  if labelled is None:
    labelled = labels >= 0
  hard = cross_entropy(student_logits, jnp.maximum(labels, 0))
  return jnp.where(labelled, alpha * hard + (1.0 - alpha) * soft, soft)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[B] float 1.0 where argmax(logits) == label, else 0.0."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


class KDOptions(NamedTuple):
  """The distillation loss's options: ``KDOptions(4.0, 0.5)(s_logits, t_logits, y)``.

  temperature: τ > 0 of the soft term.
  alpha: weight of the hard-label CE in [0, 1].
  """

  temperature: float = 4.0
  alpha: float = 0.5

  def __call__(
    self, student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array | None
  ) -> jax.Array:
    """[B] ``kd_loss`` with these options."""
    return kd_loss(
      student_logits, teacher_logits, labels, temperature=self.temperature, alpha=self.alpha
    )
