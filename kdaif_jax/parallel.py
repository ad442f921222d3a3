"""Devices: the 'data' mesh, shard_map wrapping, batch checks, multi-host start-up.

The step is written per device with collectives on the axis name ``'data'``
(``jax.lax.pmean`` of gradients, curvature products and validation gradients)
and mapped with ``jax.shard_map`` over a 1-D mesh of all devices: pmap's
programming model on the supported API. The mesh axis is ``Auto`` so that
arrays gathered inside ``jax.jit`` (a batch sliced from a device-resident
dataset) are resharded onto the mesh by the compiler; with JAX's default
``Explicit`` axes shard_map refuses them unless each one is placed by hand.

Multi-host (``config.multihost``): ``maybe_initialize_distributed`` starts JAX's
distributed runtime, after which the mesh spans every process's devices. Each
process holds the same host data (the whole dataset, the seeded initial state);
``place``/``replicate`` put it on the global mesh with multi-process-safe calls,
and ``to_host`` fetches results sharded over other processes' devices.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def maybe_initialize_distributed(multihost: bool, options: Any = None) -> None:
  """Starts JAX's distributed runtime once when ``multihost`` is set.

  Each of ``coordinator_address``, ``num_processes`` and ``process_id`` comes
  from ``options`` (``config.distributed``) when set there, else from the
  environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, else JAX detects it (Cloud TPU pods, Slurm, Open MPI). On CPU
  the processes exchange collectives over gloo (JAX's default there).

  Args:
    multihost: whether this is one process of a multi-process run.
    options: an object with ``coordinator_address`` ("" unset),
      ``num_processes`` (0 unset) and ``process_id`` (-1 unset), or None.

  Returns:
    None; afterwards ``jax.devices()`` lists the devices of every process.
  """
  if not multihost or jax.distributed.is_initialized():
    return
  address = (getattr(options, "coordinator_address", "") or "").strip()
  count = int(getattr(options, "num_processes", 0) or 0)
  pid = int(getattr(options, "process_id", -1))
  env = os.environ
  address = address or env.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
  if count <= 0 and env.get("JAX_NUM_PROCESSES", "").strip():
    count = _env_int("JAX_NUM_PROCESSES")
  if pid < 0 and env.get("JAX_PROCESS_ID", "").strip():
    pid = _env_int("JAX_PROCESS_ID")
  try:
    jax.distributed.initialize(
      coordinator_address=address,
      num_processes=count if count > 0 else None,
      process_id=pid if pid >= 0 else None,
    )
  except ValueError as e:  # nothing set and no cluster detected
    raise ValueError(
      f"config.multihost=True but JAX's distributed runtime could not start ({e}); "
      "allowed: config.distributed.* or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
      "JAX_PROCESS_ID set, or a Slurm / Open MPI / Cloud TPU job"
    ) from None


def _env_int(name: str) -> int:
  value = os.environ[name].strip()
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 0") from None


def is_main_process() -> bool:
  """True on the process that writes the workdir's files (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``'data'`` over all (or the first ``num_devices``) devices."""
  devices = jax.devices()
  n = len(devices) if not num_devices else num_devices
  if n > len(devices):
    raise ValueError(
      f"config.num_devices={n} is invalid: {len(devices)} device(s) visible; "
      f"allowed: 0 (all) to {len(devices)}"
    )
  return jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, name: str = "batch_size") -> None:
  """Raises ValueError unless ``batch_size`` splits evenly over the mesh's devices."""
  n = mesh.shape[AXIS]
  if batch_size < n or batch_size % n:
    raise ValueError(
      f"{name}={batch_size} must be a positive multiple of the device count ({n}); "
      f"try {max(n, batch_size // n * n)}"
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of arrays held whole on every device."""
  return NamedSharding(mesh, P())


def sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of arrays split along their first axis over ``'data'``."""
  return NamedSharding(mesh, P(AXIS))


def place(tree: Any, sharding: NamedSharding) -> Any:
  """Places every leaf of ``tree`` with ``sharding`` (of one mesh over all processes).

  With several processes, each leaf must hold the same global value on every
  process (host data, or arrays computed alike from the same seed): process-local
  leaves are placed with ``jax.make_array_from_callback`` (each process fills its
  own devices' slices), arrays already spread over the processes are resharded
  by a jitted identity (collectives, no host copy). One process: ``device_put``.

  Args:
    tree: a pytree of numpy arrays, scalars or ``jax.Array``s.
    sharding: e.g. ``replicated(mesh)`` or ``sharded(mesh)``.

  Returns:
    The same tree of ``jax.Array``s placed with ``sharding``.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
      return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places every leaf of ``tree`` whole on every device of ``mesh`` (``place``)."""
  return place(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
  """Every leaf of ``tree`` as a numpy array, also when it spans other processes'
  devices (gathered with ``process_allgather``: every process must call it).

  Args:
    tree: a pytree of arrays (numpy or ``jax.Array``).

  Returns:
    The same tree of numpy arrays holding the global values.
  """

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(fetch, tree)


def shard_map(fn: Callable, mesh: jax.sharding.Mesh, in_specs: Any, out_specs: Any) -> Callable:
  """``jax.shard_map`` over ``mesh`` with specs given as ``P()``/``P('data')`` trees."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


BATCH = P(AXIS)
REPLICATED = P()


def pmean(tree: Any, axis_name: str | None) -> Any:
  """``jax.lax.pmean`` over ``axis_name``, or the identity when it is None."""
  return jax.lax.pmean(tree, axis_name) if axis_name else tree


def device_local(tree: Any, axis_name: str | None) -> Any:
  """Marks replicated values as per-device before differentiating.

  Inside ``shard_map``, the gradient with respect to a replicated (device-
  invariant) input is summed over devices by the transpose rule. Casting the
  params to 'varying' first keeps each device's gradient local, so that the
  explicit ``pmean`` that follows gives the global-batch mean, as in pmap.
  Identity when ``axis_name`` is None.
  """
  return jax.lax.pcast(tree, axis_name, to="varying") if axis_name else tree
