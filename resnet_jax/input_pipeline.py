"""In-memory datasets: the uint8 cache, loading, and the order of batches.

Datasets whose row in `datasets.py` says storage='memory' (Fashion-MNIST,
MNIST, CIFAR) are held whole in host (and then device) memory as uint8, so a
training step never waits on the host: the loop gathers each batch from the
resident array with indices from `train_batch_indices`, a pure function of
(seed, epoch).

Reading order: (a) a uint8 cache under `<data_dir>/resnet_jax_cache/<name>/`,
which needs neither TensorFlow nor TFDS (so a GPU box without them can train
from a carried cache); (b) TFDS prepared data, preparing it first (offline
from `manual_dir` when given), after which the cache is written.

Command line, to build a compact cache to carry elsewhere:
  python -m resnet_jax.input_pipeline --dataset fashion_mnist \
      --data_dir D --manual_dir M
or, with --pipeline=stream (ImageNet's default), the ArrayRecord files that
streaming.py reads without TensorFlow.
"""

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np

from resnet_jax import datasets, tfds_io
from resnet_jax.durations import steps_per_epoch
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


def _atomic_write(path: str, write_fn) -> None:
  """Writes via a temporary file in the same folder, then renames it."""
  # A per-process name keeps concurrent writers apart; open() honours umask.
  tmp = os.path.join(os.path.dirname(path),
                     f'.tmp-{os.getpid()}-{os.path.basename(path)}')
  try:
    with open(tmp, 'wb') as f:
      write_fn(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_cache(folder: str, meta: dict[str, Any],
                splits: dict[str, ArrayDataset]) -> None:
  """`{split}.npz` for each split, then info.json (the completion mark)."""
  os.makedirs(folder, exist_ok=True)
  for split, ds in splits.items():
    _atomic_write(
        os.path.join(folder, f'{split}.npz'),
        lambda f, ds=ds: np.savez_compressed(f, images=ds.images,
                                             labels=ds.labels))
  _atomic_write(os.path.join(folder, 'info.json'),
                lambda f: f.write(json.dumps(dict(
                    meta, version=_CACHE_VERSION), indent=1).encode()))


def _prepare(spec: datasets.DatasetSpec, data_dir: str | None,
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
                      f'resnet_jax/datasets.py says {spec.image_shape}')
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
  meta, splits = cached if cached else _prepare(spec, data_dir, manual_dir)[1:]
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


# ------------------------------------------------------------ batch order


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """A permutation of range(num_examples), a pure function of (seed, epoch)."""
  # SeedSequence mixes both numbers, so nearby seeds/epochs give unrelated
  # streams; every process computes the same permutation.
  rng = np.random.Generator(
      np.random.PCG64(np.random.SeedSequence([seed % (1 << 64), epoch])))
  return rng.permutation(num_examples).astype(np.int64)


def train_batch_indices(num_examples: int, batch_size: int, seed: int,
                        epoch: int) -> np.ndarray:
  """(steps_per_epoch, batch_size) indices for one epoch.

  Drops the incomplete last batch (a different subset each epoch). Resuming at
  (epoch, offset) is `train_batch_indices(...)[offset:]`.
  """
  steps = steps_per_epoch(num_examples, batch_size)
  perm = epoch_permutation(num_examples, seed, epoch)
  return perm[:steps * batch_size].reshape(steps, batch_size)


def train_index_stream(num_examples: int, batch_size: int, seed: int, *,
                       start_step: int = 0) -> Iterator[np.ndarray]:
  """Endless batches of indices from global step `start_step` on.

  Resuming at any step yields the same batches as an uninterrupted run.
  """
  epoch, offset = divmod(start_step, steps_per_epoch(num_examples, batch_size))
  while True:
    yield from train_batch_indices(num_examples, batch_size, seed,
                                   epoch)[offset:]
    epoch, offset = epoch + 1, 0


def eval_batches(num_examples: int, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(indices, mask) per batch, in order, every example exactly once.

  All batches have `batch_size` rows (one compiled shape); the last one is
  padded with index 0 and mask False.
  """
  if batch_size <= 0:
    raise UserError(f'eval batch_size={batch_size} must be positive')
  for start in range(0, num_examples, batch_size):
    real = min(batch_size, num_examples - start)
    indices = np.zeros(batch_size, np.int64)
    indices[:real] = np.arange(start, start + real)
    mask = np.arange(batch_size) < real
    yield indices, mask


# ------------------------------------------------------------------- CLI


def prepare_cache(name: str, data_dir: str | None = None,
                  manual_dir: str | None = None) -> str:
  """Prepares `name` with TFDS, writes the uint8 cache; returns its folder."""
  return _prepare(datasets.get(name), data_dir, manual_dir)[0]


def prepare_stream(name: str, data_dir: str | None = None,
                   manual_dir: str | None = None) -> tuple[str, list[str]]:
  """Prepares `name` as ArrayRecord files for streaming (TFDS generates
  them, or converts a TFRecord preparation); returns the folder and the
  files."""
  from resnet_jax import streaming  # pylint: disable=g-import-not-at-top
  spec = datasets.get(name)
  found = streaming.prepared(spec, data_dir, manual_dir)
  files = [f for split in (spec.train_split, *spec.eval_splits.values())
           for f in found.files(split)]
  return found.folder, files


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  spec = datasets.get(f.dataset)
  if (f.pipeline or spec.storage) == 'stream':
    folder, files = prepare_stream(f.dataset, f.data_dir, f.manual_dir)
  else:
    if spec.storage == 'stream':
      raise UserError(f'{spec.name} does not fit in memory: use '
                      '--pipeline=stream')
    folder = prepare_cache(f.dataset, f.data_dir, f.manual_dir)
    files = [os.path.join(folder, name) for name in os.listdir(folder)]
  size = sum(os.path.getsize(path) for path in files)
  print(f'{folder} {size / 2**20:.1f} MiB')


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('dataset', None, 'A dataset of resnet_jax/datasets.py.',
                      required=True)
  flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: TFDS\'s).')
  flags.DEFINE_string('manual_dir', None,
                      'Offline: folder with the download files.')
  flags.DEFINE_enum('pipeline', None, ['memory', 'stream'],
                    "memory: the uint8 cache; stream: ArrayRecord files for "
                    "data.pipeline=stream (TFDS's, converted from TFRecord "
                    "when prepared before); unset: the dataset's own.")


if __name__ == '__main__':
  from resnet_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main)
