"""configs/finetune_fashion_mnist.py: a run warm-started from converted
torchvision weights keeps them, with a gray stem and a fresh 10-class head."""


import jax
import numpy as np
import pytest

from resnet_jax.checkpoint import checkpointing, init_from
from resnet_jax import config as config_lib, models
from resnet_jax.tools import convert
from resnet_jax.models import torchvision_weights
from resnet_jax.train import run_setup, train_loop
from resnet_jax.errors import UserError

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
pytest.importorskip('ml_collections')  # configs/*.py


def _finetune_config(**overrides):
  """The recipe with `overrides` at dotted paths ('run.init_from': ...)."""
  from configs import finetune_fashion_mnist  # pylint: disable=g-import-not-at-top
  config = finetune_fashion_mnist.get_config()
  for path, value in overrides.items():
    section, key = path.rsplit('.', 1)
    node = config
    for name in section.split('.'):
      node = node[name]
    node[key] = value
  return config


def _random_resnet18_state_dict() -> dict:
  """torchvision's resnet18 with random weights and BatchNorm statistics (so
  copying the statistics shows), as a state_dict."""
  torch.manual_seed(0)
  net = torchvision.models.resnet18(weights=None)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
  return net.state_dict()


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """A `python -m resnet_jax.tools.convert` directory and its variables."""
  variables = torchvision_weights.from_torchvision(_random_resnet18_state_dict(),
                                       'resnet18')
  path = str(tmp_path_factory.mktemp('torchvision_resnet18'))
  convert.write_converted(path, variables, 'resnet18', 1000, 'random.pth')
  return path, variables


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_recipe_defaults():
  config = _finetune_config()
  config_lib.validate(config)
  m = config.model
  assert m.name in torchvision_weights.TORCHVISION_MODELS
  # The converted weights' own width and depth...
  assert m.width is None and m.stage_sizes is None
  # ... which the recipe's network has: the converted directory's config
  # names the same network (bar the head, which the warm start replaces).
  converted = convert.converted_config(m.name, 1000).model
  for key in ('name', 'width', 'stage_sizes', 'zero_init_residual'):
    assert m[key] == converted[key], key
  assert config.data.dataset == 'fashion_mnist'
  assert config.data.image_size >= 32
  models.check_image_size(models.from_config(run_setup.resolve(config).model),
                          config.data.image_size)
  assert config.run.init_from and config.optim.learning_rate <= 0.05


@pytest.mark.full
def test_run_starts_from_converted_weights(converted, fake_data_dir, tmp_path):
  source, rgb = converted
  # Learning rate 0: the checkpoint after two steps holds the warm start.
  config = _finetune_config(**{
      'run.init_from': source, 'data.tfds_data_dir': fake_data_dir,
      'data.image_size': 32, 'data.batch_size': 8,
      'data.eval_batch_size': 100, 'run.num_train_steps': 2,
      'optim.warmup_epochs': 0.0, 'run.log_every_steps': 1,
      'run.progress_bar': False,
      # compiles faster than the CPU patches path
      'model.conv_impl': 'xla'})
  # A learning rate must be positive; a zero momentum and weight decay and
  # a rate too small to move float32 weights of this size keep them as
  # loaded (checked below to the bit).
  config.optim.learning_rate = 1e-30
  config.optim.momentum = 0.0
  config.optim.weight_decay = 0.0
  result = train_loop.train_and_evaluate(config, str(tmp_path))
  assert result['test_count'] == 100 and np.isfinite(result['test_loss'])

  ckpt = checkpointing.Checkpointer(str(tmp_path), read_only=True,
                                    async_save=False)
  variables, _ = ckpt.restore_variables(2)
  ckpt.close()
  params, start = variables['params'], rgb['params']
  # Gray stem: the RGB kernel summed over its input channels.
  np.testing.assert_allclose(params['stem']['conv1']['kernel'],
                             start['stem']['conv1']['kernel'].sum(
                                 axis=2, keepdims=True), rtol=1e-6)
  # A fresh 10-class head (not a slice of the 1000-class one).
  assert params['fc']['kernel'].shape == (512, 10)
  assert not np.allclose(params['fc']['kernel'],
                         start['fc']['kernel'][:, :10])
  # Every other parameter exactly as converted.
  got, want = _flat(params), _flat(start)
  adapted = {"['stem']['conv1']['kernel']", "['fc']['kernel']",
             "['fc']['bias']"}
  assert adapted <= set(want)
  for key in set(want) - adapted:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_placeholder_init_from_says_how_to_convert():
  config = _finetune_config(
      **{'run.init_from': '/nonexistent/torchvision_resnet18'})
  with pytest.raises(UserError, match='python -m resnet_jax.tools.convert'):
    init_from.load(config.run.init_from, {})
