"""The per-step influence block and the ``joint`` feedback, shared by the
supervised step (``step``) and the semi-supervised step (``ssl``).

On a refresh step the block runs ``influence.batch_influence`` (the same
function the dense-oracle tests check) on the device's shard of the batch;
between refreshes it reuses the cached direction s and runs only the scores.
Then the weights (docs/method.md §2), constants for the update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kdaif_jax import influence, losses, models, objectives
from kdaif_jax import weights as weights_lib
from kdaif_jax.options import InfluenceOptions
from kdaif_jax.parallel import device_local

PyTree = Any

__all__ = [
  "BatchInfluence",
  "feedback_weights",
  "memory_of",
  "online_influence",
  "remember",
  "scope_params",
  "scope_restrict",
  "student_influence",
  "teacher_feedback_loss",
  "weight_metrics",
]


class BatchInfluence(NamedTuple):
  """What the online block gives the step.

  s: the direction (C + λI)⁻¹ g_V used this step (cached for the next).
  stats: [3] float32 iterations, relative residual, negative-curvature flag of
    the newest solve (carried over on steps that reuse s).
  scores: [b] influence of the local examples (negative = helpful).
  weights: [b] weights, mean 1 over the global batch, gradient stopped.
  metrics: the solve statistics by name, for the logs.
  memory: [b] the examples' updated score memory (``remember``); the memory
    passed in when ``opts.memory`` is 0.
  """

  s: PyTree
  stats: jax.Array
  scores: jax.Array
  weights: jax.Array
  metrics: dict
  memory: jax.Array


def memory_of(batch: dict, size: int) -> tuple[jax.Array, jax.Array]:
  """A step's batch's ``(memory, visits)`` [size] each (zeros where it has none)."""
  zeros = jnp.zeros((size,), jnp.float32)
  return batch.get("memory", zeros), batch.get("visits", zeros)


def remember(
  scores: jax.Array,
  memory: jax.Array,
  visits: jax.Array,
  beta: float,
  axis_name: str | None = None,
) -> jax.Array:
  """Each example's running memory of its standardised influence.

  m_i ← β·m_i + (1 − β)·I_i / std_B(I) on every visit after the first, and
  I_i / std_B(I) on the first (so no start-up bias). One batch sees an example
  once per epoch, each time through a different s and next to other
  examples; the memory averages those views, as whole-set influence does at
  the cost of a scoring pass. Standardising by the batch's spread makes views
  taken at different stages of training comparable (the sigmoid map divides
  by the spread anyway). A non-finite score stays non-finite in the output,
  so the weight map still gives it weight 0; the loop then keeps that
  example's previous memory and visit count.

  Args:
    scores: [b] influence of this step (negative = helpful).
    memory: [b] the examples' memory before this step.
    visits: [b] how many times each example was scored before (0: never).
    beta: β in [0, 1).
    axis_name: mesh axis the batch is sharded over (std of the global batch).

  Returns:
    [b] the updated memory: the values the weights are computed from.
  """
  _, std = weights_lib.moments(jnp.where(jnp.isfinite(scores), scores, 0.0), axis_name)
  z = scores / jnp.where(std > 0, std, 1.0)
  return jnp.where(visits > 0, beta * memory + (1.0 - beta) * z, z)


def online_influence(
  params: PyTree,
  train_loss: influence.PerExampleLoss,
  val_loss: Any,
  s_prev: PyTree,
  stats_prev: jax.Array,
  opts: InfluenceOptions,
  *,
  refresh: bool,
  axis_name: str | None,
  memory: tuple[jax.Array, jax.Array] | None = None,
) -> BatchInfluence:
  """docs/method.md §1-2 for the batch: influence of every example, then weights.

  On a refresh step, ``influence.batch_influence`` on the local shard (g_V and
  the curvature averaged over ``axis_name``; CG warm-started from ``s_prev``
  when ``opts.warm_start``); otherwise s = ``s_prev`` and only the scores
  I = −jvp(ℓ_B, s) are computed.

  Args:
    params: student params (replicated).
    train_loss: per-example training loss of the local batch.
    val_loss: ``params -> []`` validation loss of the local validation shard.
    s_prev: the previous direction (warm start, or reused when not refreshing).
    stats_prev: [3] solve statistics of the previous solve.
    opts: solver, weight map and warm start.
    refresh: recompute g_V and s.
    axis_name: mesh axis, or None.
    memory: ``([b] memory, [b] visits)`` of the examples; with ``opts.memory``
      > 0 the weights come from ``remember`` instead of this step's scores.

  Returns:
    ``BatchInfluence``.
  """
  if refresh:
    result = influence.batch_influence(
      params,
      train_loss,
      val_loss,
      x0=s_prev if opts.warm_start else None,
      axis_name=axis_name,
      **opts.solver._asdict(),
    )
    s, scores, info = result.s, result.scores, result.info
    diverged = info.diverged.astype(jnp.float32)
    stats = jnp.stack(
      [
        info.iterations.astype(jnp.float32),
        info.residual,
        info.negative_curvature.astype(jnp.float32),
      ]
    )
  else:
    s, stats = s_prev, stats_prev
    diverged = jnp.zeros((), jnp.float32)  # no solve this step
    local = lambda tree: device_local(tree, axis_name)
    scores = influence.scores(train_loss, local(params), local(s))
  if memory is None:
    memory = (jnp.zeros_like(scores), jnp.zeros_like(scores))
  new_memory = memory[0]
  weigh = scores
  if opts.memory > 0:
    new_memory = remember(scores, *memory, opts.memory, axis_name)
    weigh = new_memory
  w = jax.lax.stop_gradient(opts.weights(weigh, axis_name=axis_name))
  metrics = {
    "cg_iterations": stats[0],
    "cg_residual": stats[1],
    "cg_negative_curvature": stats[2],
    "solve_diverged": diverged,  # 1 when this step's solve blew up (e.g. LiSSA scale)
  }
  return BatchInfluence(s, stats, scores, w, metrics, jax.lax.stop_gradient(new_memory))


def student_influence(
  state: Any,
  student,
  inputs: jax.Array,
  per_example: Any,
  val_inputs: jax.Array,
  val_labels: jax.Array,
  opts: InfluenceOptions,
  *,
  refresh: bool,
  axis_name: str | None,
  memory: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[Any, BatchInfluence]:
  """``online_influence`` of the student in ``state`` on a batch; the state keeps s.

  The form both training steps call: the training loss ℓ_B and the validation
  loss L_V are the student's in inference mode (``objectives``), the previous
  direction and solve statistics come from ``state.s`` / ``state.solve_stats``
  and the new ones are stored back.

  Args:
    state: a ``step.TrainState``.
    student: the student ``models.Model``.
    inputs: [b, ...] prepared training inputs of the local shard.
    per_example: ``logits -> [b]`` training losses (targets closed over).
    val_inputs, val_labels: the local shard of the validation batch.
    opts, refresh, axis_name, memory: as in ``online_influence``.

  Returns:
    ``(state with s and solve_stats, BatchInfluence)``.
  """
  stu = state.student
  scoped = scope_restrict(
    opts.scope,
    stu.params,
    objectives.training_loss(student, stu.model_state, inputs, per_example, opts.precision),
    objectives.validation_loss(student, stu.model_state, val_inputs, val_labels, opts.precision),
  )
  block = online_influence(
    scoped.params,
    scoped.train_loss,
    scoped.val_loss_fn,
    {k: state.s[k] for k in scoped.params},
    state.solve_stats,
    opts,
    refresh=refresh,
    axis_name=axis_name,
    memory=memory,
  )
  # s keeps the student's shape; outside the scope it stays zero.
  return state.replace(s={**state.s, **block.s}, solve_stats=block.stats), block


def scope_restrict(
  scope: str, params: dict, train_loss: influence.PerExampleLoss, val_loss_fn: Any
) -> influence.Restricted:
  """The influence inputs for ``scope`` ("all": unchanged; "head": the classifier layer).

  Args:
    scope: one of ``options.SCOPES``.
    params: the student's params dict.
    train_loss, val_loss_fn: the full-parameter losses.

  Returns:
    ``influence.Restricted`` (for "all", the inputs themselves).
  """
  if scope == "all":
    return influence.Restricted(params, train_loss, val_loss_fn)
  return influence.restrict(params, train_loss, val_loss_fn, tuple(scope_params(scope, params)))


def scope_params(scope: str, params: dict) -> dict:
  """The entries of the student's params dict that ``scope`` takes influence in.

  Args:
    scope: one of ``options.SCOPES``.
    params: the student's params dict.

  Returns:
    ``params`` itself for "all"; its classifier layer's entry for "head".
  """
  if scope == "all":
    return params
  if scope == "head":
    return {k: params[k] for k in models.head_keys(params)}
  raise ValueError(f"scope={scope!r} is not supported; allowed: all, head")


def _masked_mean(x: jax.Array, mask: jax.Array, axis_name: str | None) -> jax.Array:
  m = mask.astype(jnp.float32)
  num, den = jnp.sum(m * x), jnp.sum(m)
  if axis_name:
    num, den = jax.lax.psum((num, den), axis_name)
  return num / jnp.maximum(den, 1.0)


def weight_metrics(
  w: jax.Array, scores: jax.Array, noisy: jax.Array, axis_name: str | None
) -> dict[str, jax.Array]:
  """Global statistics of the batch's weights (and by flipped/clean label).

  Args:
    w: [b] weights.
    scores: [b] influence (or losses, for small_loss).
    noisy: [b] bool, the label was flipped (analysis only).
    axis_name: mesh axis, or None.

  Returns:
    dict of scalars: w_mean, w_std, w_min, w_max, w_below_half, influence_std,
    w_noisy_mean, w_clean_mean, nonfinite_scores.
  """
  # The barrier keeps XLA from merging these statistics with the weight map's own
  # (same expressions): fused together they round differently, and logging must
  # not change the trajectory of a run.
  w, scores = jax.lax.optimization_barrier((w, scores))
  mean, std = weights_lib.moments(w, axis_name)
  lo, hi = weights_lib.extremes(w, axis_name)
  everyone = jnp.ones_like(w, dtype=bool)
  return {
    "w_mean": mean,
    "w_std": std,
    "w_min": lo,
    "w_max": hi,
    "w_below_half": _masked_mean((w < 0.5).astype(jnp.float32), everyone, axis_name),
    "influence_std": weights_lib.moments(scores, axis_name)[1],
    "w_noisy_mean": _masked_mean(w, noisy, axis_name),
    "w_clean_mean": _masked_mean(w, ~noisy, axis_name),
    # Non-finite scores get weight 0 (weights.sigmoid); how many this batch.
    "nonfinite_scores": weights_lib.num_nonfinite(scores, axis_name).astype(jnp.float32),
  }


def feedback_weights(
  scores: jax.Array, axis_name: str | None = None, eps: float = 1e-8
) -> jax.Array:
  """h_j = −I_j / std(I): the student's standardised helpfulness of example j.

  Args:
    scores: [B] influence values (negative = helpful to the student).
    axis_name: mesh axis for the global std, or None.
    eps: keeps the scale positive for constant scores.

  Returns:
    [B] feedback; positive where the example (its pseudo-label) helped.
  """
  _, std = weights_lib.moments(scores, axis_name)
  return jax.lax.stop_gradient(-scores / (std + eps))


def teacher_feedback_loss(t_logits: jax.Array, pseudo_labels: jax.Array, h: jax.Array) -> jax.Array:
  """mean_j h_j · CE(ŷ_j, T(x_j)) (docs/method.md §4, ``joint``).

  Minimising it raises the teacher's probability of pseudo-labels that helped
  the student (h > 0) and lowers it for harmful ones (h < 0).

  Args:
    t_logits: [B, K] teacher logits (differentiated).
    pseudo_labels: [B] teacher's hard pseudo-labels ŷ (constants).
    h: [B] feedback from ``feedback_weights``.

  Returns:
    scalar loss.
  """
  return jnp.mean(h * losses.cross_entropy(t_logits, pseudo_labels))
