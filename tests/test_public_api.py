"""The names users reach for import from the package's top, cheaply."""

import subprocess
import sys

import resnet_jax

_PROBE = '''
import sys
from resnet_jax import (create_model, Residual, ResNet, Layers,
                        from_torchvision, available_models)
model = create_model('resnet18', num_classes=10)
assert isinstance(model, ResNet) and 'resnet50' in available_models()
heavy = sorted(m for m in sys.modules if m.split('.')[0] in (
    'tensorflow', 'tensorflow_datasets', 'torch', 'torchvision', 'grain')
    or m.startswith(('resnet_jax.cpu', 'resnet_jax.tools')))
print(' '.join(heavy))
'''


def test_public_names_load_no_tensorflow_torch_cpu_kernels_or_tools():
  out = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True,
                       text=True, check=False, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '', out.stdout


def test_every_public_name_resolves():
  for name in resnet_jax.__all__:
    assert getattr(resnet_jax, name) is not None, name
  assert resnet_jax.Residual is resnet_jax.models.Residual
  assert resnet_jax.from_torchvision.__module__ == (
      'resnet_jax.models.torchvision_weights')
