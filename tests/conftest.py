"""Test-session settings.

A persistent XLA compilation cache shared by the tests and the subprocesses
they start: many tests compile the same programs (the teacher phase of a smoke
run, the same step in a resumed run), and on 2 CPU cores compilation is most of
the suite's time. It changes no result, only how often XLA compiles.
"""

import os
import tempfile

os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kdaif_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
