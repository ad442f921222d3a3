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

import dataclasses
import functools
import json
import os
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdaif_jax import checkpoint, data, models, optim, parallel, scoring
from kdaif_jax import config as config_lib
from kdaif_jax import ssl as ssl_lib
from kdaif_jax import step as step_lib
from kdaif_jax import weights as weights_lib
from kdaif_jax.data import augment
from kdaif_jax.logs import MetricsWriter, Progress, log, setup_logging
from kdaif_jax.parallel import BATCH, REPLICATED


@dataclasses.dataclass
class _Run:
  """What every phase needs (built once)."""

  cfg: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  ds: data.Dataset
  arrays: dict
  teacher: models.Model
  student: models.Model
  prepare: Any
  weak: Any
  strong: Any
  writer: MetricsWriter
  steps_per_epoch: int
  times: dict
  rates: dict

  @property
  def student_steps_per_epoch(self) -> int:
    """An SSL epoch is one pass over the unlabelled set."""
    if not self.semi_supervised:
      return self.steps_per_epoch
    return len(self.ds.unlabelled) // (self.cfg.batch_size * self.cfg.ssl.unlabelled_ratio)

  @property
  def semi_supervised(self) -> bool:
    return self.ds.unlabelled is not None

  @property
  def scored(self) -> data.Split:
    """The split whose examples get influence weights (unlabelled in SSL)."""
    return self.ds.unlabelled if self.semi_supervised else self.ds.train


def _fingerprint(cfg: ml_collections.ConfigDict) -> dict:
  """The options that define an experiment (what a resumed run must share)."""
  d = cfg.to_dict()
  for transient in (
    "progress",
    "log_every_steps",
    "checkpoint_every_steps",
    "num_devices",
    "multihost",
    "eval_batch_size",
  ):
    d.pop(transient, None)
  return json.loads(json.dumps(d, default=str))


def _make_prepare(ds: data.Dataset):
  """Normalisation, applied per device inside the steps (the key is unused)."""
  mean, std = jnp.asarray(ds.mean), jnp.asarray(ds.std)
  return lambda key, images: data.normalize(images, mean, std)


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


def _batch_key(state, salt: int) -> jax.Array:
  return jax.random.fold_in(
    jax.random.fold_in(jax.random.wrap_key_data(state.key), salt), state.step
  )


def _device_arrays(ds: data.Dataset, mesh) -> dict:
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
  return parallel.replicate({k: np.asarray(v) for k, v in arrays.items()}, mesh)


def _init_state(run: _Run, key: jax.Array) -> step_lib.TrainState:
  cfg, ds = run.cfg, run.ds
  k_t, k_s, k_run = jax.random.split(key, 3)
  sample = jnp.zeros((1, *ds.image_shape), jnp.float32)
  t_params, t_ms = run.teacher.init(k_t, sample)
  s_params, s_ms = run.student.init(k_s, sample)
  tx_t = _teacher_tx(run)
  tx_s = optim.make_optimizer(
    cfg.student.optimizer, run.student_steps_per_epoch, cfg.student.epochs
  )
  n = len(run.scored)
  return step_lib.TrainState(
    step=jnp.zeros((), jnp.int32),
    key=jax.random.key_data(k_run),
    student=step_lib.NetState(s_params, s_ms, tx_s.init(s_params)),
    teacher=step_lib.NetState(t_params, t_ms, tx_t.init(t_params)),
    s=jax.tree.map(jnp.zeros_like, s_params),
    example_weights=jnp.ones((n,), jnp.float32),
    last_scores=jnp.zeros((n,), jnp.float32),
    last_weights=jnp.ones((n,), jnp.float32),
    solve_stats=jnp.zeros((3,), jnp.float32),
    ema=jax.tree.map(jnp.copy, s_params),  # its own buffers: the step donates both
  )


def _teacher_tx(run: _Run):
  cfg = run.cfg
  if cfg.kdaif.mechanism == "joint":
    joint = ml_collections.ConfigDict(cfg.teacher.optimizer.to_dict())
    joint.update(lr=cfg.kdaif.joint.lr, schedule="constant", warmup_epochs=0.0)
    return optim.make_optimizer(joint, run.student_steps_per_epoch, cfg.student.epochs)
  return optim.make_optimizer(
    cfg.teacher.optimizer, run.steps_per_epoch, max(cfg.teacher.epochs, 1)
  )


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


@functools.cache
def _eval_fn(model: models.Model, prepare, mesh):
  fn = step_lib.make_eval_step(model, prepare)
  return jax.jit(
    parallel.shard_map(fn, mesh, (REPLICATED, REPLICATED, BATCH, BATCH, BATCH), (REPLICATED, BATCH))
  )


def evaluate(
  run: _Run,
  model: models.Model,
  net: step_lib.NetState,
  split: data.Split,
  return_logits: bool = False,
) -> dict:
  """Accuracy and mean CE of ``net`` on ``split`` (clean labels), chunked and sharded."""
  fn = _eval_fn(model, run.prepare, run.mesh)
  ndev = run.mesh.shape[parallel.AXIS]
  size = max(ndev, run.cfg.eval_batch_size // ndev * ndev)
  n = len(split)
  tot = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  logits = []
  for start in range(0, n, size):
    idx = np.arange(start, start + size)
    mask = idx < n
    idx = np.where(mask, idx, 0)
    sums, lg = fn(net.params, net.model_state, split.images[idx], split.clean_labels[idx], mask)
    for k, v in jax.device_get(sums).items():
      tot[k] += float(v)
    if return_logits:
      logits.append(np.asarray(lg)[mask])
  out = {
    "accuracy": tot["correct"] / max(tot["count"], 1.0),
    "loss": tot["loss"] / max(tot["count"], 1.0),
  }
  if return_logits:
    out["logits"] = np.concatenate(logits) if logits else np.zeros((0, model.num_classes))
  return out


def _eval_and_log(
  run: _Run, state: step_lib.TrainState, phase: str, epoch: int, nets: tuple[str, ...]
) -> dict:
  results = {}
  for name in nets:
    model = run.teacher if name == "teacher" else run.student
    for split_name in ("val", "test"):
      r = evaluate(run, model, _eval_net(run, state, name), getattr(run.ds, split_name))
      results[(name, split_name)] = r
      run.writer.write(
        {
          "kind": "eval",
          "phase": phase,
          "net": name,
          "split": split_name,
          "step": int(state.step),
          "epoch": epoch,
          **r,
        }
      )
  return results


# --------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------


def _val_sampler(run: _Run):
  """``(state, arrays) -> val batch``: the whole validation set (trimmed to a
  multiple of the device count) or ``kdaif.val_batch_size`` examples drawn per step."""
  ndev = run.mesh.shape[parallel.AXIS]
  n_val = run.arrays["val_labels"].shape[0]
  vb = min(run.cfg.kdaif.val_batch_size or n_val, n_val) // ndev * ndev

  def sample(state, arrays):
    if vb == n_val:
      vidx = jnp.arange(vb)
    else:
      vidx = jax.random.choice(_batch_key(state, 6), n_val, (vb,), replace=False)
    return {"images": arrays["val_images"][vidx], "labels": arrays["val_labels"][vidx]}

  return sample


def _record(cfg, state, idx, scores, w):
  if cfg.kdaif.mechanism in ("online", "joint", "small_loss"):
    state = state.replace(
      last_scores=state.last_scores.at[idx].set(scores),
      last_weights=state.last_weights.at[idx].set(w),
    )
  return state


def _sharded_train_fn(run: _Run, per_device, with_val: bool):
  """Jits the outer step: gather the batch from device arrays, run per device, record."""
  cfg, bsz = run.cfg, run.cfg.batch_size
  if with_val:
    sm = parallel.shard_map(
      per_device, run.mesh, (REPLICATED, BATCH, BATCH), (REPLICATED, REPLICATED, BATCH)
    )
  else:
    sm = parallel.shard_map(per_device, run.mesh, (REPLICATED, BATCH), (REPLICATED, REPLICATED))
  val_batch = _val_sampler(run)

  def outer(state, arrays, perm, i):
    idx = jax.lax.dynamic_slice_in_dim(perm, i * bsz, bsz)
    images = run.weak(_batch_key(state, 1), arrays["train_images"][idx])
    batch = {
      "images": images,
      "labels": arrays["train_labels"][idx],
      "noisy": arrays["train_noisy"][idx],
      "weights": state.example_weights[idx],
    }
    if not with_val:
      return sm(state, {"images": batch["images"], "labels": batch["labels"]})
    state, metrics, (scores, w) = sm(state, batch, val_batch(state, arrays))
    return _record(cfg, state, idx, scores, w), metrics

  return jax.jit(outer, donate_argnums=(0,))


def _sharded_ssl_fn(run: _Run, per_device):
  """Outer SSL step: epochs run over the unlabelled set; labelled examples are
  drawn per step (without replacement within the step) from the labelled set."""
  cfg = run.cfg
  bl = cfg.batch_size
  bu = bl * cfg.ssl.unlabelled_ratio
  n_lab = len(run.ds.train)
  sm = parallel.shard_map(
    per_device, run.mesh, (REPLICATED, BATCH, BATCH), (REPLICATED, REPLICATED, BATCH)
  )
  val_batch = _val_sampler(run)

  def outer(state, arrays, perm, i):
    uidx = jax.lax.dynamic_slice_in_dim(perm, i * bu, bu)
    lidx = jax.random.choice(_batch_key(state, 2), n_lab, (bl,), replace=bl > n_lab)
    unl = arrays["unl_images"][uidx]
    batch = {
      "lab_images": run.weak(_batch_key(state, 3), arrays["train_images"][lidx]),
      "lab_labels": arrays["train_labels"][lidx],
      "unl_weak": run.weak(_batch_key(state, 4), unl),
      "unl_strong": run.strong(_batch_key(state, 5), unl),
    }
    state, metrics, (scores, w) = sm(state, batch, val_batch(state, arrays))
    return _record(cfg, state, uidx, scores, w), metrics

  return jax.jit(outer, donate_argnums=(0,))


def _scored_arrays(run: _Run) -> dict:
  """The device arrays of the scored split under the names the scorer reads."""
  if not run.semi_supervised:
    return run.arrays
  return {
    **run.arrays,
    "train_images": run.arrays["unl_images"],
    "train_labels": run.arrays["unl_labels"],
  }


def _eval_net(run: _Run, state: step_lib.TrainState, name: str) -> step_lib.NetState:
  """The network evaluated as ``name``: the student's EMA params when ``ssl.ema`` > 0."""
  net = getattr(state, name)
  if name == "student" and run.semi_supervised and run.cfg.ssl.ema > 0:
    net = net.replace(params=state.ema)
  return net


def _epoch_perm(key: jax.Array, epoch: int, n: int) -> jax.Array:
  return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def _run_phase(
  run: _Run,
  phase: str,
  state: step_lib.TrainState,
  epochs: int,
  step_fns: dict,
  ckpt: checkpoint.PhaseCheckpoints,
  eval_nets: tuple[str, ...],
  on_epoch_start=None,
  student_data: bool = False,
) -> step_lib.TrainState:
  """Steps ``state`` through ``epochs`` epochs with checkpoints, logs and evals.

  ``student_data``: epochs run over the scored split (the unlabelled set in SSL)
  rather than the labelled training split.
  """
  cfg = run.cfg
  spe = run.student_steps_per_epoch if student_data else run.steps_per_epoch
  n = len(run.scored) if student_data else len(run.ds.train)
  # Every leaf placed on the mesh, or jit compiles the step twice (placed/unplaced inputs).
  state = parallel.replicate(state, run.mesh)
  total = epochs * spe
  start = int(state.step)
  # crc32, not hash(): str hashes change between processes, and a resumed run must
  # see the same epoch order.
  perm_key = jax.random.fold_in(jax.random.key(cfg.seed), zlib.crc32(phase.encode()) % (2**31))
  progress = Progress(phase, total, start, cfg.progress, cfg.log_every_steps)
  t0 = time.time()
  refresh_every = cfg.kdaif.refresh_every
  perm, perm_epoch = None, -1
  step = start
  while step < total:
    epoch, i = divmod(step, spe)
    if epoch != perm_epoch:
      if i == 0 and on_epoch_start is not None:
        state = on_epoch_start(state, epoch)
      perm, perm_epoch = _epoch_perm(perm_key, epoch, n), epoch
    fn = step_fns["refresh"] if step % refresh_every == 0 else step_fns["stale"]
    state, metrics = fn(state, run.arrays, perm, i)
    step += 1
    if step % cfg.log_every_steps == 0 or step == total:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      run.writer.write({"kind": "train", "phase": phase, "step": step, "epoch": epoch, **m})
      progress.update(step, {"loss": m["loss"], "acc": m["accuracy"]})
    else:
      progress.update(step)
    if step % spe == 0 and ((step // spe) % cfg.eval_every_epochs == 0 or step == total):
      _eval_and_log(run, state, phase, step // spe, eval_nets)
    if step % cfg.checkpoint_every_steps == 0 or step == total:
      ckpt.save(step, state, {"elapsed": run.times.get(phase, 0.0) + time.time() - t0})
  ckpt.wait()
  run.times[phase] = run.times.get(phase, 0.0) + time.time() - t0
  run.rates[phase] = progress.close()
  return state


def _restore_or(run: _Run, phase: str, state: step_lib.TrainState):
  ckpt = checkpoint.PhaseCheckpoints(run.workdir, phase)
  latest = ckpt.latest_step()
  if latest is not None:
    state, record = ckpt.restore(state, latest)
    state = parallel.replicate(state, run.mesh)
    run.times[phase] = float(record.get("elapsed", 0.0))
    log.info("%s: resumed from checkpoint at step %d", phase, latest)
  return state, ckpt


def _teacher_phase(run: _Run, state: step_lib.TrainState) -> step_lib.TrainState:
  cfg = run.cfg
  if cfg.teacher.init:
    params, ms = load_net(cfg.teacher.init, "teacher", state.teacher)
    log.info("teacher: loaded from %s", cfg.teacher.init)
    return state.replace(teacher=state.teacher.replace(params=params, model_state=ms))
  state, ckpt = _restore_or(run, "teacher", state)
  tx = optim.make_optimizer(cfg.teacher.optimizer, run.steps_per_epoch, cfg.teacher.epochs)
  per_device = step_lib.make_supervised_step(run.teacher, tx, run.prepare, net="teacher")
  fn = _sharded_train_fn(run, per_device, with_val=False)
  state = _run_phase(
    run, "teacher", state, cfg.teacher.epochs, {"refresh": fn, "stale": fn}, ckpt, ("teacher",)
  )
  ckpt.close()
  return state


def _kd_fns(run: _Run, mechanism: str):
  cfg = ml_collections.ConfigDict(run.cfg.to_dict())
  cfg.kdaif.mechanism = mechanism
  tx_s = optim.make_optimizer(
    cfg.student.optimizer,
    run.student_steps_per_epoch,
    cfg.student.epochs if mechanism == run.cfg.kdaif.mechanism else _proxy_epochs(cfg),
  )
  tx_t = _teacher_tx(run) if mechanism == "joint" else None
  if run.semi_supervised:
    make = functools.partial(
      ssl_lib.make_ssl_step, run.student, run.teacher, tx_s, tx_t, run.prepare, cfg
    )
    wrap = functools.partial(_sharded_ssl_fn, run)
  else:
    make = functools.partial(
      step_lib.make_kd_step, run.student, run.teacher, tx_s, tx_t, run.prepare, cfg
    )
    wrap = functools.partial(_sharded_train_fn, run, with_val=True)
  fns = {"refresh": wrap(make(refresh=True))}
  online = mechanism in ("online", "joint") and cfg.kdaif.refresh_every > 1
  fns["stale"] = wrap(make(refresh=False)) if online else fns["refresh"]
  return fns


def _proxy_epochs(cfg) -> int:
  return cfg.kdaif.proxy_epochs or cfg.student.epochs


def _score_into(run: _Run, scorer, state: step_lib.TrainState, epoch: int, label: str):
  """Scores the whole training set with the state's student and freezes the weights."""
  key = jax.random.fold_in(jax.random.key(run.cfg.seed + 17), epoch)
  t0 = time.time()
  scores, info = scorer(state, _scored_arrays(run), key)
  w = np.asarray(weights_lib.get(run.cfg.kdaif.weights)(jnp.asarray(scores), **_wkw(run.cfg)))
  det = scoring.detection_metrics(w, run.scored.noisy)
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
  # Separate buffers for each field: the step donates its whole input state.
  return parallel.replicate(
    state.replace(
      example_weights=jnp.asarray(w, jnp.float32),
      last_scores=jnp.asarray(scores, jnp.float32),
      last_weights=jnp.asarray(w, jnp.float32),
    ),
    run.mesh,
  )


def _wkw(cfg) -> dict:
  return {"temperature": cfg.kdaif.weight_temperature} if cfg.kdaif.weights == "sigmoid" else {}


def _student_phase(run: _Run, state: step_lib.TrainState, fresh_student) -> step_lib.TrainState:
  cfg = run.cfg
  mech = cfg.kdaif.mechanism
  scorer = scoring.make_whole_set_scorer(run.student, run.teacher, run.prepare, cfg, run.mesh)
  if mech == "static":
    proxy, pckpt = _restore_or(run, "proxy", state)
    proxy = _run_phase(
      run,
      "proxy",
      proxy,
      _proxy_epochs(cfg),
      _kd_fns(run, "none"),
      pckpt,
      ("student",),
      student_data=True,
    )
    pckpt.close()
    # The proxy's buffers were donated step by step; continue from its output.
    state = _score_into(run, scorer, proxy, 0, "static")
    state = state.replace(student=fresh_student, step=jnp.zeros((), jnp.int32))
  state, ckpt = _restore_or(run, "student", state)
  on_epoch = None
  if mech == "periodic":
    k = cfg.kdaif.period_epochs

    def on_epoch(st, epoch):
      return _score_into(run, scorer, st, epoch, "periodic") if epoch > 0 and epoch % k == 0 else st

  nets = ("student", "teacher") if mech == "joint" else ("student",)
  state = _run_phase(
    run,
    "student",
    state,
    cfg.student.epochs,
    _kd_fns(run, mech),
    ckpt,
    nets,
    on_epoch,
    student_data=True,
  )
  ckpt.close()
  if run.semi_supervised and cfg.ssl.finetune_epochs > 0:
    state = _finetune_phase(run, state)
  return state, scorer


def _finetune_phase(run: _Run, state: step_lib.TrainState) -> step_lib.TrainState:
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
  state, ckpt = _restore_or(run, "finetune", state)
  per_device = step_lib.make_supervised_step(run.student, tx, run.prepare, net="student")
  fn = _sharded_train_fn(run, per_device, with_val=False)
  state = _run_phase(
    run, "finetune", state, cfg.ssl.finetune_epochs, {"refresh": fn, "stale": fn}, ckpt, ()
  )
  ckpt.close()
  # Evaluation after fine-tuning reads the fine-tuned weights, not the EMA.
  return state.replace(ema=jax.tree.map(jnp.copy, state.student.params))


def load_net(path: str, phase: str, like: step_lib.NetState) -> tuple[Any, Any]:
  """Loads (params, model_state) of ``phase``'s network from a workdir or checkpoint dir.

  Args:
    path: a workdir of an earlier run (its newest ``checkpoints/teacher``), or
      a ``checkpoints/PHASE`` folder.
    phase: "teacher" or "student": which network of the checkpointed state.
    like: a ``NetState`` with the expected shapes.
  """
  folder = os.path.join(path, "checkpoints", "teacher")
  if not os.path.isdir(folder):
    folder = path
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"config.teacher.init={path!r}: no checkpoint folder found")
  ckpt = checkpoint.PhaseCheckpoints(
    os.path.dirname(os.path.dirname(folder)), os.path.basename(folder)
  )
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"config.teacher.init={path!r}: no complete checkpoint in {folder}")
  raw = ckpt._manager.restore(ckpt.latest_step())  # noqa: SLF001 - structure-free restore
  net = raw["state"][phase]
  ckpt.close()
  params = jax.tree.map(jnp.asarray, net["params"])
  ms = jax.tree.map(jnp.asarray, net.get("model_state") or {})
  if jax.tree.structure(params) != jax.tree.structure(like.params):
    raise ValueError(
      f"config.teacher.init={path!r} holds a different architecture than config.teacher.model"
    )
  return params, ms


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
  config_lib.validate(cfg)
  parallel.maybe_initialize_distributed(cfg.multihost)
  mesh = parallel.make_mesh(cfg.num_devices or None)
  parallel.check_batch_size(cfg.batch_size, mesh)
  parallel.check_batch_size(cfg.eval_batch_size, mesh, "eval_batch_size")
  os.makedirs(workdir, exist_ok=True)
  checkpoint.check_experiment(workdir, _fingerprint(cfg))
  ds = data.load(cfg.data)
  if len(ds.train) < cfg.batch_size:
    raise ValueError(
      f"config.batch_size={cfg.batch_size} exceeds the {len(ds.train)} "
      "training examples; allowed: <= the training-set size"
    )
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f, indent=1, sort_keys=True, default=str)
  data.save_split_ids(ds, os.path.join(workdir, "splits.json"))
  log.info(
    "data: %s, %d train / %d val / %d test, %d classes, %d noisy; %d device(s) (%s)",
    ds.name,
    len(ds.train),
    len(ds.val),
    len(ds.test),
    ds.num_classes,
    int(ds.train.noisy.sum()),
    mesh.size,
    jax.default_backend(),
  )

  teacher = models.create(cfg.teacher.model, ds.num_classes)
  student = models.create(cfg.student.model, ds.num_classes)
  writer = MetricsWriter(workdir)
  run = _Run(
    cfg,
    workdir,
    mesh,
    ds,
    _device_arrays(ds, mesh),
    teacher,
    student,
    _make_prepare(ds),
    *_make_augment(cfg),
    writer,
    len(ds.train) // cfg.batch_size,
    {},
    {},
  )
  if run.semi_supervised and run.student_steps_per_epoch < 1:
    raise ValueError(
      f"config.ssl.unlabelled_ratio={cfg.ssl.unlabelled_ratio} x batch_size="
      f"{cfg.batch_size} exceeds the {len(ds.unlabelled)} unlabelled examples; "
      "allowed: a product <= the unlabelled-set size"
    )
  try:
    state = parallel.replicate(_init_state(run, jax.random.key(cfg.seed)), mesh)
    fresh_student = jax.tree.map(jnp.copy, state.student)  # survives the donated steps
    state = _teacher_phase(run, state)
    state = state.replace(step=jnp.zeros((), jnp.int32))
    state, scorer = _student_phase(run, state, fresh_student)
    summary = _finish(run, state, scorer, t_start)
  finally:
    writer.close()
  return summary


def _finish(run: _Run, state: step_lib.TrainState, scorer, t_start: float) -> dict:
  cfg, ds = run.cfg, run.ds
  t0 = time.time()
  results = {}
  for name, model in (("teacher", run.teacher), ("student", run.student)):
    net = _eval_net(run, state, name)
    for split in ("val", "test"):
      results[(name, split)] = evaluate(
        run, model, net, getattr(ds, split), return_logits=(split == "test")
      )
  final_scores, _ = scorer(state, _scored_arrays(run), jax.random.key(cfg.seed + 99))
  mech = cfg.kdaif.mechanism
  if mech == "none":
    infl, w = final_scores, np.ones_like(final_scores)
  elif mech == "small_loss":  # its scores are losses, not influence
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
  run.times["final"] = time.time() - t0
  det = (
    scoring.detection_metrics(w, run.scored.noisy)
    if mech != "none"
    else scoring.detection_metrics(-final_scores, run.scored.noisy)
  )
  count = lambda net: models.param_count(getattr(state, net).params)
  summary = {
    "dataset": ds.name,
    "mechanism": mech,
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
      **{k: round(v, 3) for k, v in run.times.items()},
      "total_this_invocation": round(time.time() - t_start, 3),
    },
    "steps_per_second": {k: round(v, 3) for k, v in run.rates.items()},
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
    mech,
  )
  return summary


def _write_weights_csv(run: _Run, infl, w, final_scores) -> None:
  tr = run.scored
  path = os.path.join(run.workdir, "weights.csv")
  with open(path, "w") as f:
    f.write("id,label,clean_label,noisy,influence,weight,final_influence\n")
    for row in zip(tr.ids, tr.labels, tr.clean_labels, tr.noisy, infl, w, final_scores):
      f.write(f"{row[0]},{row[1]},{row[2]},{int(row[3])},{row[4]:.6g},{row[5]:.6g},{row[6]:.6g}\n")
