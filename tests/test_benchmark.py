"""The benchmark tool: runs in-process and as a module CLI on 8 simulated
devices with real-pipeline data, writes consistent figures, and rejects bad
input with one line and exit code 2. Never asserts speed."""

import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import pytest

from resnet_jax.tools import benchmark, peak_flops
from resnet_jax import config as config_lib
from resnet_jax.errors import UserError
from helpers import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
# ResNet-20 at width 4 with XLA's convolutions (the fastest to compile), on
# Fashion-MNIST-shaped 28x28x1 images resized to 16 on the device.
TINY = {'model.name': 'cifar_resnet20', 'model.width': 4,
        'model.conv_impl': 'xla', 'model.dtype': 'float32',
        'data.dataset': 'fashion_mnist', 'data.image_size': 16}
TINY_FLAGS = [f'--config.{k}={v}' for k, v in TINY.items()] + [
    '--steps=3', '--warmup=1']


def _config(**overrides):
  """configs/default.py (the schema's defaults) with dotted `overrides`."""
  c = config_lib.base_config()
  for path, value in overrides.items():
    section, key = path.rsplit('.', 1)
    node = c
    for name in section.split('.'):
      node = node[name]
    node[key] = value
  return c


def _env(devices: int | None = None) -> dict:
  flags = f'--xla_force_host_platform_device_count={devices}' if devices else ''
  return subprocess_env(XLA_FLAGS=flags)


def _cli(*args: str, devices: int | None = None
         ) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'resnet_jax.tools.benchmark', *args],
                        capture_output=True, text=True, env=_env(devices),
                        cwd=ROOT, timeout=600, check=False)


@pytest.fixture(scope='module')
def single(tmp_path_factory) -> dict:
  """Synthetic data, in-process, one device, batch 8 of 28x28x1 -> 16."""
  path = tmp_path_factory.mktemp('bench') / 'single.json'
  result = benchmark.benchmark(benchmark.Options(
      _config(**TINY, **{'data.batch_size': 8}), steps=3, warmup=1,
      json_path=str(path), command='in-process test'))
  written = json.loads(path.read_text())
  assert written == json.loads(json.dumps(result))
  return written


@pytest.fixture(scope='module')
def sharded(tmp_path_factory, fake_data_dir) -> dict:
  """The module CLI on 8 simulated devices, batch 16, fake Fashion-MNIST
  (28x28, resized to 16 on the device) through the in-memory pipeline; the
  textbook recipe's file, then flags that override some of its fields."""
  path = tmp_path_factory.mktemp('bench') / 'sharded.json'
  out = _cli('--config=configs/d2l_fashion_mnist.py', *TINY_FLAGS,
             '--config.data.batch_size=16', '--data=real',
             f'--config.data.tfds_data_dir={fake_data_dir}',
             '--ratio_rounds=2', f'--json={path}', devices=8)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'of synthetic' in out.stdout
  return json.loads(path.read_text())


def _check_step(s: dict, batch: int, peak: float) -> None:
  assert s['lower_s'] > 0 and s['compile_s'] > 0 and s['first_call_s'] > 0
  assert s['step_s_min'] <= s['step_s_median'] <= s['step_s_max']
  assert (s['images_per_s_min'] <= s['images_per_s_median']
          <= s['images_per_s_max'])
  assert s['images_per_s_median'] == pytest.approx(batch / s['step_s_median'])
  assert s['images_per_s_min'] == pytest.approx(batch / s['step_s_max'])
  assert s['pipelined_images_per_s'] > 0
  assert s['flops_per_example'] > 0
  assert s['flops_per_example'] * batch == pytest.approx(s['flops_per_step'])
  assert s['achieved_flops_per_s'] == pytest.approx(
      s['flops_per_step'] / s['step_s_median'])
  assert s['fraction_of_peak'] == pytest.approx(
      s['achieved_flops_per_s'] / peak)
  mem = s['memory']
  assert mem['argument_bytes'] > 0 and mem['temp_bytes'] >= 0


def test_in_process_run_writes_consistent_figures(single):
  assert single['device_count'] == 1 and single['batch_size'] == 8
  # Synthetic images of the dataset's shape, resized as in training.
  assert single['dataset'] == 'fashion_mnist'
  assert single['input_shape'] == [28, 28, 1] and single['image_size'] == 16
  assert single['conv_impl_resolved'] == 'xla' and single['dtype'] == 'float32'
  # The network as the config's model section names it (num_classes filled
  # in from the dataset, as config.json records it).
  assert single['model'] == dict(
      config_lib.base_config().model.to_dict(), name='cifar_resnet20',
      width=4, num_classes=10, conv_impl='xla')
  assert single['data'] == 'synthetic'
  assert (single['steps'], single['warmup']) == (3, 1)
  for key in ('date', 'command', 'jax_version', 'device_kind', 'peak_source',
              'max_rss_bytes', 'load_average'):
    assert single[key], key
  assert single['command'] == 'in-process test'
  peak = single['peak_flops_per_s']
  assert peak > 0 and 'FLOP/cycle' in single['peak_source']
  _check_step(single['train'], 8, peak)
  _check_step(single['eval'], 8, peak)
  # Forward + backward costs more than forward alone.
  assert (single['train']['flops_per_example']
          > 1.5 * single['eval']['flops_per_example'])
  assert 'data_pipeline' not in single


@pytest.mark.full
def test_cli_on_8_devices_with_the_in_memory_pipeline(sharded, single):
  assert sharded['device_count'] == 8 and sharded['batch_size'] == 16
  assert sharded['input_shape'] == [28, 28, 1] and sharded['image_size'] == 16
  assert sharded['data'] == 'real' and sharded['dataset'] == 'fashion_mnist'
  # The config file's fields, except those the flags override.
  model = sharded['model']
  assert (model['name'], model['width'], model['conv_impl']) == (
      'cifar_resnet20', 4, 'xla')
  assert model['zero_init_residual'] is False  # from d2l_fashion_mnist.py
  assert '--config.data.batch_size=16' in sharded['command']
  assert sharded['command'].startswith('python -m resnet_jax.tools.benchmark')
  _check_step(sharded['train'], 16, sharded['peak_flops_per_s'])
  _check_step(sharded['eval'], 16, sharded['peak_flops_per_s'])
  # The count is of the global step (all devices), so twice the batch
  # is about twice the FLOPs (plus the optimizer updates).
  for step in ('train', 'eval'):
    ratio = sharded[step]['flops_per_step'] / single[step]['flops_per_step']
    assert 1.6 < ratio < 2.6, (step, ratio)
  d = sharded['data_pipeline']
  assert d['dataset'] == 'fashion_mnist' and len(d['ratios']) == 2
  assert d['ratio_median'] > 0 and d['ratio_of_totals'] > 0
  assert d['images_per_s'] > 0


@pytest.mark.parametrize('args, fragments, devices', [
    (['--config=no/such.py'], ['config file not found'], None),
    (['--steps=0'], ['--steps=0', 'at least 1'], None),
    (['--ratio_rounds=0'], ['--ratio_rounds=0'], None),
    (['--config.model.name=resnet7'],
     ["config field model.name='resnet7' is invalid: must be a registered "
      'model: ', 'cifar_resnet20'], None),
    (['--json=/no/such/dir/out.json'], ['directory does not exist'], None),
    (['--config.data.batch_size=12'], ['batch_size=12', '8 devices'], 8),
])
def test_bad_input_is_one_line_exit_2(args, fragments, devices):
  # A config file comes before the overrides of its fields.
  ordered = (args + TINY_FLAGS if args[0].startswith('--config=')
             else TINY_FLAGS + args)
  out = _cli(*ordered, devices=devices)
  assert out.returncode == 2, out.stderr[-3000:]
  err = out.stderr.strip()
  assert '\n' not in err and err.startswith('error: '), err
  for fragment in fragments:
    assert fragment in err, err


def test_options_reject_bad_values():
  c = _config(**TINY)
  for kwargs, fragment in [({'steps': 0}, '--steps=0'),
                           ({'warmup': -1}, '--warmup=-1'),
                           ({'data': 'fake'}, "--data='fake'"),
                           ({'json_path': '/no/such/dir/f.json'},
                            'does not exist')]:
    with pytest.raises(UserError, match=fragment):
      benchmark.Options(c, **kwargs)


@pytest.mark.parametrize('dataset, image_size, shape', [
    ('fashion_mnist', None, (28, 28, 1)),
    ('cifar10', 16, (32, 32, 3)),
    ('cifar100', None, (32, 32, 3)),
    # Streamed images arrive decoded at image_size.
    ('imagenet2012', 24, (24, 24, 3)),
])
def test_synthetic_input_is_the_datasets_image_shape(dataset, image_size,
                                                     shape):
  c = _config(**dict(TINY, **{'data.dataset': dataset,
                              'data.image_size': image_size,
                              'data.batch_size': 8}))
  run, batch = benchmark.build_run(benchmark.Options(c))
  assert batch['image'].shape == (8,) + shape
  assert batch['image'].dtype == 'uint8'
  assert run.image_size == (image_size or shape[0])
  # The head follows the dataset, as in training.
  assert run.model.num_classes == run.data.spec.num_classes
  assert int(batch['label'].max()) < run.data.spec.num_classes


def test_peak_table_and_cpu_derivation():
  h100 = types.SimpleNamespace(platform='gpu',
                               device_kind='NVIDIA H100 80GB HBM3')
  peak, source = peak_flops.peak_flops(h100, 'bfloat16')
  assert peak == pytest.approx(989e12 * jax.device_count())
  assert 'H100' in source
  v5e = types.SimpleNamespace(platform='tpu', device_kind='TPU v5 lite')
  assert peak_flops.peak_flops(v5e, 'bfloat16')[0] == pytest.approx(
      197e12 * jax.device_count())
  assert peak_flops.peak_flops(types.SimpleNamespace(
      platform='gpu', device_kind='Mystery'), 'float32')[0] is None
  zen = {'flags': {'avx', 'avx2', 'fma', 'avx512f'}, 'vendor': 'AuthenticAMD',
         'family': 25}
  assert peak_flops._fp32_flops_per_cycle(zen)[0] == 32  # pylint: disable=protected-access
  peak, source = peak_flops.cpu_peak_flops()
  if peak is not None:
    cores = len(os.sched_getaffinity(0))
    assert f'{cores} cores' in source and peak > cores * 1e9




@pytest.mark.full
def test_flops_are_the_models_even_inside_the_patch_chunk_loops(tmp_path):
  # At batch 64, 32x32 and width 8 a 3x3 layer's patches (19 MB) exceed
  # passes.PATCH_BYTES_LIMIT, so 'patches' computes them in chunk loops, whose
  # bodies XLA's cost analysis of the compiled step counts once: the tool
  # must still report the model's arithmetic: 0.01894 GFLOP per image
  # forward for ResNet-20 at width 8 on Fashion-MNIST's 28x28x1 resized to
  # 32x32 (XLA's count with its own convolutions), training about 3x.
  # Counted on the compiled patch program it is 0.0152 (loops counted
  # once), and it was 0.027 unchunked (padding zeros multiplied).
  path = tmp_path / 'patches.json'
  c = _config(**{'model.name': 'cifar_resnet20', 'model.width': 8,
                 'model.conv_impl': 'patches',
                 'data.dataset': 'fashion_mnist', 'data.image_size': 32,
                 'data.batch_size': 64})
  benchmark.benchmark(benchmark.Options(c, steps=1, warmup=1,
                                        json_path=str(path)))
  figures = json.loads(path.read_text())
  assert figures['conv_impl_resolved'] == 'patches'
  assert figures['input_shape'] == [28, 28, 1] and figures['image_size'] == 32
  forward = figures['eval']['flops_per_example']
  assert 0.0186e9 < forward < 0.0192e9, forward
  assert 2.5 < figures['train']['flops_per_example'] / forward < 3.5
