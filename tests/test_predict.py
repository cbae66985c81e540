"""predict.py: top-5 lines per image, the training eval path's numbers, and
one-line errors for every user mistake."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import (checkpointing, convert, device_data, input_pipeline,
                        models)
from resnet_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASS_NAMES = [f'class_{i}' for i in range(10)]  # conftest's fake datasets


@flax.struct.dataclass
class _State:
  """What restore_variables reads from a training checkpoint."""
  step: jax.Array
  params: dict
  batch_stats: dict


def _random_variables(model, shape, seed=0):
  """Random weights of the model's shapes; no init compile (slow on CPU)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros(shape), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == 'var':
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    return (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope='module')
def workdir(fake_data_dir, tmp_path_factory) -> str:
  """A training workdir (config.json + checkpoints/2) of a tiny model on the
  fake Fashion-MNIST, trained at 32x32 (resized from 28 as in training)."""
  path = str(tmp_path_factory.mktemp('predict_workdir'))
  config = {'model': 'cifar_resnet20', 'width': 4, 'dataset': 'fashion_mnist',
            'image_size': 32, 'tfds_data_dir': fake_data_dir}
  model = models.create_model('cifar_resnet20', num_classes=10, width=4)
  variables = _random_variables(model, (1, 32, 32, 1))
  checkpointing.write_config(path, config)
  ckpt = checkpointing.Checkpointer(path, async_save=False)
  ckpt.save(_State(step=np.int32(2), **variables), {'config': config})
  ckpt.close()
  return path


def _load_predict():
  spec = importlib.util.spec_from_file_location('predict', ROOT / 'predict.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


predict = _load_predict()


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(ROOT / 'predict.py'), *args],
                        capture_output=True, text=True, env=env, timeout=300,
                        check=False)


def _fake_test_image(data_dir: str, index: int = 0) -> np.ndarray:
  _, _, test = input_pipeline.load_in_memory('fashion_mnist',
                                             data_dir=data_dir)
  return test.images[index]  # uint8 (28, 28, 1)


def test_cli_prints_top5_per_image(workdir, fake_data_dir, tmp_path):
  png = tmp_path / 'item.png'
  Image.fromarray(_fake_test_image(fake_data_dir)[..., 0], 'L').save(png)
  jpeg = tmp_path / 'photo.jpg'  # RGB and another size: made gray, resized.
  pixels = np.random.default_rng(0).integers(0, 256, (50, 40, 3), np.uint8)
  Image.fromarray(pixels, 'RGB').save(jpeg, quality=90)
  out = _run(f'--workdir={workdir}', str(png), str(jpeg))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert len(lines) == 12, out.stdout
  for block, path in zip((lines[:6], lines[6:]), (png, jpeg)):
    assert block[0] == str(path)
    probs = []
    for line in block[1:]:
      assert line.startswith('  '), line
      prob, name = line.split(None, 1)
      assert name in CLASS_NAMES  # the dataset's names, from its cache
      probs.append(float(prob))
    assert probs == sorted(probs, reverse=True)
    assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1.0 + 3e-3
    assert len({l.split(None, 1)[1] for l in block[1:]}) == 5


def test_same_probabilities_as_the_training_eval_path(workdir, fake_data_dir,
                                                      tmp_path):
  # A dataset image saved as PNG must reach the model exactly as the eval
  # step sees it: same channels, resize 28 -> 32 and normalisation.
  image = _fake_test_image(fake_data_dir, index=3)
  png = tmp_path / 'item.png'
  Image.fromarray(image[..., 0], 'L').save(png)
  predictor = predict.Predictor(workdir)
  got = predictor.probabilities(predictor.load([str(png)]))

  info = input_pipeline.load_in_memory('fashion_mnist',
                                       data_dir=fake_data_dir)[0]
  eval_preprocess = device_data.make_preprocess(None, info, 32, jnp.float32,
                                                train=False)
  ckpt = checkpointing.Checkpointer(workdir, read_only=True, async_save=False)
  variables, _ = ckpt.restore_variables()
  ckpt.close()
  model = models.create_model('cifar_resnet20', num_classes=10, width=4)
  logits = model.apply(variables, eval_preprocess(image[None], None),
                       train=False)
  np.testing.assert_allclose(got, jax.nn.softmax(logits), rtol=1e-5, atol=1e-6)
  assert predictor.names == CLASS_NAMES


def test_converted_imagenet_weights_use_the_eval_crop_and_imagenet_names(
    tmp_path):
  # A `python -m resnet_jax.convert` directory (random weights, no torch).
  model = models.create_model('resnet18', num_classes=1000)
  convert.write_converted(str(tmp_path / 'tv'),
                          _random_variables(model, (1, 32, 32, 3)),
                          'resnet18', 1000, 'random.pth')
  predictor = predict.Predictor(str(tmp_path / 'tv'))
  photo = tmp_path / 'photo.jpg'
  pixels = np.zeros((300, 400, 3), np.uint8)
  pixels[:, 200:] = 255  # right half white: the centre crop keeps both
  Image.fromarray(pixels, 'RGB').save(photo)
  images = predictor.load([str(photo)])
  # Centre square of 224/256 of the shorter side, resized to 224.
  assert images.shape == (1, 224, 224, 3)
  assert images[0, :, :100].max() < 10 and images[0, :, -100:].min() > 245
  probs = predictor.probabilities(images)
  assert probs.shape == (1, 1000) and abs(probs.sum() - 1) < 1e-4
  # torchvision's readable names when it is installed, else TFDS's synsets,
  # both in the same (sorted synset) order.
  assert len(predictor.names) == 1000
  assert predictor.names[0] in ('tench', 'n01440764', 'class 0')


def _one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert 'Traceback' not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr
  for word in words:
    assert word in lines[0], lines[0]


def test_cli_errors_are_one_line(workdir, tmp_path):
  _one_line_error(_run(f'--workdir={tmp_path / "nope"}', 'x.png'),
                  'does not exist')
  bad = tmp_path / 'bad.png'
  bad.write_text('not an image')
  _one_line_error(_run(f'--workdir={workdir}', str(bad)), str(bad),
                  'PNG or JPEG')


def test_errors_name_the_problem(workdir, tmp_path):
  with pytest.raises(UserError, match='no config.json'):
    predict.Predictor(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps(
      {'model': 'resnet18', 'dataset': 'imagenet2012'}))
  with pytest.raises(UserError, match='no checkpoints/ folder'):
    predict.Predictor(str(tmp_path))
  with pytest.raises(UserError, match='no checkpoint at step 7'):
    predict.Predictor(workdir, step=7)
  with pytest.raises(UserError, match='not found'):
    predict.load_image(str(tmp_path / 'missing.png'), 1, (28, 28), 28)


def test_no_images_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    predict.main(['predict.py'])  # checked before any flag is read
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith('error: no images given; usage:')
