"""Semi-supervised KD-AIF (docs/method.md §5): the per-device SSL step.

Teacher on weak views, student on strong views (UDA / Meta Pseudo Labels):

  student:  λ_u · Σ_j w_j ℓ_j / Σ_j w_j  +  mean_l CE(y_l, S(weak(x_l)))
            ℓ_j = τ²·KL(softmax(T(weak u_j)/τ) ‖ softmax(S(strong u_j)/τ))   (targets "soft")
                 or CE(argmax T(weak u_j), S(strong u_j))                     (targets "hard")
                 or 1[max p_j ≥ c]·CE(argmax p_j, S(strong u_j)),
                    p_j = softmax(S(weak u_j)) (constant)                     ("fixmatch")
                 or CE(y_j, S(strong u_j)), y_j the hidden true label         ("labels":
                    a reference, every example labelled, not a method)
            w_j = KD-AIF weights of the unlabelled examples (none: 1; oracle:
                  1 where the teacher's pseudo-label is the hidden true label, else 0)
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

from kdaif_jax import losses, online
from kdaif_jax.options import StepOptions
from kdaif_jax.parallel import pmean
from kdaif_jax.step import NetState, TrainState, update_net


def unlabelled_loss(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  *,
  targets: str,
  temperature: float,
  threshold: float = 0.95,
) -> jax.Array:
  """Per-example loss of the student on unlabelled examples, [B].

  Args:
    student_logits: [B, K] on strong views.
    teacher_logits: [B, K] on weak views (constants): the teacher's, or for
      "fixmatch" the student's own.
    targets: "soft" (τ²·KL at temperature τ), "hard" (CE with argmax
      pseudo-labels) or "fixmatch" (hard pseudo-labels of the examples whose
      weak-view confidence max softmax ≥ ``threshold``, 0 for the others;
      Sohn et al. 2020).
    temperature: τ for soft targets.
    threshold: FixMatch's confidence threshold c.

  Returns:
    [B] losses.
  """
  if targets == "fixmatch":
    confident = jnp.max(jax.nn.softmax(teacher_logits), axis=-1) >= threshold
    ce = losses.cross_entropy(student_logits, jnp.argmax(teacher_logits, axis=-1))
    return jnp.where(confident, ce, 0.0)
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
  opts: StepOptions,
  *,
  refresh: bool = True,
  axis_name: str | None = "data",
) -> Callable:
  """One semi-supervised step (student; teacher too for ``joint``).

  Args:
    student, teacher: ``models.Model``s.
    tx_student, tx_teacher: optax transformations (teacher: ``joint`` only).
    prepare: ``uint8 images -> normalised inputs``; the views arrive already
      augmented (the loop augments the global batch outside ``shard_map``, so
      1 and N devices see the same views).
    opts: mechanism (none, online, joint or the oracle reference), KD
      temperature, influence, μ and the SSL options.
    refresh: recompute g_V and s this step; otherwise reuse ``state.s``.
    axis_name: mesh axis.

  Returns:
    ``step(state, batch, val) -> (state, metrics, (scores [bu], weights [bu]))``;
    batch: lab_images [bl] (weak view), lab_labels [bl], unl_weak [bu] and
    unl_strong [bu] (two views of the same unlabelled images); val: images, labels.
  """
  mech, ssl = opts.mechanism, opts.ssl
  per_ex = lambda out, t: unlabelled_loss(
    out, t, targets=ssl.targets, temperature=opts.kd.temperature, threshold=ssl.fixmatch_threshold
  )
  fixmatch = ssl.targets == "fixmatch"
  true_labels = ssl.targets == "labels"

  def step(state: TrainState, batch: dict, val: dict):
    xl, yl = prepare(batch["lab_images"]), batch["lab_labels"]
    xw, xs = prepare(batch["unl_weak"]), prepare(batch["unl_strong"])
    stu, tea = state.student, state.teacher
    t_weak = jax.lax.stop_gradient(teacher.apply(tea.params, tea.model_state, xw, False)[0])
    metrics = {}
    memory = online.memory_of(batch, xs.shape[0])
    if mech.online:
      state, block = online.student_influence(
        state,
        student,
        xs,
        lambda out: per_ex(out, t_weak),
        prepare(val["images"]),
        val["labels"],
        opts.influence,
        refresh=refresh,
        axis_name=axis_name,
        memory=memory,
      )
      scores, w, memory = block.scores, block.weights, (block.memory, memory[1])
      metrics.update(block.metrics)
    else:
      scores = jnp.zeros((xs.shape[0],), jnp.float32)
      w = _oracle_weights(t_weak, batch) if mech.oracle else jnp.ones_like(scores)
    denom = pmean(jnp.mean(w), axis_name)
    # A batch of wrong pseudo-labels only (the oracle) is a step without the
    # unlabelled term, not 0/0.
    denom = jnp.where(denom > 0, denom, 1.0)
    nl, nu = xl.shape[0], xs.shape[0]

    def student_loss(p):
      # One forward over labelled + unlabelled so batch norm sees the joint batch
      # (FixMatch adds the weak views: the student's own targets).
      inputs = [xl, xs, xw] if fixmatch else [xl, xs]
      logits, ms = student.apply(p, stu.model_state, jnp.concatenate(inputs), True)
      lab = jnp.mean(losses.cross_entropy(logits[:nl], yl))
      if true_labels:
        hidden = _hidden_labels(batch, "ssl.targets=labels")
        unl_per = losses.cross_entropy(logits[nl : nl + nu], hidden)
      else:
        targets = jax.lax.stop_gradient(logits[nl + nu :]) if fixmatch else t_weak
        unl_per = per_ex(logits[nl : nl + nu], targets)
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
      # The teacher's pseudo-labels against the hidden true labels (analysis only).
      pseudo_label_accuracy=_pseudo_label_accuracy(t_weak, batch, axis_name),
      **online.weight_metrics(w, scores, jnp.zeros(w.shape, bool), axis_name),
    )
    new_teacher = tea
    if mech.joint:
      new_teacher, tm = _teacher_update(
        teacher, tea, tx_teacher, xl, yl, xw, xs, t_weak, scores, opts, axis_name
      )
      metrics.update(tm)
    state = state.replace(step=state.step + 1, student=new_student, teacher=new_teacher, ema=ema)
    return state, metrics, (scores, w, memory[0])

  return step


def _oracle_weights(t_weak: jax.Array, batch: dict) -> jax.Array:
  """The semi-supervised oracle's weights, [B]: 1 where the teacher's weak-view
  pseudo-label equals the hidden true label, 0 elsewhere.

  A benchmark reference (what perfect detection of the teacher's wrong targets
  gives), not a method: it reads the labels that the split hides from training.
  """
  right = jnp.argmax(t_weak, axis=-1) == _hidden_labels(batch, "mechanism oracle")
  return right.astype(jnp.float32)


def _hidden_labels(batch: dict, who: str) -> jax.Array:
  """The batch's hidden true labels of the unlabelled examples, [B], for the
  references that read them (the oracle, ``ssl.targets=labels``); checked at trace
  time, before any compile."""
  if "unl_true_labels" not in batch:
    raise ValueError(
      f"{who} needs the batch's unl_true_labels (the hidden labels of the "
      "unlabelled examples); the trainer's loop provides them"
    )
  return batch["unl_true_labels"]


def _pseudo_label_accuracy(t_weak: jax.Array, batch: dict, axis_name: str | None) -> jax.Array:
  """Share of the teacher's weak-view pseudo-labels equal to the hidden true label.

  NaN when the batch carries no true labels (a caller without them).
  """
  true = batch.get("unl_true_labels")
  if true is None:
    return jnp.full((), jnp.nan, jnp.float32)
  return pmean(jnp.mean(losses.accuracy(t_weak, true)), axis_name)


def _teacher_update(teacher, tea: NetState, tx, xl, yl, xw, xs, t_weak, scores, opts, axis_name):
  ssl, mu = opts.ssl, opts.joint_mu
  pseudo = jnp.argmax(t_weak, axis=-1)
  h = online.feedback_weights(scores, axis_name)
  nl, nu = xl.shape[0], xw.shape[0]
  use_uda = ssl.uda_weight > 0

  def loss_fn(p):
    inputs = [xl, xw] + ([xs] if use_uda else [])
    logits, ms = teacher.apply(p, tea.model_state, jnp.concatenate(inputs), True)
    sup = jnp.mean(losses.cross_entropy(logits[:nl], yl))
    fb = online.teacher_feedback_loss(logits[nl : nl + nu], pseudo, h)
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
