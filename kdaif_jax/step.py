"""The KD-AIF train steps and the eval step: pure per-device functions.

Each ``make_*`` returns ``fn(state, batch, ...) -> (state, metrics, ...)``
written for ONE device, with collectives over ``axis_name``; ``trainer`` maps
it with ``jax.shard_map`` over the 'data' mesh and jits it. The KD-AIF student
step does METHOD.md sections 1-4 in one function:

  g_V = ∇L_V(θ)  ->  s = (C + λI)⁻¹ g_V  (CG warm-started from the last s)
      ->  I = −jvp(ℓ_B, s)  ->  w = map(I)  ->  one optax step on Σwℓ / Σw
      ->  (joint) teacher step on CE + μ·mean(h·CE(ŷ, T)),  h = −I/std(I).

Influence uses the student in inference mode (frozen batch statistics) so
that examples stay independent; the update uses train mode as usual.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from kdaif_jax import config as config_lib
from kdaif_jax import influence, losses
from kdaif_jax import weights as weights_lib

PyTree = Any


@flax.struct.dataclass
class NetState:
  """One network's trainable state: params, other collections, optimiser state."""

  params: PyTree
  model_state: PyTree
  opt_state: PyTree


@flax.struct.dataclass
class TrainState:
  """Everything a run carries from step to step (checkpointed whole).

  step: int32 global step of the current phase.
  key: uint32 raw PRNG key data of the run (``jax.random.key_data``).
  student, teacher: ``NetState``s.
  s: CG warm start / cached (C + λI)⁻¹ g_V, like student params.
  example_weights: [N] frozen per-example weights (static/periodic; ones otherwise).
  last_scores, last_weights: [N] influence and weight each training example
    got the last time it was scored (what weights.csv records).
  solve_stats: [3] float32 iterations, relative residual and negative-curvature
    flag of the newest inverse solve (reported on every step, refreshed or not).
  ema: exponential moving average of the student params (SSL, ``ssl.ema`` > 0).
  """

  step: jax.Array
  key: jax.Array
  student: NetState
  teacher: NetState
  s: PyTree
  example_weights: jax.Array
  last_scores: jax.Array
  last_weights: jax.Array
  solve_stats: jax.Array
  ema: PyTree


def pmean(tree, axis_name: str | None):
  """``jax.lax.pmean`` over ``axis_name``, or the identity when it is None."""
  return jax.lax.pmean(tree, axis_name) if axis_name else tree


def device_local(tree, axis_name: str | None):
  """Marks replicated params as per-device values before differentiating.

  Inside ``shard_map``, the gradient with respect to a replicated (device-
  invariant) input is summed over devices by the transpose rule. Casting the
  params to 'varying' first keeps each device's gradient local, so that the
  explicit ``pmean`` that follows gives the global-batch mean, as in pmap.
  """
  return jax.lax.pcast(tree, axis_name, to="varying") if axis_name else tree


def _global_stats(x: jax.Array, mask: jax.Array, axis_name) -> dict[str, jax.Array]:
  """Masked mean/std/min/max over the global batch."""
  m = mask.astype(jnp.float32)
  n, s1, s2 = jnp.sum(m), jnp.sum(m * x), jnp.sum(m * x * x)
  lo = jnp.min(jnp.where(mask, x, jnp.inf))
  hi = jnp.max(jnp.where(mask, x, -jnp.inf))
  if axis_name:
    n, s1, s2 = jax.lax.psum((n, s1, s2), axis_name)
    lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
  mean = s1 / jnp.maximum(n, 1.0)
  std = jnp.sqrt(jnp.maximum(s2 / jnp.maximum(n, 1.0) - mean * mean, 0.0))
  return {"mean": mean, "std": std, "min": lo, "max": hi}


def _masked_mean(x, mask, axis_name):
  m = mask.astype(jnp.float32)
  num, den = jnp.sum(m * x), jnp.sum(m)
  if axis_name:
    num, den = jax.lax.psum((num, den), axis_name)
  return num / jnp.maximum(den, 1.0)


def apply_update(net: NetState, tx: optax.GradientTransformation, grads, model_state) -> NetState:
  """One optax update of ``net`` with ``grads``; ``model_state`` replaces the old one."""
  updates, opt_state = tx.update(grads, net.opt_state, net.params)
  return NetState(optax.apply_updates(net.params, updates), model_state, opt_state)


def update_net(
  net: NetState, tx: optax.GradientTransformation, loss_fn: Callable, axis_name: str | None
) -> tuple[NetState, jax.Array, Any]:
  """One data-parallel optax step of ``net``: the pmap-style update every step shares.

  Gradients are taken at ``device_local`` params (so shard_map does not already
  sum them over devices), then gradients, the new model state and the loss are
  averaged over ``axis_name`` and applied.

  Args:
    net: the network's state.
    tx: its optax transformation.
    loss_fn: ``params -> (loss, (model_state, aux))`` on the local batch.
    axis_name: mesh axis, or None.

  Returns:
    (updated net, global mean loss, aux as returned by ``loss_fn``, not reduced).
  """
  (loss, (ms, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    device_local(net.params, axis_name)
  )
  grads, ms, loss = pmean((grads, ms, loss), axis_name)
  return apply_update(net, tx, grads, ms), loss, aux


def weight_metrics(w, scores, batch, axis_name) -> dict[str, jax.Array]:
  """Global statistics of the batch's weights (and by flipped/clean label)."""
  ones = jnp.ones_like(w, dtype=bool)
  st = _global_stats(w, ones, axis_name)
  out = {f"w_{k}": v for k, v in st.items()}
  out["w_below_half"] = _masked_mean((w < 0.5).astype(jnp.float32), ones, axis_name)
  out["influence_std"] = _global_stats(scores, ones, axis_name)["std"]
  noisy = batch["noisy"]
  out["w_noisy_mean"] = _masked_mean(w, noisy, axis_name)
  out["w_clean_mean"] = _masked_mean(w, ~noisy, axis_name)
  return out


def make_supervised_step(
  model,
  tx: optax.GradientTransformation,
  prepare: Callable,
  *,
  axis_name: str | None = "data",
  net: str = "teacher",
) -> Callable:
  """Plain cross-entropy training of one network (the teacher phase).

  Args:
    model: ``models.Model``.
    tx: optax transformation.
    prepare: ``(key, images_uint8) -> float inputs`` (augment + normalise).
    axis_name: mesh axis for gradient averaging.
    net: which ``TrainState`` field trains ("teacher" or "student").

  Returns:
    ``step(state, batch) -> (state, metrics)`` for one device; batch holds
    ``images`` [b,H,W,C] uint8 and ``labels`` [b] int32.
  """

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    x = prepare(step_key(state, axis_name), batch["images"])
    y = batch["labels"]
    cur: NetState = getattr(state, net)

    def loss_fn(p):
      logits, ms = model.apply(p, cur.model_state, x, True)
      return jnp.mean(losses.cross_entropy(logits, y)), (ms, logits)

    new, loss, logits = update_net(cur, tx, loss_fn, axis_name)
    acc = pmean(jnp.mean(losses.accuracy(logits, y)), axis_name)
    state = state.replace(step=state.step + 1, **{net: new})
    return state, {"loss": loss, "accuracy": acc}

  return step


def step_key(state: TrainState, axis_name: str | None) -> jax.Array:
  """A fresh PRNG key per (step, device); ``state.key`` holds raw key data (checkpointable)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  return jax.random.fold_in(key, jax.lax.axis_index(axis_name)) if axis_name else key


def make_kd_step(
  student,
  teacher,
  tx_student: optax.GradientTransformation,
  tx_teacher: optax.GradientTransformation | None,
  prepare: Callable,
  cfg,
  *,
  refresh: bool = True,
  axis_name: str | None = "data",
) -> Callable:
  """One KD / KD-AIF student step (and the teacher step for ``joint``).

  Args:
    student, teacher: ``models.Model``s.
    tx_student: optax transformation of the student.
    tx_teacher: optax transformation of the teacher (``joint`` only).
    prepare: ``(key, images_uint8) -> float inputs`` (augment + normalise).
    cfg: the run's config (reads ``kd`` and ``kdaif``).
    refresh: recompute g_V and s this step (every R steps); otherwise reuse
      ``state.s``. Two compiled variants beat a ``lax.cond`` on XLA:CPU.
    axis_name: mesh axis.

  Returns:
    ``step(state, batch, val) -> (state, metrics, (scores [b], weights [b]))``
    per device. batch: images, labels, noisy [b] (analysis only), weights [b]
    (frozen per-example weights; used by static/periodic). val: images, labels.
  """
  kd, k = cfg.kd, cfg.kdaif
  mechanism = k.mechanism
  online = mechanism in ("online", "joint")

  def kd_per_example(out, t_logits, y):
    return losses.kd_loss(out, t_logits, y, temperature=kd.temperature, alpha=kd.alpha)

  def step(state: TrainState, batch: dict, val: dict):
    x = prepare(step_key(state, axis_name), batch["images"])
    y = batch["labels"]
    stu, tea = state.student, state.teacher
    t_logits = jax.lax.stop_gradient(teacher.apply(tea.params, tea.model_state, x, False)[0])
    metrics = {}
    s = state.s
    params = device_local(stu.params, axis_name)
    if online:
      train_loss = influence.PerExampleLoss(
        outputs_fn=lambda p: student.apply(p, stu.model_state, x, False)[0],
        loss_fn=lambda out: kd_per_example(out, t_logits, y),
      )
      xv = prepare(None, val["images"])
      val_loss = lambda p: jnp.mean(
        losses.cross_entropy(student.apply(p, stu.model_state, xv, False)[0], val["labels"])
      )
      state, s, scores, w, solve_metrics = online_influence(
        state, params, train_loss, val_loss, k, refresh=refresh, axis_name=axis_name
      )
      metrics.update(solve_metrics)
    elif mechanism == "none":
      scores = jnp.zeros_like(y, jnp.float32)
      w = jnp.ones_like(scores)
    elif mechanism == "small_loss":
      # METHOD.md section 7 baseline: down-weight the largest training losses.
      out = student.apply(stu.params, stu.model_state, x, False)[0]
      scores = kd_per_example(out, t_logits, y)
      w = weights_lib.small_loss(scores, temperature=k.weight_temperature, axis_name=axis_name)
    else:  # static / periodic: frozen weights gathered per example
      scores = jnp.zeros_like(y, jnp.float32)
      w = batch["weights"]
    w = jax.lax.stop_gradient(w)
    # Σwℓ/Σw over the global batch: local mean(wℓ) / global mean(w), then pmean.
    denom = pmean(jnp.mean(w), axis_name)

    def student_loss(p):
      logits, ms = student.apply(p, stu.model_state, x, True)
      per_ex = kd_per_example(logits, t_logits, y)
      return jnp.mean(w * per_ex) / denom, (ms, (logits, per_ex))

    new_student, loss, (logits, per_ex) = update_net(stu, tx_student, student_loss, axis_name)
    metrics.update(
      loss=loss,
      kd_loss=pmean(jnp.mean(per_ex), axis_name),
      accuracy=pmean(jnp.mean(losses.accuracy(logits, y)), axis_name),
      **weight_metrics(w, scores, batch, axis_name),
    )

    new_teacher = tea
    if mechanism == "joint":
      new_teacher, tmetrics = _joint_teacher_update(
        teacher, tea, tx_teacher, x, y, t_logits, scores, k.joint.mu, axis_name
      )
      metrics.update(tmetrics)
    state = state.replace(step=state.step + 1, student=new_student, teacher=new_teacher, s=s)
    return state, metrics, (scores, w)

  return step


def online_influence(
  state: TrainState,
  params,
  train_loss: influence.PerExampleLoss,
  val_loss: Callable,
  k,
  *,
  refresh: bool,
  axis_name: str | None,
):
  """METHOD.md sections 1-2 for the batch, shared by the supervised and SSL steps.

  On a refresh step: g_V = pmean ∇L_V, then s = (C + λI)⁻¹ g_V with the
  device-averaged curvature of the batch (warm-started from ``state.s``);
  otherwise s and its solve statistics are reused. Then I = −jvp(ℓ_B, s) and
  the weights (stop-gradient, mean 1 over the global batch).

  Args:
    state: the step's input state (s, solve_stats).
    params: student params, already ``device_local``.
    train_loss: per-example training loss of the local batch.
    val_loss: ``params -> []`` validation loss of the local validation shard.
    k: the ``kdaif`` config.
    refresh: recompute g_V and s.
    axis_name: mesh axis.

  Returns:
    (state with solve_stats, s, scores [b], weights [b], metrics dict).
  """
  if refresh:
    g_v = pmean(jax.grad(val_loss)(params), axis_name)
    if k.solver == "identity":
      matvec = lambda v: v
    else:
      local_mv = influence.curvature_matvec(train_loss, params, k.curvature)
      matvec = lambda v: pmean(local_mv(device_local(v, axis_name)), axis_name)
    s, info = influence.inverse_hvp(
      matvec,
      g_v,
      solver=k.solver,
      damping=k.damping,
      maxiter=k.cg_iters,
      tol=k.cg_tol,
      x0=state.s if k.warm_start else None,
      lissa_scale=k.lissa_scale,
      unroll=config_lib.unroll_option(k.unroll),
    )
    stats = jnp.stack(
      [
        info.iterations.astype(jnp.float32),
        info.residual,
        info.negative_curvature.astype(jnp.float32),
      ]
    )
  else:
    s, stats = state.s, state.solve_stats
  scores = influence.scores(train_loss, params, device_local(s, axis_name))
  wkw = {"temperature": k.weight_temperature} if k.weights == "sigmoid" else {}
  w = jax.lax.stop_gradient(weights_lib.get(k.weights)(scores, axis_name=axis_name, **wkw))
  metrics = {"cg_iterations": stats[0], "cg_residual": stats[1], "cg_negative_curvature": stats[2]}
  return state.replace(solve_stats=stats), s, scores, w, metrics


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
  std = _global_stats(scores, jnp.ones_like(scores, dtype=bool), axis_name)["std"]
  return jax.lax.stop_gradient(-scores / (std + eps))


def teacher_feedback_loss(t_logits: jax.Array, pseudo_labels: jax.Array, h: jax.Array) -> jax.Array:
  """mean_j h_j · CE(ŷ_j, T(x_j)) (METHOD.md section 4, ``joint``).

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


def _joint_teacher_update(teacher, tea: NetState, tx, x, y, t_logits_eval, scores, mu, axis_name):
  pseudo = jnp.argmax(t_logits_eval, axis=-1)
  h = feedback_weights(scores, axis_name)
  labelled = y >= 0

  def loss_fn(p):
    logits, ms = teacher.apply(p, tea.model_state, x, True)
    ce = losses.cross_entropy(logits, jnp.maximum(y, 0))
    sup = jnp.sum(jnp.where(labelled, ce, 0.0)) / jnp.maximum(jnp.sum(labelled), 1)
    fb = teacher_feedback_loss(logits, pseudo, h)
    return sup + mu * fb, (ms, (sup, fb))

  new, loss, (sup, fb) = update_net(tea, tx, loss_fn, axis_name)
  sup, fb = pmean((sup, fb), axis_name)
  return new, {
    "teacher_loss": loss,
    "teacher_ce": sup,
    "teacher_feedback": fb,
  }


def make_eval_step(model, prepare: Callable, *, axis_name: str | None = "data") -> Callable:
  """Per-device evaluation of a chunk: summed loss/correct/count and the logits.

  Args:
    model: ``models.Model``.
    prepare: ``(None, images_uint8) -> float inputs`` (normalise, no augmentation).
    axis_name: mesh axis for the sums.

  Returns:
    ``eval(params, model_state, images, labels, mask) -> (sums dict, logits [b, K])``;
    ``mask`` [b] marks real (non-padding) examples.
  """

  def step(params, model_state, images, labels, mask):
    logits, _ = model.apply(params, model_state, prepare(None, images), False)
    m = mask.astype(jnp.float32)
    sums = {
      "loss": jnp.sum(m * losses.cross_entropy(logits, labels)),
      "correct": jnp.sum(m * losses.accuracy(logits, labels)),
      "count": jnp.sum(m),
    }
    if axis_name:
      sums = jax.lax.psum(sums, axis_name)
    return sums, logits

  return step
