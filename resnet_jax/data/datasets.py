"""One row per dataset: everything training, evaluation, streaming and
predict.py need to know about it, in one place.

To add a dataset, add a row. `storage` says how training reads it unless
data.pipeline says otherwise: 'memory' (read once as uint8, copied to every
device, batched by index inside the step; see in_memory.py) or 'stream'
(ArrayRecord files decoded on the host by Grain; see streaming.py).

Evaluation sets have names of their own: `eval_splits` maps each name to the
TFDS split it reads ('test' -> 'test' for the small datasets; ImageNet's
labelled evaluation split is TFDS 'validation', called 'val' here as in the
literature). An in-memory dataset can also hold out the last
`data.validation_examples` training images as 'val'.
"""

import dataclasses

from resnet_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str                 # the TFDS name
  num_classes: int
  channels: int
  native_size: int | None   # the images' side; None: it varies per image
  mean: tuple[float, ...]   # per channel, in 0-1 pixel units (train split)
  std: tuple[float, ...]
  storage: str              # 'memory' | 'stream'
  num_train: int            # examples of the TFDS train split
  eval_splits: dict[str, str]      # our name -> TFDS split
  eval_sizes: dict[str, int]       # our name -> examples
  # Evaluation and predict.py: a centre square of image_size /
  # (image_size + eval_crop_padding) of the shorter side, resized to
  # image_size (224 of 256 for ImageNet); None: the whole image, resized.
  eval_crop_padding: int | None = None
  train_split: str = 'train'

  @property
  def image_shape(self) -> tuple[int, int, int] | None:
    """(H, W, C) of the stored images, None where the size varies."""
    if self.native_size is None:
      return None
    return (self.native_size, self.native_size, self.channels)

  @property
  def cropped_on_host(self) -> bool:
    """Images of varying size (ImageNet) are cropped, resized and flipped
    on the host as they are decoded (streaming.py); images of one size are
    decoded as stored and augmented on the device (preprocess.py)."""
    return self.native_size is None


def _small(name, num_classes, channels, size, mean, std, num_train, num_test):
  return DatasetSpec(name, num_classes, channels, size, mean, std, 'memory',
                     num_train, {'test': 'test'}, {'test': num_test})


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    _small('fashion_mnist', 10, 1, 28, (0.2860,), (0.3530,), 60_000, 10_000),
    _small('mnist', 10, 1, 28, (0.1307,), (0.3081,), 60_000, 10_000),
    _small('cifar10', 10, 3, 32, (0.4914, 0.4822, 0.4465),
           (0.2470, 0.2435, 0.2616), 50_000, 10_000),
    _small('cifar100', 100, 3, 32, (0.5071, 0.4865, 0.4409),
           (0.2673, 0.2564, 0.2762), 50_000, 10_000),
    DatasetSpec('imagenet2012', 1000, 3, None, (0.485, 0.456, 0.406),
                (0.229, 0.224, 0.225), 'stream', 1_281_167,
                {'val': 'validation'}, {'val': 50_000}, eval_crop_padding=32),
)}

# The held-out validation split of an in-memory dataset.
HELD_OUT = 'val'


def get(name: str) -> DatasetSpec:
  """The row of `name`; an unknown name lists the known ones."""
  if name not in DATASETS:
    raise UserError(f'unknown dataset {name!r}; choose one of: '
                    f'{", ".join(DATASETS)} (or add a row to '
                    'resnet_jax/data/datasets.py)')
  return DATASETS[name]


def pipeline(dataset: str, requested: str | None = None) -> str:
  """How a run reads `dataset`: 'memory' or 'stream', the `requested` one
  (config.data.pipeline) or, unset, the dataset's own storage."""
  return requested or get(dataset).storage


def eval_split_names(spec: DatasetSpec, validation_examples: int
                     ) -> tuple[str, ...]:
  """The named evaluation sets of a run, the one that selects the best
  checkpoint first: the held-out 'val' when there is one."""
  names = tuple(spec.eval_splits)
  if validation_examples > 0 and HELD_OUT not in names:
    names = (HELD_OUT,) + names
  return names


def image_size(spec: DatasetSpec, configured: int | None) -> int:
  """The model's input side: the configured one, else the native one."""
  if configured is not None:
    return configured
  if spec.native_size is None:
    raise UserError(f'{spec.name} images vary in size: set '
                    '--config.data.image_size (e.g. 224)')
  return spec.native_size
