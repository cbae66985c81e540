"""Training: sharded == single device, every config runs, the CLI's outputs
and errors, and a short real run that learns."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from resnet_jax import train_loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if p.stem != '__init__')


def _env(**extra) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  env.update(extra)
  return env


def run_check(name: str, *args: str) -> dict:
  out = subprocess.run(
      [sys.executable, str(ROOT / 'tests' / 'multidevice_checks.py'), name,
       *args], capture_output=True, text=True, env=_env(), timeout=600,
      check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_sharded_step_equals_single_device_step():
  r = run_check('sharded_step')
  assert r['devices'] == 8
  np.testing.assert_allclose(r['loss'][0], r['loss'][1], rtol=1e-5)
  # Gradients are sums in another order on 8 devices: BN bias gradients
  # differ by up to ~1e-2 relative in float32, their norm by ~1e-4.
  np.testing.assert_allclose(r['grad_norm'][0], r['grad_norm'][1], rtol=1e-3)
  assert r['correct'][0] == r['correct'][1]
  # BatchNorm over the global batch: with 4 examples per device, per-device
  # statistics would differ from the single-device ones by far more.
  assert r['batch_stats_max_rel'] < 1e-5
  # Updated parameters differ by the gradients' summation-order noise (up to
  # ~1e-2 relative for BN bias gradients) times the step: a few percent of
  # the largest update at most. Unsynchronised BN would differ by far more.
  assert r['params_max_abs'] < 0.05 * r['update_max_abs']


def tiny_config(name: str, data_dir: str, **overrides):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.tfds_data_dir = data_dir
  config.num_train_steps = 3
  config.warmup_epochs = 0.0
  config.warmup_steps = -1
  config.lr_boundaries = tuple(b for b in config.lr_boundaries if b < 3)
  config.lr_scales = config.lr_scales[:len(config.lr_boundaries)]
  config.batch_size = 8
  config.eval_batch_size = 64
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.progress_bar = False
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.fixture
def mock_imagenet(monkeypatch):
  """imagenet2012 under tfds.testing.mock_data: random JPEGs, streamed."""
  tfds = pytest.importorskip('tensorflow_datasets')
  from resnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(input_pipeline, '_network_reachable',
                      lambda urls, **kw: True)
  with tfds.testing.mock_data(num_examples=40):
    yield


class _NoCheckpoints:
  """Orbax's array-metadata write fails under tfds.testing.mock_data's
  patches; checkpoints have their own tests, so this one skips them."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def all_steps(self):
    return []

  def save(self, *args, **kwargs):
    pass

  wait = close = lambda self: None


def test_imagenet_config_streams_and_trains(mock_imagenet, tmp_path,
                                            monkeypatch):
  # The recipe (bfloat16, Nesterov, label smoothing, warmup + cosine, the
  # streamed Inception crop) on a narrow ResNet-50 at 64x64.
  monkeypatch.setattr(train_loop.checkpointing, 'Checkpointer', _NoCheckpoints)
  config = tiny_config('imagenet_resnet50', str(tmp_path / 'tfds'), width=8,
                       image_size=32, eval_batch_size=16, num_train_steps=3)
  config.warmup_steps = 1
  result = train_loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['test_count'] == 40  # every mock validation image, once
  assert np.isfinite(result['test_loss'])


# imagenet streams (test above); the fine-tuning recipe starts from converted
# torchvision weights (tests/test_finetune.py runs it).
@pytest.mark.parametrize('name', [c for c in CONFIGS if c not in (
    'imagenet_resnet50', 'finetune_fashion_mnist')])
def test_every_config_trains_a_few_steps(name, fake_data_dir, tmp_path):
  overrides = {}
  if name == 'd2l_fashion_mnist':
    overrides['image_size'] = 96  # the recipe's resize, kept
  if name in ('cifar10_resnet56', 'cifar10_resnet110'):
    # The recipe (optimiser, schedule, augmentation) on a 20-layer net:
    # compiling 56 or 110 layers takes minutes on 2 cores, and their
    # architectures are covered by tests/test_models.py.
    overrides['model'] = 'cifar_resnet20'
  if name != 'd2l_fashion_mnist':
    overrides['width'] = 8
  config = tiny_config(name, fake_data_dir, **overrides)
  result = train_loop.train_and_evaluate(config, str(tmp_path))
  assert result['test_count'] == 100  # every fake test image, once
  records = [json.loads(line) for line in
             (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'epoch' not in r] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) for r in records if 'loss' in r)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '3']


def _blocked_tensorflow(tmp_path) -> str:
  """A sitecustomize under which TensorFlow and TFDS look not installed:
  imports fail and importlib.util.find_spec returns None (as etils asks)."""
  block = tmp_path / 'block_tf'
  block.mkdir()
  (block / 'sitecustomize.py').write_text(
      'import importlib.util, sys\n'
      'BLOCKED = ("tensorflow", "tensorflow_datasets")\n'
      'class _Block:\n'
      '  def find_spec(self, name, path=None, target=None):\n'
      '    if name.split(".")[0] in BLOCKED:\n'
      '      raise ModuleNotFoundError(f"No module named {name!r}")\n'
      'sys.meta_path.insert(0, _Block())\n'
      '_find_spec = importlib.util.find_spec\n'
      'def find_spec(name, package=None):\n'
      '  if name.split(".")[0] in BLOCKED:\n'
      '    return None\n'
      '  return _find_spec(name, package)\n'
      'importlib.util.find_spec = find_spec\n')
  return str(block)


def test_cli_trains_without_tensorflow_and_leaves_outputs(fake_data_dir,
                                                          tmp_path):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, str(ROOT / 'train.py'), f'--workdir={workdir}',
         f'--config.tfds_data_dir={fake_data_dir}', '--config.width=4',
         '--config.batch_size=32', '--config.eval_batch_size=50',
         '--config.num_epochs=2', '--config.warmup_epochs=0',
         '--config.log_every_steps=4']
  env = _env(PYTHONPATH=f'{_blocked_tensorflow(tmp_path)}:{ROOT}')
  out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  # The textbook's line, once per epoch.
  lines = [l for l in out.stdout.splitlines() if l.startswith('epoch ')]
  assert len(lines) == 2 and 'test acc' in lines[0] and 'examples/sec' in lines[0]
  names = set(os.listdir(workdir))
  assert {'config.json', 'metrics.jsonl', 'curves.png', 'checkpoints',
          'tensorboard'} <= names
  assert os.listdir(workdir / 'tensorboard')
  config = json.loads((workdir / 'config.json').read_text())
  assert config['width'] == 4 and config['model'] == 'cifar_resnet20'
  epochs = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text()
            .splitlines() if '"epoch"' in l]
  assert [r['epoch'] for r in epochs] == [1.0, 2.0]
  for key in ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy',
              'examples_per_sec', 'step'):
    assert key in epochs[0]


def test_short_real_run_learns(fashion_mnist_data_dir, tmp_path):
  config = tiny_config('default', fashion_mnist_data_dir, width=8,
                       batch_size=64, num_train_steps=120, learning_rate=0.1,
                       log_every_steps=40, checkpoint_every_steps=1000,
                       eval_batch_size=1000)
  result = train_loop.train_and_evaluate(config, str(tmp_path))
  assert result['test_count'] == 10_000
  # Chance is 0.10 (loss 2.30); 120 steps of a narrow ResNet reach ~0.62.
  assert result['test_accuracy'] > 0.5, result
  assert result['test_loss'] < 1.5, result


def test_epoch_line_names_the_split_it_evaluated(capsys):
  record = {'epoch': 3, 'train_loss': 0.25, 'train_accuracy': 0.9,
            'test_accuracy': 0.88, 'examples_per_sec': 100.0}
  train_loop._epoch_line(record, True, on_validation=False)  # pylint: disable=protected-access
  train_loop._epoch_line(record, True, on_validation=True)  # pylint: disable=protected-access
  train_loop._epoch_line(record, False, on_validation=False)  # pylint: disable=protected-access
  assert capsys.readouterr().out.splitlines() == [
      'epoch 3: loss 0.250, train acc 0.900, test acc 0.880, 100.0 examples/sec',
      'epoch 3: loss 0.250, train acc 0.900, val acc 0.880, 100.0 examples/sec']


def test_epoch_line_of_a_run_cut_mid_epoch(capsys):
  record = {'epoch': 120 / 234, 'train_loss': 0.729, 'train_accuracy': 0.76,
            'test_accuracy': 0.822, 'examples_per_sec': 43.3}
  train_loop._epoch_line(record, True, on_validation=False)  # pylint: disable=protected-access
  assert capsys.readouterr().out == (
      'epoch 0.51: loss 0.729, train acc 0.760, test acc 0.822, '
      '43.3 examples/sec\n')
