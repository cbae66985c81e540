"""Top-5 classes of image files: python predict.py --workdir=DIR [--step=N] IMAGE...

DIR is a training workdir or a directory written by
`python -m resnet_jax.convert` (both hold config.json and checkpoints/).
Images are prepared as the model's evaluation data was: images of an
in-memory dataset (Fashion-MNIST, CIFAR, ...) are resized to the dataset's
native size, then to the training `image_size` as in training; others
(ImageNet) get the streamed evaluation's centre crop of the shorter side,
resized to `image_size`. Class names come from the dataset cache, else TFDS
(or torchvision for ImageNet), else 'class N'.
"""

import json
import os
import sys
from typing import Any, Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TFDS fallback only.

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from resnet_jax import (checkpointing, input_pipeline, models,  # noqa: E402
                        preprocess, streaming)
from resnet_jax.errors import UserError  # noqa: E402

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Training workdir or converted-weights directory.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_TOP = flags.DEFINE_integer('top', 5, 'How many classes to print per image.')
_BATCH = 32  # Images per forward pass.


def read_config(workdir: str) -> dict[str, Any]:
  """config.json of a workdir, with a one-line error when it is not one."""
  if not workdir:
    raise UserError('--workdir is required: a training workdir or a directory '
                    'written by python -m resnet_jax.convert')
  if not os.path.isdir(workdir):
    raise UserError(f'--workdir {workdir!r} does not exist; give the workdir '
                    'of a training run or of python -m resnet_jax.convert')
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except FileNotFoundError:
    raise UserError(f'no config.json in {workdir!r}; is it a workdir of '
                    'train.py or of python -m resnet_jax.convert?') from None
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path!r} ({e}); rewrite it or rerun the '
                    'training/conversion') from None
  for key in ('model', 'dataset'):
    if key not in config:
      raise UserError(f'{path!r} has no {key!r} field; it was not written by '
                      'train.py or python -m resnet_jax.convert')
  return config


def restore(workdir: str, step: int | None) -> dict[str, Any]:
  """{'params', 'batch_stats'} of the checkpoint at `step` (default latest)."""
  if not os.path.isdir(os.path.join(workdir, checkpointing.CHECKPOINT_DIR)):
    raise UserError(f'no checkpoints/ folder in {workdir!r}; train first, or '
                    'convert weights with python -m resnet_jax.convert')
  ckpt = checkpointing.Checkpointer(workdir, read_only=True, async_save=False)
  try:
    if not ckpt.all_steps():
      raise UserError(f'no checkpoint in {ckpt.directory}; train at least '
                      'until the first checkpoint is saved')
    variables, _ = ckpt.restore_variables(step)
  finally:
    ckpt.close()
  return variables


def _leaf_shape(variables: dict[str, Any], *path: str) -> tuple[int, ...] | None:
  node = variables['params']
  for name in path:
    if not isinstance(node, dict) or name not in node:
      return None
    node = node[name]
  return tuple(node.shape)


def _dataset_meta(name: str, data_dir: str | None) -> dict[str, Any] | None:
  """The project's dataset cache info.json (class names, native shape)."""
  path = os.path.join(input_pipeline.cache_dir(name, data_dir), 'info.json')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def class_names(name: str, num_classes: int, data_dir: str | None
                ) -> list[str]:
  """Names from the dataset cache, else TFDS's metadata (no data needed; for
  imagenet2012 torchvision's readable names first), else 'class N'."""
  meta = _dataset_meta(name, data_dir)
  candidates = [lambda: (meta or {}).get('class_names')]
  if name == 'imagenet2012':
    candidates.append(_torchvision_imagenet_names)
  candidates.append(lambda: _tfds_names(name, data_dir))
  for get in candidates:
    names = get()
    if names and len(names) == num_classes:
      return [str(n) for n in names]
  return [f'class {i}' for i in range(num_classes)]


def _torchvision_imagenet_names() -> list[str] | None:
  """ImageNet's readable names in torchvision's (= TFDS's synset) order."""
  try:
    from torchvision.models import ResNet50_Weights  # pylint: disable=g-import-not-at-top
    return list(ResNet50_Weights.IMAGENET1K_V1.meta['categories'])
  except Exception:  # pylint: disable=broad-except  (absent or changed)
    return None


def _tfds_names(name: str, data_dir: str | None) -> list[str] | None:
  """Label names TFDS ships with the dataset's code (imagenet2012: synsets)."""
  try:
    builder = input_pipeline.tfds_builder(name, data_dir)
    return list(builder.info.features['label'].names)
  except Exception:  # pylint: disable=broad-except  (no TFDS, unknown name)
    return None


def load_image(path: str, channels: int, native: tuple[int, int] | None,
               image_size: int) -> np.ndarray:
  """uint8 (H, W, channels): native size for in-memory datasets, else the
  streamed evaluation's centre crop resized to image_size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      image = image.convert('L' if channels == 1 else 'RGB')
  except FileNotFoundError:
    raise UserError(f'image {path!r} not found; check the path') from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise UserError(f'cannot read image {path!r} ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else "unreadable"}); '
                    'give a PNG or JPEG file') from None
  if native is not None:
    image = image.resize((native[1], native[0]), Image.BILINEAR)
  else:
    w, h = image.size
    side = int(image_size / (image_size + streaming._EVAL_CROP_PADDING)  # pylint: disable=protected-access
               * min(h, w))
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    image = image.crop((left, top, left + side, top + side)).resize(
        (image_size, image_size), Image.BICUBIC)
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if array.ndim == 2 else array


class Predictor:
  """A checkpoint, its model and the preprocessing of its dataset."""

  def __init__(self, workdir: str, step: int | None = None):
    config = read_config(workdir)
    self.variables = restore(workdir, step)
    fc = _leaf_shape(self.variables, 'fc', 'kernel')
    if fc is None:
      raise UserError(f'the checkpoint in {workdir!r} has no fc layer; '
                      'predict.py needs a classifier')
    num_classes = fc[1]
    self.dataset = config['dataset']
    if self.dataset not in preprocess.DATASET_STATS:
      raise UserError(f'no normalisation statistics for dataset '
                      f'{self.dataset!r}; add them to '
                      'resnet_jax.preprocess.DATASET_STATS')
    self.mean, self.std = preprocess.DATASET_STATS[self.dataset]
    stem = _leaf_shape(self.variables, 'stem', 'conv1', 'kernel')
    self.channels = stem[2] if stem else len(self.mean)
    data_dir = config.get('tfds_data_dir') or None
    meta = _dataset_meta(self.dataset, data_dir)
    native = ((meta or {}).get('image_shape') or
              input_pipeline.IN_MEMORY_DATASETS.get(self.dataset))
    self.native = tuple(native[:2]) if native and native[0] else None
    self.image_size = int(config.get('image_size') or
                          (self.native[0] if self.native else 224))
    self.model = models.create_model(config['model'], num_classes=num_classes,
                                     width=config.get('width') or None)
    self.names = class_names(self.dataset, num_classes, data_dir)
    self._probs = jax.jit(self._forward)

  def _forward(self, variables: dict[str, Any], images_u8: jax.Array
               ) -> jax.Array:
    x = preprocess.preprocess_batch(images_u8, None, image_size=self.image_size,
                                    mean=self.mean, std=self.std, augment=None)
    logits = self.model.apply(variables, x, train=False)
    return jax.nn.softmax(logits.astype(np.float32), axis=-1)

  def load(self, paths: Sequence[str]) -> np.ndarray:
    return np.stack([load_image(p, self.channels, self.native, self.image_size)
                     for p in paths])

  def probabilities(self, images_u8: np.ndarray) -> np.ndarray:
    """(N, num_classes) softmax probabilities for uint8 NHWC images."""
    out = [np.asarray(self._probs(self.variables, images_u8[i:i + _BATCH]))
           for i in range(0, len(images_u8), _BATCH)]
    return np.concatenate(out)


def format_top(path: str, probs: np.ndarray, names: Sequence[str],
               k: int = 5) -> str:
  order = np.argsort(-probs, kind='stable')[:k]
  return '\n'.join([path] + [f'  {probs[i]:.3f}  {names[i]}' for i in order])


def main(argv: list[str]) -> None:
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every restore (and warns that read-only managers don't
    # save); the answer here is the printed table. --verbosity=0 shows them.
    logging.set_verbosity(logging.ERROR)
  paths = argv[1:]
  try:
    if not paths:
      raise UserError('no images given; usage: python predict.py '
                      '--workdir=DIR [--step=N] IMAGE...')
    if _TOP.value < 1:
      raise UserError(f'--top must be at least 1, got {_TOP.value}')
    predictor = Predictor(_WORKDIR.value, _STEP.value)
    probs = predictor.probabilities(predictor.load(paths))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  for path, p in zip(paths, probs):
    print(format_top(path, p, predictor.names, _TOP.value))


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}; usage: python predict.py --workdir=DIR [--step=N] '
          'IMAGE...', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
