"""Throughput of a run's train and eval steps: python -m resnet_jax.tools.benchmark.

  python -m resnet_jax.tools.benchmark --config=configs/imagenet_resnet50.py \
      --config.data.batch_size=256 --steps=50 --json=out.json
  python -m resnet_jax.tools.benchmark --data=real --config.data.tfds_data_dir=D

Builds the run exactly as training does (run_setup: the config's model,
on-device preprocessing, optimizer, mesh over all devices, batch sharded,
state replicated and donated) and reports, for each step: lower and compile
time, images/s per step (each step blocked on before the clock stops) and
pipelined (steps dispatched back to back, one block at the end, as in
training), FLOPs from XLA's cost analysis, the achieved FLOP/s and its
fraction of the device's peak, and memory. Synthetic data (the default) is
one fixed device-resident uint8 batch of the dataset's image shape;
`--data=real` puts the config's input pipeline in the loop and reports its
ratio to synthetic data, over alternating rounds.

Peak FLOP/s: a table for known accelerators; for a CPU, cores x clock x fp32
FLOPs per cycle (`cpu_peak_flops`; the hypervisor reports the nominal clock
and the cores boost, so it is an approximate ceiling, and the fp32 peak also
for bfloat16).

FLOPs are the model's arithmetic, the same for every conv_impl: XLA's cost
analysis of the step lowered with XLA's own convolutions (`_flops`). The
compiled patch programs would count differently: their chunk loops are
counted once whatever their trip count, and their matmuls also multiply the
zero padding they copy out. Compare implementations by images/s.
"""

import dataclasses
import datetime
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from jax.sharding import PartitionSpec as P

from resnet_jax import cli, models, sharding
from resnet_jax.tools import peak_flops
from resnet_jax.cpu import layers as cpu_layers
from resnet_jax.data import datasets, device_data, in_memory
from resnet_jax.train import run_setup
from resnet_jax.errors import UserError

@dataclasses.dataclass
class Options:
  config: Any  # the run's config, with the command line's overrides
  steps: int = 50
  warmup: int = 5
  data: str = 'synthetic'  # or 'real': the config's input pipeline
  ratio_rounds: int = 5
  json_path: str | None = None
  command: str = ''

  def __post_init__(self):
    if self.data not in ('synthetic', 'real'):
      raise UserError(f"--data={self.data!r}: choose 'synthetic' or 'real'")
    for name, low in (('steps', 1), ('warmup', 0), ('ratio_rounds', 1)):
      if getattr(self, name) < low:
        raise UserError(f'--{name}={getattr(self, name)} must be at least '
                        f'{low}')
    if self.json_path and not os.path.isdir(
        os.path.dirname(os.path.abspath(self.json_path))):
      raise UserError(f'--json={self.json_path}: its directory does not '
                      'exist; create it or choose another path')


# ------------------------------------------------------------------ the run


def _random_batch(shape: tuple[int, ...], num_classes: int,
                  n: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (n,) + tuple(shape), dtype=np.uint8),
          'label': rng.integers(0, num_classes, n).astype(np.int32)}


def _input_shape(config: Any) -> tuple[int, int, int]:
  """The shape of the dataset's stored images (streamed ones arrive at
  image_size), which the step resizes as in training."""
  spec = datasets.get(config.data.dataset)
  if spec.image_shape is not None:
    return spec.image_shape
  size = datasets.image_size(spec, config.data.image_size)
  return (size, size, spec.channels)


def _synthetic_data(config: Any, mesh) -> device_data.InMemoryData:
  """One batch of random uint8 images of the dataset's shape, on the devices."""
  spec = datasets.get(config.data.dataset)
  n = config.data.batch_size
  b = _random_batch(_input_shape(config), spec.num_classes, n)
  split = in_memory.ArrayDataset(b['image'], b['label'])
  splits = in_memory.InMemorySplits(split, {'test': split}, ())
  return device_data.InMemoryData(spec, mesh, splits, n, n, config.run.seed)


def build_run(opts: Options) -> tuple[run_setup.Run, dict]:
  """The run (as training builds it) and a fixed synthetic global batch."""
  load = _synthetic_data if opts.data == 'synthetic' else device_data.load
  run = run_setup.build(opts.config, load_data=load)
  n = run.config.data.batch_size
  batch = _random_batch(_input_shape(run.config), run.data.spec.num_classes, n)
  return run, {k: sharding.global_array_from_host(run.mesh, v,
                                                  P(sharding.DATA_AXIS))
               for k, v in batch.items()}


# ---------------------------------------------------------------- measuring


def _compile(fn, *args) -> tuple[Any, dict[str, float]]:
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, {'lower_s': t1 - t0, 'compile_s': t2 - t1}


def _flops(fn, state: Any, batch: dict, model: nn.Module) -> float | None:
  """FLOPs of one call over all devices, from XLA's cost analysis of the same
  step with Flax's own layers (`models.FLAX`: nn.Conv, nn.BatchNorm).

  The arithmetic is the model's whatever the conv implementation; but the
  patch formulations compute their patches in chunk loops, and XLA's cost
  analysis does not multiply a loop body by its trip count, so counting the
  compiled step itself would miss most convolutions. Lowering the twin step
  costs no compilation, and the lowered (not yet partitioned) program is the
  global one: its count covers all devices. Some backends give no count
  for a lowered program (CUDA on jax 0.11), and their compiled programs hide
  the convolutions in library calls that are not counted: there the FLOPs
  are None (unknown), never a wrong figure. The count is the same on every
  platform, so take it from a CPU run of the same config.
  """
  twin = state.replace(apply_fn=model.clone(layers=models.FLAX).apply)
  cost = fn.lower(twin, batch).cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0] if cost else {}
  flops = (cost or {}).get('flops')
  return float(flops) if flops else None


def _timed(step: Callable, state: Any, n: int) -> tuple[Any, list[float]]:
  """Per-step wall times, each waiting for the step's results."""
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    state, out = step(state)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - t0)
  return state, times


def _pipelined(step: Callable, state: Any, n: int) -> tuple[Any, float]:
  """Seconds for n steps dispatched back to back, blocked on once."""
  t0 = time.perf_counter()
  outs = []
  for _ in range(n):
    state, out = step(state)
    outs.append(out)
  jax.block_until_ready((state, outs))
  return state, time.perf_counter() - t0


def _measure(step: Callable, state: Any, opts: Options, batch: int,
             flops: float | None, peak: float | None) -> tuple[Any, dict]:
  t0 = time.perf_counter()
  state, out = step(state)
  jax.block_until_ready((state, out))
  first = time.perf_counter() - t0
  state, _ = _timed(step, state, opts.warmup)
  state, times = _timed(step, state, opts.steps)
  state, total = _pipelined(step, state, opts.steps)
  median = statistics.median(times)
  achieved = flops / median if flops else None
  return state, {
      'first_call_s': first, 'step_s_median': median,
      'step_s_min': min(times), 'step_s_max': max(times),
      'images_per_s_median': batch / median,
      'images_per_s_min': batch / max(times),
      'images_per_s_max': batch / min(times),
      'pipelined_images_per_s': opts.steps * batch / total,
      'flops_per_step': flops,
      'flops_per_example': flops / batch if flops else None,
      'achieved_flops_per_s': achieved,
      'fraction_of_peak': achieved / peak if achieved and peak else None,
  }


def _memory(compiled) -> dict:
  """XLA's buffer sizes (per device) and, where the backend keeps it (GPU,
  TPU), the device's peak memory in use so far in this process."""
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use')
           for d in jax.local_devices()]
  mem = {'device_peak_bytes': max(peaks) if all(peaks) else None}
  analysis = compiled.memory_analysis()
  for k in ('temp', 'argument', 'output', 'alias', 'generated_code'):
    mem[f'{k}_bytes'] = getattr(analysis, f'{k}_size_in_bytes', None)
  return mem


def _data_ratio(train: Any, state: Any, run: run_setup.Run, batch: dict,
                opts: Options) -> tuple[Any, dict]:
  """Pipelined images/s with the run's input pipeline over synthetic data,
  alternated in rounds so that both see the same machine load."""
  batches = run.data.train_batches(0)

  def data_step(s):  # as train_loop: the data's own batches -> step
    return train(s, next(batches)), None

  def synthetic_step(s):
    return train(s, batch), None

  state, _ = _timed(data_step, state, max(opts.warmup, 1))
  t_syn, t_data = [], []
  for _ in range(opts.ratio_rounds):
    state, t = _pipelined(synthetic_step, state, opts.steps)
    t_syn.append(t)
    state, t = _pipelined(data_step, state, opts.steps)
    t_data.append(t)
  ratios = [s / d for s, d in zip(t_syn, t_data)]
  batches.close()
  result = {
      'dataset': run.data.spec.name, 'rounds': opts.ratio_rounds,
      'ratios': ratios, 'ratio_median': statistics.median(ratios),
      'ratio_of_totals': sum(t_syn) / sum(t_data),
      'images_per_s': opts.ratio_rounds * opts.steps
                      * run.config.data.batch_size / sum(t_data)}
  if isinstance(run.data, device_data.StreamingData):
    # The stream alone (decoded, on the devices, no step), from steps not
    # read above, per decoding process: on a CPU, the figure per core.
    alone = run.data.train_batches((opts.ratio_rounds + 1) * opts.steps + 1)
    jax.block_until_ready(next(alone))
    start = time.perf_counter()
    for _ in range(opts.steps):
      jax.block_until_ready(next(alone))
    rate = opts.steps * run.config.data.batch_size / (
        time.perf_counter() - start)
    alone.close()
    processes = max(run.data.decoding_processes, 1)
    result.update(stream_alone_images_per_s=rate,
                  decoding_processes=processes,
                  images_per_s_per_process=rate / processes)
  return state, result


def run_benchmark(opts: Options) -> dict:
  load_start = os.getloadavg()
  run, batch = build_run(opts)
  c, n = run.config, run.config.data.batch_size
  state = run_setup.init_state(run)
  train_fn, eval_fn = run_setup.compile_steps(run)
  eval_batch = dict(batch, mask=sharding.global_array_from_host(
      run.mesh, np.ones(n, np.int32), P(sharding.DATA_AXIS)))
  train, train_compile = _compile(train_fn, state, batch)
  evaluate, eval_compile = _compile(eval_fn, state, eval_batch)
  peak, peak_source = peak_flops.peak_flops(jax.devices()[0], c.model.dtype)
  result = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'command': opts.command,
      'jax_version': jax.__version__, 'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'model': c.model.to_dict(),
      'conv_impl_resolved': cpu_layers.resolve_conv_impl(c.model.conv_impl),
      'dtype': c.model.dtype, 'batch_size': n, 'dataset': c.data.dataset,
      'input_shape': list(batch['image'].shape[1:]),
      'image_size': run.image_size, 'data': opts.data, 'steps': opts.steps,
      'warmup': opts.warmup, 'peak_flops_per_s': peak,
      'peak_source': peak_source,
  }
  train_flops = _flops(train_fn, state, batch, run.model)
  eval_flops = _flops(eval_fn, state, eval_batch, run.model)
  state, result['train'] = _measure(lambda s: (train(s, batch), None), state,
                                    opts, n, train_flops, peak)
  result['train'].update(train_compile, memory=_memory(train))
  state, result['eval'] = _measure(lambda s: (s, evaluate(s, eval_batch)),
                                   state, opts, n, eval_flops, peak)
  result['eval'].update(eval_compile, memory=_memory(evaluate))
  if opts.data == 'real':
    state, result['data_pipeline'] = _data_ratio(train, state, run, batch, opts)
  result['max_rss_bytes'] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024
  result['load_average'] = {'start': list(load_start),
                            'end': list(os.getloadavg())}
  return result


# ------------------------------------------------------------ peak FLOP/s


# ------------------------------------------------------------------ report


def _fmt_bytes(b: int | None) -> str:
  return 'n/a' if b is None else f'{b / 2**20:.1f} MiB'


def print_report(r: dict) -> None:
  m = r['model']
  extras = ''.join(f' {k} {m[k]}' for k in ('width', 'stage_sizes')
                   if m.get(k) is not None)
  print(f'{m["name"]}{extras} {r["conv_impl_resolved"]} {r["dtype"]} '
        f'batch {r["batch_size"]} input '
        f'{"x".join(map(str, r["input_shape"]))} -> {r["image_size"]} '
        f'on {r["device_count"]} x {r["device_kind"]} (jax {r["jax_version"]})')
  print(f'peak: {r["peak_source"]}')
  for name in ('train', 'eval'):
    s = r[name]
    frac = s['fraction_of_peak']
    mem = s['memory']
    print(f'{name}: compile {s["lower_s"]:.1f}+{s["compile_s"]:.1f} s '
          f'(lower+compile), first call {s["first_call_s"]:.2f} s')
    print(f'  images/s {s["images_per_s_median"]:.1f} median '
          f'[{s["images_per_s_min"]:.1f}-{s["images_per_s_max"]:.1f}], '
          f'pipelined {s["pipelined_images_per_s"]:.1f}')
    if s['flops_per_example'] is None:
      print("  FLOPs: not counted on this backend (XLA's cost analysis gives "
            'none); take them from a CPU run of the same config')
    else:
      print(f'  {s["flops_per_example"] / 1e9:.3f} GFLOP/example, '
            f'{s["achieved_flops_per_s"] / 1e9:.1f} GFLOP/s'
            + (f' = {frac:.1%} of peak' if frac is not None else ''))
    print(f'  memory: device peak {_fmt_bytes(mem["device_peak_bytes"])}, '
          f'temp {_fmt_bytes(mem["temp_bytes"])}, args '
          f'{_fmt_bytes(mem["argument_bytes"])}, outputs '
          f'{_fmt_bytes(mem["output_bytes"])} (per device)')
  if 'data_pipeline' in r:
    d = r['data_pipeline']
    print(f'data {d["dataset"]}: {d["images_per_s"]:.1f} images/s pipelined, '
          f'{d["ratio_of_totals"]:.3f} of synthetic over {d["rounds"]} '
          f'alternating rounds (per round: '
          f'{", ".join(f"{x:.3f}" for x in d["ratios"])})')
    if 'stream_alone_images_per_s' in d:
      print(f'  the stream alone: {d["stream_alone_images_per_s"]:.1f} '
            f'images/s with {d["decoding_processes"]} decoding processes, '
            f'{d["images_per_s_per_process"]:.1f} per process (per core '
            'when each has one)')
  load = r['load_average']
  print(f'max RSS {_fmt_bytes(r["max_rss_bytes"])}; load average '
        f'{load["start"][0]:.2f} -> {load["end"][0]:.2f}')


def benchmark(opts: Options) -> dict:
  """Runs, prints and (with --json) writes the figures."""
  result = run_benchmark(opts)
  print_report(result)
  if opts.json_path:
    with open(opts.json_path, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)
  return result


def _define_flags():
  """Only when run as a command: importing the module defines no flags."""
  config = cli.define_config_flag()
  flags.DEFINE_integer('steps', 50, 'Timed steps.')
  flags.DEFINE_integer('warmup', 5, 'Untimed steps before timing.')
  flags.DEFINE_enum('data', 'synthetic', ['synthetic', 'real'],
                    "'real': also time the config's input pipeline against "
                    'synthetic data.')
  flags.DEFINE_integer('ratio_rounds', 5,
                       'Alternating synthetic/real rounds for the data ratio.')
  flags.DEFINE_string('json', None, 'Write all figures here.')
  return config


def main(argv: list[str], config_flag) -> None:
  del argv
  f = flags.FLAGS
  benchmark(Options(cli.config_value(config_flag), steps=f.steps,
                    warmup=f.warmup, data=f.data,
                    ratio_rounds=f.ratio_rounds, json_path=f.json,
                    command=' '.join(['python -m resnet_jax.tools.benchmark']
                                     + sys.argv[1:])))


if __name__ == '__main__':
  _CONFIG = _define_flags()
  cli.run(lambda argv: main(argv, _CONFIG))
