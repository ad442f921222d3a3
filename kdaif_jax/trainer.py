"""The training loop: teacher, (proxy,) student with KD-AIF, evaluation, files.

``train_and_evaluate(config, workdir)`` is all ``main.py`` calls. Phases:

  teacher   cross-entropy from scratch (or loaded from ``teacher.init``)
  proxy     ``static`` only: a plain-KD student whose influence freezes the weights
  student   distillation with ``kdaif.mechanism``
  final     evaluation, whole-set influence, weights.csv, summary.json, report

Each phase checkpoints under ``WORKDIR/checkpoints/PHASE``; rerunning the same
command resumes from the newest complete checkpoint of the unfinished phase.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdaif_jax import (
  checkpoint,
  data,
  loop,
  metrics,
  models,
  online,
  optim,
  parallel,
  results,
  scoring,
  trajectory,
)
from kdaif_jax import config as config_lib
from kdaif_jax import ssl as ssl_lib
from kdaif_jax import step as step_lib
from kdaif_jax import weights as weights_lib
from kdaif_jax.data import augment
from kdaif_jax.logs import MetricsWriter, log, setup_logging
from kdaif_jax.loop import PhaseTime, StepFns
from kdaif_jax.options import Mechanism
from kdaif_jax.rng import RunStream, run_key

Times = dict[str, PhaseTime]


def _fingerprint(cfg: ml_collections.ConfigDict) -> dict:
  """The options that define an experiment (what a resumed run must share)."""
  d = cfg.to_dict()
  for transient in (
    "progress",
    "log_every_steps",
    "checkpoint_every_steps",
    "num_devices",
    "multihost",
    "distributed",
    "eval_batch_size",
  ):
    d.pop(transient, None)
  return json.loads(json.dumps(d, default=str))


def _make_prepare(ds: data.Dataset):
  """Normalisation, applied per device inside the steps (views arrive augmented)."""
  return data.make_prepare(ds.mean, ds.std, text=ds.text is not None)


def _make_augment(cfg):
  """Weak and strong views of uint8 batches, applied to the GLOBAL batch inside
  the jitted outer step (before ``shard_map``): the views then do not depend on
  the device count, and the RandAugment switch stays out of the per-device code."""
  st = cfg.ssl.strong

  def weak(key, images):
    if not (cfg.augment.pad or cfg.augment.flip):
      return images
    return augment.weak(key, images, pad=cfg.augment.pad, flip=cfg.augment.flip)

  def strong(key, images):
    return augment.strong(
      key,
      images,
      num_ops=st.num_ops,
      magnitude=st.magnitude,
      cutout_size=st.cutout,
      pad=cfg.augment.pad,
      flip=cfg.augment.flip,
    )

  return weak, strong


def _device_arrays(ds: data.Dataset, mesh) -> dict:
  """The splits, whole on every device of every process (each loads the whole small
  dataset): a step gathers its batch in jit and each device keeps its own slice."""
  arrays = {
    "train_images": ds.train.images,
    "train_labels": ds.train.labels,
    "train_noisy": ds.train.noisy,
    "val_images": ds.val.images,
    "val_labels": ds.val.labels,
  }
  if ds.unlabelled is not None:
    arrays["unl_images"] = ds.unlabelled.images
    arrays["unl_labels"] = ds.unlabelled.labels
    # The hidden true labels: the pseudo-labels' accuracy in the logs, nothing else.
    arrays["unl_true_labels"] = ds.unlabelled.clean_labels
  return parallel.replicate({k: np.asarray(v) for k, v in arrays.items()}, mesh)


def _init_state(run: loop.Run, key: jax.Array) -> step_lib.TrainState:
  cfg, ds = run.cfg, run.ds
  k_t, k_s, k_run = jax.random.split(key, 3)
  sample = jnp.zeros((1, *ds.image_shape), jnp.float32)
  t_params, t_ms = run.teacher.init(k_t, sample)
  s_params, s_ms = run.student.init(k_s, sample)
  tx_t = optim.make_optimizer(
    cfg.teacher.optimizer, run.steps_per_epoch, max(cfg.teacher.epochs, 1)
  )
  tx_s = optim.make_optimizer(
    cfg.student.optimizer, run.student_steps_per_epoch, cfg.student.epochs
  )
  return step_lib.new_train_state(
    key=jax.random.key_data(k_run),
    student=step_lib.NetState(s_params, s_ms, tx_s.init(s_params)),
    teacher=step_lib.NetState(t_params, t_ms, tx_t.init(t_params)),
    num_examples=len(run.scored),
  )


def _joint_tx(run: loop.Run):
  cfg, k = run.cfg, run.cfg.kdaif.joint
  steps = (run.student_steps_per_epoch, cfg.student.epochs)
  return optim.feedback_optimizer(cfg.teacher.optimizer, k.lr, int(k.every), *steps)


def _teacher_phase(run: loop.Run, state: step_lib.TrainState) -> tuple[step_lib.TrainState, Times]:
  cfg = run.cfg
  if cfg.teacher.init:
    params, ms = checkpoint.load_net(cfg.teacher.init, "teacher", state.teacher)
    log.info("teacher: loaded from %s", cfg.teacher.init)
    return state.replace(teacher=state.teacher.replace(params=params, model_state=ms)), {}
  tx = optim.make_optimizer(cfg.teacher.optimizer, run.steps_per_epoch, cfg.teacher.epochs)
  state, t = _supervised_phase(run, state, "teacher", "teacher", tx, cfg.teacher.epochs)
  return state, {"teacher": t}


def _supervised_phase(run: loop.Run, state, phase: str, net: str, tx, epochs: int):
  """Cross-entropy training of ``net`` on the labelled split (teacher, fine-tuning)."""
  state, ckpt, elapsed = loop.restore_or(run, phase, state)
  per_device = step_lib.make_supervised_step(getattr(run, net), tx, run.prepare, net=net)
  fn = loop.sharded_train_fn(run, per_device, with_val=False)
  state, t = loop.run_phase(
    run,
    phase,
    state,
    epochs=epochs,
    step_fns=StepFns(fn, fn),
    ckpt=ckpt,
    eval_nets=(net,) if net == "teacher" else (),
    elapsed=elapsed,
  )
  ckpt.close()
  return state, t


def _kd_fns(run: loop.Run, mechanism: Mechanism, epochs: int) -> StepFns:
  """The jitted KD (or SSL) steps of ``mechanism`` for a student trained ``epochs``."""
  cfg = run.cfg
  opts = config_lib.step_options(cfg, mechanism.name)
  tx_s = optim.make_optimizer(cfg.student.optimizer, run.student_steps_per_epoch, epochs)
  tx_t = _joint_tx(run) if mechanism.joint else None
  if run.semi_supervised:
    make = functools.partial(
      ssl_lib.make_ssl_step, run.student, run.teacher, tx_s, tx_t, run.prepare, opts
    )
    wrap = functools.partial(loop.sharded_ssl_fn, run)
  else:
    make = functools.partial(
      step_lib.make_kd_step, run.student, run.teacher, tx_s, tx_t, run.prepare, opts
    )
    wrap = functools.partial(loop.sharded_train_fn, run, with_val=True)
  refresh = wrap(make(refresh=True))
  every = cfg.kdaif.refresh_every if mechanism.online else 1
  stale = wrap(make(refresh=False)) if every > 1 else refresh
  return StepFns(refresh, stale, every)


def _proxy_epochs(cfg) -> int:
  return cfg.kdaif.proxy_epochs or cfg.student.epochs


def _score(run: loop.Run, scorer, state: step_lib.TrainState, epoch: int, label: str):
  """Scores the whole training set with ``scorer``; logs and returns the
  ``(scores, weights)`` [N] each."""
  key = jax.random.fold_in(run_key(run.cfg.seed, RunStream.SCORING), epoch)
  t0 = time.time()
  scores, info = scorer(state, loop.scored_arrays(run), key)
  w = np.asarray(config_lib.weight_map(run.cfg)(jnp.asarray(scores)))
  det = metrics.detection_metrics(w, run.scored.noisy)
  run.writer.write(
    {
      "kind": "scoring",
      "phase": label,
      "epoch": epoch,
      "step": int(state.step),
      "cg_iterations": int(info.iterations),
      "cg_residual": float(info.residual),
      "seconds": time.time() - t0,
      "w_std": float(w.std()),
      **{k: v for k, v in det.items() if v is not None},
    }
  )
  log.info(
    "%s: scored %d training examples (CG %d it, residual %.2e)%s",
    label,
    len(scores),
    int(info.iterations),
    float(info.residual),
    f", AUROC(flipped) {det['auroc']:.3f}" if det["auroc"] is not None else "",
  )
  return scores, w


def _score_into(run: loop.Run, scorer, state: step_lib.TrainState, epoch: int, label: str):
  """Scores the whole training set with the state's student and freezes the weights."""
  scores, w = _score(run, scorer, state, epoch, label)
  # Separate buffers for each field: the step donates its whole input state.
  return parallel.replicate(
    state.replace(
      example_weights=jnp.asarray(w, jnp.float32),
      last_scores=jnp.asarray(scores, jnp.float32),
      last_weights=jnp.asarray(w, jnp.float32),
    ),
    run.mesh,
  )


def _teacher_memory(run: loop.Run, state: step_lib.TrainState) -> step_lib.TrainState:
  """``kdaif.memory_init="teacher"``: every example's score memory starts from the
  teacher's whole-set influence, as if the whole set were one batch seen for the
  first time (``online.remember``), with one visit counted (none, and memory 0,
  where a score is not finite)."""
  scorer = scoring.make_teacher_scorer(
    run.teacher, run.prepare, config_lib.scorer_options(run.cfg), run.mesh
  )
  scores, _ = _score(run, scorer, state, 0, "memory_init")
  ok = np.isfinite(scores)
  if not ok.all():
    log.warning("memory_init: %d of the teacher's scores are not finite", int((~ok).sum()))
  never = jnp.zeros(scores.shape, jnp.float32)
  z = online.remember(jnp.asarray(scores, jnp.float32), never, never, beta=0.0)
  z = jnp.where(jnp.asarray(ok), z, 0.0)
  state = state.replace(score_memory=z, score_visits=jnp.asarray(ok, jnp.float32))
  return parallel.replicate(state, run.mesh)


def _student_phase(
  run: loop.Run, state: step_lib.TrainState, fresh_student, scorer, traj: tuple[int, ...]
) -> tuple[step_lib.TrainState, Times]:
  cfg = run.cfg
  mech = run.mechanism
  times: Times = {}
  if mech.proxy:
    proxy, pckpt, elapsed = loop.restore_or(run, "proxy", state)
    proxy, times["proxy"] = loop.run_phase(
      run,
      "proxy",
      proxy,
      epochs=_proxy_epochs(cfg),
      step_fns=_kd_fns(run, Mechanism("none"), _proxy_epochs(cfg)),
      ckpt=pckpt,
      eval_nets=("student",),
      elapsed=elapsed,
      student_data=True,
    )
    pckpt.close()
    # The proxy's buffers were donated step by step; continue from its output.
    state = _score_into(run, scorer, proxy, 0, "static")
    state = state.replace(student=fresh_student, step=jnp.zeros((), jnp.int32))
  if mech.joint:  # a fresh optimiser state (and structure) for the teacher's feedback steps
    tea = state.teacher
    fresh = parallel.replicate(_joint_tx(run).init(tea.params), run.mesh)
    state = state.replace(teacher=tea.replace(opt_state=fresh))
  if mech.oracle and not run.semi_supervised:  # a benchmark reference: the injected flips
    w = np.asarray(weights_lib.oracle(run.scored.noisy))  # two buffers: the step donates both
    state = state.replace(example_weights=jnp.asarray(w), last_weights=jnp.asarray(w))
    state = parallel.replicate(state, run.mesh)
  state, ckpt, elapsed = loop.restore_or(run, "student", state)
  if cfg.kdaif.memory_init == "teacher":
    if not (mech.online and cfg.kdaif.score_memory > 0):
      log.info("kdaif.memory_init=teacher: unused (needs online/joint, score_memory > 0)")
    elif ckpt.latest_step() is None:  # a resumed run has its memory in the checkpoint
      state = _teacher_memory(run, state)
  k = cfg.kdaif.period_epochs

  def on_epoch(st, epoch):
    rescore = mech.rescores and epoch > 0 and epoch % k == 0
    st = _score_into(run, scorer, st, epoch, "periodic") if rescore else st
    if epoch in traj:  # saved before this epoch's first step, so before any checkpoint in it
      s = st.last_scores if rescore else _score(run, scorer, st, epoch, "trajectory")[0]
      s = parallel.to_host(s)  # every process gathers; process 0 writes
      if parallel.is_main_process():
        trajectory.save(run.workdir, epoch, s)
    return st

  state, times["student"] = loop.run_phase(
    run,
    "student",
    state,
    epochs=cfg.student.epochs,
    step_fns=_kd_fns(run, mech, cfg.student.epochs),
    ckpt=ckpt,
    eval_nets=("student", "teacher") if mech.joint else ("student",),
    elapsed=elapsed,
    on_epoch_start=on_epoch if (mech.rescores or traj) else None,
    student_data=True,
  )
  ckpt.close()
  if run.semi_supervised and cfg.ssl.finetune_epochs > 0:
    state, times["finetune"] = _finetune_phase(run, state)
  return state, times


def _finetune_phase(run: loop.Run, state: step_lib.TrainState) -> tuple[step_lib.TrainState, Any]:
  """Meta Pseudo Labels' last stage: the student fine-tuned on the labelled set alone."""
  cfg = run.cfg
  ft = ml_collections.ConfigDict(cfg.student.optimizer.to_dict())
  ft.update(lr=cfg.ssl.finetune_lr, schedule="constant", warmup_epochs=0.0)
  tx = optim.make_optimizer(ft, run.steps_per_epoch, cfg.ssl.finetune_epochs)
  student = state.student
  if cfg.ssl.ema > 0:  # continue from the weights that were being evaluated
    student = student.replace(params=jax.tree.map(jnp.copy, state.ema))
  state = state.replace(
    step=jnp.zeros((), jnp.int32), student=student.replace(opt_state=tx.init(student.params))
  )
  state, t = _supervised_phase(run, state, "finetune", "student", tx, cfg.ssl.finetune_epochs)
  # Evaluation after fine-tuning reads the fine-tuned weights, not the EMA.
  return state.replace(ema=jax.tree.map(jnp.copy, state.student.params)), t


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs an experiment end to end in ``workdir`` and returns its summary.

  Args:
    config: an experiment config (see ``configs/`` and ``kdaif_jax.config``).
    workdir: output folder; rerunning with the same one resumes.

  Returns:
    The summary dict also written to ``WORKDIR/summary.json``.
  """
  setup_logging()
  t_start = time.time()
  cfg = config
  config_lib.validate(cfg, paths=True)
  parallel.maybe_initialize_distributed(cfg.multihost, cfg.distributed)
  mesh = parallel.make_mesh(cfg.num_devices or None)
  parallel.check_batch_size(cfg.batch_size, mesh)
  parallel.check_batch_size(cfg.eval_batch_size, mesh, "eval_batch_size")
  lock = checkpoint.open_workdir(workdir)
  try:
    # Refused before anything is written; recorded in _train once data and state exist.
    checkpoint.check_experiment(workdir, _fingerprint(cfg), write=False)
    return _train(cfg, workdir, mesh, t_start)
  finally:
    if lock is not None:
      lock.release()


def _train(cfg: ml_collections.ConfigDict, workdir: str, mesh, t_start: float) -> dict:
  """The body of ``train_and_evaluate`` once the workdir is held and checked."""
  ds = data.load(cfg.data)
  if len(ds.train) < cfg.batch_size:
    raise ValueError(
      f"config.batch_size={cfg.batch_size} exceeds the {len(ds.train)} "
      "training examples; allowed: <= the training-set size"
    )
  if parallel.is_main_process():  # the workdir's files: process 0 writes them
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=1, sort_keys=True, default=str)
    data.save_split_ids(ds, os.path.join(workdir, "splits.json"))
  log.info(
    "data: %s, %d train / %d val / %d test, %d classes, %d noisy; %d %s devices, process %d of %d",
    ds.name,
    len(ds.train),
    len(ds.val),
    len(ds.test),
    ds.num_classes,
    int(ds.train.noisy.sum()),
    mesh.size,
    jax.default_backend(),
    jax.process_index(),
    jax.process_count(),
  )

  # Only the image models take a compute dtype (validate() keeps text at float32).
  precision = {} if cfg.dtype == "float32" else {"dtype": cfg.dtype}
  net = lambda n: models.create(
    cfg[n].model, ds.num_classes, pretrained=cfg[n].get("pretrained"), **precision
  )
  teacher, student = net("teacher"), net("student")
  writer = MetricsWriter(workdir, enabled=parallel.is_main_process())
  weak, strong = _make_augment(cfg)
  run = loop.Run(
    cfg=cfg,
    workdir=workdir,
    mesh=mesh,
    ds=ds,
    arrays=_device_arrays(ds, mesh),
    teacher=teacher,
    student=student,
    prepare=_make_prepare(ds),
    weak=weak,
    strong=strong,
    writer=writer,
    steps_per_epoch=len(ds.train) // cfg.batch_size,
    mechanism=Mechanism(cfg.kdaif.mechanism),
  )
  if run.semi_supervised and run.student_steps_per_epoch < 1:
    raise ValueError(
      f"config.ssl.unlabelled_ratio={cfg.ssl.unlabelled_ratio} x batch_size="
      f"{cfg.batch_size} exceeds the {len(ds.unlabelled)} unlabelled examples; "
      "allowed: a product <= the unlabelled-set size"
    )
  try:
    state = parallel.replicate(_init_state(run, jax.random.key(cfg.seed)), mesh)
    checkpoint.check_experiment(workdir, _fingerprint(cfg), write=parallel.is_main_process())
    fresh_student = jax.tree.map(jnp.copy, state.student)  # survives the donated steps
    scorer = scoring.make_whole_set_scorer(
      student, teacher, run.prepare, config_lib.scorer_options(cfg), mesh
    )
    state, times = _teacher_phase(run, state)
    state = state.replace(step=jnp.zeros((), jnp.int32))
    traj = trajectory.scoring_epochs(cfg.student.epochs, cfg.kdaif.whole_set.trajectory)
    state, student_times = _student_phase(run, state, fresh_student, scorer, traj)
    summary = results.finish(run, state, scorer, {**times, **student_times}, t_start, traj)
  finally:
    writer.close()
  return summary
