"""Every command on every recipe's workdir: train -> evaluate the workdir ->
predict.py on image files -> summary of the workdir's network -> benchmark
of the config. The default recipe runs as a newcomer runs it (the command
lines, real Fashion-MNIST, the issue's 20-step smoke test); the other
recipes run in-process, shrunk to a few steps of a narrow network (their
data is fake where it is not here: synthetic ImageNet), so that the matrix
fits in CI."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax.checkpoint import workdir as workdir_lib

from resnet_jax.tools import benchmark, summary
from resnet_jax import predictor
from resnet_jax.data import datasets, device_data, in_memory
from resnet_jax.train import train_loop
from helpers import ROOT, blocked_tensorflow, subprocess_env

# Subprocesses and every config end to end: the full tier.
pytestmark = pytest.mark.full

CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if p.stem != '__init__')

# How each recipe is shrunk: its optimiser, schedule, augmentation, dataset
# and network family stay; widths, depths and sizes shrink.
SHRINK = {
    'd2l_fashion_mnist': {'model.width': 8},  # still at the recipe's 96x96
    'cifar10_resnet20': {'model.width': 4},
    'cifar10_resnet56': {'model.width': 4, 'model.stage_sizes': (1, 1, 1)},
    'cifar10_resnet110': {'model.width': 4, 'model.stage_sizes': (1, 1, 1)},
    'fashion_mnist_best': {'model.width': 4, 'data.validation_examples': 56},
    'imagenet_resnet50': {'model.width': 8, 'model.stage_sizes': (1, 1, 1, 1),
                          'data.image_size': 32},
    'finetune_fashion_mnist': {'data.image_size': 32},
}


def _write_images(folder: pathlib.Path, channels: int) -> list[str]:
  """A PNG of another size and a JPEG of the other colour mode."""
  rng = np.random.default_rng(0)
  png, jpeg = folder / 'item.png', folder / 'photo.jpg'
  gray = rng.integers(0, 256, (40, 30), np.uint8)
  rgb = rng.integers(0, 256, (50, 70, 3), np.uint8)
  Image.fromarray(gray if channels == 1 else rgb).save(png)
  Image.fromarray(rgb if channels == 1 else gray).save(jpeg, quality=90)
  return [str(png), str(jpeg)]


def _synthetic_imagenet(config, mesh):
  """ImageNet is not here: a few random images at the run's image size
  stand in for the streamed pipeline (tested on mock data elsewhere)."""
  spec = datasets.get(config.data.dataset)
  size = config.data.image_size
  rng = np.random.default_rng(0)

  def split(n):
    return in_memory.ArrayDataset(
        rng.integers(0, 256, (n, size, size, 3), np.uint8),
        rng.integers(0, spec.num_classes, n).astype(np.int32))

  splits = in_memory.InMemorySplits(split(32), {'val': split(20)}, ())
  return device_data.InMemoryData(spec, mesh, splits, config.data.batch_size,
                                  config.data.eval_batch_size, config.run.seed)


@pytest.fixture(scope='module')
def converted_resnet18(tmp_path_factory) -> str:
  """A `python -m resnet_jax.tools.convert` directory (random weights), for the
  fine-tuning recipe's warm start."""
  from resnet_jax.tools import convert
  from resnet_jax import models
  model = models.create_model('resnet18', num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: (rng.uniform(0.5, 2.0, x.shape) if p[-1].key == 'var' else
                    0.05 * rng.standard_normal(x.shape)).astype(np.float32),
      shapes)
  path = str(tmp_path_factory.mktemp('torchvision_resnet18'))
  convert.write_converted(path, variables, 'resnet18', 1000, 'random.pth')
  return path


@pytest.mark.parametrize('name', [c for c in CONFIGS if c != 'default'])
def test_every_command_on_a_recipes_workdir(name, fake_data_dir,
                                           converted_resnet18, tmp_path,
                                           monkeypatch, capsys):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.update_from_flattened_dict({
      'data.tfds_data_dir': fake_data_dir, 'data.batch_size': 8,
      'data.eval_batch_size': 64, 'run.num_train_steps': 3,
      'run.log_every_steps': 1, 'run.checkpoint_every_steps': 2,
      'run.progress_bar': False,
      # XLA's convolutions compile faster than the CPU patch path; the
      # default recipe's test below keeps 'auto'.
      'model.conv_impl': 'xla', **SHRINK[name]})
  if name == 'finetune_fashion_mnist':
    config.run.init_from = converted_resnet18
  if config.data.dataset == 'imagenet2012':
    monkeypatch.setattr(device_data, 'load', _synthetic_imagenet)
  workdir = str(tmp_path / 'run')
  spec = datasets.get(config.data.dataset)
  first_split = datasets.eval_split_names(
      spec, config.data.validation_examples)[0]

  # 1. Train: the last evaluation is on the run's first named split.
  result = train_loop.train_and_evaluate(config, workdir)
  assert result[f'{first_split}_count'] > 0
  assert np.isfinite(result[f'{first_split}_loss'])
  assert f'{first_split} acc' in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '3']

  # 2. Evaluate the workdir as recorded (the record, not the recipe).
  recorded = workdir_lib.read_config(workdir)
  recorded.run.mode = 'eval'
  evaluated = train_loop.evaluate_checkpoint(recorded, workdir)
  assert evaluated['step'] == 3
  assert evaluated[f'{first_split}_accuracy'] == pytest.approx(
      result[f'{first_split}_accuracy'])
  for split in datasets.eval_split_names(spec,
                                         config.data.validation_examples):
    assert evaluated[f'{split}_count'] > 0

  # 3. predict.py's library on image files of other sizes and colour modes.
  model = predictor.Predictor(workdir)
  probs = model.probabilities(model.load(_write_images(tmp_path,
                                                       spec.channels)))
  assert probs.shape == (2, spec.num_classes)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
  assert len(model.names) == spec.num_classes

  # 4. The summary of the workdir's network has the checkpoint's parameters.
  network, shape = summary.model_and_input(recorded)
  figures = summary.summarize(network, shape)
  assert figures['params'] == sum(
      x.size for x in jax.tree.leaves(model.variables['params']))
  assert figures['flops_per_example'] > 0

  # 5. The benchmark of the config: the same steps, on synthetic data.
  figures = benchmark.run_benchmark(benchmark.Options(config, steps=1,
                                                      warmup=0))
  assert figures['train']['images_per_s_median'] > 0
  assert figures['model']['name'] == config.model.name


def _cli(*args: str, **env) -> subprocess.CompletedProcess:
  out = subprocess.run([sys.executable, *args], capture_output=True,
                       text=True, env=subprocess_env(**env), cwd=ROOT, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_every_command_on_the_default_recipes_workdir(fashion_mnist_data_dir,
                                                      tmp_path):
  # The README's default command with the usual smoke-test override, on the
  # real Fashion-MNIST read from its cache with TensorFlow not importable
  # (as on a GPU machine without it): the recipe's 0.3 epochs of warmup (281
  # steps) are longer than the 20 steps asked for, so the warmup is
  # shortened with a warning.
  workdir = tmp_path / 'default'
  data = f'--config.data.tfds_data_dir={fashion_mnist_data_dir}'
  out = _cli('train.py', f'--workdir={workdir}', data,
             '--config.run.num_train_steps=20', '--config.run.log_every_steps=8',
             PYTHONPATH=f'{blocked_tensorflow(tmp_path)}:{ROOT}')
  assert 'warmup of 281 steps is longer than the run (20 steps)' in out.stderr
  assert 'cifar_resnet8 on fashion_mnist' in out.stderr
  # The textbook's line, once, naming the split it evaluated.
  epoch_lines = [l for l in out.stdout.splitlines() if l.startswith('epoch')]
  assert len(epoch_lines) == 1 and ' test acc ' in epoch_lines[0]
  assert 'examples/sec' in epoch_lines[0]
  assert {'config.json', 'metrics.jsonl', 'curves.png', 'checkpoints',
          'tensorboard'} <= set(os.listdir(workdir))
  assert os.listdir(workdir / 'tensorboard')
  # The network as a value: the default's own registry name, the dataset's
  # number of classes filled in.
  record = json.loads((workdir / 'config.json').read_text())
  assert record['model']['name'] == 'cifar_resnet8'
  assert record['model']['num_classes'] == 10
  records = [json.loads(l) for l in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [8, 16, 20, 20]
  assert set(records[-1]) == {'step', 'epoch', 'train_loss', 'train_accuracy',
                              'examples_per_sec', 'test_loss', 'test_accuracy',
                              'test_top5_accuracy', 'test_count'}
  for key in ('loss', 'accuracy', 'grad_norm', 'learning_rate',
              'images_per_sec'):
    assert all(np.isfinite(r[key]) for r in records[:3]), key
  workdir = str(workdir)

  # Evaluate: the workdir's recorded run, with no --config at all.
  out = _cli('train.py', f'--workdir={workdir}', '--config.run.mode=eval')
  assert 'step 20: test loss' in out.stdout and '10000 examples' in out.stdout

  # predict.py, the command a user types (this failed on ResNet-8 before).
  images = _write_images(tmp_path, channels=1)
  out = _cli('predict.py', f'--workdir={workdir}', *images)
  lines = out.stdout.splitlines()
  assert len(lines) == 12 and lines[0] == images[0]
  assert lines[1].split(None, 1)[1] in (
      'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
      'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

  out = _cli('-m', 'resnet_jax.tools.summary', f'--workdir={workdir}')
  assert 'parameters: 75,002' in out.stdout and 'stage3' in out.stdout

  out = _cli('-m', 'resnet_jax.tools.benchmark', '--steps=2', '--warmup=1')
  assert 'cifar_resnet8' in out.stdout and 'images/s' in out.stdout
