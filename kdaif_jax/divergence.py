"""The divergence guard of the training loop.

A run stops at the first step whose loss, influence or weights are not finite,
or whose influence solve reports ``diverged`` (LiSSA with too small a scale,
CG blown up on a (near-)singular or indefinite curvature), with a one-line
error naming the phase, the step, the checkpoint kept and the option to change.
"""

from __future__ import annotations

import math

__all__ = ["TrainingDivergedError", "diverged_error", "divergence", "watched"]


class TrainingDivergedError(RuntimeError):
  """A step produced a non-finite loss, influence or weights (or a diverged solve).

  The run stops at once; no checkpoint of a non-finite state is ever saved, so
  the phase's newest checkpoint is the last finite one.
  """


# Step metrics that must stay finite; any ``*diverged`` flag must stay false.
_WATCHED = ("loss", "teacher_loss", "w_mean", "influence_std", "cg_residual")


def _is_flag(key: str) -> bool:
  return key == "diverged" or key.endswith("_diverged")


def watched(metrics: dict) -> dict:
  """The entries of a step's (device) metrics the divergence guard reads."""
  return {k: v for k, v in metrics.items() if k in _WATCHED or _is_flag(k)}


def divergence(values: dict) -> str | None:
  """``"loss=nan"``-style text for the first bad entry of fetched step metrics, or None.

  Non-finite ``loss``, ``teacher_loss``, ``w_mean``, ``influence_std`` or
  ``cg_residual``, or a true ``diverged`` / ``*_diverged`` flag (an influence
  solve that blew up), count as divergence; other keys are ignored.
  """
  for key in [k for k in _WATCHED if k in values] + sorted(k for k in values if _is_flag(k)):
    v = float(values[key])
    if _is_flag(key):
      if v != 0:
        return f"{key}=True"
    elif not math.isfinite(v):
      return f"{key}={v}"
  return None


def _divergence_hint(cfg, phase: str, what: str) -> str:
  if _is_flag(what.split("=")[0]):
    k = cfg.kdaif
    if k.solver == "lissa":
      return f"raise config.kdaif.lissa_scale ({k.lissa_scale:g}) or use kdaif.solver=cg"
    hint = f"raise config.kdaif.damping ({k.damping:g})"  # CG blew up: a (near-)singular C
    return hint + (" or use kdaif.curvature=ggn" if k.curvature == "hessian" else "")
  if what.startswith("teacher_loss") and phase != "teacher":  # the joint teacher's update
    return f"lower config.kdaif.joint.lr ({cfg.kdaif.joint.lr:g})"
  net = "teacher" if phase == "teacher" else "student"
  opt = cfg[net].optimizer
  hint = f"lower the learning rate (config.{net}.optimizer.lr={opt.lr:g})"
  if phase == "finetune":
    hint = f"lower the learning rate (config.ssl.finetune_lr={cfg.ssl.finetune_lr:g})"
  if not opt.clip_norm:
    hint += f" or enable clipping (config.{net}.optimizer.clip_norm=1)"
  return hint


def diverged_error(cfg, phase: str, step: int, what: str, ckpt) -> TrainingDivergedError:
  """The one-line error of a diverged ``phase`` at ``step`` (after in-flight saves land).

  Args:
    cfg: the experiment config (for the hint: which option to change).
    phase: the phase's name.
    step: the step whose metrics or state went bad.
    what: ``"loss=nan"``-style text from ``divergence``.
    ckpt: the phase's ``checkpoint.PhaseCheckpoints`` (names the step kept).

  Returns:
    ``TrainingDivergedError`` to raise.
  """
  ckpt.wait()  # the saves in flight (all of finite states) complete
  kept = ckpt.latest_step()
  where = f"checkpoint at step {kept} kept" if kept is not None else f"no {phase} checkpoint yet"
  return TrainingDivergedError(
    f"training diverged: {phase} step {step} {what} ({where}); {_divergence_hint(cfg, phase, what)}"
  )
