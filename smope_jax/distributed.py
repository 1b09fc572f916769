"""Multi-process start-up, the device mesh and global batches.

One code path serves a laptop CPU, one GPU box and a TPU pod slice: the mesh
has a single 'data' axis over all devices of all processes, parameters are
replicated and each global batch is assembled from the processes' local
shards.
"""

import os
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from smope_jax.errors import UserError

DATA_AXIS = "data"
# Set to "auto" (launch/tpu_vm.sh does) to join the cluster JAX detects.
DISTRIBUTED_ENV = "SMOPE_DISTRIBUTED"


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "").strip()
  return int(value) if value else None


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> None:
  """Joins a multi-process run when one is requested or detected.

  Explicit arguments win; otherwise `SMOPE_COORDINATOR_ADDRESS`,
  `SMOPE_NUM_PROCESSES` and `SMOPE_PROCESS_ID` are read. These join with
  JAX's cluster detection switched off: under `srun` it would otherwise
  restrict each process to the one GPU numbered `SLURM_LOCALID`, while here
  a process drives every device of its machine.

  `SMOPE_DISTRIBUTED=auto` asks JAX to detect the cluster: a Cloud TPU VM,
  single host or pod slice (from the VM's metadata), TPUs on GKE, SLURM or
  Open MPI. Without any of these, several SLURM or Open MPI tasks and GKE TPU
  slices, recognised from their environment variables, are joined the same
  way; anything else runs as one process.
  """
  address = coordinator_address or os.environ.get("SMOPE_COORDINATOR_ADDRESS")
  count = num_processes or _env_int("SMOPE_NUM_PROCESSES") or None
  pid = process_id if process_id >= 0 else _env_int("SMOPE_PROCESS_ID")
  if address or count:
    if not (address and count and pid is not None):
      raise UserError(
          "a multi-process run needs all of --coordinator_address=HOST:PORT, "
          "--num_processes=N and --process_id=I (or SMOPE_COORDINATOR_ADDRESS,"
          " SMOPE_NUM_PROCESSES, SMOPE_PROCESS_ID).")
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=pid,
                               cluster_detection_method="deactivate")
  elif _detection_requested() or _cluster_detected():
    _join_detected_cluster()
  logging.info("process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)


def _detection_requested() -> bool:
  value = os.environ.get(DISTRIBUTED_ENV, "").strip()
  if value not in ("", "auto"):
    raise UserError(f"{DISTRIBUTED_ENV} must be 'auto' or unset, got "
                    f"{value!r}.")
  return value == "auto"


def _join_detected_cluster() -> None:
  """`jax.distributed.initialize()`, which finds the cluster by itself."""
  try:
    jax.distributed.initialize()
  except ValueError as e:  # JAX found no cluster to take the arguments from.
    raise UserError(
        "JAX detected no cluster (Cloud TPU VM, GKE TPU, SLURM, Open MPI) "
        f"to join ({e}): unset {DISTRIBUTED_ENV} to run as one process, or "
        "pass --coordinator_address, --num_processes and --process_id.") from e


def _cluster_detected() -> bool:
  """True under SLURM / Open MPI with several tasks or on a GKE TPU slice."""
  if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_PROCID" in os.environ:
    return True
  if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def make_mesh(devices=None) -> Mesh:
  """One 'data' axis over `devices` (default: every device of the run)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices),
              (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """Assembles the global batch from each process's local numpy shard."""
  return {
      k: jax.make_array_from_process_local_data(sharding, v)
      for k, v in local.items()
  }


def put_replicated(tree, mesh: Mesh):
  """Places a host pytree (the same on every process) on all devices."""
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(
          np.shape(x), sharding, lambda idx, x=x: np.asarray(x)[idx]), tree)


def to_host(tree):
  """Fetches replicated global arrays to numpy on every process."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_data(0))
      if isinstance(x, jax.Array) else np.asarray(x), tree)


def gather_to_host(x: jax.Array) -> np.ndarray:
  """All rows of a batch-sharded array, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_primary() -> bool:
  return jax.process_index() == 0
