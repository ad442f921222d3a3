"""The end of a run: final evaluation, the whole-set influence record, and the files.

``finish`` evaluates both networks, scores every training (or unlabelled)
example with the final student, and writes weights.csv, predictions.npz,
summary.json and the SAFE report into the workdir. ``collapse_warnings`` flags a
run that finished but did not learn (accuracy at chance, a loss that rose): they
go to the log, to summary.json's ``warnings`` and to the report.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from kdaif_jax import evaluation, loop, metrics, models, parallel, trajectory
from kdaif_jax import step as step_lib
from kdaif_jax.logs import log
from kdaif_jax.loop import PhaseTime
from kdaif_jax.rng import RunStream, run_key


def finish(
  run: loop.Run,
  state: step_lib.TrainState,
  scorer,
  times: dict[str, PhaseTime],
  t_start: float,
  trajectory_epochs: tuple[int, ...] = (),
) -> dict:
  """Evaluates, scores and writes the run's result files; returns the summary.

  Args:
    run: the run context.
    state: the final state.
    scorer: the whole-set scorer (``scoring.make_whole_set_scorer``).
    times: the phases' wall times and step rates.
    t_start: ``time.time()`` when this invocation started.
    trajectory_epochs: the epochs whose saved whole-set scores the final ones join
      in weights.csv's ``trajectory_influence`` (``kdaif_jax.trajectory``; empty:
      no such column).

  Returns:
    The summary dict also written to ``WORKDIR/summary.json``.
  """
  cfg, ds = run.cfg, run.ds
  t0 = time.time()
  results = {}
  for name, model in (("teacher", run.teacher), ("student", run.student)):
    net = evaluation.eval_net(run, state, name)
    for split in ("val", "test"):
      results[(name, split)] = evaluation.evaluate(
        run, model, net, getattr(ds, split), return_logits=(split == "test")
      )
  log.info(
    "final: whole-set influence and self-influence of the %d training examples", len(ds.train)
  )
  final_scores, _ = scorer(
    state, loop.scored_arrays(run), run_key(cfg.seed, RunStream.FINAL_SCORING)
  )
  mech = run.mechanism
  if mech.plain:
    infl, w = final_scores, np.ones_like(final_scores)
  elif mech.small_loss or mech.oracle:  # weights from losses / the flips, not from influence
    infl, w = final_scores, parallel.to_host(state.last_weights)
  else:
    infl, w = parallel.to_host((state.last_scores, state.last_weights))
  self_infl = _self_influence(run, state, scorer, np.full_like(final_scores, np.nan))
  main = parallel.is_main_process()  # every process computes; process 0 writes the files
  traj = _trajectory(run, trajectory_epochs, final_scores) if trajectory_epochs and main else None
  if main:
    _write_weights_csv(run, infl, w, final_scores, self_infl, traj and traj[0])
  if ds.text is not None and main:
    _add_text_column(run)
  if main:
    np.savez_compressed(
      os.path.join(run.workdir, "predictions.npz"),
      labels=ds.test.clean_labels,
      ids=ds.test.ids,
      teacher_logits=results[("teacher", "test")]["logits"],
      student_logits=results[("student", "test")]["logits"],
    )
  final_seconds = time.time() - t0
  warnings = collapse_warnings(run, results)
  for message in warnings:
    log.warning("warning: %s", message)
  # Plain KD has no weights: its detection is that of the final whole-set influence.
  det = metrics.detection_metrics(-final_scores if mech.plain else w, run.scored.noisy)
  count = lambda net: models.param_count(getattr(state, net).params)
  summary = {
    "dataset": ds.name,
    "mechanism": mech.name,
    "noise_rate": float(cfg.data.noise.rate),
    "noise_kind": cfg.data.noise.kind,
    "num_train": len(ds.train),
    "num_unlabelled": len(ds.unlabelled) if run.semi_supervised else 0,
    "num_scored": len(run.scored),
    "teacher": {
      "architecture": cfg.teacher.model,
      "parameters": count("teacher"),
      "test_accuracy": results[("teacher", "test")]["accuracy"],
      "val_accuracy": results[("teacher", "val")]["accuracy"],
    },
    "student": {
      "architecture": cfg.student.model,
      "parameters": count("student"),
      "test_accuracy": results[("student", "test")]["accuracy"],
      "val_accuracy": results[("student", "val")]["accuracy"],
      "test_loss": results[("student", "test")]["loss"],
    },
    "noise_detection": det,
    "wall_time_s": {
      **{k: round(t.seconds, 3) for k, t in times.items()},
      "final": round(final_seconds, 3),
      "total_this_invocation": round(time.time() - t_start, 3),
    },
    # Rates of the steps run in this invocation; a phase resumed at its end ran none
    # and has no rate (steps_this_invocation says which).
    "steps_per_second": {
      k: round(t.steps_per_second, 3) for k, t in times.items() if t.steps_per_second is not None
    },
    "steps_this_invocation": {k: t.steps for k, t in times.items()},
    "warnings": warnings,
    "device_count": run.mesh.size,
    "process_count": jax.process_count(),
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "jax_version": jax.__version__,
  }
  if traj is not None:
    summary["trajectory"] = traj[1]
  if ds.text is not None:  # GLUE: the task's official metrics on its test (dev) split
    from kdaif_jax.text.metrics import TASK_METRICS

    summary["task_metrics"] = {
      net: {k: results[(net, "test")][k] for k in TASK_METRICS[ds.text.task]}
      for net in ("teacher", "student")
    }
  if main:
    with open(os.path.join(run.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1, sort_keys=True)
  if cfg.report and main:
    try:
      from kdaif_jax import report  # matplotlib is only imported when a report is written

      out = report.write_report(run.workdir)
      log.info("report: %s", out["report_md"])
    except Exception as e:  # noqa: BLE001 - a report problem must not lose a finished run
      log.warning("report could not be written: %s", e)
  # GLUE: the task's headline metric (stsb has no accuracy); images: accuracy.
  tm = summary.get("task_metrics")
  name = next(iter(tm["student"])) if tm else "acc"
  head = lambda net: tm[net][name] if tm else summary[net]["test_accuracy"]
  log.info(
    "done: teacher %s test %s %.4f | student %s test %s %.4f (%s)",
    cfg.teacher.model,
    name,
    head("teacher"),
    cfg.student.model,
    name,
    head("student"),
    mech.name,
  )
  return summary


# A network "did not learn" when its test accuracy is within this of always
# answering the test set's most common class.
CHANCE_MARGIN = 0.01
# A phase's training loss "rose" when its last logged value exceeds this factor
# times the first (and the first by at least LOSS_RISE_MIN).
LOSS_RISE_FACTOR = 2.0
LOSS_RISE_MIN = 1.0


def collapse_warnings(run: loop.Run, results: dict) -> list[str]:
  """One-line warnings for a finished run that collapsed or did not learn.

  Args:
    run: the run context (test labels, class count, config, workdir).
    results: ``{(net, split): {"accuracy", ...}}`` of the final evaluation.

  Returns:
    A warning for each network whose test accuracy is at most chance (the share
    of the test set's most common class, at least 1/K) + ``CHANCE_MARGIN``, and
    for each phase whose logged training loss rose (``loss_rise_warnings``).
  """
  labels = np.asarray(run.ds.test.clean_labels)
  k = run.ds.num_classes
  if run.ds.text is not None and run.ds.text.regression:  # no classes: no chance level
    return loss_rise_warnings(os.path.join(run.workdir, "metrics.jsonl"))
  chance = max(np.bincount(labels, minlength=k).max() / max(len(labels), 1), 1.0 / k)
  out = []
  for net in ("teacher", "student"):
    acc = results[(net, "test")]["accuracy"]
    if acc <= chance + CHANCE_MARGIN:
      out.append(
        f"{net} test accuracy {acc:.1%} is no better than chance ({chance:.1%}, always the "
        f"most common class): the run collapsed or did not learn; check the learning rate "
        f"(config.{net}.optimizer.lr={run.cfg[net].optimizer.lr:g}) and the epochs"
      )
  return out + loss_rise_warnings(os.path.join(run.workdir, "metrics.jsonl"))


def loss_rise_warnings(path: str) -> list[str]:
  """A warning for each phase of ``metrics.jsonl`` whose training loss rose far above its start.

  The first and last logged ``train`` losses of a phase (the last line of each
  step, as a resumed run appends) are compared with ``LOSS_RISE_FACTOR`` and
  ``LOSS_RISE_MIN``; unreadable lines are skipped.
  """
  losses: dict[str, dict[int, float]] = {}
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        try:
          r = json.loads(line)
          if r.get("kind") == "train":
            losses.setdefault(r["phase"], {})[int(r["step"])] = float(r["loss"])
        except (ValueError, KeyError, TypeError, AttributeError):
          continue
  except OSError:
    return []
  out = []
  for phase, by_step in losses.items():
    first_step, last_step = min(by_step), max(by_step)
    first, last = by_step[first_step], by_step[last_step]
    if not (math.isfinite(first) and math.isfinite(last)):
      continue
    if last > LOSS_RISE_FACTOR * first and last - first >= LOSS_RISE_MIN:
      out.append(
        f"{phase} training loss rose from {first:.4g} (step {first_step}) to {last:.4g} "
        f"(step {last_step}): training went wrong; check the learning rate"
      )
  return out


def _self_influence(run: loop.Run, state, scorer, missing: np.ndarray) -> np.ndarray:
  """The scorer's self-influence of every scored example, or ``missing`` (NaN) when the
  scorer has none or the classifier layer is too large for its dense factor (a
  CIFAR-100 head: P = (features + 1)·100 > ``self_influence.MAX_PARAMS``)."""
  self_fn = getattr(scorer, "self_influence", None)
  if self_fn is None:
    return missing
  try:
    out = self_fn(state, loop.scored_arrays(run), run_key(run.cfg.seed, RunStream.FINAL_SCORING))
  except ValueError as e:
    if "max_params" not in str(e):
      raise
    log.warning("self_influence column left empty (NaN): %s", e)
    return missing
  bad = int(np.sum(~np.isfinite(out)))
  if bad:  # e.g. kdaif.damping = 0: C + λI is singular even in the classifier layer
    log.warning(
      "self_influence: %d of %d values are not finite (a singular or ill-conditioned "
      "C + λI); set kdaif.whole_set.damping > 0",
      bad,
      len(out),
    )
  return out


def _trajectory(run: loop.Run, epochs: tuple[int, ...], final_scores) -> tuple[np.ndarray, dict]:
  """weights.csv's ``trajectory_influence`` [N] (the saved epochs' scores and the final
  ones, ``trajectory.average``) and its summary record (epochs used, missing, AUROC)."""
  found, missing = trajectory.load(run.workdir, epochs)
  if missing:  # e.g. deleted by hand: average what is there, and say so
    log.warning("trajectory_influence: no saved scores for epochs %s; averaged without", missing)
  used = [e for e in epochs if e not in missing] + [int(run.cfg.student.epochs)]
  col = trajectory.average([*found, final_scores])
  det = metrics.detection_metrics(-col, run.scored.noisy)
  return col, {"epochs": used, "missing": missing, "auroc": det["auroc"]}


def _write_weights_csv(run: loop.Run, infl, w, final_scores, self_infl, traj=None) -> None:
  # self_influence: I_ii in the classifier layer (scoring.make_self_influence_scorer);
  # trajectory_influence (when asked for): kdaif_jax.trajectory.
  tr = run.scored
  extra = () if traj is None else (traj,)
  path = os.path.join(run.workdir, "weights.csv")
  with open(path, "w") as f:
    f.write("id,label,clean_label,noisy,influence,weight,final_influence,self_influence")
    f.write(",trajectory_influence\n" if extra else "\n")
    rows = zip(
      tr.ids, tr.labels, tr.clean_labels, tr.noisy, infl, w, final_scores, self_infl, *extra
    )
    for row in rows:
      f.write(f"{row[0]},{row[1]},{row[2]},{int(row[3])},")
      f.write(",".join(f"{v:.6g}" for v in row[4:]) + "\n")


def _add_text_column(run: loop.Run) -> None:
  """Appends each training example's text (GLUE) to weights.csv as a quoted column."""
  import csv

  path = os.path.join(run.workdir, "weights.csv")
  texts = run.ds.text.train_texts
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  rows[0].append("text")
  for row in rows[1:]:
    row.append(str(texts[int(row[0])]))
  with open(path, "w", newline="") as f:
    csv.writer(f, lineterminator="\n").writerows(rows)
