"""Test-session settings.

A persistent XLA compilation cache shared by the tests and the subprocesses
they start: many tests compile the same programs (the teacher phase of a smoke
run, the same step in a resumed run), and on 2 CPU cores compilation is most of
the suite's time. It changes no result, only how often XLA compiles.
"""

import logging
import os
import tempfile

import pytest

os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kdaif_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture
def eight_cpu_env() -> dict:
  """The environment of a subprocess with 8 simulated devices: CPUs, also on a
  machine whose default backend is a GPU (where XLA_FLAGS alone leaves one GPU)."""
  return {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
  }


@pytest.fixture
def kdaif_log(caplog):
  """``caplog`` with its handler on the ``kdaif_jax`` logger itself. The trainer's
  ``setup_logging`` stops that logger's propagation, and ``caplog.at_level`` puts its
  handler on a named logger only when that logger already does not propagate on entry:
  so the first trainer run in a process, inside such a block, hid its warnings from
  caplog (its handler on the root alone), and the result depended on test order."""
  logger = logging.getLogger("kdaif_jax")
  logger.addHandler(caplog.handler)
  caplog.handler.setLevel(logging.WARNING)
  try:
    yield caplog
  finally:
    logger.removeHandler(caplog.handler)
