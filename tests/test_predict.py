"""predict.py: top-5 lines per image, the training eval path's numbers, and
one-line errors for every user mistake."""

import json
import os
import pathlib
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax.checkpoint import workdir as workdir_lib

from resnet_jax.checkpoint import checkpointing
from resnet_jax import config as config_lib, models, predictor
from resnet_jax.tools import convert
from resnet_jax.data import datasets, in_memory, preprocess
from resnet_jax.train import run_setup
from resnet_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASS_NAMES = [f'class_{i}' for i in range(10)]  # conftest's fake datasets
FASHION_MNIST = datasets.get('fashion_mnist')


@flax.struct.dataclass
class _State:
  """What restore_variables reads from a training checkpoint."""
  step: jax.Array
  params: dict
  batch_stats: dict


def _random_variables(model, shape, seed=0):
  """Random weights of the model's shapes; no init compile (slow on CPU)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros(shape, np.float32), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == 'var':
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    return (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _run_config(data_dir: str, **model):
  """A tiny model on the fake Fashion-MNIST, trained at 32x32 (resized from
  28 on the device), resolved as train.py records it in config.json."""
  c = config_lib.base_config()
  c.model.name = 'cifar_resnet20'
  c.model.width = 4
  c.model.conv_impl = 'xla'  # compiles fastest on the CPU
  c.model.update(model)
  c.data.dataset = 'fashion_mnist'
  c.data.image_size = 32
  c.data.tfds_data_dir = data_dir
  return run_setup.resolve(c)


def _make_workdir(path: str, data_dir: str, step: int = 2, **model) -> str:
  """A training workdir: the full config.json and checkpoints/<step>."""
  config = _run_config(data_dir, **model)
  variables = _random_variables(models.from_config(config.model),
                                (1, 32, 32, 1))
  workdir_lib.write_config(path, config)
  ckpt = checkpointing.Checkpointer(path, async_save=False)
  ckpt.save(_State(step=np.int32(step), **variables))
  ckpt.close()
  return path


@pytest.fixture(scope='module')
def workdir(fake_data_dir, tmp_path_factory) -> str:
  return _make_workdir(str(tmp_path_factory.mktemp('predict_workdir')),
                       fake_data_dir)


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(ROOT / 'predict.py'), *args],
                        capture_output=True, text=True, env=env, timeout=300,
                        check=False)


def _fake_test_image(data_dir: str, index: int = 0) -> np.ndarray:
  splits = in_memory.load_in_memory(FASHION_MNIST, data_dir=data_dir)
  return splits.evals['test'].images[index]  # uint8 (28, 28, 1)


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


def _eval_path_probabilities(workdir: str, image: np.ndarray) -> np.ndarray:
  """What the training eval step computes on `image`: the run built from
  the workdir's config.json as train.py builds it, its eval preprocessing
  and the checkpoint's variables."""
  run = run_setup.build(workdir_lib.read_config(workdir))
  prep = preprocess.make_preprocess(run.config.data, run.data.spec,
                                    run.image_size, run.model.dtype)
  ckpt = checkpointing.Checkpointer(workdir, read_only=True, async_save=False)
  variables, _ = ckpt.restore_variables()
  ckpt.close()
  logits = run.model.apply(variables, prep.eval(image[None], None),
                           train=False)
  return np.asarray(jax.nn.softmax(logits))


def test_same_probabilities_as_the_training_eval_path(workdir, fake_data_dir,
                                                      tmp_path):
  # A dataset image saved as PNG must reach the model exactly as the eval
  # step sees it: same channels, resize 28 -> 32 and normalisation.
  image = _fake_test_image(fake_data_dir, index=3)
  png = tmp_path / 'item.png'
  Image.fromarray(image[..., 0], 'L').save(png)
  p = predictor.Predictor(workdir)
  assert p.image_size == 32 and p.spec == FASHION_MNIST
  loaded = p.load([str(png)])
  np.testing.assert_array_equal(loaded[0], image)  # PNG round trip, 28x28x1
  got = p.probabilities(loaded)
  np.testing.assert_allclose(got, _eval_path_probabilities(workdir, image),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, 0.1, atol=1e-3)  # the weights matter
  assert p.names == CLASS_NAMES


def test_stage_sizes_override_predicts(fake_data_dir, tmp_path):
  # config.json's whole model section builds the network: a run of ResNet-20
  # with one block per stage has checkpoints of that network, which a model
  # rebuilt from name and width alone (three blocks per stage) cannot load.
  path = _make_workdir(str(tmp_path), fake_data_dir, stage_sizes=(1, 1, 1))
  p = predictor.Predictor(path)
  assert tuple(p.model.stage_sizes) == (1, 1, 1) and p.model.stem_width == 4
  image = _fake_test_image(fake_data_dir, index=5)
  png = tmp_path / 'item.png'
  Image.fromarray(image[..., 0], 'L').save(png)
  got = p.probabilities(p.load([str(png)]))
  assert got.shape == (1, 10)
  np.testing.assert_allclose(got, _eval_path_probabilities(path, image),
                             rtol=1e-5, atol=1e-6)


def test_converted_imagenet_weights_use_the_eval_crop_and_imagenet_names(
    tmp_path):
  # A `python -m resnet_jax.tools.convert` directory (random weights, no torch).
  model = models.create_model('resnet18', num_classes=1000)
  convert.write_converted(str(tmp_path / 'tv'),
                          _random_variables(model, (1, 32, 32, 3)),
                          'resnet18', 1000, 'random.pth')
  p = predictor.Predictor(str(tmp_path / 'tv'))
  assert p.spec.name == 'imagenet2012' and p.image_size == 224
  photo = tmp_path / 'photo.jpg'
  pixels = np.zeros((300, 400, 3), np.uint8)
  pixels[:, 200:] = 255  # right half white: the centre crop keeps both
  Image.fromarray(pixels, 'RGB').save(photo)
  images = p.load([str(photo)])
  # Centre square of 224/256 of the shorter side, resized to 224.
  assert images.shape == (1, 224, 224, 3)
  assert images[0, :, :100].max() < 10 and images[0, :, -100:].min() > 245
  probs = p.probabilities(images)
  assert probs.shape == (1, 1000) and abs(probs.sum() - 1) < 1e-4
  # torchvision's readable names when it is installed, else TFDS's synsets,
  # both in the same (sorted synset) order.
  assert len(p.names) == 1000
  assert p.names[0] in ('tench', 'n01440764', 'class 0')


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
  with pytest.raises(UserError, match='does not exist'):
    predictor.Predictor(str(tmp_path / 'nope'))
  with pytest.raises(UserError, match='no config.json'):
    predictor.Predictor(str(tmp_path))
  # A config.json of an older version (flat keys) is named as such.
  (tmp_path / 'config.json').write_text(json.dumps(
      {'model': 'resnet18', 'dataset': 'imagenet2012'}))
  with pytest.raises(UserError, match='another version of resnet_jax'):
    predictor.Predictor(str(tmp_path))
  workdir_lib.write_config(str(tmp_path), convert.converted_config('resnet18', 1000))
  with pytest.raises(UserError, match='no checkpoints/ folder'):
    predictor.Predictor(str(tmp_path))
  with pytest.raises(UserError, match='no checkpoint at step 7'):
    predictor.Predictor(workdir, step=7)
  with pytest.raises(UserError, match='not found'):
    predictor.load_image(str(tmp_path / 'missing.png'), FASHION_MNIST, 28)


def test_no_images_is_a_usage_error(workdir):
  out = _run(f'--workdir={workdir}')  # checked before the workdir is read
  _one_line_error(out, 'no images given; usage:')
