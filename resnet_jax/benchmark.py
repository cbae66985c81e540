"""Throughput of the train and eval steps: python -m resnet_jax.benchmark.

  python -m resnet_jax.benchmark --model resnet50 --batch_size 256 \
      --image_size 224 --channels 3 --dtype bfloat16 --steps 50 --json out.json
  python -m resnet_jax.benchmark --config configs/default.py --data fashion_mnist

Runs the steps training runs (run_setup.init_state and run_setup.compile_steps:
same model, on-device preprocessing, optimizer, mesh over all devices, batch
sharded, state replicated and donated) and reports, for each step: lower and
compile time, images/s per step (each step blocked on before the clock stops)
and pipelined (steps dispatched back to back, one block at the end, as in
training), FLOPs from XLA's cost analysis, the achieved FLOP/s and its fraction
of the device's peak, and memory. Synthetic data is one fixed device-resident
uint8 batch; `--data NAME` also times training's input pipeline (for an
in-memory dataset: index stream -> on-device gather) against it.

Peak FLOP/s: a table for known accelerators; for a CPU, cores x clock x fp32
FLOPs per cycle (see cpu_peak_flops). The 2-core development machines are
AMD EPYCs of family 25 with two 256-bit FMA pipes per core (32 fp32
FLOP/cycle; Zen 4 runs AVX-512 on the same pipes): model 1 (Zen 3), where
/proc/cpuinfo reports 2445 MHz, gives 2 x 2.445 GHz x 32 = 156 GFLOP/s, and
model 17 (Zen 4) at 2596 MHz gives 166 GFLOP/s. The hypervisor reports the
nominal clock and the cores boost, so either is an approximate ceiling. The
CPU figure is the fp32 peak also for bfloat16.

FLOPs are the model's arithmetic, the same for every conv_impl: XLA's cost
analysis of the step lowered with XLA's own convolutions (`_flops`). The
compiled patch programs would count differently: their chunk loops are
counted once whatever their trip count, and their matmuls also multiply the
zero padding they copy out (ResNet-18 at 32x32, whose last 3x3 convs see
2x2 and 1x1 maps, does 0.076 GFLOP per forward as patches against XLA's
0.044). Compare implementations by images/s.
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from resnet_jax import (conv, device_data, input_pipeline,  # noqa: E402
                        models, preprocess, run_setup, sharding)
from resnet_jax.errors import UserError  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs', 'default.py')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# device_kind substring (lower case; first match wins) -> dense peak FLOP/s per
# device (bfloat16, float32). GPU float32 is the non-tensor-core figure: JAX's
# default precision may use TF32 tensor cores there, so the float32 fraction
# can exceed 1. TPUs run float32 matmuls as bfloat16 passes at default
# precision, hence the same figure.
PEAK_FLOPS = (
    ('h100 pcie', 756e12, 51e12), ('h100', 989e12, 67e12),
    ('h200', 989e12, 67e12), ('a100', 312e12, 19.5e12),
    ('tpu v4', 275e12, 275e12), ('tpu v5 lite', 197e12, 197e12),
    ('tpu v5e', 197e12, 197e12), ('tpu v5', 459e12, 459e12),
)


@dataclasses.dataclass
class Options:
  config: Any  # run config (ml_collections) with the flags' overrides
  input_shape: tuple[int, int, int] | None  # synthetic batch; None: --data's
  num_classes: int | None
  steps: int
  warmup: int
  data: str
  ratio_rounds: int
  json_path: str | None
  argv: list[str]


def _parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m resnet_jax.benchmark', description=__doc__.split('\n')[0])
  # None = from --config (or configs/default.py), so explicit flags win.
  p.add_argument('--config', default=None, help='configs/X.py to start from')
  p.add_argument('--model', default=None)
  p.add_argument('--batch_size', type=int, default=None, help='global batch')
  p.add_argument('--image_size', type=int, default=None,
                 help='model input size (0 = the native size)')
  p.add_argument('--channels', type=int, default=None,
                 help='synthetic input of image_size^2 x channels (default: '
                 "the config's dataset's native shape, resized as in training)")
  p.add_argument('--dtype', choices=sorted(DTYPES), default=None)
  p.add_argument('--num_classes', type=int, default=None)
  p.add_argument('--width', type=int, default=None)
  p.add_argument('--conv_impl', default=None)
  p.add_argument('--steps', type=int, default=50, help='timed steps')
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--data', default='synthetic',
                 help="'synthetic' or an in-memory TFDS name (fashion_mnist)")
  p.add_argument('--data_dir', default=None, help='TFDS data dir')
  p.add_argument('--ratio_rounds', type=int, default=5,
                 help='alternating synthetic/data rounds for the data ratio')
  p.add_argument('--json', default=None, help='write all figures here')
  return p.parse_args(argv)


def load_config(path: str) -> Any:
  """get_config() of a config file (they need ml_collections)."""
  if not os.path.isfile(path):
    raise UserError(f'config file not found: {path!r}; give configs/X.py')
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:  # configs import each other as `configs.X`
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location('_benchmark_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def make_options(argv: list[str]) -> Options:
  a = _parse(argv)
  config = load_config(a.config or _DEFAULT_CONFIG)
  if a.model is not None:
    # A model named on the command line is that model: a stage override
    # belongs to the config's recipe (the default's ResNet-8 is a
    # cifar_resnet20 with one block per stage).
    config.stage_sizes = ()
  native = input_pipeline.IN_MEMORY_DATASETS.get(config.dataset)
  for field, value in (('model', a.model), ('batch_size', a.batch_size),
                       ('image_size', a.image_size), ('width', a.width),
                       ('conv_impl', a.conv_impl)):
    if value is not None:
      setattr(config, field, value)
  if a.dtype is not None:
    config.half_precision = a.dtype == 'bfloat16'
  if a.data != 'synthetic':
    config.dataset = a.data
  if a.data_dir is not None:
    config.tfds_data_dir = a.data_dir
  if a.data != 'synthetic':
    if a.channels:
      raise UserError(f'--channels is for synthetic data; {a.data} has its '
                      'own: leave --channels out')
    shape = None
  elif a.channels or not native:
    size = config.image_size or 224
    shape = (size, size, a.channels or 3)
  else:
    shape = tuple(native)
  for name, value, low in (('steps', a.steps, 1), ('warmup', a.warmup, 0),
                           ('channels', a.channels, 1),
                           ('ratio_rounds', a.ratio_rounds, 1)):
    if value is not None and value < low:
      raise UserError(f'--{name}={value} must be at least {low}')
  if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
    raise UserError(f'--json {a.json}: its directory does not exist; create '
                    'it or choose another path')
  return Options(config, shape, a.num_classes, a.steps, a.warmup, a.data,
                 a.ratio_rounds, a.json, list(argv))


# ------------------------------------------------------------------ the run


def _random_batch(shape: tuple[int, ...], num_classes: int,
                  n: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (n,) + tuple(shape), dtype=np.uint8),
          'label': rng.integers(0, num_classes, n).astype(np.int32)}


def _synthetic_data(mesh, shape: tuple[int, int, int], num_classes: int,
                    batch: int, stats_of: str) -> device_data.InMemoryData:
  """`batch` random uint8 images on the devices, as an InMemoryData."""
  b = _random_batch(shape, num_classes, batch)
  info = input_pipeline.DatasetInfo(
      name=stats_of, num_classes=num_classes,
      class_names=tuple(map(str, range(num_classes))), image_shape=shape,
      num_train=batch, num_eval=batch, in_memory=True)
  images, labels = (sharding.global_array_from_host(mesh, b[k], P())
                    for k in ('image', 'label'))
  return device_data.InMemoryData(info, mesh, images, labels, images, labels)


def _stats_name(dataset: str, channels: int) -> str:
  """A dataset whose normalisation constants the synthetic images borrow, so
  that the preprocessing is training's own (the values do not affect speed)."""
  stats = preprocess.DATASET_STATS
  if dataset in stats and len(stats[dataset][0]) == channels:
    return dataset
  for name, (mean, _) in stats.items():
    if len(mean) == channels:
      return name
  raise UserError(f'--channels={channels}: synthetic data supports '
                  f'{sorted({len(m) for m, _ in stats.values()})} channels')


def build_run(opts: Options) -> tuple[run_setup.Run, dict]:
  """The run (as run_setup.build makes it) and a fixed synthetic batch."""
  c = opts.config
  mesh = sharding.make_mesh()
  sharding.check_batch_size(c.batch_size)
  if opts.data == 'synthetic':
    num_classes = opts.num_classes or models.model_defaults(
        c.model)['num_classes']
    shape = opts.input_shape
    data = _synthetic_data(mesh, shape, num_classes, c.batch_size,
                           _stats_name(c.dataset, shape[-1]))
  else:
    data = device_data.load(c, mesh, c.image_size)
    if data.info.num_train < c.batch_size:
      raise UserError(f'batch_size={c.batch_size} exceeds the '
                      f'{data.info.num_train} training examples of {opts.data}')
  model = run_setup.model_from_config(c, data.info.num_classes)
  image_size = c.image_size or data.info.image_shape[0]
  run_setup.check_image_size(model, image_size)
  # The learning rate's schedule costs a few scalar ops; a constant one keeps
  # the run independent of the dataset's length.
  run = run_setup.Run(c, mesh, data, model, image_size, steps_per_epoch=1,
                      total_steps=1,
                      schedule=optax.constant_schedule(c.learning_rate))
  shape = data.info.image_shape
  if not shape[0]:  # streamed images of varying size arrive at image_size
    shape = (image_size, image_size, shape[-1])
  batch = _random_batch(shape, data.info.num_classes, c.batch_size)
  return run, {k: sharding.global_array_from_host(mesh, v,
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


def _flops(fn, state: Any, batch: dict, model: nn.Module) -> float:
  """FLOPs of one call over all devices, from XLA's cost analysis of the same
  step with XLA's own convolutions (`nn.Conv`).

  The arithmetic is the model's whatever the conv implementation; but the
  patch formulations compute their patches in chunk loops, and XLA's cost
  analysis does not multiply a loop body by its trip count, so counting the
  compiled step itself would miss most convolutions. Lowering the twin step
  costs no compilation, and the lowered (not yet partitioned) program is the
  global one: its count covers all devices.
  """
  twin = state.replace(apply_fn=model.clone(conv=nn.Conv).apply)
  cost = fn.lower(twin, batch).cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


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
             flops: float, peak: float | None) -> tuple[Any, dict]:
  t0 = time.perf_counter()
  state, out = step(state)
  jax.block_until_ready((state, out))
  first = time.perf_counter() - t0
  state, _ = _timed(step, state, opts.warmup)
  state, times = _timed(step, state, opts.steps)
  state, total = _pipelined(step, state, opts.steps)
  median = statistics.median(times)
  achieved = flops / median
  return state, {
      'first_call_s': first, 'step_s_median': median,
      'step_s_min': min(times), 'step_s_max': max(times),
      'images_per_s_median': batch / median,
      'images_per_s_min': batch / max(times),
      'images_per_s_max': batch / min(times),
      'pipelined_images_per_s': opts.steps * batch / total,
      'flops_per_step': flops, 'flops_per_example': flops / batch,
      'achieved_flops_per_s': achieved,
      'fraction_of_peak': achieved / peak if peak else None,
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
  """Pipelined images/s with the in-memory input pipeline over synthetic,
  alternated in rounds so that both see the same machine load."""
  c = run.config
  batches = run.data.train_batches(0, c.batch_size, c.seed)

  def data_step(s):  # as train_loop: the data's own batches -> step
    return train(s, next(batches))

  synthetic_step = lambda s: train(s, batch)
  state, _ = _timed(data_step, state, max(opts.warmup, 1))
  t_syn, t_data = [], []
  for _ in range(opts.ratio_rounds):
    state, t = _pipelined(synthetic_step, state, opts.steps)
    t_syn.append(t)
    state, t = _pipelined(data_step, state, opts.steps)
    t_data.append(t)
  ratios = [s / d for s, d in zip(t_syn, t_data)]
  return state, {
      'dataset': opts.data, 'rounds': opts.ratio_rounds, 'ratios': ratios,
      'ratio_median': statistics.median(ratios),
      'ratio_of_totals': sum(t_syn) / sum(t_data),
      'images_per_s': opts.ratio_rounds * opts.steps * c.batch_size
                      / sum(t_data)}


def run_benchmark(opts: Options) -> dict:
  load_start = os.getloadavg()
  run, batch = build_run(opts)
  c, n = run.config, run.config.batch_size
  state = run_setup.init_state(run)
  train_fn, eval_fn = run_setup.compile_steps(run)
  eval_batch = dict(batch, mask=sharding.global_array_from_host(
      run.mesh, np.ones(n, np.int32), P(sharding.DATA_AXIS)))
  train, train_compile = _compile(train_fn, state, batch)
  evaluate, eval_compile = _compile(eval_fn, state, eval_batch)
  dtype = 'bfloat16' if c.half_precision else 'float32'
  peak, peak_source = peak_flops(jax.devices()[0], dtype)
  result = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'command': ' '.join(['python -m resnet_jax.benchmark'] + opts.argv),
      'jax_version': jax.__version__, 'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'model': c.model, 'width': c.width or None,
      'conv_impl': c.conv_impl,
      'conv_impl_resolved': conv.resolve_conv_impl(c.conv_impl),
      'dtype': dtype, 'batch_size': n,
      'input_shape': list(batch['image'].shape[1:]),
      'image_size': run.image_size, 'num_classes': run.data.info.num_classes,
      'data': opts.data, 'steps': opts.steps, 'warmup': opts.warmup,
      'peak_flops_per_s': peak, 'peak_source': peak_source,
  }
  train_flops = _flops(train_fn, state, batch, run.model)
  eval_flops = _flops(eval_fn, state, eval_batch, run.model)
  state, result['train'] = _measure(lambda s: train(s, batch), state, opts, n,
                                    train_flops, peak)
  result['train'].update(train_compile, memory=_memory(train))
  state, result['eval'] = _measure(lambda s: (s, evaluate(s, eval_batch)),
                                   state, opts, n, eval_flops, peak)
  result['eval'].update(eval_compile, memory=_memory(evaluate))
  if opts.data != 'synthetic':
    state, result['data_pipeline'] = _data_ratio(train, state, run, batch, opts)
  result['max_rss_bytes'] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024
  result['load_average'] = {'start': list(load_start),
                            'end': list(os.getloadavg())}
  return result


# ------------------------------------------------------------ peak FLOP/s


def _cpuinfo() -> dict[str, Any]:
  info = {'mhz': [], 'flags': set(), 'vendor': '', 'family': 0}
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        key, _, value = (s.strip() for s in line.partition(':'))
        if key == 'cpu MHz':
          info['mhz'].append(float(value))
        elif key == 'flags':
          info['flags'] = set(value.split())
        elif key == 'vendor_id':
          info['vendor'] = value
        elif key == 'cpu family':
          info['family'] = int(value)
  except OSError:
    pass
  if not info['mhz']:  # e.g. /proc/cpuinfo without clocks: ask lscpu
    try:
      out = subprocess.run(['lscpu'], capture_output=True, text=True,
                           timeout=10, check=False).stdout
      info['mhz'] = [float(line.split(':')[1]) for line in out.splitlines()
                     if line.startswith(('CPU max MHz', 'CPU MHz'))]
    except (OSError, ValueError, subprocess.SubprocessError):
      pass
  return info


def _fp32_flops_per_cycle(info: dict) -> tuple[int, str]:
  flags = info['flags']
  full_avx512 = 'avx512f' in flags and (
      info['vendor'] == 'GenuineIntel' or
      (info['vendor'] == 'AuthenticAMD' and info['family'] >= 26))
  if full_avx512:  # two 512-bit FMA pipes (Intel server cores, AMD Zen 5)
    return 64, '2 FMA x 16 fp32 lanes x 2'
  if 'fma' in flags:  # Zen 2-4 (Zen 4 splits AVX-512 over 256-bit pipes)
    return 32, '2 FMA x 8 fp32 lanes x 2'
  if 'avx' in flags:
    return 16, '8-lane add + 8-lane mul'
  return 8, '4-lane add + 4-lane mul'


def cpu_peak_flops() -> tuple[float | None, str]:
  """cores (this process's affinity) x max clock x fp32 FLOPs per cycle."""
  info = _cpuinfo()
  cores = len(os.sched_getaffinity(0))
  if not info['mhz']:
    return None, 'CPU clock unknown (no cpu MHz in /proc/cpuinfo or lscpu)'
  ghz = max(info['mhz']) / 1000
  per_cycle, how = _fp32_flops_per_cycle(info)
  return cores * ghz * 1e9 * per_cycle, (
      f'{cores} cores x {ghz:.3f} GHz x {per_cycle} fp32 FLOP/cycle ({how})')


def peak_flops(device: Any, dtype: str) -> tuple[float | None, str]:
  """Peak FLOP/s of all devices together, and where the figure comes from."""
  if device.platform == 'cpu':  # simulated CPU devices share the same cores
    return cpu_peak_flops()
  kind = device.device_kind.lower()
  for key, bf16, fp32 in PEAK_FLOPS:
    if key in kind:
      per_device = bf16 if dtype == 'bfloat16' else fp32
      return per_device * jax.device_count(), (
          f'{jax.device_count()} x {per_device / 1e12:g} TFLOP/s '
          f'({device.device_kind}, {dtype} dense)')
  return None, f'no peak known for {device.device_kind!r}'


# ------------------------------------------------------------------ report


def _fmt_bytes(b: int | None) -> str:
  return 'n/a' if b is None else f'{b / 2**20:.1f} MiB'


def print_report(r: dict) -> None:
  print(f'{r["model"]} {r["conv_impl_resolved"]} {r["dtype"]} '
        f'batch {r["batch_size"]} input '
        f'{"x".join(map(str, r["input_shape"]))} -> {r["image_size"]} '
        f'on {r["device_count"]} x {r["device_kind"]} (jax {r["jax_version"]})')
  print(f'peak: {r["peak_source"]}')
  for name in ('train', 'eval'):
    s = r[name]
    frac = s['fraction_of_peak']
    m = s['memory']
    print(f'{name}: compile {s["lower_s"]:.1f}+{s["compile_s"]:.1f} s '
          f'(lower+compile), first call {s["first_call_s"]:.2f} s')
    print(f'  images/s {s["images_per_s_median"]:.1f} median '
          f'[{s["images_per_s_min"]:.1f}-{s["images_per_s_max"]:.1f}], '
          f'pipelined {s["pipelined_images_per_s"]:.1f}')
    print(f'  {s["flops_per_example"] / 1e9:.3f} GFLOP/example, '
          f'{s["achieved_flops_per_s"] / 1e9:.1f} GFLOP/s'
          + (f' = {frac:.1%} of peak' if frac is not None else ''))
    print(f'  memory: device peak {_fmt_bytes(m["device_peak_bytes"])}, '
          f'temp {_fmt_bytes(m["temp_bytes"])}, args '
          f'{_fmt_bytes(m["argument_bytes"])}, outputs '
          f'{_fmt_bytes(m["output_bytes"])} (per device)')
  if 'data_pipeline' in r:
    d = r['data_pipeline']
    print(f'data {d["dataset"]}: {d["images_per_s"]:.1f} images/s pipelined, '
          f'{d["ratio_of_totals"]:.3f} of synthetic over {d["rounds"]} '
          f'alternating rounds (per round: '
          f'{", ".join(f"{x:.3f}" for x in d["ratios"])})')
  load = r['load_average']
  print(f'max RSS {_fmt_bytes(r["max_rss_bytes"])}; load average '
        f'{load["start"][0]:.2f} -> {load["end"][0]:.2f}')


def main(argv: list[str] | None = None) -> int:
  try:
    opts = make_options(sys.argv[1:] if argv is None else argv)
    result = run_benchmark(opts)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print_report(result)
  if opts.json_path:
    with open(opts.json_path, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
