"""In-memory datasets: the uint8 cache, and loading a dataset's splits.

Datasets whose row in `datasets.py` says storage='memory' (Fashion-MNIST,
MNIST, CIFAR) are held whole in host (and then device) memory as uint8, so a
training step never waits on the host: `device_data.InMemoryData` gathers
each batch from the resident arrays with indices from `order.py`.

Reading order: (a) a uint8 cache under `<data_dir>/resnet_jax_cache/<name>/`,
which needs neither TensorFlow nor TFDS (so a GPU box without them can train
from a carried cache); (b) TFDS prepared data, preparing it first (offline
from `manual_dir` when given), after which the cache is written.

`python -m resnet_jax.tools.prepare_data` builds the cache (or the streamed
pipeline's ArrayRecord files) to carry elsewhere.
"""

import dataclasses
import json
import os
from typing import Any

import numpy as np

from resnet_jax import atomic_files
from resnet_jax.data import datasets, tfds_io
from resnet_jax.errors import UserError

_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """A split held in host memory."""
  images: np.ndarray  # uint8 (N, H, W, C)
  labels: np.ndarray  # int32 (N,)

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class InMemorySplits:
  """A dataset's splits in host memory, the held-out 'val' already cut."""
  train: ArrayDataset
  evals: dict[str, ArrayDataset]  # our split name -> examples
  class_names: tuple[str, ...]


# ----------------------------------------------------------------- the cache


def cache_dir(name: str, data_dir: str | None = None) -> str:
  return os.path.join(data_dir or tfds_io.default_data_dir(),
                      'resnet_jax_cache', name)


def read_cache_info(name: str, data_dir: str | None) -> dict[str, Any] | None:
  """The cache's info.json (class names, shape), or None when incomplete."""
  # info.json is written last, so its presence means the npz files are whole.
  try:
    with open(os.path.join(cache_dir(name, data_dir), 'info.json'),
              encoding='utf-8') as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  return meta if meta.get('version') == _CACHE_VERSION else None


def _read_cache(spec: datasets.DatasetSpec, data_dir: str | None
                ) -> tuple[dict[str, Any], dict[str, ArrayDataset]] | None:
  meta = read_cache_info(spec.name, data_dir)
  if meta is None:
    return None
  splits = {}
  for split in ('train', *spec.eval_splits):
    with np.load(os.path.join(cache_dir(spec.name, data_dir),
                              f'{split}.npz'), allow_pickle=False) as z:
      splits[split] = ArrayDataset(z['images'], z['labels'].astype(np.int32))
  return meta, splits


def write_cache(folder: str, meta: dict[str, Any],
                splits: dict[str, ArrayDataset]) -> None:
  """`{split}.npz` for each split, then info.json (the completion mark)."""
  os.makedirs(folder, exist_ok=True)
  for split, ds in splits.items():
    with atomic_files.open_atomic(os.path.join(folder, f'{split}.npz'),
                                  'wb') as f:
      np.savez_compressed(f, images=ds.images, labels=ds.labels)
  atomic_files.write_text(os.path.join(folder, 'info.json'), json.dumps(
      dict(meta, version=_CACHE_VERSION), indent=1))


def prepare(spec: datasets.DatasetSpec, data_dir: str | None,
             manual_dir: str | None
             ) -> tuple[str, dict[str, Any], dict[str, ArrayDataset]]:
  """Prepares `spec` with TFDS and writes the uint8 cache."""
  if spec.storage != 'memory':
    raise UserError(f'{spec.name} is streamed (too large to hold in memory); '
                    'it has no uint8 cache')
  folder = cache_dir(spec.name, data_dir)
  builder = tfds_io.builder(spec.name, data_dir)
  tfds_io.ensure_prepared(builder, manual_dir, folder)
  splits = {}
  for split, tfds_split in ((spec.train_split, spec.train_split),
                            *spec.eval_splits.items()):
    images, labels = tfds_io.read_split(builder, tfds_split)
    if images.shape[1:] != spec.image_shape:
      raise UserError(f'{spec.name} images are {images.shape[1:]}, but '
                      f'resnet_jax/data/datasets.py says {spec.image_shape}')
    splits[split] = ArrayDataset(images, labels)
  meta = {'name': spec.name, 'tfds_version': str(builder.version),
          'num_classes': spec.num_classes,
          'class_names': tfds_io.label_names(builder),
          'image_shape': list(spec.image_shape)}
  write_cache(folder, meta, splits)
  return folder, meta, splits


def load_in_memory(spec: datasets.DatasetSpec, *, data_dir: str | None = None,
                   manual_dir: str | None = None,
                   validation_examples: int = 0) -> InMemorySplits:
  """The dataset's splits in host memory as uint8.

  With validation_examples > 0 the last `validation_examples` of the train
  split are held out as the 'val' split (train shrinks accordingly).
  """
  cached = _read_cache(spec, data_dir)
  meta, splits = cached if cached else prepare(spec, data_dir, manual_dir)[1:]
  train = splits.pop('train')
  if not 0 <= validation_examples < len(train):
    raise UserError(f'data.validation_examples={validation_examples} must be '
                    f'in [0, {len(train)}) for {spec.name}')
  if validation_examples:
    cut = len(train) - validation_examples
    # Slices are views: no copy of the (possibly large) train images.
    splits[datasets.HELD_OUT] = ArrayDataset(train.images[cut:],
                                             train.labels[cut:])
    train = ArrayDataset(train.images[:cut], train.labels[:cut])
  # In the run's order of named sets (datasets.eval_split_names).
  evals = {name: splits[name] for name in
           datasets.eval_split_names(spec, validation_examples)}
  return InMemorySplits(train, evals, tuple(meta['class_names']))
