"""Optimisers and learning-rate schedules from a config (optax)."""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(
  cfg: ml_collections.ConfigDict, steps_per_epoch: int, epochs: int
) -> optax.Schedule:
  """Learning-rate schedule: linear warm-up then constant, cosine or step decay.

  Args:
    cfg: optimizer config with lr, schedule, warmup_epochs, decay_epochs, decay_factor.
    steps_per_epoch: optimiser steps per epoch.
    epochs: length of the phase.

  Returns:
    optax schedule of the step.
  """
  total = max(1, steps_per_epoch * epochs)
  warmup = int(cfg.warmup_epochs * steps_per_epoch)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, max(1, total - warmup))
  else:
    boundaries = {int(e * steps_per_epoch) - warmup: cfg.decay_factor for e in cfg.decay_epochs}
    main = optax.piecewise_constant_schedule(cfg.lr, boundaries)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def make_optimizer(
  cfg: ml_collections.ConfigDict, steps_per_epoch: int, epochs: int
) -> optax.GradientTransformation:
  """SGD (momentum, Nesterov) or Adam(W) with L2 weight decay and a schedule.

  Args:
    cfg: optimizer config (name, lr, momentum, nesterov, weight_decay, schedule, ...).
    steps_per_epoch: optimiser steps per epoch.
    epochs: length of the phase.

  Returns:
    optax GradientTransformation.
  """
  lr = make_schedule(cfg, steps_per_epoch, epochs)
  clip = cfg.get("clip_norm", 0.0)
  head = [optax.clip_by_global_norm(clip)] if clip else []
  if cfg.name == "sgd":
    # Coupled L2 decay as in the distillation papers' PyTorch SGD.
    return optax.chain(
      *head,
      optax.add_decayed_weights(cfg.weight_decay),
      optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
    )
  if cfg.name == "adam":
    return optax.chain(*head, optax.add_decayed_weights(cfg.weight_decay), optax.adam(lr))
  return optax.chain(*head, optax.adamw(lr, weight_decay=cfg.weight_decay))


def every_k(tx: optax.GradientTransformation, k: int) -> optax.GradientTransformation:
  """``tx`` applied once every ``k`` calls, to the mean of the ``k`` gradients.

  Between those calls the updates are zero (``optax.MultiSteps``); ``k = 1``
  returns ``tx`` itself, so its state keeps its structure.

  Args:
    tx: the optimiser.
    k: calls per update, >= 1.

  Returns:
    optax GradientTransformation.
  """
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx


def feedback_optimizer(
  teacher_cfg: ml_collections.ConfigDict, lr: float, every: int, steps_per_epoch: int, epochs: int
) -> optax.GradientTransformation:
  """The teacher's optimiser for ``joint``'s feedback steps (``kdaif.joint``).

  The teacher's own optimiser (``teacher_cfg``) at a constant ``lr``, without
  warm-up, applied once every ``every`` student steps (``every_k``).

  Args:
    teacher_cfg: the teacher's optimizer config.
    lr: ``kdaif.joint.lr``.
    every: ``kdaif.joint.every``.
    steps_per_epoch, epochs: the student phase's length.

  Returns:
    optax GradientTransformation.
  """
  cfg = ml_collections.ConfigDict(teacher_cfg.to_dict())
  cfg.update(lr=lr, schedule="constant", warmup_epochs=0.0)
  return every_k(make_optimizer(cfg, steps_per_epoch, epochs), every)


def default_optimizer_config(lr: float = 0.05) -> ml_collections.ConfigDict:
  """SGD 0.9 Nesterov, weight decay 5e-4, cosine schedule, no warm-up."""
  return ml_collections.ConfigDict(
    dict(
      name="sgd",
      lr=lr,
      momentum=0.9,
      nesterov=True,
      weight_decay=5e-4,
      schedule="cosine",
      decay_epochs=(),
      decay_factor=0.1,
      warmup_epochs=0.0,
      clip_norm=0.0,  # > 0: clip the global gradient norm first
    )
  )
