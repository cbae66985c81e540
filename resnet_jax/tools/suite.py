"""Every accelerator figure the docs report, from one command.

  python -m resnet_jax.tools.suite --out=DIR --data_dir=D      # on a GPU or TPU
  python -m resnet_jax.tools.suite --out=DIR --data_dir=D --smoke   # CPU, tiny

Stages, each in its own process (a crash or an out-of-memory in one is
recorded and the next still runs):
  env       the device, its count and the software versions;
  bench     the benchmark rows (ResNet-50 224x224x3 bfloat16 batch 256; the
            textbook ResNet-18 96x96x1 batch 256 in float32 and bfloat16;
            CIFAR ResNet-20 32x32x3 batch 128): images/s, fraction of the
            device's peak, compile time, memory, and the real-data/synthetic
            ratio where the dataset is prepared in --data_dir;
  textbook  configs/d2l_fashion_mnist.py trained to completion, with curves;
  best      configs/fashion_mnist_best.py with 5,000 training images held out
            for validation, trained to completion, then its test accuracy.
Writes DIR/results.json (merged with an earlier one, so stages can run in
separate calls: --stages=bench, then --stages=textbook,best), DIR/results.md
(tables for docs/performance.md and docs/results.md), the curves as DIR/<stage>_curves.png and each
stage's log under DIR/logs/.

Needs only JAX, flax, optax, orbax, absl, numpy, pillow, matplotlib,
tensorboard and ml_collections (a small pure-Python wheel): no TensorFlow
and no TFDS. The training stages read the uint8 cache of Fashion-MNIST from
--data_dir, prepared elsewhere with
  python -m resnet_jax.tools.prepare_data --dataset=fashion_mnist --data_dir=D
(about 55 MB; see docs/accelerators.md).

--smoke runs every stage with tiny widths, sizes and step counts (on the
CPU in CI), to prove the suite before an accelerator hour is spent on it.
"""

import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

from absl import flags

from resnet_jax import atomic_files, cli
from resnet_jax.data import datasets, in_memory
from resnet_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ('env', 'bench', 'textbook', 'best')


@dataclasses.dataclass(frozen=True)
class BenchRow:
  name: str
  description: str
  config: str
  overrides: dict[str, Any]
  smoke: dict[str, Any]


# --smoke: one block per stage, narrow, small images.
_SMOKE_D2L = {'model.width': 4, 'data.image_size': 32,
              'model.stage_sizes': '(1,1,1,1)'}
_SMOKE_CIFAR = {'model.width': 4, 'model.stage_sizes': '(1,1,1)'}
BENCH_ROWS = (
    BenchRow('resnet50_bf16', 'ResNet-50, 224x224x3, bfloat16, batch 256',
             'imagenet_resnet50.py', {'data.batch_size': 256,
                                      'data.eval_batch_size': 256},
             {'model.width': 4, 'data.image_size': 32,
              'model.stage_sizes': '(1,1,1,1)'}),
    BenchRow('d2l_resnet18_f32', 'textbook ResNet-18, 96x96x1, float32, '
             'batch 256', 'd2l_fashion_mnist.py', {}, _SMOKE_D2L),
    BenchRow('d2l_resnet18_bf16', 'textbook ResNet-18, 96x96x1, bfloat16, '
             'batch 256', 'd2l_fashion_mnist.py', {'model.dtype': 'bfloat16'},
             _SMOKE_D2L),
    BenchRow('cifar_resnet20_f32', 'CIFAR ResNet-20, 32x32x3, float32, '
             'batch 128', 'cifar10_resnet20.py', {}, _SMOKE_CIFAR),
)
_SMOKE_BATCH = {'data.batch_size': 8, 'data.eval_batch_size': 8,
                'model.conv_impl': 'xla'}

# (stage, config, overrides, smoke overrides)
TRAIN_STAGES = {
    'textbook': ('d2l_fashion_mnist.py', {}, _SMOKE_D2L),
    'best': ('fashion_mnist_best.py', {'data.validation_examples': 5000},
             dict(_SMOKE_CIFAR, **{'data.validation_examples': 64})),
}
_SMOKE_TRAIN = {'run.num_train_steps': 4, 'data.batch_size': 8,
                'data.eval_batch_size': 64, 'run.log_every_steps': 2,
                'optim.warmup_steps': 1, 'model.conv_impl': 'xla'}


def _flags(overrides: dict[str, Any]) -> list[str]:
  return [f'--config.{k}={v}' for k, v in overrides.items()]


def _run(cmd: list[str], log_path: str, timeout: float) -> dict[str, Any]:
  """Runs `cmd` from the repository root, its output into `log_path`."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env['PYTHONPATH'] = os.pathsep.join(
      [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
  t0 = time.perf_counter()
  with open(log_path, 'w', encoding='utf-8') as log:
    log.write(' '.join(cmd) + '\n')
    log.flush()
    try:
      code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, timeout=timeout,
                            check=False).returncode
    except subprocess.TimeoutExpired:
      code = 'timeout'
  seconds = time.perf_counter() - t0
  with open(log_path, encoding='utf-8', errors='replace') as log:
    tail = [line.rstrip() for line in log.readlines()[-15:]]
  result = {'command': ' '.join(cmd), 'seconds': round(seconds, 1),
            'log': log_path}
  if code == 'timeout':
    result.update(status='failed', returncode=code,
                  error=f'timed out after {timeout:g} s (--stage_timeout)')
  elif code != 0:
    errors = [line for line in tail if line.startswith('error:')]
    result.update(status='failed', returncode=code,
                  error=(errors or tail or ['(no output)'])[-1])
  else:
    result['status'] = 'ok'
  return result


class Suite:
  """The stages, writing into `out` as they finish."""

  def __init__(self, out: str, data_dir: str | None, smoke: bool,
               timeout: float):
    self.out = os.path.abspath(out)
    self.data_dir = os.path.abspath(data_dir) if data_dir else None
    self.smoke = smoke
    self.timeout = timeout
    os.makedirs(os.path.join(self.out, 'logs'), exist_ok=True)
    self.results_path = os.path.join(self.out, 'results.json')
    self.results: dict[str, Any] = {}
    if os.path.exists(self.results_path):
      with open(self.results_path, encoding='utf-8') as f:
        self.results = json.load(f)

  def _save(self) -> None:
    atomic_files.write_text(self.results_path,
                            json.dumps(self.results, indent=2))
    atomic_files.write_text(os.path.join(self.out, 'results.md'),
                            markdown(self.results))

  def run(self, stages: list[str]) -> dict[str, Any]:
    for stage in stages:
      print(f'suite: {stage} ...', flush=True)
      try:
        result = getattr(self, f'_{stage}')()
      except Exception as e:  # pylint: disable=broad-except
        result = {'status': 'failed', 'error': f'{type(e).__name__}: {e}'}
      result['finished'] = datetime.datetime.now().isoformat(
          timespec='seconds')
      result['smoke'] = self.smoke
      self.results[stage] = result
      self._save()
      print(f'suite: {stage} {result.get("status", "ok")}'
            + (f': {result["error"]}' if 'error' in result else ''),
            flush=True)
    return self.results

  # ---------------------------------------------------------------- stages

  def _env(self) -> dict[str, Any]:
    # JAX (and the device) only in the stages that need them: the stages'
    # own processes measure, and this one must not hold the accelerator.
    import jax  # pylint: disable=g-import-not-at-top
    versions = {}
    for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint',
                 'numpy', 'ml_collections', 'tensorboard'):
      try:
        module = __import__(name, fromlist=['__version__'])
        versions[name] = getattr(module, '__version__', '?')
      except ImportError:
        versions[name] = None
    devices = jax.devices()
    env = {'status': 'ok', 'backend': jax.default_backend(),
           'device_kind': devices[0].device_kind,
           'device_count': len(devices), 'process_count': jax.process_count(),
           'python': platform.python_version(), 'host': platform.node(),
           'versions': versions}
    if shutil.which('nvidia-smi'):
      out = subprocess.run(
          ['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
           '--format=csv,noheader'], capture_output=True, text=True,
          check=False, timeout=60)
      env['nvidia_smi'] = out.stdout.strip()
    return env

  def _prepared(self, dataset: str) -> bool:
    """Whether the uint8 cache of in-memory `dataset` is in --data_dir."""
    return (self.data_dir is not None and in_memory.read_cache_info(
        dataset, self.data_dir) is not None)

  def _bench(self) -> dict[str, Any]:
    rows = {}
    for row in BENCH_ROWS:
      spec = importlib.util.spec_from_file_location(
          'recipe', os.path.join(ROOT, 'configs', row.config))
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      recipe = module.get_config()
      dataset = recipe.data.dataset
      streamed = datasets.pipeline(dataset, recipe.data.pipeline) == 'stream'
      overrides = dict(row.overrides)
      if self.smoke:
        overrides.update(row.smoke, **_SMOKE_BATCH)
      if self.data_dir:
        overrides['data.tfds_data_dir'] = self.data_dir
      real = not streamed and self._prepared(dataset)
      json_path = os.path.join(self.out, 'logs', f'bench_{row.name}.json')
      cmd = [sys.executable, '-m', 'resnet_jax.tools.benchmark',
             f'--config={os.path.join("configs", row.config)}',
             *_flags(overrides), f'--json={json_path}',
             f'--data={"real" if real else "synthetic"}']
      cmd += (['--steps=2', '--warmup=1', '--ratio_rounds=1'] if self.smoke
              else ['--steps=50', '--warmup=10', '--ratio_rounds=3'])
      result = _run(cmd, os.path.join(self.out, 'logs',
                                      f'bench_{row.name}.log'), self.timeout)
      result['description'] = row.description
      if not real:
        result['real_data'] = (f'{dataset} is streamed (ArrayRecord through '
                               'Grain), not measured here' if streamed else
                               f'{dataset} is not prepared in --data_dir')
      if result['status'] == 'ok':
        with open(json_path, encoding='utf-8') as f:
          result['figures'] = _bench_figures(json.load(f))
      rows[row.name] = result
    failed = [k for k, v in rows.items() if v['status'] != 'ok']
    return {'status': 'failed' if failed else 'ok', 'rows': rows,
            **({'error': f'rows failed: {", ".join(failed)}'}
               if failed else {})}

  def _train(self, stage: str) -> dict[str, Any]:
    config, overrides, smoke = TRAIN_STAGES[stage]
    overrides = dict(overrides)
    if self.smoke:
      overrides.update(smoke, **_SMOKE_TRAIN)
    if self.data_dir:
      overrides['data.tfds_data_dir'] = self.data_dir
    from resnet_jax.train import metric_writers
    workdir = os.path.join(self.out, f'{stage}_workdir')
    if os.path.exists(workdir):  # a fresh run every time: its time counts
      shutil.rmtree(workdir)
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
           f'--config={os.path.join("configs", config)}',
           f'--workdir={workdir}', '--config.run.progress_bar=False',
           *_flags(overrides)]
    result = _run(cmd, os.path.join(self.out, 'logs', f'{stage}.log'),
                  self.timeout)
    result['config'] = config
    result['overrides'] = overrides
    if result['status'] != 'ok':
      return result
    epochs = [r for r in metric_writers.read_records(workdir) if 'epoch' in r]
    last = epochs[-1]
    result['final'] = {k: v for k, v in last.items()
                       if k.endswith(('_accuracy', '_loss')) or k == 'epoch'}
    result['examples_per_sec_last_epoch'] = last.get('examples_per_sec')
    curves = os.path.join(workdir, 'curves.png')
    if os.path.exists(curves):
      shutil.copy(curves, os.path.join(self.out, f'{stage}_curves.png'))
      result['curves'] = f'{stage}_curves.png'
    if 'test_accuracy' not in last:  # trained on a held-out split: test once
      evaluation = _run(
          [sys.executable, os.path.join(ROOT, 'train.py'),
           f'--workdir={workdir}', '--config.run.mode=eval'],
          os.path.join(self.out, 'logs', f'{stage}_eval.log'), self.timeout)
      result['test_eval'] = evaluation
      if evaluation['status'] == 'ok':
        with open(evaluation['log'], encoding='utf-8') as f:
          for line in f:
            if ': test loss' in line:  # train_loop.evaluate_checkpoint's line
              result['final']['test_accuracy'] = float(
                  line.split('test acc ')[1].split()[0])
      else:
        result.update(status='failed', error=evaluation['error'])
    return result

  def _textbook(self) -> dict[str, Any]:
    return self._train('textbook')

  def _best(self) -> dict[str, Any]:
    return self._train('best')


def _bench_figures(r: dict[str, Any]) -> dict[str, Any]:
  """The figures of one benchmark row that the docs report."""
  train = r['train']
  figures = {
      'device': f'{r["device_count"]} x {r["device_kind"]}',
      'images_per_s': train['images_per_s_median'],
      'pipelined_images_per_s': train['pipelined_images_per_s'],
      'fraction_of_peak': train['fraction_of_peak'],
      'flops_per_example': train['flops_per_example'],
      'compile_s': train['lower_s'] + train['compile_s'],
      'device_peak_bytes': train['memory']['device_peak_bytes'],
      'temp_bytes': train['memory']['temp_bytes'],
      'eval_images_per_s': r['eval']['images_per_s_median'],
      'conv_impl': r['conv_impl_resolved'],
  }
  if 'data_pipeline' in r:
    figures['real_over_synthetic'] = r['data_pipeline']['ratio_of_totals']
  return figures


def _fmt(value: Any, spec: str, missing: str = 'n/a') -> str:
  return missing if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
  """The docs' tables from results.json."""
  lines = []
  env = results.get('env', {})
  if env.get('status') == 'ok':
    v = env['versions']
    lines += [f'Device: {env["device_count"]} x {env["device_kind"]} '
              f'({env.get("nvidia_smi", env["backend"])}); jax {v["jax"]}, '
              f'flax {v["flax"]}, optax {v["optax"]}, orbax '
              f'{v["orbax.checkpoint"]}; Python {env["python"]}.', '']
  bench = results.get('bench')
  if bench:
    lines += ['| benchmark | train images/s | of peak | compile | device '
              'peak memory | real/synthetic data | finished |',
              '|---|---|---|---|---|---|---|']
    for row in bench.get('rows', {}).values():
      f = row.get('figures')
      if not f:
        lines.append(f'| {row["description"]} | failed: {row.get("error")} '
                     f'| | | | | {bench["finished"][:10]} |')
        continue
      peak = f['device_peak_bytes']
      memory = 'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'
      ratio = (_fmt(f.get('real_over_synthetic'), '.3f') if 'real_over_'
               'synthetic' in f else f'not measured ({row["real_data"]})')
      lines.append(
          f'| {row["description"]} | {f["images_per_s"]:,.0f} | '
          f'{_fmt(f["fraction_of_peak"], ".1%", "FLOPs not counted")} | '
          f'{f["compile_s"]:.1f} s | '
          f'{memory} | {ratio} | '
          f'{bench["finished"][:10]} |')
    lines.append('')
  trained = [s for s in TRAIN_STAGES if s in results]
  if trained:
    lines += ['| recipe | test accuracy | val accuracy | epochs | wall time '
              '(incl. compile, eval) | examples/s (last epoch) | finished |',
              '|---|---|---|---|---|---|---|']
    for stage in trained:
      r = results[stage]
      if r.get('status') != 'ok':
        lines.append(f'| {stage} ({r.get("config")}) | failed: '
                     f'{r.get("error")} | | | | | {r["finished"][:10]} |')
        continue
      final = r['final']
      lines.append(
          f'| {stage} (configs/{r["config"]}) | '
          f'{_fmt(final.get("test_accuracy"), ".4f")} | '
          f'{_fmt(final.get("val_accuracy"), ".4f", "-")} | '
          f'{final["epoch"]:g} | {r["seconds"]:.0f} s | '
          f'{_fmt(r.get("examples_per_sec_last_epoch"), ",.0f")} | '
          f'{r["finished"][:10]} |')
    lines.append('')
  if any(results.get(s, {}).get('smoke') for s in STAGES):
    lines.append('(smoke run: tiny sizes, not figures to report)')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  f = flags.FLAGS
  stages = f.stages
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise UserError(f'--stages: unknown {", ".join(unknown)}; choose from '
                    f'{", ".join(STAGES)}')
  if f.data_dir and not os.path.isdir(f.data_dir):
    raise UserError(f'--data_dir={f.data_dir} does not exist; prepare the '
                    'cache there with python -m resnet_jax.tools.prepare_data '
                    '--dataset=fashion_mnist --data_dir=DIR')
  results = Suite(f.out, f.data_dir, f.smoke, f.stage_timeout).run(stages)
  print(markdown(results))
  return 1 if any(results[s].get('status') != 'ok' for s in stages) else 0


def _define_flags():
  flags.DEFINE_string('out', None, 'Directory for results.json, results.md, '
                      'the curves and the logs.', required=True)
  flags.DEFINE_string('data_dir', None, 'Where the prepared uint8 caches are '
                      '(the --data_dir of python -m '
                      'resnet_jax.tools.prepare_data); default: TFDS\'s.')
  flags.DEFINE_list('stages', list(STAGES), f'from {", ".join(STAGES)}')
  flags.DEFINE_bool('smoke', False, 'tiny sizes: prove the suite on a CPU')
  flags.DEFINE_float('stage_timeout', 3600, 'seconds per command')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
