"""Devices, meshes and shardings: data parallelism over every device of every host.

One mesh axis, 'data'. The train state is replicated (``P()``) and each batch
is split along its leading axis (``P('data')``); ``jax.jit`` then inserts the
gradient all-reduce itself, and BatchNorm statistics are those of the global
batch (synchronised BN, unlike the reference's per-GPU BN). Each host feeds
only its own rows (``jax.make_array_from_process_local_data``).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts JAX's distributed runtime when running on several hosts.

  With no address and one process this does nothing (single host). On TPU
  pods and SLURM/Open MPI clusters ``jax.distributed.initialize()`` finds all
  three by itself: pass ``num_processes=-1`` to ask for that. On CPU the gloo
  collectives carry the all-reduce (two processes on 127.0.0.1 in the tests).
  """
  if not coordinator_address and (num_processes in (None, 1)):
    return
  # Only the CPU backend reads this; asking for the backend here would start
  # it, which must not happen before jax.distributed.initialize.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if num_processes == -1:
    jax.distributed.initialize()
    return
  if num_processes is None or process_id is None or not coordinator_address:
    raise ValueError('multi-host runs need --coordinator_address, --num_processes and '
                     '--process_id together (or --num_processes=-1 on TPU/SLURM)')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id} must lie in [0, {num_processes})')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D 'data' mesh over all (or the first ``num_devices``) global devices."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f'asked for {num_devices} devices, only {len(devices)} exist')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, flag: str = '--batch_size') -> None:
  if global_batch % mesh.size:
    raise ValueError(f'{flag}={global_batch} must be divisible by the {mesh.size} devices; '
                     f'use a multiple of {mesh.size}')


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """This host's rows of a global batch -> global arrays sharded over 'data'."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def put_replicated(tree, mesh: Mesh):
  """Places a host-side pytree (identical on every host) on all devices."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
      tree)
