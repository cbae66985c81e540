"""torchvision -> resnet_jax conversion: same logits, checked keys, the CLI.

The equality tests build each torchvision model with random weights (no
download) and random BatchNorm statistics, so a wrong epsilon, swapped
mean/var or a mis-transposed kernel changes the logits. They need torch and
are skipped without it; the other tests make torchvision-style state_dicts
from numpy and run without torch.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from resnet_jax.checkpoint import workdir as workdir_lib

from resnet_jax.checkpoint import checkpointing, faults
from resnet_jax import config as config_lib, models
from resnet_jax.tools import convert
from resnet_jax.models import torchvision_weights, weights
from resnet_jax.errors import UserError
from resnet_jax.models import create_model

_SLOW = ('resnet152', 'resnext101_32x8d', 'wide_resnet50_2')
# H=64 (even) and W=57 (odd) sides: stage 4 still has a 2x2 map, so every
# 3x3 conv sees padding and neighbours, and both parities of stride-2
# padding are exercised.
_NCHW = (2, 3, 64, 57)
_TOL = 1e-4
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_torchvision(torch, name: str):
  """A torchvision model, eval mode, random weights and BN statistics."""
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = getattr(torchvision.models, name)(weights=None)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.2, 1.0)
        module.bias.uniform_(-0.2, 0.2)
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 2.0)
  return model.eval()


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=pytest.mark.full) if n in _SLOW else n
    for n in torchvision_weights.TORCHVISION_MODELS])
def test_logits_equal_torchvision(name):
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  torch_model = _random_torchvision(torch, name)
  x = torch.randn(*_NCHW, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = torch_model(x).numpy()

  variables = torchvision_weights.from_torchvision(torch_model.state_dict(), name)
  model = create_model(name)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                           mutable=['intermediates']))
  # Full float32 products: on GPUs JAX's default is TF32 (~4e-4 off on H100).
  with jax.default_matmul_precision('highest'):
    logits, state = apply(variables, x.numpy().transpose(0, 2, 3, 1))
  logits = np.asarray(logits)

  assert state['intermediates']['stage4'][0].shape[1:3] == (2, 2)
  assert logits.shape == expected.shape == (2, 1000)
  diff = np.abs(logits - expected)
  rel = diff.max() / np.abs(expected).max()
  elem = (diff / np.abs(expected)).max()
  print(f'\n{name}: max|jax-torch|/max|torch| = {rel:.2e}, '
        f'per-element max relative = {elem:.2e}')
  assert rel < _TOL


def _cli(*args, code=None):
  """`python -m resnet_jax.tools.convert ARGS` (or `python -c CODE ARGS`)."""
  command = ['-c', code] if code else ['-m', 'resnet_jax.tools.convert']
  return subprocess.run([sys.executable, *command, *args], capture_output=True,
                        text=True, cwd=_REPO, timeout=300, check=False)


@pytest.mark.full
def test_pth_checkpoint_through_cli(tmp_path):
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  state = _random_torchvision(torch, 'resnet18').state_dict()
  src = str(tmp_path / 'resnet18.pth')
  torch.save({'state_dict': state}, src)  # Wrapped, as training scripts do.
  dst = tmp_path / 'out'
  result = _cli('--from=torchvision', '--model=resnet18', f'--src={src}',
                f'--dst={dst}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'wrote resnet18 (1000 classes)' in result.stdout
  _assert_restores_to(dst, torchvision_weights.from_torchvision(state, 'resnet18'), src)


def _torchvision_resnet18_state(num_classes: int = 1000,
                                seed: int = 0) -> dict[str, np.ndarray]:
  """The keys and shapes of torchvision's resnet18().state_dict(), written
  out independently of the converter's rules, with random numpy values."""
  rng = np.random.default_rng(seed)
  shapes = {'conv1.weight': (64, 3, 7, 7)}

  def bn(prefix, c):
    for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{prefix}.{leaf}'] = (c,)
    shapes[f'{prefix}.num_batches_tracked'] = ()

  bn('bn1', 64)
  cin = 64
  for i, c in enumerate((64, 128, 256, 512), start=1):
    for j in range(2):
      p = f'layer{i}.{j}'
      shapes[f'{p}.conv1.weight'] = (c, cin if j == 0 else c, 3, 3)
      bn(f'{p}.bn1', c)
      shapes[f'{p}.conv2.weight'] = (c, c, 3, 3)
      bn(f'{p}.bn2', c)
      if j == 0 and i > 1:
        shapes[f'{p}.downsample.0.weight'] = (c, cin, 1, 1)
        bn(f'{p}.downsample.1', c)
    cin = c
  shapes['fc.weight'] = (num_classes, 512)
  shapes['fc.bias'] = (num_classes,)
  return {k: (np.array(7, np.int64) if k.endswith('num_batches_tracked')
              else rng.uniform(0.5, 2.0, s).astype(np.float32))
          for k, s in shapes.items()}


def test_numpy_state_dict_layouts():
  state = _torchvision_resnet18_state(num_classes=7)
  variables = torchvision_weights.from_torchvision(state, 'resnet18')
  params, stats = variables['params'], variables['batch_stats']
  np.testing.assert_array_equal(params['layer2_0']['conv1']['kernel'],
                                state['layer2.0.conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['layer3_0']['downsample_conv']['kernel'],
                                state['layer3.0.downsample.0.weight']
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['fc']['kernel'], state['fc.weight'].T)
  np.testing.assert_array_equal(params['stem']['bn1']['scale'],
                                state['bn1.weight'])
  np.testing.assert_array_equal(stats['layer4_0']['downsample_bn']['mean'],
                                state['layer4.0.downsample.1.running_mean'])
  np.testing.assert_array_equal(stats['layer1_1']['bn2']['var'],
                                state['layer1.1.bn2.running_var'])
  # Exactly the model's tree: same structure, shapes and float32 everywhere.
  model = create_model('resnet18', num_classes=7)
  expected = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), variables) ==
          jax.tree.map(lambda a: (a.shape, a.dtype), dict(expected)))


@pytest.mark.full
def test_numpy_state_dict_needs_no_torch(tmp_path):
  src = str(tmp_path / 'sd.npz')
  np.savez(src, **_torchvision_resnet18_state())
  # The library and then the command itself, with any torch import failing.
  code = (
      'import runpy, sys; sys.modules["torch"] = None\n'
      'import numpy as np\n'
      'from resnet_jax import from_torchvision\n'
      f'sd = dict(np.load({src!r}))\n'
      'v = from_torchvision(sd, "resnet18")\n'
      'assert v["params"]["fc"]["kernel"].shape == (512, 1000)\n'
      'sys.argv[0] = "convert"\n'
      'runpy.run_module("resnet_jax.tools.convert", run_name="__main__")\n')
  result = _cli('--model=resnet18', f'--src={src}',
                f'--dst={tmp_path / "out"}', code=code)
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.path.exists(tmp_path / 'out' / 'config.json')


@pytest.mark.parametrize('edit, fragments', [
    (lambda sd: sd.pop('layer4.1.bn2.running_var'),
     ["missing key 'layer4.1.bn2.running_var'", '(512,)',
      'batch_stats/layer4_1/bn2/var']),
    (lambda sd: sd.update({'layer5.0.conv1.weight': np.zeros((8, 4, 3, 3))}),
     ["unexpected key 'layer5.0.conv1.weight'", '(8, 4, 3, 3)']),
    (lambda sd: sd.update({'layer1.0.conv2.weight': np.zeros((64, 32, 3, 3))}),
     ["'layer1.0.conv2.weight'", '(64, 32, 3, 3)', '(64, 64, 3, 3)',
      'params/layer1_0/conv2/kernel', '(3, 3, 64, 64)']),
])
def test_state_dict_that_does_not_fit_is_named(edit, fragments):
  state = _torchvision_resnet18_state()
  edit(state)
  with pytest.raises(UserError) as info:
    torchvision_weights.from_torchvision(state, 'resnet18')
  message = str(info.value)
  assert '\n' not in message
  for fragment in fragments:
    assert fragment in message


def test_head_size_mismatch_names_fc():
  with pytest.raises(UserError, match=r"'fc.weight' has shape \(1000, 512\) "
                     r'but resnet18 expects \(10, 512\)'):
    torchvision_weights.from_torchvision(_torchvision_resnet18_state(), 'resnet18',
                             num_classes=10)


def test_model_without_torchvision_counterpart():
  with pytest.raises(UserError, match='no torchvision counterpart'):
    torchvision_weights.from_torchvision(_torchvision_resnet18_state(), 'cifar_resnet20')


def _assert_restores_to(dst, variables, src) -> None:
  num_classes = variables['params']['fc']['bias'].shape[0]
  expected = convert.converted_config('resnet18', num_classes)
  # config.json: a training run's schema, naming the network and its data.
  with open(dst / 'config.json') as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(expected.to_dict()))
  config = workdir_lib.read_config(str(dst))  # validates it
  assert config.to_dict() == expected.to_dict()
  assert config.model.name == 'resnet18'
  assert config.model.num_classes == num_classes
  assert config.data.dataset == 'imagenet2012'
  assert config.data.image_size == 224
  # The network it names is the one the weights fit.
  model = models.from_config(config.model)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), dict(shapes)) ==
          jax.tree.map(lambda a: (a.shape, a.dtype), variables))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, variables)
  with ocp.CheckpointManager(os.path.abspath(dst / 'checkpoints')) as manager:
    assert manager.all_steps() == [0]
    restored = manager.restore(0, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  jax.tree.map(np.testing.assert_array_equal, restored['state'], variables)
  meta = dict(restored['meta'])
  # Checksums of every array, as a training checkpoint has: damage is found.
  assert faults.mismatch(restored['state'], meta.pop('fingerprint')) is None
  assert meta == {'step': 0, 'metrics': {}, 'source': 'torchvision',
                  'src': os.path.abspath(src)}
  # ... and the checkpointer of warm starts and predict.py reads it.
  ckpt = checkpointing.Checkpointer(str(dst), read_only=True, async_save=False)
  loaded, meta = ckpt.restore_variables()
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  assert meta['step'] == 0


def test_converted_config_is_a_valid_run_config():
  c = convert.converted_config('resnet50', 1000)
  config_lib.validate(c)
  assert config_lib.from_dict(c.to_dict()).to_dict() == c.to_dict()
  # torchvision's networks: no zero-initialised residual BN, no width or
  # depth override; ImageNet at 224 without augmentation.
  assert (c.model.name, c.model.num_classes) == ('resnet50', 1000)
  assert not c.model.zero_init_residual
  assert c.model.width is None and c.model.stage_sizes is None
  assert (c.data.dataset, c.data.image_size) == ('imagenet2012', 224)
  assert convert.converted_config('resnet18', 5).model.num_classes == 5


def _assert_one_line_error(result, fragment) -> None:
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert result.stderr.startswith('error: '), result.stderr[-2000:]
  assert result.stderr.count('\n') == 1, result.stderr
  assert fragment in result.stderr


@pytest.mark.full
def test_cli_writes_checkpoint_that_restores(tmp_path):
  state = _torchvision_resnet18_state(num_classes=5)
  src = str(tmp_path / 'sd.npz')
  np.savez(src, **state)
  dst = tmp_path / 'out'
  result = _cli('--from=torchvision', '--model=resnet18', f'--src={src}',
                f'--dst={dst}', '--num_classes=5')
  assert result.returncode == 0, result.stderr[-2000:]
  _assert_restores_to(dst, torchvision_weights.from_torchvision(state, 'resnet18'), src)
  # Converting again into the same directory is refused, not overwritten.
  again = _cli('--model=resnet18', f'--src={src}', f'--dst={dst}')
  _assert_one_line_error(again, 'already exists')


@pytest.mark.parametrize('args, fragment', [
    (['--from=timm', '--model=resnet18', '--src=x.pth'],
     "--from='timm' is not supported"),
    (['--model=resnet19', '--src=x.pth'],
     "--model='resnet19' has no torchvision counterpart"),
    (['--model=resnet18', '--src=nowhere.pth'],
     "'nowhere.pth' is not a file"),
    (['--model=resnet18', '--src=SD', '--num_classes=10'],
     "'fc.weight' has shape (1000, 512) but resnet18 expects (10, 512)"),
    (['--src=x.pth'], '--model'),  # a required flag
])
def test_cli_errors_are_one_line(args, fragment, tmp_path):
  src = tmp_path / 'sd.npz'
  np.savez(src, **_torchvision_resnet18_state())
  args = [a.replace('SD', str(src)) for a in args]
  result = _cli(*args, f'--dst={tmp_path / "out"}')
  _assert_one_line_error(result, fragment)
  assert not os.path.exists(tmp_path / 'out')


def _small_model_variables(num_classes: int = 10):
  """A narrow resnet18 with random numpy variables (model.init compiles one
  threefry normal per kernel, ~20 s on 2 cores; these tests need no init)."""
  model = create_model('resnet18', num_classes=num_classes, width=8)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)
  return model, dict(variables)


def test_grayscale_model_equals_rgb_model_on_replicated_image():
  model, rgb = _small_model_variables()
  gray = weights.adapt_input_channels(rgb, in_channels=1)
  assert gray['params']['stem']['conv1']['kernel'].shape == (7, 7, 1, 8)
  assert rgb['params']['stem']['conv1']['kernel'].shape == (7, 7, 3, 8)  # Pure.
  image = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  out_gray = apply(gray, image)
  out_rgb = apply(rgb, jnp.repeat(image, 3, axis=-1))
  np.testing.assert_allclose(out_gray, out_rgb, rtol=1e-5, atol=1e-6)


def test_adapt_to_six_channels_equals_rgb_model_on_doubled_image():
  # Tiled and rescaled by 3/6: an RGB image given twice gives the RGB output.
  model, rgb = _small_model_variables()
  six = weights.adapt_input_channels(rgb, in_channels=6)
  assert six['params']['stem']['conv1']['kernel'].shape == (7, 7, 6, 8)
  image = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  np.testing.assert_allclose(apply(six, jnp.concatenate([image, image], -1)),
                             apply(rgb, image), rtol=1e-5, atol=1e-6)


def test_replace_head():
  _, variables = _small_model_variables(num_classes=1000)
  new = weights.replace_head(variables, 10, jax.random.key(3))
  assert new['params']['fc']['kernel'].shape == (64, 10)
  assert new['params']['fc']['bias'].shape == (10,)
  assert np.std(new['params']['fc']['kernel']) > 0
  assert variables['params']['fc']['kernel'].shape == (64, 1000)  # Pure.
  # Everything but the head is unchanged, and the result fits a 10-class model.
  assert new['params']['layer1_0'] is variables['params']['layer1_0']
  assert new['batch_stats'] is variables['batch_stats']
  model = create_model('resnet18', num_classes=10, width=8)
  assert model.apply(new, jnp.zeros((1, 32, 32, 3)), train=False).shape == (1, 10)
