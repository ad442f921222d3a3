"""The workdir lock: one trainer per workdir (``WORKDIR/.lock``), and ``open_workdir``."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket

import jax

LOCK_FILE = ".lock"

log = logging.getLogger("kdaif_jax")

__all__ = ["LOCK_FILE", "WorkdirLock", "WorkdirLockedError", "open_workdir"]


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _read_holder(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace")
    holder = json.loads(text) if text.strip() else {}
    return holder if isinstance(holder, dict) else {"raw": text.strip()[:80]}
  except (OSError, ValueError):
    return {"raw": "unreadable"}


class WorkdirLock:
  """An exclusive lock on a workdir: ``WORKDIR/.lock`` holds the holder's PID and host.

  The lock is an ``fcntl.flock`` on that file, which the kernel drops when its
  process dies (also on SIGKILL), so a lock file left by a killed run is stale:
  ``acquire`` takes it over and logs whose it was. A live holder makes
  ``acquire`` raise ``WorkdirLockedError`` naming its PID. ``release`` removes
  the file. Use as a context manager or call ``acquire``/``release``.

  Args:
    workdir: the run's folder (must exist).
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    """Takes the lock (see the class docstring); returns self."""
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      flock_ok = True
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise WorkdirLockedError(
          f"--workdir={self.workdir} is in use by PID {holder.get('pid', '?')} on "
          f"{holder.get('host', '?')} (started {holder.get('started', '?')}, {self.path}); "
          "wait for that run to end or use another --workdir"
        ) from None
      except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          os.close(fd)
          raise
        flock_ok = False
        log.warning("workdir lock: %s does not support file locks; PID check only", self.path)
      # The holder removes the file on release: if that happened between our open
      # and flock we locked an orphan inode; start over on the new file.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    holder = _read_holder(fd)
    host = socket.gethostname()
    if holder:
      pid = holder.get("pid")
      # With working file locks our flock proves the holder dead; without them
      # a live PID on this host is all there is to go by.
      if (
        not flock_ok
        and holder.get("host") == host
        and isinstance(pid, int)
        and pid != os.getpid()
        and _pid_alive(pid)
      ):
        os.close(fd)
        raise WorkdirLockedError(
          f"--workdir={self.workdir} is in use by PID {pid} on {host} ({self.path}); "
          "wait for that run to end or use another --workdir"
        )
      log.info(
        "workdir lock: took over the stale lock of PID %s on %s (%s)",
        pid,
        holder.get("host", "?"),
        "no longer running" if holder.get("host") == host else "another host, not running there",
      )
    record = {
      "pid": os.getpid(),
      "host": host,
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    """Removes the lock file and drops the lock (a no-op when not held)."""
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while still holding it: see the inode check in acquire
    except FileNotFoundError:
      pass
    try:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def open_workdir(workdir: str) -> WorkdirLock | None:
  """Creates ``workdir`` when needed and takes its lock (process 0 of a multi-host run).

  Returns:
    The held ``WorkdirLock`` (None on the other processes).

  Raises:
    ValueError: an empty workdir, one that is a file, or a folder that cannot be
      created or written; one line naming it.
    WorkdirLockedError: another live run holds it (its PID named).
  """
  if not str(workdir).strip():
    raise ValueError("--workdir is empty; give a folder, e.g. --workdir=workdirs/default")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a folder; give a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--workdir={workdir}: cannot create it ({e.strerror or e})") from None
  if jax.process_index() != 0:
    return None
  try:
    return WorkdirLock(workdir).acquire()
  except OSError as e:
    raise ValueError(f"--workdir={workdir} is not writable ({e.strerror or e})") from None
