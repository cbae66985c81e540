"""Where arrays live: one data-parallel mesh over every device of every process.

The batch is split along the mesh axis `data`; parameters, optimizer state
and BatchNorm statistics are replicated. Under `jax.jit` the compiler inserts
the cross-device reductions, so a BatchNorm mean over the batch axis is the
mean over the global batch (synchronised BatchNorm) with no extra code.
"""

import os
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax.errors import UserError

DATA_AXIS = 'data'


def initialize_distributed() -> None:
  """Joins the other processes when launched as several (pods, clusters).

  JAX detects TPU pods, SLURM and Open MPI by itself; elsewhere set
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID in each process. CPU processes talk through gloo.
  """
  if jax.distributed.is_initialized():
    return
  num_processes = int(os.environ.get('JAX_NUM_PROCESSES', '1'))
  if num_processes > 1:
    if 'JAX_COORDINATOR_ADDRESS' not in os.environ or (
        'JAX_PROCESS_ID' not in os.environ):
      raise UserError('JAX_NUM_PROCESSES > 1 needs JAX_COORDINATOR_ADDRESS '
                      '(host:port of process 0) and JAX_PROCESS_ID (0..N-1)')
    jax.distributed.initialize(os.environ['JAX_COORDINATOR_ADDRESS'],
                               num_processes=num_processes,
                               process_id=int(os.environ['JAX_PROCESS_ID']))
  elif (int(os.environ.get('SLURM_NTASKS', '1')) > 1 or
        int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1 or
        ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')):
    jax.distributed.initialize()  # the cluster's own environment says how


def shutdown_distributed() -> None:
  """Leaves the process group while every process is still alive.

  Called at the same point of the program by every process (after the last
  checkpoint is committed), so the coordination service's shutdown barrier
  is met at once instead of from an at-exit hook racing the interpreter's
  teardown, which on loaded machines could wait out its timeout.
  """
  if jax.process_count() > 1 and jax.distributed.is_initialized():
    jax.distributed.shutdown()


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes.

  Axis type Auto: the compiler propagates shardings (GSPMD), so model code
  needs no sharding annotations (jax.make_mesh defaults to Explicit).
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices())


def per_device(fn: Callable[..., jax.Array], batched: Sequence[bool],
               summed: bool = False) -> Callable[..., jax.Array]:
  """`fn` applied to each device's slice of the batch, under a mesh context.

  A custom call (the native CPU kernels) is opaque to XLA's SPMD
  partitioner, which therefore gathers a batch-sharded operand onto every
  device first; the chunk loops of the patch convolutions have the same
  effect (x47 all-gathers, 976 MiB per textbook step on 8 devices). Under a
  mesh context (`jax.sharding.use_abstract_mesh`, as `train_step.jit_steps`
  traces the steps) this runs `fn` in a `shard_map` over every mesh axis
  instead: the arguments marked in `batched` are split along their first
  axis, the others replicated, and the result is split too, or, when
  `summed` (a kernel gradient), summed over the devices. Without a mesh of
  several devices, or with a batch that does not split evenly, it is `fn`
  itself.
  """
  def call(*args: jax.Array) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or any(
        a.shape[0] % mesh.size for a, b in zip(args, batched) if b):
      return fn(*args)
    axes = tuple(mesh.axis_names)
    split = P(axes)

    def local(*shards):
      out = fn(*shards)
      return jax.lax.psum(out, axes) if summed else out

    return jax.shard_map(
        local, mesh=mesh, check_vma=False,
        in_specs=tuple(split if b else P() for b in batched),
        out_specs=P() if summed else split)(*args)
  return call


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, what: str = 'batch_size',
                     micro_batches: int = 1) -> None:
  """A global batch must split evenly over devices and processes (each of
  its `micro_batches` micro-batches, under gradient accumulation): the one
  check of batch divisibility, made before any data is read."""
  devices = jax.device_count()
  unit = devices * micro_batches
  if batch_size <= 0 or batch_size % unit:
    parts = (f'the {devices} devices' if micro_batches == 1 else
             f'{micro_batches} micro-batches x {devices} devices')
    raise UserError(
        f'{what}={batch_size} does not divide by {parts}; '
        f'use a multiple of {unit} (e.g. --config.{what}='
        f'{max(unit, batch_size // unit * unit)})')


def global_array_from_host(mesh: Mesh, global_value: np.ndarray,
                           spec: P) -> jax.Array:
  """Builds a global array from a value every process holds in full."""
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(global_value.shape, sharding,
                                      lambda index: global_value[index])


def global_batch_from_local(mesh: Mesh, local_batch):
  """Assembles each process's slice of the batch into sharded global arrays."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
