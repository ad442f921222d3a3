"""Orbax checkpoints of a run's phases, the workdir's experiment fingerprint and lock.

Each phase (teacher, proxy, student) has its own ``CheckpointManager`` under
``WORKDIR/checkpoints/PHASE``. Orbax writes a step into a temporary folder and
renames it only when complete, so a run killed at any moment leaves the newest
complete checkpoint intact; a rerun restores it and loses at most the steps
since then.

Every saved state carries a checksum in its JSON record (``state_digest``:
exact integer sums of each leaf's bits, independent of device and reduction
order). ``PhaseCheckpoints.restore_newest_valid`` restores the newest step that
reads, matches its checksum and is finite, and moves the steps it skipped aside
(``STEP.corrupt``). Once a step is on disk, its files' sizes and sha256 are
sealed in ``STEP/kdaif_files.json``; a step whose files no longer match is
skipped before Orbax reads any of it (a damaged file can make Orbax abandon
reads half-way, whose echoes would otherwise surface later). ``WorkdirLock``
(``kdaif_jax.workdir_lock``, re-exported here) keeps two trainers out of one
workdir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from kdaif_jax.checkpoint_files import SEAL_FILE as SEAL_FILE
from kdaif_jax.checkpoint_files import (
  Invalid,
  check_seal,
  init_folder,
  one_line,
  quiet_abandoned_reads,
  seal,
  write_atomic,
)
from kdaif_jax.logs import absl_quiet

# Re-exported: the trainer and main.py reach the lock through this module.
from kdaif_jax.workdir_lock import LOCK_FILE as LOCK_FILE
from kdaif_jax.workdir_lock import WorkdirLock as WorkdirLock
from kdaif_jax.workdir_lock import WorkdirLockedError as WorkdirLockedError
from kdaif_jax.workdir_lock import open_workdir as open_workdir

EXPERIMENT_FILE = "experiment.json"

log = logging.getLogger("kdaif_jax")


class CheckpointMismatchError(ValueError):
  """The workdir belongs to a different experiment (its experiment.json differs)."""


class CheckpointCorruptError(RuntimeError):
  """No checkpoint of a phase could be restored (all unreadable, altered or non-finite)."""


# --------------------------------------------------------------------------
# Checksums and finiteness of a state
# --------------------------------------------------------------------------


def _fetchable(x: Any) -> Any:
  """A leaf ready for ``jax.device_get`` (raw key data for typed PRNG keys)."""
  if isinstance(x, jax.Array):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:  # multi-host: any copy of a replicated leaf will do
      x = x.addressable_data(0) if x.is_fully_replicated else multihost_utils.process_allgather(x)
  return x


def _is_float(x: np.ndarray) -> bool:
  return np.issubdtype(x.dtype, np.inexact) or "float" in x.dtype.name  # ml_dtypes: bfloat16


def _bits(x: np.ndarray) -> np.ndarray:
  """The bit patterns of ``x`` as a flat uint32 vector."""
  if x.dtype == np.bool_:
    return x.astype(np.uint32).reshape(-1)
  size = x.dtype.itemsize
  view = {1: np.uint8, 2: np.uint16}.get(size, np.uint32)
  return np.ascontiguousarray(x).view(view).astype(np.uint32).reshape(-1)


def state_digest(state: Any) -> tuple[bool, str]:
  """Whether every floating leaf of ``state`` is finite, and a checksum of all its bits.

  The state is fetched once (one batched device-to-host copy, as the save itself
  makes) and summed on the host: no compilation, a few milliseconds for the
  smoke state (360k numbers), well under a second for millions of parameters.
  The checksum is the sum of all leaves' bit patterns (as uint32) and their
  position-weighted sum, both mod 2^32: integer sums are exact, so it depends
  only on the bits, not on the device, the sharding or the reduction order.

  Returns:
    ``(finite, checksum)``: checksum is ``"u32x2:"`` + a sha256 of the two sums.
  """
  leaves = jax.device_get([_fetchable(x) for x in jax.tree.leaves(state)])
  leaves = [np.asarray(x) for x in leaves]
  finite = all(
    bool(np.isfinite(x.astype(np.float32) if x.dtype.itemsize < 4 else x).all())
    for x in leaves
    if _is_float(x)
  )
  u = np.concatenate([_bits(x) for x in leaves]) if leaves else np.zeros(0, np.uint32)
  pos = np.arange(u.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
  sums = np.array([u.sum(dtype=np.uint32), (u * pos).sum(dtype=np.uint32)], "<u4")
  digest = hashlib.sha256(sums.tobytes() + str(len(leaves)).encode()).hexdigest()
  return finite, f"u32x2:{digest[:32]}"


class PhaseCheckpoints:
  """Save/restore one phase's ``TrainState`` (plus a small JSON record) by step.

  Args:
    workdir: the run's folder.
    phase: phase name (a subfolder of ``checkpoints/``).
    max_to_keep: how many complete checkpoints to keep.
  """

  def __init__(self, workdir: str, phase: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints", phase))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._unsealed: set[int] = set()  # saved by this manager, seal not yet written

  def _seal_finished(self) -> None:
    """Seals the steps this manager saved that Orbax has finished (call after a wait)."""
    on_disk = set(self._manager.all_steps())
    for step in sorted(self._unsealed):
      if step in on_disk and jax.process_index() == 0:
        seal(os.path.join(self.directory, str(step)))
    self._unsealed.clear()

  def latest_step(self) -> int | None:
    """Newest complete step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: dict | None = None) -> None:
    """Saves ``state`` (asynchronously) and ``record`` (JSON) at ``step``."""
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record or {})
    )
    # Orbax's save waits for the previous one anyway; waiting here first lets it be sealed.
    self.wait()
    self._manager.save(step, args=args)
    self._unsealed.add(step)

  def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores the state at ``step`` (newest by default) shaped and placed like ``like``."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()
      ),
    )
    return out.state, dict(out.record or {})

  def _check(self, like: Any, step: int) -> tuple[Any, dict]:
    """Restores ``step`` and verifies it; raises ValueError naming what is wrong."""
    check_seal(os.path.join(self.directory, str(step)))
    state, record = self.restore(like, step)
    finite, digest = state_digest(state)
    expected = record.get("checksum")
    if expected is not None and expected != digest:
      raise Invalid("checksum mismatch: its data changed on disk")
    if not finite:
      raise Invalid("it holds non-finite values (NaN or inf)")
    return state, record

  def restore_newest_valid(self, like: Any, phase: str = "") -> tuple[Any, dict, int] | None:
    """The newest step that restores, matches its checksum and is finite.

    Each newer step skipped is logged in one line and moved aside to
    ``STEP.corrupt`` (kept for inspection; Orbax ignores it), so that the phase
    can save that step number again.

    Args:
      like: a state with the expected structure, shapes and placement.
      phase: the phase's name, for the log lines.

    Returns:
      ``(state, record, step)``, or None when the folder has no complete step.

    Raises:
      CheckpointCorruptError: steps exist but none passes (one line naming the folder).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    problems = []
    for step in steps:
      why = None
      # The window closes after the except clauses have dropped the exception (and
      # with it the frames of Orbax's abandoned reads), so the collection finds them.
      with quiet_abandoned_reads():
        try:
          state, record = self._check(like, step)
        except Invalid as err:
          why = str(err)
        except Exception as err:  # noqa: BLE001 - any failure to read means: try an older step
          why = f"unreadable: {one_line(err)}"
      if why is not None:
        problems.append((step, why))
        continue
      for bad, why in problems:
        moved = self._move_aside(bad)
        log.warning(
          "%s: checkpoint at step %d skipped (%s); moved to %s; resuming from step %d",
          phase or os.path.basename(self.directory),
          bad,
          why,
          moved,
          step,
        )
      if problems:
        if jax.process_count() > 1:  # process 0 moved them; the others wait for it
          multihost_utils.sync_global_devices(f"kdaif_move_aside_{self.directory}_{step}")
        self._manager.reload()
      return state, record, step
    detail = "; ".join(f"step {s}: {why}" for s, why in problems)
    raise CheckpointCorruptError(
      f"no checkpoint in {self.directory} could be restored ({detail}); "
      "delete that folder to restart the phase"
    )

  def _move_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.corrupt"
    n = 1
    while os.path.exists(dst):
      dst, n = f"{src}.corrupt{n}", n + 1
    if jax.process_index() == 0:
      os.rename(src, dst)
    return dst

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk (and sealed)."""
    self._manager.wait_until_finished()
    self._seal_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self.wait()
    self._manager.close()


def restore_net_arrays(folder: str, net: str) -> tuple[Any, Any, int]:
  """One network of the newest readable checkpoint in ``folder``, as numpy arrays.

  No target structure is needed and the arrays do not depend on the devices
  that wrote them, so a checkpoint from a GPU run reads on a laptop. A step that
  fails to read (e.g. cut short on disk) or holds non-finite values in ``net``
  falls back to the next older one.

  Args:
    folder: a ``checkpoints/PHASE`` folder.
    net: "teacher" or "student".

  Returns:
    (params, model_state, step).

  Raises:
    FileNotFoundError: no complete checkpoint in ``folder``.
    RuntimeError: none of them could be read (the last error is named).
  """
  # Orbax reads absolute paths only; a relative one is the working directory's
  # (``--config.teacher.init=workdirs/x``), as for ``PhaseCheckpoints``.
  folder = os.path.abspath(folder)
  steps = (
    sorted(
      (
        int(d)
        for d in os.listdir(folder)
        if d.isdigit() and os.path.isdir(os.path.join(folder, d, "state"))
      ),
      reverse=True,
    )
    if os.path.isdir(folder)
    else []
  )
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint in {folder}")
  with absl_quiet():  # orbax logs missing optional metadata
    ckptr = ocp.PyTreeCheckpointer()
    error: Exception | None = None
    for step in steps:
      path = os.path.join(folder, str(step), "state")
      try:
        check_seal(os.path.join(folder, str(step)))
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = ckptr.restore(path, restore_args=args)
        params, model_state = state[net]["params"], state[net].get("model_state") or {}
        for leaf in jax.tree.leaves((params, model_state)):
          if _is_float(np.asarray(leaf)) and not np.isfinite(np.asarray(leaf, np.float32)).all():
            raise Invalid(f"step {step}: {net} holds non-finite values (NaN or inf)")
        return params, model_state, step
      except Exception as err:  # noqa: BLE001 - try the next older step
        error = err
    raise RuntimeError(f"{folder}: {error}")


def load_net(path: str, phase: str, like: Any) -> tuple[Any, Any]:
  """Loads (params, model_state) of ``phase``'s network from a workdir or checkpoint dir.

  Args:
    path: a workdir of an earlier run (its newest ``checkpoints/teacher``), or
      a ``checkpoints/PHASE`` folder.
    phase: "teacher" or "student": which network of the checkpointed state.
    like: a ``NetState`` with the expected shapes.
  """
  folder = init_folder(path)
  try:
    params, ms, _ = restore_net_arrays(folder, phase)
  except (FileNotFoundError, RuntimeError) as e:
    raise FileNotFoundError(f"config.teacher.init={path!r}: {e}") from None
  params = jax.tree.map(jnp.asarray, params)
  ms = jax.tree.map(jnp.asarray, ms)
  if jax.tree.structure(params) != jax.tree.structure(like.params):
    raise ValueError(
      f"config.teacher.init={path!r} holds a different architecture than config.teacher.model"
    )
  return params, ms


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


# Options added after workdirs were first written, with the value that keeps such a
# workdir's experiment: a fingerprint without the option reads as this value. (The
# influence maths' precision changes nothing on CPU, where those runs were made.)
_ADDED_OPTIONS = {
  "kdaif.matmul_precision": "highest",
  "kdaif.whole_set.trajectory": 0,
  "kdaif.whole_set.damping": None,
}


def check_experiment(workdir: str, fingerprint: dict, write: bool = True) -> None:
  """Records ``fingerprint`` in the workdir, or checks it against the one there.

  The trainer calls it before the first step, with the workdir locked. In a
  multi-process run every process checks and only process 0 writes (``write``):
  the others read either no file or the same fingerprint, so all agree.

  Args:
    workdir: the run's folder.
    fingerprint: the experiment's options (``trainer._fingerprint``).
    write: whether to record it when the workdir has none yet.

  Raises:
    CheckpointMismatchError: the workdir was made by a run (finished, stopped or
      still without checkpoints) whose fingerprint differs; the message names
      the differing options. Also when its experiment.json is unreadable.
  """
  path = os.path.join(workdir, EXPERIMENT_FILE)
  # Checked whenever the file exists, not only once checkpoints do: a run stopped
  # before its first checkpoint left metrics and config files of its experiment.
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = _flatten(json.load(f))
    except (OSError, ValueError) as err:
      raise CheckpointMismatchError(
        f"--workdir={workdir}: {path} is unreadable ({one_line(err)}); "
        "use a new --workdir, or delete that file if the workdir is this experiment's"
      ) from None
    new = _flatten(json.loads(json.dumps(fingerprint)))
    old = {**{k: v for k, v in _ADDED_OPTIONS.items() if k in new}, **old}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
      shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
      more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
      raise CheckpointMismatchError(
        f"--workdir={workdir} holds a different experiment ({shown}{more}); "
        "use a new --workdir or delete that one"
      )
    return
  if not write:
    return
  os.makedirs(workdir, exist_ok=True)
  write_atomic(path, lambda f: json.dump(fingerprint, f, indent=1, sort_keys=True))
