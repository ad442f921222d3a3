"""Devices: the 'data' mesh, shard_map wrapping, batch checks, multi-host start-up.

The step is written per device with collectives on the axis name ``'data'``
(``jax.lax.pmean`` of gradients, curvature products and validation gradients)
and mapped with ``jax.shard_map`` over a 1-D mesh of all devices: pmap's
programming model on the supported API. The mesh axis is ``Auto`` so that
arrays gathered inside ``jax.jit`` (a batch sliced from a device-resident
dataset) are resharded onto the mesh by the compiler; with JAX's default
``Explicit`` axes shard_map refuses them unless each one is placed by hand.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def maybe_initialize_distributed(multihost: bool) -> None:
  """Calls ``jax.distributed.initialize()`` once when ``multihost`` is set.

  On Cloud TPU pods and SLURM/Open MPI clusters JAX discovers the
  coordinator itself; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
  and JAX_PROCESS_ID.
  """
  if multihost and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``'data'`` over all (or the first ``num_devices``) devices."""
  devices = jax.devices()
  n = len(devices) if not num_devices else num_devices
  if n > len(devices):
    raise ValueError(f"num_devices={n} but only {len(devices)} devices are visible")
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


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places every leaf of ``tree`` whole on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


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
