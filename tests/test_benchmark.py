"""The benchmark tool: runs in-process and as a module CLI on 8 simulated
devices with real-pipeline data, writes consistent figures, and rejects bad
input with one line and exit code 2. Never asserts speed."""

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from resnet_jax import benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--model', 'cifar_resnet20', '--width', '4', '--steps', '3',
        '--warmup', '1', '--dtype', 'float32', '--conv_impl', 'xla']


def _env(devices: int | None = None) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  if devices:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _cli(*args: str, devices: int | None = None
         ) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'resnet_jax.benchmark', *args],
                        capture_output=True, text=True, env=_env(devices),
                        cwd=ROOT, timeout=600, check=False)


@pytest.fixture(scope='module')
def single(tmp_path_factory) -> dict:
  """Synthetic data, in-process, one device, batch 8 at 16x16x1."""
  path = tmp_path_factory.mktemp('bench') / 'single.json'
  code = benchmark.main(TINY + ['--batch_size', '8', '--image_size', '16',
                                '--channels', '1', '--json', str(path)])
  assert code == 0
  return json.loads(path.read_text())


@pytest.fixture(scope='module')
def sharded(tmp_path_factory, fake_data_dir) -> dict:
  """The module CLI on 8 simulated devices, batch 16, fake Fashion-MNIST
  (28x28, resized to 16 on the device) through the in-memory pipeline."""
  path = tmp_path_factory.mktemp('bench') / 'sharded.json'
  out = _cli(*TINY, '--batch_size', '16', '--image_size', '16',
             '--data', 'fashion_mnist', '--data_dir', fake_data_dir,
             '--ratio_rounds', '2', '--json', str(path), devices=8)
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
  assert single['input_shape'] == [16, 16, 1] and single['image_size'] == 16
  assert single['conv_impl_resolved'] == 'xla' and single['dtype'] == 'float32'
  for key in ('date', 'command', 'jax_version', 'device_kind', 'peak_source',
              'max_rss_bytes', 'load_average'):
    assert single[key], key
  assert '--batch_size 8' in single['command']
  peak = single['peak_flops_per_s']
  assert peak > 0 and 'FLOP/cycle' in single['peak_source']
  _check_step(single['train'], 8, peak)
  _check_step(single['eval'], 8, peak)
  # Forward + backward costs more than forward alone.
  assert (single['train']['flops_per_example']
          > 1.5 * single['eval']['flops_per_example'])
  assert 'data_pipeline' not in single


def test_cli_on_8_devices_with_the_in_memory_pipeline(sharded, single):
  assert sharded['device_count'] == 8 and sharded['batch_size'] == 16
  assert sharded['input_shape'] == [28, 28, 1] and sharded['image_size'] == 16
  _check_step(sharded['train'], 16, sharded['peak_flops_per_s'])
  _check_step(sharded['eval'], 16, sharded['peak_flops_per_s'])
  # The count is of the global step (all devices), so twice the batch
  # is about twice the FLOPs (plus a small resize and 8 optimizer updates).
  for step in ('train', 'eval'):
    ratio = sharded[step]['flops_per_step'] / single[step]['flops_per_step']
    assert 1.6 < ratio < 2.6, (step, ratio)
  d = sharded['data_pipeline']
  assert d['dataset'] == 'fashion_mnist' and len(d['ratios']) == 2
  assert d['ratio_median'] > 0 and d['ratio_of_totals'] > 0
  assert d['images_per_s'] > 0


def test_unknown_model_is_one_line_exit_2(capsys):
  assert benchmark.main(['--model', 'resnet7']) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: unknown model') and '\n' not in err


def test_batch_not_divisible_by_devices_is_one_line_exit_2():
  out = _cli(*TINY, '--batch_size', '12', devices=8)
  assert out.returncode == 2
  err = out.stderr.strip()
  assert '\n' not in err and 'batch_size=12' in err and '8 devices' in err


@pytest.mark.parametrize('args, message', [
    (['--config', 'no/such.py'], 'config file not found'),
    (['--steps', '0'], '--steps=0'),
    (['--channels', '2'], 'channels'),
    (['--data', 'fashion_mnist', '--channels', '1'], 'leave --channels out'),
    (['--json', '/no/such/dir/out.json'], 'directory does not exist'),
])
def test_other_bad_input_is_one_line_exit_2(capsys, args, message):
  assert benchmark.main(TINY + ['--image_size', '16'] + args) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and '\n' not in err


def test_config_file_then_flags():
  d2l = str(ROOT / 'configs' / 'd2l_fashion_mnist.py')
  opts = benchmark.make_options(['--config', d2l])
  c = opts.config
  assert (c.model, c.batch_size, c.image_size) == ('d2l_resnet18', 256, 96)
  # Synthetic images of the dataset's native shape, resized as in training.
  assert opts.input_shape == (28, 28, 1) and not c.half_precision
  opts = benchmark.make_options(['--config', d2l, '--batch_size', '32',
                                 '--dtype', 'bfloat16', '--conv_impl',
                                 'patches', '--channels', '3'])
  c = opts.config
  assert (c.batch_size, c.half_precision, c.conv_impl) == (32, True, 'patches')
  assert opts.input_shape == (96, 96, 3)
  # No --config: configs/default.py.
  opts = benchmark.make_options(['--image_size', '32', '--channels', '3'])
  assert (opts.config.model, opts.config.batch_size) == ('cifar_resnet20', 64)
  assert tuple(opts.config.stage_sizes) == (1, 1, 1)  # the default's ResNet-8
  assert opts.input_shape == (32, 32, 3)
  # A named model drops the default's stage override: resnet18 is resnet18,
  # and cifar_resnet20 (the default's own model) has its 3 blocks per stage.
  for name in ('resnet18', 'cifar_resnet20'):
    opts = benchmark.make_options(['--model', name])
    assert tuple(opts.config.stage_sizes) == ()


def test_peak_table_and_cpu_derivation():
  h100 = types.SimpleNamespace(platform='gpu',
                               device_kind='NVIDIA H100 80GB HBM3')
  peak, source = benchmark.peak_flops(h100, 'bfloat16')
  assert peak == pytest.approx(989e12 * benchmark.jax.device_count())
  assert 'H100' in source
  v5e = types.SimpleNamespace(platform='tpu', device_kind='TPU v5 lite')
  assert benchmark.peak_flops(v5e, 'bfloat16')[0] == pytest.approx(
      197e12 * benchmark.jax.device_count())
  assert benchmark.peak_flops(types.SimpleNamespace(
      platform='gpu', device_kind='Mystery'), 'float32')[0] is None
  zen = {'flags': {'avx', 'avx2', 'fma', 'avx512f'}, 'vendor': 'AuthenticAMD',
         'family': 25}
  assert benchmark._fp32_flops_per_cycle(zen)[0] == 32  # pylint: disable=protected-access
  peak, source = benchmark.cpu_peak_flops()
  if peak is not None:
    cores = len(os.sched_getaffinity(0))
    assert f'{cores} cores' in source and peak > cores * 1e9




def test_flops_are_the_models_even_inside_the_patch_chunk_loops(tmp_path):
  # At batch 64, 32x32 and width 8 a 3x3 layer's patches (19 MB) exceed
  # conv.PATCH_BYTES_LIMIT, so 'patches' computes them in chunk loops, whose
  # bodies XLA's cost analysis of the compiled step counts once: the tool
  # must still report the model's arithmetic: 0.0188 GFLOP per 32x32x1 image
  # forward for ResNet-20 at width 8 (XLA's count with its own convolutions),
  # training about 3x. Counted on the compiled patch program it was 0.0151
  # (loops counted once), and 0.027 unchunked (padding zeros multiplied).
  path = tmp_path / 'patches.json'
  args = ['--model', 'cifar_resnet20', '--width', '8', '--steps', '1',
          '--warmup', '1', '--batch_size', '64', '--image_size', '32',
          '--channels', '1', '--conv_impl', 'patches', '--json', str(path)]
  assert benchmark.main(args) == 0
  figures = json.loads(path.read_text())
  assert figures['conv_impl_resolved'] == 'patches'
  forward = figures['eval']['flops_per_example']
  assert 0.018e9 < forward < 0.0195e9, forward
  assert 2.5 < figures['train']['flops_per_example'] / forward < 3.5
