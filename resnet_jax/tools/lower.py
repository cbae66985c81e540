"""A run's train and eval steps lowered for GPU or TPU, without the hardware.

  python -m resnet_jax.tools.lower --config=configs/imagenet_resnet50.py \
      --platform=cuda,tpu --devices=8

Builds the steps exactly as train.py would on the target platform (the
config's model with its convolution implementation resolved for that
platform, its dtype, the real batch shapes, a data-parallel mesh of
`--devices` devices, state replicated and batches split) and exports them
with `jax.export` for that platform. The devices are simulated CPU devices
standing in for the target's: lowering needs only shapes and shardings.

Printed per step: the program's size, its sharding annotations, its custom
calls (on an accelerator only the partitioner's own are allowed: an FFI
call or a host callback there is a CPU-only path that leaked, and fails),
the collectives XLA's SPMD partitioner inserts (from the same program
compiled for the simulated CPU devices: GSPMD partitions alike on every
backend, though each backend's later passes may combine them differently)
and the bytes of the arguments per device. Temporary memory is known only
to the target's compiler, so it is given for `cpu` alone.

An unknown platform or a failed lowering is one line and exit code 2.
"""

import collections
import dataclasses
import functools
import re
from typing import Any, Iterable

import jax
import numpy as np
from absl import flags

from resnet_jax import cli, sharding
from resnet_jax.cpu import layers as cpu_layers
from resnet_jax.cpu import native
from resnet_jax.data import datasets, device_data
from resnet_jax.errors import UserError
from resnet_jax.train import run_setup, train_step

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
# Custom calls through which JAX itself expresses shardings: allowed anywhere.
PARTITIONER_CALLS = frozenset({
    'Sharding', 'SPMDFullToShardShape', 'SPMDShardToFullShape',
    'annotate_device_placement', 'MoveToHost', 'MoveToDevice'})
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter',
                'collective-permute', 'all-to-all', 'collective-broadcast')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
          'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8,
          'f64': 8}


@dataclasses.dataclass
class LoweredStep:
  """What one step's program holds, for one group of target platforms."""
  step: str                       # 'train' | 'eval'
  platforms: tuple[str, ...]
  conv_impl: str                  # resolved for those platforms
  devices: int
  program_bytes: int              # serialized StableHLO
  sharding_annotations: int
  custom_calls: dict[str, int]    # target -> count
  argument_bytes_per_device: int
  collectives: dict[str, dict[str, int]] | None = None  # kind -> count, bytes
  memory: dict[str, int] | None = None  # cpu only: XLA's buffer sizes

  def describe(self) -> str:
    mib = lambda n: f'{n / 2**20:.1f} MiB'  # pylint: disable=unnecessary-lambda-assignment
    calls = ', '.join(f'{k} x{v}' for k, v in self.custom_calls.items())
    lines = [f'{self.step} step for {",".join(self.platforms)} on '
             f'{self.devices} devices (conv_impl {self.conv_impl}): '
             f'{mib(self.program_bytes)} of StableHLO, '
             f'{self.sharding_annotations} sharding annotations',
             f'  custom calls: {calls or "none"}']
    if self.collectives is not None:
      found = ', '.join(f'{k} x{v["count"]} ({mib(v["bytes"])})'
                        for k, v in self.collectives.items())
      lines.append('  collectives (SPMD partitioner, same program compiled '
                   f'for {self.devices} CPU devices): {found or "none"}')
    lines.append('  arguments per device: '
                 f'{mib(self.argument_bytes_per_device)}')
    if self.memory is not None:
      lines.append('  cpu buffers per device: ' + ', '.join(
          f'{k} {mib(v)}' for k, v in self.memory.items()))
    else:
      lines.append('  temporary memory: known only to the '
                   f'{"/".join(self.platforms)} compiler (XLA reports it '
                   'after compiling for the hardware)')
    return '\n'.join(lines)


def check_platforms(platforms: Iterable[str]) -> tuple[str, ...]:
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise UserError(f'unknown platform {",".join(unknown) or "(none)"!s}: '
                    f'choose from {", ".join(PLATFORMS)} (comma-separated)')
  return platforms


class ShapeData(device_data.Data):
  """A dataset known by its shapes alone (nothing is read): what lowering
  needs. Sizes are the dataset row's, so steps per epoch are the run's."""

  def __init__(self, config: Any, mesh: jax.sharding.Mesh):
    spec = datasets.get(config.data.dataset)
    held_out = config.data.validation_examples
    names = datasets.eval_split_names(spec, held_out)
    sizes = {n: held_out if n == datasets.HELD_OUT and held_out
             else spec.eval_sizes[n] for n in names}
    super().__init__(spec, mesh, spec.num_train - held_out, sizes,
                     config.data.batch_size, config.data.eval_batch_size,
                     config.run.seed)
    size = datasets.image_size(spec, config.data.image_size)
    # Stored images at their own size; streamed ones arrive at image_size.
    self.image_shape = spec.image_shape or (size, size, spec.channels)

  def batch(self, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    n = self.batch_size if train else self.eval_batch_size
    split = sharding.batch_sharded(self.mesh)
    shapes = {'image': ((n,) + tuple(self.image_shape), np.uint8),
              'label': ((n,), np.int32)}
    if not train:  # the padding mask of `order.eval_batch`
      shapes['mask'] = ((n,), np.bool_)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=split)
            for k, (s, d) in shapes.items()}

  def train_batches(self, start_step: int):
    raise NotImplementedError('ShapeData holds shapes, not examples')

  def eval_batches(self, split: str):
    raise NotImplementedError('ShapeData holds shapes, not examples')


def _abstract_state(run: run_setup.Run) -> train_step.TrainState:
  state = jax.eval_shape(functools.partial(run_setup.init_state, run))
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=run.replicated,
                                     weak_type=x.weak_type), state)


def _bytes_per_device(args: Any) -> int:
  total = 0
  for x in jax.tree.leaves(args):
    shape = x.sharding.shard_shape(x.shape)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      itemsize = jax.random.key_data(jax.random.key(0)).nbytes
    else:
      itemsize = np.dtype(x.dtype).itemsize
    total += int(np.prod(shape, dtype=np.int64)) * itemsize
  return total


def collectives_in(hlo_text: str) -> dict[str, dict[str, int]]:
  """Collective ops of a compiled (partitioned) HLO module: count and bytes
  of their results, per kind."""
  found = collections.defaultdict(lambda: {'count': 0, 'bytes': 0})
  pattern = re.compile(r'= (.+?) (' + '|'.join(_COLLECTIVES) +
                       r')(?:-start)?\(')
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    kind = found[match.group(2)]
    kind['count'] += 1
    for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]',
                                  match.group(1)):
      size = int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
      kind['bytes'] += size * _BYTES.get(dtype, 4)
  return dict(found)


def _export(step_fn, args, platforms: tuple[str, ...], name: str):
  # The native CPU kernels are this project's own FFI targets, with no
  # compatibility guarantee across jaxlib versions: allowed on the CPU only.
  allowed = ([jax.export.DisabledSafetyCheck.custom_call(t) for t in native.TARGETS]
             if platforms == ('cpu',) else [])
  try:
    return jax.export.export(step_fn, platforms=platforms,
                             disabled_checks=allowed)(*args)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    hint = ''
    if 'callback' in str(e) or 'different from the lowering platform' in str(e):
      hint = ' (a host callback: it runs only on the CPU)'
    elif 'custom call' in str(e):
      hint = ' (a custom call without a lowering for that platform)'
    raise UserError(f'lowering the {name} step for {",".join(platforms)} '
                    f'failed{hint}: {type(e).__name__}: {first[:300]}'
                    ) from None


def _check_custom_calls(lowered: LoweredStep) -> None:
  if lowered.platforms == ('cpu',):
    return
  leaked = sorted(set(lowered.custom_calls) - PARTITIONER_CALLS)
  if leaked:
    raise UserError(
        f'the {lowered.step} step for {",".join(lowered.platforms)} calls '
        f'{", ".join(leaked)}: a custom call that is not the partitioner\'s '
        '(a CPU-only path such as an FFI kernel leaked into the accelerator '
        'program); select it by platform (cpu_layers.resolve_conv_impl)')


def lower_steps(config: Any, platforms: Iterable[str],
                collectives: bool = False) -> list[LoweredStep]:
  """The train and eval steps of `config` lowered for `platforms`, on the
  mesh of this process's devices. Platforms that resolve the convolution
  implementation alike share one (multi-platform) export."""
  platforms = check_platforms(platforms)
  groups: dict[str, list[str]] = {}
  for p in platforms:
    groups.setdefault(cpu_layers.resolve_conv_impl(config.model.conv_impl, p),
                      []).append(p)
  results = []
  for impl, group in groups.items():
    c = config.copy_and_resolve_references()
    # 'per_layer' is what 'auto' means on this (CPU) backend.
    c.model.conv_impl = 'auto' if impl == 'per_layer' else impl
    run = run_setup.build(c, load_data=ShapeData)
    state = _abstract_state(run)
    train_fn, eval_fn = run_setup.compile_steps(run)
    for name, fn, batch in (('train', train_fn, run.data.batch(True)),
                            ('eval', eval_fn, run.data.batch(False))):
      args = (state, batch)
      exported = _export(fn, args, tuple(group), name)
      text = exported.mlir_module()
      lowered = LoweredStep(
          name, tuple(group), impl, jax.device_count(),
          len(exported.mlir_module_serialized),
          len(re.findall(r'(?:sdy|mhlo)\.sharding\s*=', text)),
          dict(collections.Counter(
              re.findall(r'stablehlo\.custom_call @([\w.$-]+)', text))),
          _bytes_per_device(args))
      _check_custom_calls(lowered)
      if collectives or group == ['cpu']:
        compiled = fn.lower(*args).compile()
        lowered.collectives = collectives_in(compiled.as_text())
        if group == ['cpu']:
          m = compiled.memory_analysis()
          lowered.memory = {k: getattr(m, f'{k}_size_in_bytes') for k in (
              'argument', 'output', 'temp', 'generated_code')}
      results.append(lowered)
  return results


def _define_flags():
  return (cli.define_config_flag(),
          flags.DEFINE_list('platform', ['cuda'],
                            f'target platforms, from {", ".join(PLATFORMS)}'),
          flags.DEFINE_integer('devices', 8, 'devices of the mesh (simulated '
                               'on the CPU)'),
          flags.DEFINE_bool('collectives', True, "list the SPMD partitioner's "
                            'collectives (compiles the program for the '
                            'simulated CPU devices: seconds to minutes)'))


def main(argv):
  del argv
  config_flag, platform_flag, devices_flag, collectives_flag = _FLAGS
  platforms = check_platforms(platform_flag.value)
  if devices_flag.value < 1:
    raise UserError(f'--devices={devices_flag.value} must be at least 1')
  # Stand-ins for the target's devices; set before JAX starts its backend.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', devices_flag.value)
  if jax.device_count() != devices_flag.value:
    raise UserError(f'JAX already started with {jax.device_count()} devices; '
                    f'run python -m resnet_jax.tools.lower in a fresh process')
  config = cli.config_value(config_flag)
  for lowered in lower_steps(config, platforms, collectives_flag.value):
    print(lowered.describe(), flush=True)
  return 0


if __name__ == '__main__':
  _FLAGS = _define_flags()
  cli.run(main)
