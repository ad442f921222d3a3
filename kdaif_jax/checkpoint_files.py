"""The files of a checkpoint step: their seal, and quiet failed reads.

``seal`` records the size and sha256 of every file of a finished step in
``STEP/kdaif_files.json``; ``check_seal`` compares them before anything is
read, so a truncated or altered step is skipped without Orbax starting (and
abandoning) reads of it. ``quiet_abandoned_reads`` keeps the echoes of such
abandoned reads out of the output for steps that have no seal. ``write_atomic``
writes the run folder's small files so that a kill never leaves one half written.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
from typing import IO, Callable

SEAL_FILE = "kdaif_files.json"

log = logging.getLogger("kdaif_jax")


class Invalid(ValueError):
  """A checkpoint that reads but must not be used (its message says why)."""


def one_line(err: BaseException, limit: int = 160) -> str:
  """``"ExceptionType: message"`` on one line, at most ``limit`` characters."""
  text = " ".join(str(err).split())
  if len(text) > limit:
    text = text[: limit - 3] + "..."
  return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _is_orbax_read_echo(unraisable) -> bool:
  """An abandoned Orbax read: its coroutine, or an exception raised in Orbax's code."""
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return True
  return _tb_in_orbax(unraisable.exc_traceback)


def _tb_in_orbax(tb) -> bool:
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _AsyncioReadEcho(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for abandoned Orbax reads."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and _tb_in_orbax(exc.__traceback__))


@contextlib.contextmanager
def quiet_abandoned_reads():
  """Keeps a failed restore's abandoned Orbax read coroutines from printing tracebacks.

  When one array of a damaged step fails to read, Orbax gives up on the others;
  their coroutines are finalised whenever the garbage collector gets to them and
  each prints "Exception ignored in <coroutine ...>" with a traceback
  (sys.unraisablehook). The failure itself is reported in one line by
  ``restore_newest_valid``. A filter for exactly these echoes (other unraisable
  exceptions pass through to the previous hook) is installed for the rest of the
  process, since the finalisation can come at any later point; a collection at
  the end of the window finalises most of them at once.
  """
  if not getattr(sys.unraisablehook, "_kdaif_read_echo_filter", False):
    previous = sys.unraisablehook

    def hook(unraisable):
      if _is_orbax_read_echo(unraisable):
        log.debug("abandoned checkpoint read: %s", unraisable.exc_value)
        return
      previous(unraisable)

    hook._kdaif_read_echo_filter = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AsyncioReadEcho())
  try:
    yield
  finally:
    gc.collect()


def _step_files(step_dir: str) -> dict[str, tuple[int, str]]:
  """``{relative path: (size, sha256)}`` of every file under a step folder but the seal."""
  files = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel.startswith(SEAL_FILE):  # the seal and its temporary file
        continue
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      files[rel] = (os.path.getsize(path), digest.hexdigest())
  return files


def write_atomic(path: str, write: Callable[[IO], None], *, binary: bool = False) -> None:
  """Writes a file through ``write(f)`` to ``path.tmp``, then renames it onto ``path``.

  A kill during the write leaves the old file (or none), never a half-written one.

  Args:
    path: the file to write.
    write: writes the contents to the open file object it is given.
    binary: open the temporary file in binary mode.
  """
  tmp = f"{path}.tmp"
  with open(tmp, "wb" if binary else "w") as f:
    write(f)
  os.replace(tmp, path)


def seal(step_dir: str) -> None:
  """Writes the seal of a complete step (atomically: a killed write leaves no seal)."""
  files = {rel: list(v) for rel, v in sorted(_step_files(step_dir).items())}
  write_atomic(os.path.join(step_dir, SEAL_FILE), lambda f: json.dump(files, f))


def check_seal(step_dir: str) -> None:
  """Raises ``Invalid`` when a sealed step's files differ from what was saved.

  A step without a seal (written by an older version, or by a run killed just
  after Orbax finished it) is left to Orbax's own checks.
  """
  path = os.path.join(step_dir, SEAL_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      sealed = {rel: tuple(v) for rel, v in json.load(f).items()}
  except (OSError, ValueError) as err:
    raise Invalid(f"unreadable: its seal {SEAL_FILE}: {one_line(err)}") from None
  found = _step_files(step_dir)
  for rel, (size, digest) in sealed.items():
    if rel not in found:
      raise Invalid(f"unreadable: {rel} is missing")
    if found[rel][0] != size:
      raise Invalid(f"unreadable: {rel} has {found[rel][0]} bytes, saved with {size}")
    if found[rel][1] != digest:
      raise Invalid(f"unreadable: {rel} changed on disk since it was saved")


def init_folder(path: str) -> str:
  """The checkpoint folder that ``config.teacher.init`` names.

  Args:
    path: a workdir of an earlier run (its ``checkpoints/teacher`` is used) or a
      ``checkpoints/PHASE`` folder.

  Returns:
    The folder holding the numbered checkpoint steps.

  Raises:
    FileNotFoundError: no such folder, or one without a saved step (one line,
      naming the option), so that ``validate`` refuses it before any data loads.
  """
  folder = os.path.join(path, "checkpoints", "teacher")
  if not os.path.isdir(folder):
    folder = path
  if not os.path.isdir(folder) or not any(n.isdigit() for n in os.listdir(folder)):
    raise FileNotFoundError(
      f"config.teacher.init={path!r}: no checkpoint folder found; allowed: the workdir "
      "of an earlier run, or a checkpoints/teacher (or student) folder with saved steps"
    )
  return folder
