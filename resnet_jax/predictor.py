"""Class probabilities of image files from a workdir (predict.py's library).

A workdir (of train.py or of `python -m resnet_jax.tools.convert`) holds the
network as a value, config.json's `model` section, and the checkpoints; the
dataset's row in `datasets.py` says how its images were prepared. So an image
file reaches the model as the run's evaluation data did: images of an
in-memory dataset (Fashion-MNIST, CIFAR, ...) are resized to the dataset's
native size and then, on the device, to the run's `image_size`; others
(ImageNet) get the evaluation's centre crop of the shorter side, resized to
`image_size`.
"""

import os
from typing import Any, Sequence

import jax
import numpy as np

from resnet_jax.checkpoint import workdir as workdir_lib

from resnet_jax.checkpoint import checkpointing
from resnet_jax import config as config_lib, models
from resnet_jax.data import datasets, in_memory, preprocess, tfds_io
from resnet_jax.errors import UserError

_BATCH = 32  # Images per forward pass.


def restore_variables(workdir: str, step: int | None, weights: str = 'raw'
                      ) -> dict[str, Any]:
  """{'params', 'batch_stats'} of the checkpoint at `step` (default latest),
  the trained ('raw') or the EMA model's ('ema')."""
  if not os.path.isdir(os.path.join(workdir, checkpointing.CHECKPOINT_DIR)):
    raise UserError(f'no checkpoints/ folder in {workdir!r}; train first, or '
                    'convert weights with python -m resnet_jax.tools.convert')
  ckpt = checkpointing.Checkpointer(workdir, read_only=True, async_save=False)
  try:
    if not ckpt.all_steps():
      raise UserError(f'no checkpoint in {ckpt.directory}; train at least '
                      'until the first checkpoint is saved')
    variables, _ = ckpt.restore_variables(step, weights)
  finally:
    ckpt.close()
  return variables


def class_names(spec: datasets.DatasetSpec, data_dir: str | None
                ) -> list[str]:
  """Names from the dataset cache, else TFDS's metadata (no data needed; for
  imagenet2012 torchvision's readable names first), else 'class N'."""
  candidates = [lambda: (in_memory.read_cache_info(spec.name, data_dir)
                         or {}).get('class_names')]
  if spec.name == 'imagenet2012':
    candidates.append(_torchvision_imagenet_names)
  candidates.append(lambda: _tfds_names(spec.name, data_dir))
  for get in candidates:
    names = get()
    if names and len(names) == spec.num_classes:
      return [str(n) for n in names]
  return [f'class {i}' for i in range(spec.num_classes)]


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
    return tfds_io.label_names(tfds_io.builder(name, data_dir))
  except Exception:  # pylint: disable=broad-except  (no TFDS, unknown name)
    return None


def load_image(path: str, spec: datasets.DatasetSpec,
               image_size: int) -> np.ndarray:
  """uint8 (H, W, channels): the dataset's native size for in-memory
  datasets, else the evaluation's centre crop resized to image_size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      image = image.convert('L' if spec.channels == 1 else 'RGB')
  except FileNotFoundError:
    raise UserError(f'image {path!r} not found; check the path') from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise UserError(f'cannot read image {path!r} ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else "unreadable"}); '
                    'give a PNG or JPEG file') from None
  if spec.native_size is not None:
    image = image.resize((spec.native_size, spec.native_size), Image.BILINEAR)
  else:
    w, h = image.size
    side = int(image_size / (image_size + (spec.eval_crop_padding or 0))
               * min(h, w))
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    image = image.crop((left, top, left + side, top + side)).resize(
        (image_size, image_size), Image.BICUBIC)
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if array.ndim == 2 else array


class Predictor:
  """A workdir's network, checkpoint and its dataset's preprocessing."""

  def __init__(self, workdir: str, step: int | None = None,
               weights: str | None = None):
    """`weights`: 'raw' or 'ema'; unset: the run's `run.eval_weights`."""
    if not workdir:
      raise UserError('--workdir is required: a training workdir or a '
                      'directory written by python -m resnet_jax.tools.convert')
    config = workdir_lib.read_config(workdir)
    self.spec = datasets.get(config.data.dataset)
    self.image_size = datasets.image_size(self.spec, config.data.image_size)
    self.model = models.from_config(config.model)
    self.weights = weights or config.run.eval_weights
    if self.weights not in config_lib.EVAL_WEIGHTS:
      raise UserError(f'--weights={self.weights!r} is invalid: must be one of '
                      + ', '.join(config_lib.EVAL_WEIGHTS))
    self.variables = restore_variables(workdir, step, self.weights)
    self.names = class_names(self.spec, config.data.tfds_data_dir)
    self._probs = jax.jit(self._forward)

  def _forward(self, variables: dict[str, Any], images_u8: jax.Array
               ) -> jax.Array:
    x = preprocess.preprocess_batch(
        images_u8, None, image_size=self.image_size, mean=self.spec.mean,
        std=self.spec.std, augment=None, dtype=self.model.dtype)
    logits = self.model.apply(variables, x, train=False)
    return jax.nn.softmax(logits.astype(np.float32), axis=-1)

  def load(self, paths: Sequence[str]) -> np.ndarray:
    return np.stack([load_image(p, self.spec, self.image_size)
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
