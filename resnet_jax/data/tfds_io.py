"""TensorFlow Datasets access: the only module that imports TFDS (lazily).

Preparing a dataset (download, or offline from the files in a manual dir)
and opening a prepared one. Importing this module costs nothing: TensorFlow
is imported on the first call that needs it, so training from the uint8
cache never loads it.
"""

import os
import socket
import threading
import urllib.parse

from resnet_jax.data import records
from resnet_jax.errors import UserError

# Opening TFDS datasets (building a builder, `as_dataset`) is serialised: the
# prefetch threads open a new stream each epoch while the main thread may
# open an evaluation split, and TFDS gives no thread-safety guarantee for
# these calls (its test mocks patch the file system process-wide while
# opening). Reading the opened tf.data pipelines stays fully parallel.
OPEN_LOCK = threading.RLock()


def default_data_dir() -> str:
  """TFDS's default data dir, found without importing TFDS."""
  return os.path.expanduser(
      os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))


def import_tfds():
  """(tensorflow, tensorflow_datasets), with TensorFlow kept off the GPU."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(
        f'reading TFDS data needs tensorflow and tensorflow-datasets ({e}); '
        'install them, or carry a cache made elsewhere with '
        '`python -m resnet_jax.tools.prepare_data --dataset NAME --data_dir D` '
        'and pass --config.data.tfds_data_dir=D') from None
  # TF must never grab accelerator memory that JAX needs.
  tf.config.set_visible_devices([], 'GPU')
  return tf, tfds


def builder(name: str, data_dir: str | None = None):
  _, tfds = import_tfds()
  try:
    with OPEN_LOCK:
      return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f'TFDS has no dataset {name!r}') from None


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


def ensure_prepared(tfds_builder, manual_dir: str | None,
                    cache_hint: str | None = None,
                    file_format: str | None = None) -> None:
  """Prepares the dataset (download + generate) unless it already is.

  `cache_hint`: where a uint8 cache carried from elsewhere would go, for the
  offline advice (in-memory datasets only). `file_format`: TFDS's
  ('array_record' for streaming); unset: its default (TFRecord).
  """
  if tfds_builder.is_prepared():
    return
  name = tfds_builder.name
  _, tfds = import_tfds()
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise UserError(f'tfds_manual_dir {manual_dir!r} does not exist; point '
                    '--config.data.tfds_manual_dir at the folder holding the '
                    f'{name} download files')
  urls = list(tfds_builder.url_infos or {})
  present = set(os.listdir(manual_dir)) if manual_dir else set()
  missing = [u for u in urls if os.path.basename(u) not in present]
  how = (f'{name} is not prepared in {tfds_builder.data_dir} and cannot be '
         f'downloaded here. To prepare it offline, put the files '
         f'{[os.path.basename(u) for u in urls] or "listed by TFDS"} (named '
         f'as in their download URLs) in a folder and pass '
         f'--config.data.tfds_manual_dir=DIR')
  if cache_hint:
    how += (f', or run once on a machine with internet, write the cache there '
            f'with `python -m resnet_jax.tools.prepare_data --dataset={name} '
            f'--data_dir=D` and carry D/resnet_jax_cache/{name} to '
            f'{cache_hint}')
  if missing and not _network_reachable(missing):
    raise UserError(how)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    tfds_builder.download_and_prepare(download_config=config,
                                      file_format=file_format)
  except (OSError, AssertionError) as e:
    # Network failures (requests' errors are OSErrors) and TFDS's assertion
    # about an empty manual_dir both mean: the user must supply the files.
    raise UserError(f'{how}; TFDS said: {str(e).splitlines()[0]}') from None


def read_split(tfds_builder, split: str):
  """A whole prepared split as uint8 images (N, H, W, C) and int32 labels."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  _, tfds = import_tfds()
  images, labels = tfds.as_numpy(
      tfds_builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
  if images.dtype != np.uint8:
    raise UserError(f'{tfds_builder.name} images are {images.dtype}, not uint8')
  return np.ascontiguousarray(images), labels.astype(np.int32)


def label_names(tfds_builder) -> list[str]:
  keys = tfds_builder.info.supervised_keys
  return list(tfds_builder.info.features[keys[1]].names)


def prepare_array_record(name: str, data_dir: str | None,
                         manual_dir: str | None = None) -> None:
  """Prepares `name` as ArrayRecord files (what streaming reads): TFDS
  generates them (`file_format='array_record'`), or, when the dataset is
  already prepared as TFRecord files, they are copied record by record into
  ArrayRecord files beside them (TFDS's own `convert_format` needs Apache
  Beam; the records, serialized tf.train.Examples, are the same)."""
  tfds_builder = builder(name, data_dir)
  if not tfds_builder.is_prepared():
    ensure_prepared(tfds_builder, manual_dir, file_format='array_record')
    return
  records.convert_tfrecord_folder(str(tfds_builder.data_path), name)
