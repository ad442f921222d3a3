"""The step loop shared by every phase: the run context, sharded outer steps,
checkpointed epochs with logs, progress and evaluations (``evaluation``).

``trainer`` builds a ``Run`` once and drives the phases through ``run_phase``.
The outer steps gather the batch from device-resident arrays, draw the
augmented views for the GLOBAL batch, and call the per-device step under
``jax.shard_map``; all of it is one jitted function per step kind.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from kdaif_jax import checkpoint, data, evaluation, models, parallel
from kdaif_jax import step as step_lib
from kdaif_jax.divergence import diverged_error, divergence, watched
from kdaif_jax.logs import MetricsWriter, Progress, log
from kdaif_jax.options import Mechanism
from kdaif_jax.parallel import BATCH, REPLICATED
from kdaif_jax.rng import StepStream, step_key
from kdaif_jax.text import tokenize


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
  """What every phase needs (built once by the trainer; never changed).

  cfg: the experiment config (batch sizes, epochs, logging cadence).
  workdir: the run's folder.
  mesh: the 'data' mesh.
  ds: the dataset (host numpy splits).
  arrays: the device-resident arrays the outer steps gather batches from.
  teacher, student: the models.
  prepare: ``images_uint8 -> normalised float inputs`` (jittable).
  weak, strong: ``(key, images_uint8) -> augmented images`` for the global batch.
  writer: the metrics writer.
  steps_per_epoch: steps of one pass over the labelled training split.
  mechanism: the run's update mechanism.
  """

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
  mechanism: Mechanism

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


@dataclasses.dataclass(frozen=True)
class StepFns:
  """The jitted outer steps of a phase: with a fresh influence solve and without.

  refresh: ``(state, arrays, perm, i) -> (state, metrics)`` recomputing g_V and s.
  stale: the same reusing the cached s (may be ``refresh`` itself).
  refresh_every: R; step t uses ``refresh`` when t % R == 0.
  """

  refresh: Any
  stale: Any
  refresh_every: int = 1


@dataclasses.dataclass(frozen=True)
class PhaseTime:
  """Wall time of a phase (all invocations) and its step rate in this invocation.

  seconds: wall time of the phase over all invocations.
  steps_per_second: rate of the steps run in this invocation (after the first,
    compiling one when there were two or more); None when it ran none.
  steps: steps run in this invocation (0 when resumed at the phase's end).
  """

  seconds: float
  steps_per_second: float | None
  steps: int = 0


# --------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------


def _val_sampler(run: Run):
  """``(state, arrays) -> val batch``: the whole validation set (trimmed to a
  multiple of the device count) or ``kdaif.val_batch_size`` examples drawn per step."""
  ndev = run.mesh.shape[parallel.AXIS]
  n_val = run.arrays["val_labels"].shape[0]
  vb = min(run.cfg.kdaif.val_batch_size or n_val, n_val) // ndev * ndev

  def sample(state, arrays):
    if vb == n_val:
      vidx = jnp.arange(vb)
    else:
      vidx = jax.random.choice(step_key(state, StepStream.VAL_SAMPLE), n_val, (vb,), replace=False)
    return {"images": arrays["val_images"][vidx], "labels": arrays["val_labels"][vidx]}

  return sample


def _with_memory(state, batch: dict, idx) -> dict:
  """Adds the examples' score memory (``online.remember``) to a step's batch."""
  if state.score_memory is None:
    return batch
  return {**batch, "memory": state.score_memory[idx], "visits": state.score_visits[idx]}


def _record(mechanism: Mechanism, state, idx, out, *, semi_supervised: bool = False):
  scores, w, memory = out
  # The semi-supervised oracle also weighs each batch in the step (its answer, the
  # hidden labels, is compared with the teacher's pseudo-labels of that batch).
  if mechanism.batch_weights or (semi_supervised and mechanism.oracle):
    state = state.replace(
      last_scores=state.last_scores.at[idx].set(scores),
      last_weights=state.last_weights.at[idx].set(w),
    )
  if mechanism.online and state.score_memory is not None:
    # A non-finite score leaves the memory and the visit count as they were.
    seen = jnp.isfinite(memory)
    state = state.replace(
      score_memory=state.score_memory.at[idx].set(jnp.where(seen, memory, state.score_memory[idx])),
      score_visits=state.score_visits.at[idx].add(seen.astype(jnp.float32)),
    )
  return state


def sharded_train_fn(run: Run, per_device, with_val: bool):
  """Jits the outer step: gather the batch from device arrays, run per device, record."""
  bsz = run.cfg.batch_size
  if with_val:
    sm = parallel.shard_map(
      per_device, run.mesh, (REPLICATED, BATCH, BATCH), (REPLICATED, REPLICATED, BATCH)
    )
  else:
    sm = parallel.shard_map(per_device, run.mesh, (REPLICATED, BATCH), (REPLICATED, REPLICATED))
  val_batch = _val_sampler(run)

  def outer(state, arrays, perm, i, length=None):
    idx = jax.lax.dynamic_slice_in_dim(perm, i * bsz, bsz)
    images = arrays["train_images"][idx]
    if length is not None:  # text: the batch's own length bucket (trailing padding cut)
      images = images[..., :length]
    images = run.weak(step_key(state, StepStream.TRAIN_VIEW), images)
    batch = {
      "images": images,
      "labels": arrays["train_labels"][idx],
      "noisy": arrays["train_noisy"][idx],
      "weights": state.example_weights[idx],
    }
    if not with_val:
      return sm(state, {"images": batch["images"], "labels": batch["labels"]})
    state, metrics, out = sm(state, _with_memory(state, batch, idx), val_batch(state, arrays))
    return _record(run.mechanism, state, idx, out), metrics

  return jax.jit(outer, donate_argnums=(0,), static_argnames=("length",))


def sharded_ssl_fn(run: Run, per_device):
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
    pick = step_key(state, StepStream.SSL_LABELLED_PICK)
    lidx = jax.random.choice(pick, n_lab, (bl,), replace=bl > n_lab)
    unl = arrays["unl_images"][uidx]
    batch = {
      "lab_images": run.weak(
        step_key(state, StepStream.SSL_LABELLED_VIEW), arrays["train_images"][lidx]
      ),
      "lab_labels": arrays["train_labels"][lidx],
      "unl_weak": run.weak(step_key(state, StepStream.SSL_WEAK_VIEW), unl),
      "unl_strong": run.strong(step_key(state, StepStream.SSL_STRONG_VIEW), unl),
      "unl_true_labels": arrays["unl_true_labels"][uidx],  # analysis only
    }
    state, metrics, out = sm(state, _with_memory(state, batch, uidx), val_batch(state, arrays))
    return _record(run.mechanism, state, uidx, out, semi_supervised=True), metrics

  return jax.jit(outer, donate_argnums=(0,))


def scored_arrays(run: Run) -> dict:
  """The device arrays of the scored split under the names the scorer reads."""
  if not run.semi_supervised:
    return run.arrays
  return {
    **run.arrays,
    "train_images": run.arrays["unl_images"],
    "train_labels": run.arrays["unl_labels"],
  }


def _epoch_perm(key: jax.Array, epoch: int, n: int) -> jax.Array:
  return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def run_phase(
  run: Run,
  phase: str,
  state: step_lib.TrainState,
  *,
  epochs: int,
  step_fns: StepFns,
  ckpt: checkpoint.PhaseCheckpoints,
  eval_nets: tuple[str, ...],
  elapsed: float = 0.0,
  on_epoch_start=None,
  student_data: bool = False,
) -> tuple[step_lib.TrainState, PhaseTime]:
  """Steps ``state`` through ``epochs`` epochs with checkpoints, logs and evals.

  Args:
    run: the run context.
    phase: the phase's name (its checkpoint folder, logs and epoch order).
    state: the (restored or fresh) state; ``state.step`` is where it resumes.
    epochs: the phase's length.
    step_fns: its jitted outer steps.
    ckpt: its checkpoints.
    eval_nets: the networks evaluated at the end of each epoch.
    elapsed: seconds the phase already ran in earlier invocations.
    on_epoch_start: ``(state, epoch) -> state`` before each epoch's first step.
    student_data: epochs run over the scored split (the unlabelled set in SSL)
      rather than the labelled training split.

  Returns:
    ``(state, PhaseTime)``.
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
  if start < total:  # the first step compiles: seconds on a CPU, minutes for a WRN
    log.info("%s: steps %d-%d (%d per epoch); compiling the step", phase, start + 1, total, spe)
  else:  # a rerun of a finished workdir redoes only the final evaluation and files
    log.info("%s: already complete (%d steps)", phase, total)
  t0 = time.time()
  perm, perm_epoch = None, -1
  # Text (supervised GLUE): each batch runs at its own length bucket, so a batch of
  # short sentences costs a short sequence; jit compiles one step per bucket used.
  bucketed = (
    run.ds.text is not None
    and not run.semi_supervised
    and bool(data.glue.text_option(cfg.data, "bucket_batches"))
  )
  lengths = tokenize.token_lengths(run.ds.train.images) if bucketed else None
  padded = run.ds.train.images.shape[-1]
  step = start
  # The divergence guard reads the watched metrics of every step one step late
  # (while the next one runs, so the host never waits for the device) and at
  # once at log and checkpoint steps; a non-finite state is never saved.
  pending = None  # (step, epoch, metrics) not yet checked

  def check(item):
    p_step, p_epoch, p_metrics = item
    what = divergence(jax.device_get(watched(p_metrics)))
    if what is not None:
      m = {k: float(v) for k, v in jax.device_get(p_metrics).items()}
      run.writer.write({"kind": "train", "phase": phase, "step": p_step, "epoch": p_epoch, **m})
      raise diverged_error(run.cfg, phase, p_step, what, ckpt)

  while step < total:
    epoch, i = divmod(step, spe)
    if epoch != perm_epoch:
      if i == 0 and on_epoch_start is not None:
        if pending is not None:  # do not rescore a diverged state
          check(pending)
          pending = None
        state = on_epoch_start(state, epoch)
      perm, perm_epoch = parallel.replicate(_epoch_perm(perm_key, epoch, n), run.mesh), epoch
      host_perm = parallel.to_host(perm) if bucketed else None
    fn = step_fns.refresh if step % step_fns.refresh_every == 0 else step_fns.stale
    kw = {}
    if bucketed:
      b = cfg.batch_size
      kw["length"] = tokenize.batch_length(lengths, host_perm[i * b : (i + 1) * b], padded)
    state, metrics = fn(state, run.arrays, perm, i, **kw)
    if pending is not None:
      check(pending)
    step += 1
    pending = (step, epoch, metrics)
    if step % cfg.log_every_steps == 0 or step == total:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      run.writer.write({"kind": "train", "phase": phase, "step": step, "epoch": epoch, **m})
      shown = {"loss": m["loss"], "batch_acc": m["accuracy"]}  # NaN: a regression task
      progress.update(step, {k: v for k, v in shown.items() if math.isfinite(v)})
      what = divergence(watched(m))
      if what is not None:
        raise diverged_error(run.cfg, phase, step, what, ckpt)
      pending = None
    else:
      progress.update(step)
    if step % spe == 0 and ((step // spe) % cfg.eval_every_epochs == 0 or step == total):
      evaluation.eval_and_log(run, state, phase, step // spe, eval_nets)
    if step % cfg.checkpoint_every_steps == 0 or step == total:
      if pending is not None:
        check(pending)
        pending = None
      finite, digest = checkpoint.state_digest(state)
      if not finite:
        raise diverged_error(
          run.cfg, phase, step, "state=non-finite (parameters after the update)", ckpt
        )
      ckpt.save(step, state, {"elapsed": elapsed + time.time() - t0, "checksum": digest})
  if pending is not None:
    check(pending)
  ckpt.wait()
  rate = progress.close()
  return state, PhaseTime(elapsed + time.time() - t0, rate if step > start else None, step - start)


def restore_or(
  run: Run, phase: str, state: step_lib.TrainState
) -> tuple[step_lib.TrainState, checkpoint.PhaseCheckpoints, float]:
  """The newest checkpoint of ``phase`` if there is one, else ``state``.

  Returns:
    ``(state, the phase's checkpoints, seconds the phase ran before)``.
  """
  ckpt = checkpoint.PhaseCheckpoints(run.workdir, phase)
  # Restored leaves take the placement of ``state``'s: on the mesh (of every process).
  state = parallel.replicate(state, run.mesh)
  # The newest step that reads, matches its checksum and is finite; newer ones
  # are logged and moved aside (CheckpointCorruptError when none passes).
  found = ckpt.restore_newest_valid(state, phase)
  elapsed = 0.0
  if found is not None:
    state, record, latest = found
    state = parallel.replicate(state, run.mesh)
    elapsed = float(record.get("elapsed", 0.0))
    log.info("%s: resumed from checkpoint at step %d", phase, latest)
  return state, ckpt, elapsed
