"""The KD-AIF train steps and the eval step: pure per-device functions.

Each ``make_*`` returns ``fn(state, batch, ...) -> (state, metrics, ...)``
written for ONE device, with collectives over ``axis_name``; ``loop`` maps it
with ``jax.shard_map`` over the 'data' mesh and jits it. The KD-AIF student
step does docs/method.md §1-4 in one function:

  g_V = ∇L_V(θ)  ->  s = (C + λI)⁻¹ g_V  (CG warm-started from the last s)
      ->  I = −jvp(ℓ_B, s)  ->  w = map(I)  ->  one optax step on Σwℓ / Σw
      ->  (joint) teacher step on CE + μ·mean(h·CE(ŷ, T)),  h = −I/std(I).

The influence block is ``online.online_influence`` (shared with the SSL step),
which runs ``influence.batch_influence``. Influence uses the student in
inference mode (frozen batch statistics) so that examples stay independent;
the update uses train mode as usual.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from kdaif_jax import losses, objectives, online
from kdaif_jax import weights as weights_lib
from kdaif_jax.options import StepOptions
from kdaif_jax.parallel import device_local, pmean

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
  example_weights: [N] frozen per-example weights (static/periodic and the supervised
    oracle; ones otherwise).
  last_scores, last_weights: [N] influence and weight each training example
    got the last time it was scored (what weights.csv records).
  solve_stats: [3] float32 iterations, relative residual and negative-curvature
    flag of the newest inverse solve (reported on every step, refreshed or not).
  ema: exponential moving average of the student params (SSL, ``ssl.ema`` > 0).
  score_memory, score_visits: [N] each example's memory of its standardised
    scores and how often it was scored (``online.remember``;
    ``kdaif.score_memory`` > 0). None where a caller has no use for them.
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
  score_memory: jax.Array | None = None
  score_visits: jax.Array | None = None


def new_train_state(
  *, key: jax.Array, student: NetState, teacher: NetState, num_examples: int, s: PyTree = None
) -> TrainState:
  """A run's state before its first step: the one place that fills every field.

  Args:
    key: raw PRNG key data of the run (``jax.random.key_data``).
    student, teacher: the networks' initial ``NetState``s.
    num_examples: N, the size of the scored training set (per-example vectors).
    s: the initial direction (zeros like the student's params by default).

  Returns:
    ``TrainState`` at step 0: weights 1, scores and score memory 0, the EMA a
    copy of the student's params (its own buffers: the steps donate both).
  """
  n = num_examples
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    key=key,
    student=student,
    teacher=teacher,
    s=jax.tree.map(jnp.zeros_like, student.params) if s is None else s,
    example_weights=jnp.ones((n,), jnp.float32),
    last_scores=jnp.zeros((n,), jnp.float32),
    last_weights=jnp.ones((n,), jnp.float32),
    solve_stats=jnp.zeros((3,), jnp.float32),
    ema=jax.tree.map(jnp.copy, student.params),
    score_memory=jnp.zeros((n,), jnp.float32),
    score_visits=jnp.zeros((n,), jnp.float32),
  )


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
    prepare: ``images_uint8 -> float inputs`` (normalise; views arrive augmented).
    axis_name: mesh axis for gradient averaging.
    net: which ``TrainState`` field trains ("teacher" or "student").

  Returns:
    ``step(state, batch) -> (state, metrics)`` for one device; batch holds
    ``images`` [b,H,W,C] uint8 and ``labels`` [b] int32.
  """

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    x = prepare(batch["images"])
    y = batch["labels"]
    cur: NetState = getattr(state, net)

    def loss_fn(p):
      logits, ms = model.apply(p, cur.model_state, x, True)
      return jnp.mean(losses.supervised_loss(logits, y)), (ms, logits)

    new, loss, logits = update_net(cur, tx, loss_fn, axis_name)
    acc = pmean(jnp.mean(losses.accuracy(logits, y)), axis_name)
    state = state.replace(step=state.step + 1, **{net: new})
    return state, {"loss": loss, "accuracy": acc}

  return step


def make_kd_step(
  student,
  teacher,
  tx_student: optax.GradientTransformation,
  tx_teacher: optax.GradientTransformation | None,
  prepare: Callable,
  opts: StepOptions,
  *,
  refresh: bool = True,
  axis_name: str | None = "data",
) -> Callable:
  """One KD / KD-AIF student step (and the teacher step for ``joint``).

  Args:
    student, teacher: ``models.Model``s.
    tx_student: optax transformation of the student.
    tx_teacher: optax transformation of the teacher (``joint`` only).
    prepare: ``images_uint8 -> float inputs`` (normalise; views arrive augmented).
    opts: mechanism, KD loss, influence and joint options.
    refresh: recompute g_V and s this step (every R steps); otherwise reuse
      ``state.s``. Two compiled variants beat a ``lax.cond`` on XLA:CPU.
    axis_name: mesh axis.

  Returns:
    ``step(state, batch, val) -> (state, metrics, (scores [b], weights [b],
    memory [b]))`` per device. batch: images, labels, noisy [b] (analysis
    only), weights [b] (frozen per-example weights; used by static/periodic/oracle),
    optionally memory and visits [b] (``online.remember``; returned updated,
    or unchanged when unused). val: images, labels.
  """
  mech, kd = opts.mechanism, opts.kd

  def step(state: TrainState, batch: dict, val: dict):
    x = prepare(batch["images"])
    y = batch["labels"]
    stu, tea = state.student, state.teacher
    t_logits = jax.lax.stop_gradient(teacher.apply(tea.params, tea.model_state, x, False)[0])
    per_example = lambda out: kd(out, t_logits, y)
    metrics = {}
    memory = online.memory_of(batch, y.shape[0])
    if mech.online:
      state, block = online.student_influence(
        state,
        student,
        x,
        per_example,
        prepare(val["images"]),
        val["labels"],
        opts.influence,
        refresh=refresh,
        axis_name=axis_name,
        memory=memory,
      )
      scores, w, memory = block.scores, block.weights, (block.memory, memory[1])
      metrics.update(block.metrics)
    elif mech.small_loss:
      # docs/method.md §7 baseline: down-weight the largest training losses.
      logits = objectives.inference_logits(student, stu.model_state, x, opts.influence.precision)(
        stu.params
      )
      scores = per_example(logits)
      w = weights_lib.small_loss(
        scores, temperature=opts.influence.weights.temperature, axis_name=axis_name
      )
    elif mech.frozen_weights:  # static / periodic / oracle: frozen weights gathered per example
      scores = jnp.zeros_like(y, jnp.float32)
      w = batch["weights"]
    else:  # none: plain KD
      scores = jnp.zeros_like(y, jnp.float32)
      w = jnp.ones_like(scores)
    w = jax.lax.stop_gradient(w)
    # Σwℓ/Σw over the global batch: local mean(wℓ) / global mean(w), then pmean.
    denom = pmean(jnp.mean(w), axis_name)
    # A batch whose every weight is 0 (the oracle on a batch of flipped labels) is
    # a step with zero loss and gradient, not 0/0.
    denom = jnp.where(denom > 0, denom, 1.0)

    def student_loss(p):
      logits, ms = student.apply(p, stu.model_state, x, True)
      per_ex = per_example(logits)
      return jnp.mean(w * per_ex) / denom, (ms, (logits, per_ex))

    new_student, loss, (logits, per_ex) = update_net(stu, tx_student, student_loss, axis_name)
    metrics.update(
      loss=loss,
      kd_loss=pmean(jnp.mean(per_ex), axis_name),
      accuracy=pmean(jnp.mean(losses.accuracy(logits, y)), axis_name),
      **online.weight_metrics(w, scores, batch["noisy"], axis_name),
    )

    new_teacher = tea
    if mech.joint:
      new_teacher, tmetrics = _joint_teacher_update(
        teacher, tea, tx_teacher, x, y, t_logits, scores, opts.joint_mu, axis_name
      )
      metrics.update(tmetrics)
    state = state.replace(step=state.step + 1, student=new_student, teacher=new_teacher)
    return state, metrics, (scores, w, memory[0])

  return step


def _joint_teacher_update(teacher, tea: NetState, tx, x, y, t_logits_eval, scores, mu, axis_name):
  pseudo = jnp.argmax(t_logits_eval, axis=-1)
  h = online.feedback_weights(scores, axis_name)
  labelled = y >= 0

  def loss_fn(p):
    logits, ms = teacher.apply(p, tea.model_state, x, True)
    ce = losses.cross_entropy(logits, jnp.maximum(y, 0))
    sup = jnp.sum(jnp.where(labelled, ce, 0.0)) / jnp.maximum(jnp.sum(labelled), 1)
    fb = online.teacher_feedback_loss(logits, pseudo, h)
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
    prepare: ``images_uint8 -> float inputs`` (normalise, no augmentation).
    axis_name: mesh axis for the sums.

  Returns:
    ``eval(params, model_state, images, labels, mask) -> (sums dict, logits [b, K])``;
    ``mask`` [b] marks real (non-padding) examples.
  """

  def step(params, model_state, images, labels, mask):
    logits, _ = model.apply(params, model_state, prepare(images), False)
    m = mask.astype(jnp.float32)
    sums = {
      "loss": jnp.sum(m * losses.supervised_loss(logits, labels)),
      "correct": jnp.sum(m * losses.accuracy(logits, labels)),
      "count": jnp.sum(m),
    }
    if axis_name:
      sums = jax.lax.psum(sums, axis_name)
    return sums, logits

  return step
