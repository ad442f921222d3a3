"""Per-example losses (each returns one value per example, shape [B]).

docs/method.md §3:
  ℓ_i = α·CE(y_i, S(x_i)) + (1−α)·τ²·KL(softmax(T(x_i)/τ) ‖ softmax(S(x_i)/τ))
for labelled examples and the KD term alone (α = 0) for unlabelled ones.
For regression (float labels, one output: GLUE STS-B) the squared-error
analogue ℓ_i = α·(S − y)² + (1−α)·(S − T)² (``regression_kd_loss``).

Input checks: shapes, dtypes and the options (τ, α) raise a one-line
ValueError before anything is traced, under ``jit`` too (they are static).
Label VALUES are checked only when concrete (numpy or jax arrays outside
``jit``); under ``jit`` an out-of-range class id cannot be detected, and its
example's cross-entropy is NaN (with zero gradient), so it shows in the loss
instead of silently scoring some class.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdaif_jax import _checks


def _at_least_f32(x: jax.Array) -> jax.Array:
  """bfloat16/float16 logits are promoted to float32; float64 stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_logits(logits: jax.Array, name: str) -> None:
  shape = np.shape(logits)
  if len(shape) != 2 or shape[1] < 1:
    raise ValueError(f"{name} must be [B, K] with K >= 1 classes, got shape {shape}")


def _check_labels(logits: jax.Array, labels: jax.Array, name: str = "labels") -> None:
  """[B] integer ids or [B, K] probabilities matching ``logits`` [B, K]."""
  b, k = np.shape(logits)
  shape, dtype = np.shape(labels), _checks.dtype_of(labels)
  if shape == (b, k):
    return
  if len(shape) != 1:
    raise ValueError(
      f"{name} must be [B] class ids or [B, K] probabilities for logits {(b, k)}, got shape {shape}"
    )
  if shape[0] != b:
    raise ValueError(f"{name} has {shape[0]} examples but the logits have {b} (shape {(b, k)})")
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{name} [B] must hold integer class ids, got dtype {dtype}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """CE(y, softmax(logits)) per example.

  Args:
    logits: [B, K].
    labels: [B] integer class ids in 0..K−1, or [B, K] target probabilities.

  Returns:
    [B] losses (nats). Under ``jit`` an out-of-range id (e.g. −1, the
    unlabelled marker, or K) gives NaN for its example (and zero gradient);
    eagerly it is an error.

  Raises:
    ValueError: logits not [B, K]; labels neither [B] integers nor [B, K];
      a batch-size mismatch; a concrete id outside 0..K−1.
  """
  _check_logits(logits, "logits")
  _check_labels(logits, labels)
  logp = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
  if labels.ndim == logits.ndim:
    return -jnp.sum(labels * logp, axis=-1)
  k = logits.shape[-1]
  _checks.check_class_ids(labels, k, "labels")
  # Out-of-range ids (only possible under jit) gather class 0 and become NaN,
  # instead of wrapping around (−1 would score the last class).
  valid = (labels >= 0) & (labels < k)
  idx = jnp.where(valid, labels, 0)[:, None].astype(jnp.int32)
  picked = -jnp.take_along_axis(logp, idx, axis=-1)[:, 0]
  return jnp.where(valid, picked, jnp.nan)


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

  Raises:
    ValueError: logits not both [B, K] of one shape; τ not a finite number > 0.
  """
  _check_logits(student_logits, "student_logits")
  if np.shape(teacher_logits) != np.shape(student_logits):
    raise ValueError(
      f"teacher_logits has shape {np.shape(teacher_logits)} but student_logits "
      f"{np.shape(student_logits)}; they must match"
    )
  _checks.check_positive(temperature, "temperature")
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
    labels: [B] int labels in −1..K−1 (−1 = unlabelled) or None (all
      unlabelled).
    temperature: τ > 0 (finite).
    alpha: weight of the hard-label CE in [0, 1].
    labelled: optional [B] bool mask; defaults to ``labels >= 0``. Rows it
      marks labelled need an id in 0..K−1; the others' labels are ignored.

  Returns:
    [B] losses. Under ``jit`` a labelled row with an out-of-range id gets a
    NaN loss (see ``cross_entropy``); eagerly it is an error.

  Raises:
    ValueError: τ not a finite number > 0; α outside [0, 1]; shapes that do
      not match (see ``cross_entropy``, ``kl_divergence``); concrete labels
      outside −1..K−1 (with ``labelled``: outside 0..K−1 on a marked row).
  """
  _checks.check_positive(temperature, "temperature")
  _checks.check_in_range(alpha, "alpha", 0.0, 1.0)
  soft = temperature**2 * kl_divergence(teacher_logits, student_logits, temperature)
  if labels is None:
    return soft
  _check_labels(student_logits, labels)
  if np.ndim(labels) != 1:
    raise ValueError(f"labels must be [B] class ids (−1 = unlabelled), got {np.shape(labels)}")
  k = np.shape(student_logits)[-1]
  if labelled is None:
    _checks.check_class_ids(labels, k, "labels", lo=-1)
    labelled = labels >= 0
  else:
    if np.shape(labelled) != np.shape(labels):
      raise ValueError(f"labelled has shape {np.shape(labelled)} but labels {np.shape(labels)}")
    _check_marked_rows(labels, labelled, k)
  hard = cross_entropy(student_logits, jnp.where(labelled, labels, 0))
  return jnp.where(labelled, alpha * hard + (1.0 - alpha) * soft, soft)


def _check_marked_rows(labels: jax.Array, labelled: jax.Array, k: int) -> None:
  """Eagerly: rows marked labelled carry a class id in 0..K−1."""
  if isinstance(labels, jax.core.Tracer) or isinstance(labelled, jax.core.Tracer):
    return
  y, m = np.asarray(labels), np.asarray(labelled, bool)
  bad = m & ((y < 0) | (y >= k))
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
      f"labels contains {y[i]} at index {i}, a row marked labelled; labelled rows "
      f"need class ids in 0..{k - 1} (K={k} classes)"
    )


def is_regression(outputs: jax.Array, labels: jax.Array | None) -> bool:
  """Whether ``labels`` are real-valued scores (GLUE STS-B) rather than class ids.

  Decided by dtype and shape alone (static under ``jit``): floating [B] labels
  with one output per example.
  """
  return (
    labels is not None
    and np.ndim(labels) == 1
    and jnp.issubdtype(_checks.dtype_of(labels), jnp.floating)
    and np.shape(outputs)[-1:] == (1,)
  )


def squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """(outputs − targets)² per example, the regression loss (STS-B).

  Args:
    outputs: [B, 1] predictions.
    targets: [B] real targets (labels, or a teacher's [B, 1] outputs).

  Returns:
    [B] squared errors.
  """
  _check_logits(outputs, "outputs")
  t = jnp.reshape(targets, (np.shape(targets)[0], -1))
  if np.shape(t) != np.shape(outputs):
    raise ValueError(f"targets {np.shape(targets)} do not match outputs {np.shape(outputs)}")
  return jnp.sum(jnp.square(_at_least_f32(outputs) - _at_least_f32(t)), axis=-1)


def supervised_loss(outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """The task loss per example: ``cross_entropy``, or ``squared_error`` for regression.

  Args:
    outputs: [B, K] logits, or [B, 1] regression outputs.
    labels: [B] class ids / [B, K] probabilities, or [B] float scores (with K = 1).

  Returns:
    [B] losses.
  """
  if is_regression(outputs, labels):
    return squared_error(outputs, labels)
  return cross_entropy(outputs, labels)


def regression_kd_loss(
  student: jax.Array, teacher: jax.Array, labels: jax.Array, *, alpha: float = 0.5
) -> jax.Array:
  """KD for regression per example: α·(S − y)² + (1−α)·(S − T)² (no temperature).

  Args:
    student: [B, 1] outputs.
    teacher: [B, 1] outputs (constants for the caller).
    labels: [B] float targets.
    alpha: weight of the label term in [0, 1].

  Returns:
    [B] losses.
  """
  _checks.check_in_range(alpha, "alpha", 0.0, 1.0)
  return alpha * squared_error(student, labels) + (1.0 - alpha) * squared_error(student, teacher)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[B] float 1.0 where argmax(logits) == label, else 0.0; NaN for a regression
  task (``is_regression``: STS-B's real-valued scores have no accuracy)."""
  if is_regression(logits, labels):
    return jnp.full(np.shape(labels), jnp.nan, jnp.float32)
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


class KDOptions(NamedTuple):
  """The distillation loss's options: ``KDOptions(4.0, 0.5)(s_logits, t_logits, y)``.

  temperature: τ > 0 of the soft term.
  alpha: weight of the hard-label CE in [0, 1].
  (Checked when called, by ``kd_loss``.)
  """

  temperature: float = 4.0
  alpha: float = 0.5

  def __call__(
    self, student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array | None
  ) -> jax.Array:
    """[B] ``kd_loss`` with these options (``regression_kd_loss`` for float scores)."""
    if is_regression(student_logits, labels):
      return regression_kd_loss(student_logits, teacher_logits, labels, alpha=self.alpha)
    return kd_loss(
      student_logits, teacher_logits, labels, temperature=self.temperature, alpha=self.alpha
    )
