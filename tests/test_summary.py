"""The model summary command: the textbook's listing, counts and FLOPs."""

import pathlib
import subprocess
import sys

import pytest

from resnet_jax.checkpoint import workdir as workdir_lib

from resnet_jax import config, models
from resnet_jax.tools import summary

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_summary_lists_the_textbook_shapes_in_order():
  s = summary.summarize(models.create_model('d2l_resnet18', num_classes=10),
                        (1, 224, 224, 1))
  assert [shape for _, shape in s['layers']] == [
      (1, 112, 112, 64), (1, 56, 56, 64), (1, 56, 56, 64), (1, 28, 28, 128),
      (1, 14, 14, 256), (1, 7, 7, 512), (1, 512), (1, 10)]
  assert s['params'] == 11_178_378
  # ResNet-18 is ~1.8 GMACs at 3x224x224; one input channel saves a little.
  assert 3.0e9 < s['flops_per_example'] < 3.7e9


def test_flops_scale_with_resolution():
  model = models.create_model('cifar_resnet20', num_classes=10)
  small = summary.summarize(model, (2, 16, 16, 3))
  large = summary.summarize(model, (2, 32, 32, 3))
  assert 3.5 < large['flops_per_example'] / small['flops_per_example'] < 4.5


def test_model_and_input_follow_the_config():
  c = config.base_config()  # cifar_resnet8 on Fashion-MNIST at 28x28
  model, shape = summary.model_and_input(c)
  assert shape == (1, 28, 28, 1)
  assert model.num_classes == 10 and tuple(model.stage_sizes) == (1, 1, 1)
  c.model.name = 'cifar_resnet20'
  c.model.width = 4
  c.model.stage_sizes = (2, 1, 1)
  c.data.dataset = 'cifar100'
  c.data.image_size = 16
  model, shape = summary.model_and_input(c)
  assert shape == (1, 16, 16, 3)  # the dataset's channels, the run's size
  assert model.num_classes == 100  # the dataset's classes, resolved
  assert tuple(model.stage_sizes) == (2, 1, 1)
  assert model.stem_width == 4 and tuple(model.stage_widths) == (4, 8, 16)


def _summary_cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'resnet_jax.tools.summary', *args], capture_output=True,
      text=True, cwd=ROOT, timeout=300, check=False)


@pytest.mark.full
def test_summary_cli(tmp_path):
  out = _summary_cli('--config=configs/cifar10_resnet20.py')
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'parameters: 269,722' in out.stdout
  assert 'input (1, 32, 32, 3)' in out.stdout
  assert 'stage3' in out.stdout and 'FLOPs' in out.stdout
  # A workdir: the network its config.json describes (here with fewer
  # blocks than the registered model), not the default recipe's.
  c = config.base_config()
  c.model.name = 'cifar_resnet20'
  c.model.stage_sizes = (1, 1, 1)
  c.model.num_classes = 10
  c.data.dataset = 'cifar10'
  workdir_lib.write_config(str(tmp_path), c)
  out = _summary_cli(f'--workdir={tmp_path}')
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'parameters: 75,290' in out.stdout  # ResNet-8's count
  bad = _summary_cli('--config.model.name=resnet99')
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "error: config field model.name='resnet99' is invalid: must be a "
      'registered model')
  assert 'Traceback' not in bad.stderr


@pytest.mark.parametrize('impl', ['auto', 'patches'])
def test_flops_count_the_convolutions_of_every_conv_impl(impl):
  # The CPU paths hide their convolutions from XLA's cost analysis (oneDNN
  # custom calls, patch chunk loops); the count must be the model's anyway.
  shape = (1, 32, 32, 3)
  xla = summary.summarize(models.create_model('cifar_resnet20'), shape)
  fast = summary.summarize(
      models.create_model('cifar_resnet20', conv_impl=impl), shape)
  assert fast['flops_per_example'] == xla['flops_per_example'] > 3e7
