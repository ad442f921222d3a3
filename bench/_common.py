"""Helpers shared by the benchmarks: timing, environment record, JSON output.

Not a benchmark itself. Every bench script runs from the repository root as
``.venv/bin/python bench/NAME.py``; this file sits next to them, so a plain
``import _common`` works (Python puts the script's folder on ``sys.path``).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Any, Callable

import jax

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def time_fn(fn: Callable, args: tuple, repeats: int, warmup: int = 1) -> dict[str, Any]:
  """Times ``fn(*args)`` with ``block_until_ready`` on its outputs.

  The first call (compile + first run) is timed separately, then ``warmup - 1``
  more untimed calls, then ``repeats`` timed ones.

  Args:
    fn: a (jitted) function.
    args: its positional arguments, reused on every call (nothing is donated).
    repeats: timed calls (>= 1).
    warmup: untimed calls before the timed ones, the first included (>= 1).

  Returns:
    dict with ``median_ms``, ``min_ms``, ``max_ms``, ``times_ms`` (every timed
    call), ``first_call_s`` (compile + first run) and ``out`` (the last output).
  """
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  for _ in range(max(warmup, 1) - 1):
    out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(1e3 * (time.perf_counter() - t0))
  return {
    "median_ms": statistics.median(times),
    "min_ms": min(times),
    "max_ms": max(times),
    "times_ms": [round(t, 3) for t in times],
    "first_call_s": first,
    "out": out,
  }


def environment() -> dict[str, Any]:
  """What a result depends on: date, versions, backend, devices, CPUs, platform."""
  import flax
  import numpy as np
  import optax

  dev = jax.devices()[0]
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "jax_version": jax.__version__,
    "flax_version": flax.__version__,
    "optax_version": optax.__version__,
    "numpy_version": np.__version__,
    "backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "platform": platform.platform(),
    "python": platform.python_version(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
  }


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
  """Writes ``payload`` as indented JSON (creating the folder); returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_default) + "\n")
  os.replace(tmp, path)
  return path


def _default(obj):
  try:
    import numpy as np

    if isinstance(obj, np.generic):
      return obj.item()
    if isinstance(obj, np.ndarray):
      return obj.tolist()
  except ImportError:  # pragma: no cover
    pass
  return str(obj)
