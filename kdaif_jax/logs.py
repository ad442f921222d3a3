"""Run logs: metrics.jsonl, TensorBoard event files (no TensorFlow), progress output."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from typing import Any

import numpy as np

log = logging.getLogger("kdaif_jax")


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item() if np.ndim(value) == 0 else value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Appends one JSON object per line to ``WORKDIR/metrics.jsonl`` and mirrors
  scalars to TensorBoard event files under ``WORKDIR/tensorboard`` (tensorboardX).

  Lines carry ``phase``, ``step`` and ``kind`` ("train" or "eval"). A resumed
  run appends; readers keep the last line of each (phase, kind, step, split, net).
  With ``enabled=False`` (the processes other than 0 of a multi-host run) it
  opens and writes nothing.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True):
    self._file = self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: it pulls protobuf

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict) -> None:
    """Writes one record (scalars only are mirrored to TensorBoard)."""
    if self._file is None:
      return
    record = {k: _plain(v) for k, v in record.items()}
    record.setdefault("time", time.time())
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    if self._tb is not None:
      prefix = "/".join(str(record[k]) for k in ("phase", "kind", "net", "split") if k in record)
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ("step", "time", "epoch"):
          self._tb.add_scalar(f"{prefix}/{k}", v, record.get("step", 0))

  def close(self) -> None:
    """Flushes and closes both sinks."""
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


class Progress:
  """A progress bar with rate and ETA on a terminal, plain log lines otherwise.

  Args:
    phase: shown as the description.
    total: total steps of the phase.
    start: steps already done (resume).
    mode: "bar", "log", "none", or "auto" (bar when stderr is a terminal).
    every: log-line interval in steps.
  """

  def __init__(self, phase: str, total: int, start: int = 0, mode: str = "auto", every: int = 20):
    if mode == "auto":
      mode = "bar" if sys.stderr.isatty() else "log"
    self.mode, self.phase, self.total, self.every = mode, phase, total, every
    self._start_step, self._t0, self._step = start, time.time(), start
    self._bar = None
    self._first, self._t_first = None, None
    if mode == "bar":
      from tqdm.auto import tqdm

      self._bar = tqdm(total=total, initial=start, desc=phase, unit="step", dynamic_ncols=True)

  def update(self, step: int, info: dict | None = None) -> None:
    """Advances to ``step``; ``info`` (a few scalars) is shown beside the bar/line."""
    done = step - self._step
    self._step = step
    if self._first is None:
      # Rates exclude the first step, which pays for compilation.
      self._first, self._t_first = step, time.time()
    text = " ".join(f"{k}={v:.4g}" for k, v in (info or {}).items())
    if self._bar is not None:
      self._bar.update(done)
      if info:
        self._bar.set_postfix_str(text, refresh=False)
    elif self.mode == "log" and (step % self.every == 0 or step == self.total):
      rate = self._rate()
      eta = (self.total - step) / rate if rate > 0 else float("nan")
      log.info(
        "%s %d/%d (%.0f%%) %.2f steps/s ETA %s %s",
        self.phase,
        step,
        self.total,
        100.0 * step / max(self.total, 1),
        rate,
        _fmt_duration(eta) if math.isfinite(eta) else "?",
        text,
      )

  def close(self) -> float:
    """Ends the bar; returns steps per second after the first (compiling) step.

    With a single step in this invocation that step's own rate (compilation
    included); 0.0 when none ran.
    """
    if self._bar is not None:
      self._bar.close()
    if self._first is not None and self._step == self._first:
      return (self._step - self._start_step) / max(self._t_first - self._t0, 1e-9)
    return self._rate()

  def _rate(self) -> float:
    if self._first is None or self._step == self._first:
      return 0.0
    return (self._step - self._first) / max(time.time() - self._t_first, 1e-9)


def setup_logging() -> None:
  """INFO-level timestamped lines on stderr for the ``kdaif_jax`` logger."""
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
  # Orbax logs every checkpoint write at INFO through absl; keep the console for progress.
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)


@contextlib.contextmanager
def absl_quiet():
  """Shows only absl ERROR lines inside the block (orbax's and tfds' routine warnings,
  e.g. missing optional metadata, would otherwise precede our one-line errors)."""
  from absl import logging as absl_logging

  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)
