"""The model summary command: the textbook's listing, counts and FLOPs."""

import pathlib
import subprocess
import sys

from resnet_jax import summary

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_summary_lists_the_textbook_shapes_in_order():
  s = summary.summarize('d2l_resnet18', (1, 224, 224, 1), 10)
  assert [shape for _, shape in s['layers']] == [
      (1, 112, 112, 64), (1, 56, 56, 64), (1, 56, 56, 64), (1, 28, 28, 128),
      (1, 14, 14, 256), (1, 7, 7, 512), (1, 512), (1, 10)]
  assert s['params'] == 11_178_378
  # ResNet-18 is ~1.8 GMACs at 3x224x224; one input channel saves a little.
  assert 3.0e9 < s['flops_per_example'] < 3.7e9


def test_flops_scale_with_resolution():
  small = summary.summarize('cifar_resnet20', (2, 16, 16, 3), 10)
  large = summary.summarize('cifar_resnet20', (2, 32, 32, 3), 10)
  assert 3.5 < large['flops_per_example'] / small['flops_per_example'] < 4.5


def test_summary_cli():
  out = subprocess.run(
      [sys.executable, '-m', 'resnet_jax.summary', '--model=cifar_resnet20',
       '--input_shape=1,32,32,3'], capture_output=True, text=True,
      cwd=ROOT, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'parameters: 269,722' in out.stdout
  assert 'stage3' in out.stdout and 'FLOPs' in out.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'resnet_jax.summary', '--model=resnet99'],
      capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith('error: unknown model')
  assert 'Traceback' not in bad.stderr
