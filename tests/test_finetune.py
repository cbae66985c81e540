"""configs/finetune_fashion_mnist.py: a run warm-started from converted
torchvision weights keeps them, with a gray stem and a fresh 10-class head."""

import types

import jax
import numpy as np
import pytest

from resnet_jax import checkpointing, convert, run_setup, train_loop
from resnet_jax.errors import UserError

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
pytest.importorskip('ml_collections')  # configs/*.py


def _finetune_config(**overrides):
  from configs import finetune_fashion_mnist  # pylint: disable=g-import-not-at-top
  config = finetune_fashion_mnist.get_config()
  for key, value in overrides.items():
    setattr(config, key, value)
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
  """A `python -m resnet_jax.convert` directory and its variables."""
  variables = convert.from_torchvision(_random_resnet18_state_dict(),
                                       'resnet18')
  path = str(tmp_path_factory.mktemp('torchvision_resnet18'))
  convert.write_converted(path, variables, 'resnet18', 1000, 'random.pth')
  return path, variables


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_recipe_defaults():
  config = _finetune_config()
  assert config.model in convert.TORCHVISION_MODELS
  assert config.width == 0  # the converted weights' own width
  assert config.dataset == 'fashion_mnist' and config.image_size >= 32
  assert config.init_from and config.learning_rate <= 0.05


def test_run_starts_from_converted_weights(converted, fake_data_dir, tmp_path):
  source, rgb = converted
  # Learning rate 0: the checkpoint after two steps holds the warm start.
  config = _finetune_config(
      init_from=source, tfds_data_dir=fake_data_dir, image_size=32,
      batch_size=8, eval_batch_size=100, num_train_steps=2, warmup_epochs=0.0,
      learning_rate=0.0, log_every_steps=1, progress_bar=False,
      conv_impl='xla')  # compiles faster than the CPU patches path
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
  run = types.SimpleNamespace(config=_finetune_config(
      init_from='/nonexistent/torchvision_resnet18'))
  with pytest.raises(UserError, match='python -m resnet_jax.convert'):
    run_setup.warm_start(run, None)
