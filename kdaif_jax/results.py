"""The end of a run: final evaluation, the whole-set influence record, and the files.

``finish`` evaluates both networks, scores every training (or unlabelled)
example with the final student, and writes weights.csv, predictions.npz,
summary.json and the SAFE report into the workdir.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from kdaif_jax import loop, metrics, models
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
) -> dict:
  """Evaluates, scores and writes the run's result files; returns the summary.

  Args:
    run: the run context.
    state: the final state.
    scorer: the whole-set scorer (``scoring.make_whole_set_scorer``).
    times: the phases' wall times and step rates.
    t_start: ``time.time()`` when this invocation started.

  Returns:
    The summary dict also written to ``WORKDIR/summary.json``.
  """
  cfg, ds = run.cfg, run.ds
  t0 = time.time()
  results = {}
  for name, model in (("teacher", run.teacher), ("student", run.student)):
    net = loop.eval_net(run, state, name)
    for split in ("val", "test"):
      results[(name, split)] = loop.evaluate(
        run, model, net, getattr(ds, split), return_logits=(split == "test")
      )
  final_scores, _ = scorer(
    state, loop.scored_arrays(run), run_key(cfg.seed, RunStream.FINAL_SCORING)
  )
  mech = run.mechanism
  if mech.plain:
    infl, w = final_scores, np.ones_like(final_scores)
  elif mech.small_loss:  # its scores are losses, not influence
    infl, w = final_scores, np.asarray(state.last_weights)
  else:
    infl, w = np.asarray(state.last_scores), np.asarray(state.last_weights)
  _write_weights_csv(run, infl, w, final_scores)
  np.savez_compressed(
    os.path.join(run.workdir, "predictions.npz"),
    labels=ds.test.clean_labels,
    ids=ds.test.ids,
    teacher_logits=results[("teacher", "test")]["logits"],
    student_logits=results[("student", "test")]["logits"],
  )
  final_seconds = time.time() - t0
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
    "steps_per_second": {k: round(t.steps_per_second, 3) for k, t in times.items()},
    "device_count": run.mesh.size,
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "jax_version": jax.__version__,
  }
  with open(os.path.join(run.workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  if cfg.report and jax.process_index() == 0:
    try:
      from kdaif_jax import report  # matplotlib is only imported when a report is written

      out = report.write_report(run.workdir)
      log.info("report: %s", out["report_md"])
    except Exception as e:  # noqa: BLE001 - a report problem must not lose a finished run
      log.warning("report could not be written: %s", e)
  log.info(
    "done: teacher %s test acc %.4f | student %s test acc %.4f (%s)",
    cfg.teacher.model,
    summary["teacher"]["test_accuracy"],
    cfg.student.model,
    summary["student"]["test_accuracy"],
    mech.name,
  )
  return summary


def _write_weights_csv(run: loop.Run, infl, w, final_scores) -> None:
  tr = run.scored
  path = os.path.join(run.workdir, "weights.csv")
  with open(path, "w") as f:
    f.write("id,label,clean_label,noisy,influence,weight,final_influence\n")
    for row in zip(tr.ids, tr.labels, tr.clean_labels, tr.noisy, infl, w, final_scores):
      f.write(f"{row[0]},{row[1]},{row[2]},{int(row[3])},{row[4]:.6g},{row[5]:.6g},{row[6]:.6g}\n")
