"""Orbax checkpoints of a run's phases, and the workdir's experiment fingerprint.

Each phase (teacher, proxy, student) has its own ``CheckpointManager`` under
``WORKDIR/checkpoints/PHASE``. Orbax writes a step into a temporary folder and
renames it only when complete, so a run killed at any moment leaves the newest
complete checkpoint intact; a rerun restores it and loses at most the steps
since then.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

EXPERIMENT_FILE = "experiment.json"


class CheckpointMismatchError(ValueError):
  """The workdir holds checkpoints of a different experiment."""


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

  def latest_step(self) -> int | None:
    """Newest complete step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: dict | None = None) -> None:
    """Saves ``state`` (asynchronously) and ``record`` (JSON) at ``step``."""
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record or {})
    )
    self._manager.save(step, args=args)

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

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def restore_net_arrays(folder: str, net: str) -> tuple[Any, Any, int]:
  """One network of the newest readable checkpoint in ``folder``, as numpy arrays.

  No target structure is needed and the arrays do not depend on the devices
  that wrote them, so a checkpoint from a GPU run reads on a laptop. A step that
  fails to read (e.g. cut short on disk) falls back to the next older one.

  Args:
    folder: a ``checkpoints/PHASE`` folder.
    net: "teacher" or "student".

  Returns:
    (params, model_state, step).

  Raises:
    FileNotFoundError: no complete checkpoint in ``folder``.
    RuntimeError: none of them could be read (the last error is named).
  """
  from absl import logging as absl_logging

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
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs missing optional metadata
  try:
    ckptr = ocp.PyTreeCheckpointer()
    error: Exception | None = None
    for step in steps:
      path = os.path.join(folder, str(step), "state")
      try:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = ckptr.restore(path, restore_args=args)
        return state[net]["params"], state[net].get("model_state") or {}, step
      except Exception as err:  # noqa: BLE001 - try the next older step
        error = err
    raise RuntimeError(f"{folder}: {error}")
  finally:
    absl_logging.set_verbosity(verbosity)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def check_experiment(workdir: str, fingerprint: dict) -> None:
  """Records ``fingerprint`` in the workdir, or checks it against the one there.

  Raises:
    CheckpointMismatchError: the workdir has checkpoints from a run whose
      fingerprint differs; the message names the differing options.
  """
  path = os.path.join(workdir, EXPERIMENT_FILE)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  has_ckpt = os.path.isdir(ckpt_dir) and bool(os.listdir(ckpt_dir))
  if os.path.exists(path) and has_ckpt:
    with open(path) as f:
      old = _flatten(json.load(f))
    new = _flatten(json.loads(json.dumps(fingerprint)))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
      shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
      more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
      raise CheckpointMismatchError(
        f"--workdir={workdir} holds checkpoints of a different experiment ({shown}{more}); "
        "use a new --workdir or delete that one"
      )
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(fingerprint, f, indent=1, sort_keys=True)
