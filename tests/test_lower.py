"""Every recipe lowers for GPU and TPU on 8 devices, a CPU-only path (an
FFI call, a host callback) in an accelerator program fails the lowering,
and the CPU lowering keeps the native kernels, per device.

The lowering runs in a subprocess with 8 simulated CPU devices standing in
for the accelerator's (the test process has one).
"""

import json
import pathlib
import subprocess
import sys

import pytest

from helpers import subprocess_env
from resnet_jax.cpu import native

# Subprocesses and every config end to end: the full tier.
pytestmark = pytest.mark.full

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if p.stem != '__init__')

_SCRIPT = r'''
import importlib.util, json, sys
import jax
jax.config.update('jax_num_cpu_devices', 8)
import numpy as np
from resnet_jax.tools import lower
from resnet_jax.train import train_step
from resnet_jax.errors import UserError

def config(name):
  spec = importlib.util.spec_from_file_location(name, f'configs/{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()

for name in sys.argv[1:]:
  for s in lower.lower_steps(config(name), ['cuda', 'tpu']):
    print(json.dumps({'config': name, 'step': s.step,
                      'platforms': s.platforms, 'conv_impl': s.conv_impl,
                      'devices': s.devices, 'custom_calls': s.custom_calls,
                      'annotations': s.sharding_annotations,
                      'bytes': s.program_bytes}), flush=True)

# The CPU itself: the native kernels are custom calls there, split per device.
for s in lower.lower_steps(config('default'), ['cpu']):
  print(json.dumps({'cpu_step': s.step, 'custom_calls': s.custom_calls,
                    'collectives': s.collectives}), flush=True)

# CPU-only paths leaking into the loss of every step.
cross_entropy = train_step.cross_entropy

@jax.custom_jvp  # differentiable, as a oneDNN convolution would be
def ffi_identity(x):
  return jax.ffi.ffi_call('resnet_jax_cpu_only_kernel',
                          jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
ffi_identity.defjvp(lambda p, t: (ffi_identity(p[0]), t[0]))

leaks = {
    'ffi': ffi_identity,
    'callback': lambda x: jax.pure_callback(
        np.asarray, jax.ShapeDtypeStruct(x.shape, x.dtype), x),
}
for leak, fn in leaks.items():
  train_step.cross_entropy = lambda *a, fn=fn, **k: fn(cross_entropy(*a, **k))
  c = config('default')
  try:
    lower.lower_steps(c, ['cuda'])
    error = None
  except UserError as e:
    error = str(e)
  print(json.dumps({'leak': leak, 'error': error}), flush=True)
'''


@pytest.fixture(scope='module')
def lowered():
  out = subprocess.run([sys.executable, '-c', _SCRIPT, *CONFIGS],
                       capture_output=True, text=True, cwd=ROOT, env=subprocess_env(),
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return [json.loads(line) for line in out.stdout.splitlines()]


def test_every_config_lowers_for_gpu_and_tpu_on_8_devices(lowered):
  steps = [r for r in lowered if 'config' in r]
  assert {(r['config'], r['step']) for r in steps} == {
      (c, s) for c in CONFIGS for s in ('train', 'eval')}
  for r in steps:
    assert r['platforms'] == ['cuda', 'tpu'], r
    assert r['conv_impl'] == 'xla', r  # 'auto' means XLA's on accelerators
    assert r['devices'] == 8
    assert r['annotations'] > 0, r  # the batch is split over the mesh
    assert set(r['custom_calls']) <= {'Sharding', 'SPMDFullToShardShape',
                                      'SPMDShardToFullShape'}, r


@pytest.mark.skipif(not native.available(), reason='no native CPU kernels here')
def test_the_cpu_lowering_keeps_its_native_kernels_per_device(lowered):
  steps = {r['cpu_step']: r for r in lowered if 'cpu_step' in r}
  assert set(steps) == {'train', 'eval'}
  for r in steps.values():
    assert 'resnet_jax_onednn_conv_forward' in r['custom_calls'], r
    assert 'all-gather' not in r['collectives'], r  # no batch gathered
  assert 'resnet_jax_onednn_conv_input_grad' in steps['train']['custom_calls']


@pytest.mark.parametrize('leak,reason', [('ffi', 'custom call'),
                                         ('callback', 'host callback')])
def test_a_cpu_only_path_fails_the_accelerator_lowering(lowered, leak, reason):
  [result] = [r for r in lowered if r.get('leak') == leak]
  assert result['error'], f'the {leak} leaked into the cuda program unnoticed'
  assert 'lowering the train step for cuda failed' in result['error']
  assert reason in result['error']


def test_command_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'resnet_jax.tools.lower', '--platform=cuda',
       '--devices=2', '--config.data.batch_size=32'],
      capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert 'train step for cuda on 2 devices (conv_impl xla)' in text
  assert 'eval step for cuda on 2 devices' in text
  assert 'custom calls: none' in text
  # Synchronised BatchNorm and the gradient mean: all-reduces over devices.
  assert 'all-reduce x' in text
  assert 'known only to the cuda compiler' in text
  bad = subprocess.run(
      [sys.executable, '-m', 'resnet_jax.tools.lower', '--platform=gpu'],
      capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      'error: unknown platform gpu: choose from cpu, cuda, rocm, tpu '
      '(comma-separated)']
