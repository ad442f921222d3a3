"""Semi-supervised KD-AIF (METHOD.md section 5): the per-device SSL step.

Teacher on weak views, student on strong views (UDA / Meta Pseudo Labels):

  student:  λ_u · Σ_j w_j ℓ_j / Σ_j w_j  +  mean_l CE(y_l, S(weak(x_l)))
            ℓ_j = τ²·KL(softmax(T(weak u_j)/τ) ‖ softmax(S(strong u_j)/τ))   (targets "soft")
                 or CE(argmax T(weak u_j), S(strong u_j))                     (targets "hard")
            w_j = KD-AIF weights of the unlabelled examples (none: 1)
  teacher (joint only):
            mean_l CE(y_l, T(weak x_l))
            + λ_uda · mean_j m_j·KL(sharpen(T(weak u_j)) ‖ T(strong u_j))    (UDA, optional)
            + μ · mean_j h_j · CE(ŷ_j, T(weak u_j)),   h_j = −I_j / std(I)

ŷ_j is the teacher's hard pseudo-label on the weak view, m_j = 1 where the
teacher's confidence passes the UDA threshold. The student's weights and the
teacher's feedback both come from one influence computation on the batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from kdaif_jax import influence, losses
from kdaif_jax.step import (
  NetState,
  TrainState,
  device_local,
  feedback_weights,
  online_influence,
  pmean,
  step_key,
  teacher_feedback_loss,
  update_net,
  weight_metrics,
)


def unlabelled_loss(
  student_logits: jax.Array, teacher_logits: jax.Array, *, targets: str, temperature: float
) -> jax.Array:
  """Per-example loss of the student on unlabelled examples, [B].

  Args:
    student_logits: [B, K] on strong views.
    teacher_logits: [B, K] on weak views (constants).
    targets: "soft" (τ²·KL at temperature τ) or "hard" (CE with argmax pseudo-labels).
    temperature: τ for soft targets.

  Returns:
    [B] losses.
  """
  if targets == "hard":
    return losses.cross_entropy(student_logits, jnp.argmax(teacher_logits, axis=-1))
  return losses.kd_loss(student_logits, teacher_logits, None, temperature=temperature)


def uda_consistency(
  t_weak: jax.Array, t_strong: jax.Array, *, threshold: float, temperature: float
) -> tuple[jax.Array, jax.Array]:
  """UDA's confidence-masked consistency (Xie et al. 2020), per example.

  Args:
    t_weak: [B, K] teacher logits on weak views (targets; gradient stopped here).
    t_strong: [B, K] teacher logits on strong views (differentiated).
    threshold: keep examples whose weak-view max probability ≥ threshold.
    temperature: sharpening temperature of the targets (< 1 sharpens).

  Returns:
    ([B] masked KL(sharpened weak ‖ strong), [B] float mask).
  """
  t_weak = jax.lax.stop_gradient(t_weak)
  mask = (jnp.max(jax.nn.softmax(t_weak), axis=-1) >= threshold).astype(jnp.float32)
  target = jax.nn.softmax(t_weak / temperature)
  kl = losses.cross_entropy(t_strong, target) + jnp.sum(target * jnp.log(target + 1e-12), -1)
  return mask * kl, mask


def make_ssl_step(
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
  """One semi-supervised step (student; teacher too for ``joint``).

  Args:
    student, teacher: ``models.Model``s.
    tx_student, tx_teacher: optax transformations (teacher: ``joint`` only).
    prepare: ``(key, uint8 images) -> normalised inputs``; the views arrive
      already augmented (the trainer augments the global batch outside
      ``shard_map``, so 1 and N devices see the same views).
    cfg: run config (reads kd, kdaif, ssl).
    refresh: recompute g_V and s this step; otherwise reuse ``state.s``.
    axis_name: mesh axis.

  Returns:
    ``step(state, batch, val) -> (state, metrics, (scores [bu], weights [bu]))``;
    batch: lab_images [bl] (weak view), lab_labels [bl], unl_weak [bu] and
    unl_strong [bu] (two views of the same unlabelled images); val: images, labels.
  """
  k, ssl = cfg.kdaif, cfg.ssl
  mech = k.mechanism
  online = mech in ("online", "joint")
  per_ex = lambda out, t: unlabelled_loss(
    out, t, targets=ssl.targets, temperature=cfg.kd.temperature
  )

  def step(state: TrainState, batch: dict, val: dict):
    key = step_key(state, axis_name)
    xl, yl = prepare(key, batch["lab_images"]), batch["lab_labels"]
    xw, xs = prepare(key, batch["unl_weak"]), prepare(key, batch["unl_strong"])
    stu, tea = state.student, state.teacher
    t_weak = jax.lax.stop_gradient(teacher.apply(tea.params, tea.model_state, xw, False)[0])
    metrics, s = {}, state.s
    params = device_local(stu.params, axis_name)
    if online:
      train_loss = influence.PerExampleLoss(
        outputs_fn=lambda p: student.apply(p, stu.model_state, xs, False)[0],
        loss_fn=lambda out: per_ex(out, t_weak),
      )
      xv = prepare(None, val["images"])
      val_loss = lambda p: jnp.mean(
        losses.cross_entropy(student.apply(p, stu.model_state, xv, False)[0], val["labels"])
      )
      state, s, scores, w, solve_metrics = online_influence(
        state, params, train_loss, val_loss, k, refresh=refresh, axis_name=axis_name
      )
      metrics.update(solve_metrics)
    else:
      scores = jnp.zeros((xs.shape[0],), jnp.float32)
      w = jnp.ones_like(scores)
    denom = pmean(jnp.mean(w), axis_name)
    nl = xl.shape[0]

    def student_loss(p):
      # One forward over labelled + unlabelled so batch norm sees the joint batch.
      logits, ms = student.apply(p, stu.model_state, jnp.concatenate([xl, xs]), True)
      lab = jnp.mean(losses.cross_entropy(logits[:nl], yl))
      unl_per = per_ex(logits[nl:], t_weak)
      unl = jnp.mean(w * unl_per) / denom
      return lab + ssl.unlabelled_weight * unl, (ms, (lab, unl_per, logits[:nl]))

    new_student, loss, (lab, unl_per, lab_logits) = update_net(
      stu, tx_student, student_loss, axis_name
    )
    lab = pmean(lab, axis_name)
    ema = state.ema
    if ssl.ema > 0:
      ema = jax.tree.map(lambda e, p: ssl.ema * e + (1 - ssl.ema) * p, ema, new_student.params)
    metrics.update(
      loss=loss,
      labelled_loss=lab,
      unlabelled_loss=pmean(jnp.mean(unl_per), axis_name),
      accuracy=pmean(jnp.mean(losses.accuracy(lab_logits, yl)), axis_name),
      **weight_metrics(w, scores, {"noisy": jnp.zeros(w.shape, bool)}, axis_name),
    )
    new_teacher = tea
    if mech == "joint":
      new_teacher, tm = _teacher_update(
        teacher, tea, tx_teacher, xl, yl, xw, xs, t_weak, scores, cfg, axis_name
      )
      metrics.update(tm)
    state = state.replace(
      step=state.step + 1, student=new_student, teacher=new_teacher, s=s, ema=ema
    )
    return state, metrics, (scores, w)

  return step


def _teacher_update(teacher, tea: NetState, tx, xl, yl, xw, xs, t_weak, scores, cfg, axis_name):
  ssl, mu = cfg.ssl, cfg.kdaif.joint.mu
  pseudo = jnp.argmax(t_weak, axis=-1)
  h = feedback_weights(scores, axis_name)
  nl, nu = xl.shape[0], xw.shape[0]
  use_uda = ssl.uda_weight > 0

  def loss_fn(p):
    inputs = [xl, xw] + ([xs] if use_uda else [])
    logits, ms = teacher.apply(p, tea.model_state, jnp.concatenate(inputs), True)
    sup = jnp.mean(losses.cross_entropy(logits[:nl], yl))
    fb = teacher_feedback_loss(logits[nl : nl + nu], pseudo, h)
    total = sup + mu * fb
    uda = jnp.zeros(())
    if use_uda:
      per, _ = uda_consistency(
        t_weak, logits[nl + nu :], threshold=ssl.uda_threshold, temperature=ssl.uda_temperature
      )
      uda = jnp.mean(per)
      total = total + ssl.uda_weight * uda
    return total, (ms, (sup, fb, uda))

  new, loss, (sup, fb, uda) = update_net(tea, tx, loss_fn, axis_name)
  sup, fb, uda = pmean((sup, fb, uda), axis_name)
  return new, {
    "teacher_loss": loss,
    "teacher_ce": sup,
    "teacher_feedback": fb,
    "teacher_uda": uda,
  }
