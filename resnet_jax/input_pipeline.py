"""Loading image-classification data into host memory, and the order of batches.

Small datasets (Fashion-MNIST, MNIST, CIFAR) are held whole in host (and then
device) memory as uint8, so a training step never waits on the host: the loop
gathers each batch from the resident array with indices from
`train_batch_indices`, a pure function of (seed, epoch). Large datasets such as
imagenet2012 stream through tf.data instead (`resnet_jax.streaming`).

Reading order: (a) a uint8 cache under `<data_dir>/resnet_jax_cache/<name>/`,
which needs neither TensorFlow nor TFDS (so a GPU box without them can train
from a carried cache); (b) TFDS prepared data, preparing it first (offline from
`manual_dir` when given), after which the cache is written.

CLI, to build a compact cache to carry elsewhere:
  python -m resnet_jax.input_pipeline --dataset fashion_mnist \
      --data_dir D --manual_dir M
"""

import argparse
import dataclasses
import json
import os
import socket
import sys
import threading
from typing import Any, Iterator
import urllib.parse

import numpy as np

from resnet_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str  # TFDS name, e.g. 'fashion_mnist'.
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]  # Native (H, W, C); (0, 0, 3) if it varies.
  num_train: int  # Train examples actually used (after holding out validation).
  num_eval: int
  in_memory: bool


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """A split held in host memory."""
  images: np.ndarray  # uint8 (N, H, W, C)
  labels: np.ndarray  # int32 (N,)

  def __len__(self) -> int:
    return len(self.labels)


# Datasets known to fit in memory: name -> native image shape. Other TFDS names
# with a fixed image shape work too when their train split is under the limit.
IN_MEMORY_DATASETS: dict[str, tuple[int, int, int]] = {
    'fashion_mnist': (28, 28, 1),
    'mnist': (28, 28, 1),
    'cifar10': (32, 32, 3),
    'cifar100': (32, 32, 3),
}
# Datasets read through the tf.data streaming path (variable image size).
STREAMING_DATASETS: tuple[str, ...] = ('imagenet2012',)
# Largest train split (uint8 bytes) held in memory; it is also copied to every
# accelerator, so keep it well below device memory.
MAX_IN_MEMORY_BYTES = 2 << 30
_CACHE_VERSION = 1


# ----------------------------------------------------------------- the cache


def default_data_dir() -> str:
  """TFDS's default data dir, found without importing TFDS."""
  return os.path.expanduser(
      os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))


def cache_dir(name: str, data_dir: str | None = None) -> str:
  return os.path.join(data_dir or default_data_dir(), 'resnet_jax_cache', name)


def _read_cache(folder: str) -> tuple[dict[str, Any], ArrayDataset,
                                      ArrayDataset] | None:
  """The cached (meta, train, test), or None when there is no complete cache."""
  meta_path = os.path.join(folder, 'info.json')
  # info.json is written last, so its presence means the npz files are whole.
  if not os.path.exists(meta_path):
    return None
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get('version') != _CACHE_VERSION:
    return None
  splits = []
  for split in ('train', 'test'):
    with np.load(os.path.join(folder, f'{split}.npz'),
                 allow_pickle=False) as z:
      splits.append(ArrayDataset(z['images'], z['labels'].astype(np.int32)))
  return meta, splits[0], splits[1]


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


def _write_cache(folder: str, meta: dict[str, Any], train: ArrayDataset,
                 test: ArrayDataset) -> None:
  os.makedirs(folder, exist_ok=True)
  for split, ds in (('train', train), ('test', test)):
    _atomic_write(
        os.path.join(folder, f'{split}.npz'),
        lambda f, ds=ds: np.savez_compressed(f, images=ds.images,
                                             labels=ds.labels))
  _atomic_write(os.path.join(folder, 'info.json'),
                lambda f: f.write(json.dumps(meta, indent=1).encode()))


# ------------------------------------------------------------------ TFDS


def import_tfds():
  """Imports TensorFlow (kept off the GPU) and TFDS, only when needed."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(
        f'reading TFDS data needs tensorflow and tensorflow-datasets ({e}); '
        'install them, or carry a cache made elsewhere with '
        '`python -m resnet_jax.input_pipeline --dataset NAME --data_dir D` '
        'and pass --config.tfds_data_dir=D') from None
  # TF must never grab accelerator memory that JAX needs.
  tf.config.set_visible_devices([], 'GPU')
  return tf, tfds


def _supported_message() -> str:
  return (f'in-memory datasets: {", ".join(IN_MEMORY_DATASETS)} (or any TFDS '
          'image-classification dataset with a fixed image size whose train '
          'split fits in memory); streamed: '
          f'{", ".join(STREAMING_DATASETS)} (or any TFDS image-classification '
          'dataset with JPEG/PNG images)')


# Opening TFDS datasets (building a builder, `as_dataset`) is serialised: the
# prefetch threads open a new stream each epoch while the main thread may open
# the eval split, and TFDS gives no thread-safety guarantee for these calls
# (its test mocks patch the file system process-wide while opening). Reading
# the opened tf.data pipelines stays fully parallel.
TFDS_OPEN_LOCK = threading.RLock()


def tfds_builder(name: str, data_dir: str | None = None):
  _, tfds = import_tfds()
  try:
    with TFDS_OPEN_LOCK:
      return tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f'unknown dataset {name!r}; '
                    f'{_supported_message()}') from None


def _network_reachable(urls: list[str], timeout: float = 3.0) -> bool:
  """Whether the first download host answers; bounded by `timeout`.

  TFDS retries an unreachable download for minutes before failing, so without
  internet we check first and explain how to prepare the data offline.
  """
  if not urls:
    return True
  parsed = urllib.parse.urlparse(urls[0])
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  try:
    with socket.create_connection((parsed.hostname, port), timeout=timeout):
      return True
  except OSError:
    return False


def ensure_prepared(builder, manual_dir: str | None = None,
                    data_dir: str | None = None) -> None:
  """Prepares `builder` (download + generate) unless it already is."""
  if builder.is_prepared():
    return
  name = builder.name
  _, tfds = import_tfds()
  manual_dir = manual_dir or None  # configs use '' for "not given"
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise UserError(f'tfds_manual_dir {manual_dir!r} does not exist; '
                    f'point --config.tfds_manual_dir at the folder holding '
                    f'the {name} download files')
  urls = list(builder.url_infos or {})
  present = set(os.listdir(manual_dir)) if manual_dir else set()
  missing = [u for u in urls if os.path.basename(u) not in present]
  how = (f'{name} is not prepared in {builder.data_dir} and cannot be '
         f'downloaded here. To prepare it offline, put the files '
         f'{[os.path.basename(u) for u in urls] or "listed by TFDS"} (named '
         f'as in their download URLs) in a folder and pass '
         f'--config.tfds_manual_dir=DIR, or run once on a machine with '
         f'internet, write the cache there with `python -m '
         f'resnet_jax.input_pipeline --dataset {name} --data_dir D` and carry '
         f'D/resnet_jax_cache/{name} to {cache_dir(name, data_dir)}')
  if missing and not _network_reachable(missing):
    raise UserError(how)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    builder.download_and_prepare(download_config=config)
  except (OSError, AssertionError) as e:
    # Network failures (requests' errors are OSErrors) and TFDS's assertion
    # about an empty manual_dir both mean: the user must supply the files.
    raise UserError(f'{how}; TFDS said: {str(e).splitlines()[0]}') from None


def _read_split(builder, split: str) -> ArrayDataset:
  """A whole prepared split as uint8 numpy, in TFDS's order."""
  _, tfds = import_tfds()
  images, labels = tfds.as_numpy(
      builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
  if images.dtype != np.uint8:
    raise UserError(f'{builder.name} images are {images.dtype}, not uint8')
  return ArrayDataset(np.ascontiguousarray(images), labels.astype(np.int32))


def _check_in_memory_capable(builder) -> tuple[int, int, int]:
  """The fixed image shape of a supervised image-classification builder."""
  features = builder.info.features
  keys = builder.info.supervised_keys
  shape = tuple(features[keys[0]].shape) if keys else ()
  if (not keys or len(shape) != 3 or None in shape or
      not hasattr(features[keys[1]], 'num_classes')):
    raise UserError(f'{builder.name} is not an image-classification dataset '
                    f'with a fixed image size, so it cannot be held in memory; '
                    f'{_supported_message()}')
  return shape


def _eval_split(builder) -> str:
  for split in ('test', 'validation'):
    if split in builder.info.splits:
      return split
  raise UserError(f'{builder.name} has neither a test nor a validation split')


def prepare_cache(name: str, data_dir: str | None = None,
                  manual_dir: str | None = None) -> str:
  """Prepares `name` with TFDS, writes the uint8 cache; returns its folder."""
  return _prepare(name, data_dir, manual_dir)[0]


def _prepare(name: str, data_dir: str | None, manual_dir: str | None
             ) -> tuple[str, dict[str, Any], ArrayDataset, ArrayDataset]:
  builder = tfds_builder(name, data_dir)
  if name in STREAMING_DATASETS:
    raise UserError(f'{name} is too large to hold in memory; '
                    f'{_supported_message()}')
  shape = _check_in_memory_capable(builder)
  ensure_prepared(builder, manual_dir, data_dir)
  train_bytes = builder.info.splits['train'].num_examples * int(np.prod(shape))
  if train_bytes > MAX_IN_MEMORY_BYTES:
    raise UserError(f'{name} train split needs {train_bytes >> 20} MiB, over '
                    f'the in-memory limit of {MAX_IN_MEMORY_BYTES >> 20} MiB; '
                    'use the streaming path')
  train = _read_split(builder, 'train')
  test = _read_split(builder, _eval_split(builder))
  label = builder.info.features[builder.info.supervised_keys[1]]
  meta = {
      'version': _CACHE_VERSION,
      'name': name,
      'tfds_version': str(builder.version),
      'num_classes': int(label.num_classes),
      'class_names': list(label.names),
      'image_shape': list(shape),
  }
  folder = cache_dir(name, data_dir)
  _write_cache(folder, meta, train, test)
  return folder, meta, train, test


def load_in_memory(
    name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
    validation_examples: int = 0,
) -> tuple[DatasetInfo, ArrayDataset, ArrayDataset]:
  """(info, train, eval) held in host memory as uint8.

  With validation_examples > 0 the last `validation_examples` of the official
  train split are held out and returned as `eval` (train shrinks
  accordingly); otherwise eval is the official test split.
  """
  cached = _read_cache(cache_dir(name, data_dir))
  if cached is None:
    cached = _prepare(name, data_dir, manual_dir)[1:]
  meta, train, test = cached
  if validation_examples < 0 or validation_examples >= len(train):
    raise UserError(f'validation_examples={validation_examples} must be in '
                    f'[0, {len(train)}) for {name}')
  if validation_examples:
    cut = len(train) - validation_examples
    # Slices are views: no copy of the (possibly large) train images.
    test = ArrayDataset(train.images[cut:], train.labels[cut:])
    train = ArrayDataset(train.images[:cut], train.labels[:cut])
  info = DatasetInfo(
      name=name, num_classes=meta['num_classes'],
      class_names=tuple(meta['class_names']),
      image_shape=tuple(meta['image_shape']), num_train=len(train),
      num_eval=len(test), in_memory=True)
  return info, train, test


def streaming_dataset(
    name: str, split: str, *, batch_size_per_process: int, image_size: int,
    train: bool, seed: int, data_dir: str | None = None,
    manual_dir: str | None = None, epoch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of uint8 batches through tf.data: see `resnet_jax.streaming`."""
  # Imported here: the streaming module needs TensorFlow, this one must not.
  from resnet_jax import streaming  # pylint: disable=g-import-not-at-top
  return streaming.streaming_dataset(
      name, split, batch_size_per_process=batch_size_per_process,
      image_size=image_size, train=train, seed=seed, data_dir=data_dir,
      manual_dir=manual_dir, epoch=epoch)


# ------------------------------------------------------------ batch order


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """A permutation of range(num_examples), a pure function of (seed, epoch)."""
  # SeedSequence mixes both numbers, so nearby seeds/epochs give unrelated
  # streams; every process computes the same permutation.
  rng = np.random.Generator(
      np.random.PCG64(np.random.SeedSequence([seed % (1 << 64), epoch])))
  return rng.permutation(num_examples).astype(np.int64)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  if batch_size <= 0 or batch_size > num_examples:
    raise UserError(f'batch_size={batch_size} must be in [1, {num_examples}] '
                    f'(the number of training examples)')
  return num_examples // batch_size


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
                       start_step: int = 0
                       ) -> Iterator[tuple[int, int, np.ndarray]]:
  """Endless (epoch, step_in_epoch, indices) from global step `start_step`.

  Resuming at any step yields the same batches as an uninterrupted run.
  """
  steps = steps_per_epoch(num_examples, batch_size)
  epoch, offset = divmod(start_step, steps)
  while True:
    batches = train_batch_indices(num_examples, batch_size, seed, epoch)
    for step in range(offset, steps):
      yield epoch, step, batches[step]
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


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  return -(-num_examples // batch_size)


# ------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description='Prepare a dataset and write the uint8 cache that '
      'load_in_memory reads without TensorFlow.')
  parser.add_argument('--dataset', required=True)
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--manual_dir', default=None)
  args = parser.parse_args(argv)
  try:
    folder = prepare_cache(args.dataset, args.data_dir, args.manual_dir)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  size = sum(os.path.getsize(os.path.join(folder, f))
             for f in os.listdir(folder))
  print(f'{folder} {size / 2**20:.1f} MiB')
  return 0


if __name__ == '__main__':
  sys.exit(main())
