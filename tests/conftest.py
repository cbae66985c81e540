"""Shared fixtures: small datasets in the project's uint8 cache format, and
real Fashion-MNIST prepared once per session from ../shared/data."""

import os
import pathlib
import tempfile

# One persistent XLA compilation cache for the session, shared with the
# subprocesses the tests start: the same small programs compile once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      tempfile.mkdtemp(prefix='resnet_jax_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# The tests' programs are tiny and compiled once each: LLVM's optimisation
# passes would cost more time than they save (a quarter of the suite's CPU
# time). Same arithmetic, only less optimised machine code; subprocesses the
# tests start inherit it (test_training._env).
FAST_COMPILE = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()

# torchvision (the conversion tests, its ImageNet class names) must be
# imported before TensorFlow has started tf.data threads (the streaming
# tests): imported after them, it crashes the process in this environment.
try:
  import torchvision.models  # noqa: E402,F401  pylint: disable=unused-import
except ImportError:
  pass

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_compilation_cache_dir',
                  os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

from resnet_jax.data import datasets, in_memory

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASHION_MNIST_FILES = ROOT.parent / 'shared' / 'data' / 'fashion_mnist'


def write_fake_dataset(data_dir: str, name: str, shape=(28, 28, 1),
                       num_classes: int = 10, num_train: int = 256,
                       num_test: int = 100, seed: int = 0) -> None:
  """A learnable dataset: each class is a distinct brightness pattern + noise."""
  rng = np.random.default_rng(seed)
  patterns = rng.integers(0, 256, (num_classes,) + shape)

  def split(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    noise = rng.integers(-40, 41, (n,) + shape)
    images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
    return in_memory.ArrayDataset(images, labels)

  meta = {'name': name, 'tfds_version': 'fake', 'num_classes': num_classes,
          'class_names': [f'class_{i}' for i in range(num_classes)],
          'image_shape': list(shape)}
  in_memory.write_cache(
      in_memory.cache_dir(name, data_dir), meta,
      {'train': split(num_train), 'test': split(num_test)})


@pytest.fixture(scope='session')
def fake_data_dir(tmp_path_factory) -> str:
  """fashion_mnist-, cifar10- and cifar100-shaped fakes in one data dir."""
  data_dir = str(tmp_path_factory.mktemp('fake_tfds'))
  write_fake_dataset(data_dir, 'fashion_mnist')
  write_fake_dataset(data_dir, 'cifar10', shape=(32, 32, 3))
  write_fake_dataset(data_dir, 'cifar100', shape=(32, 32, 3), num_classes=100)
  return data_dir


@pytest.fixture(scope='session')
def fashion_mnist_data_dir(tmp_path_factory) -> str:
  """Real Fashion-MNIST, prepared offline by TFDS once, read from its cache."""
  if not FASHION_MNIST_FILES.is_dir():
    pytest.skip(f'real Fashion-MNIST files not found at {FASHION_MNIST_FILES}')
  data_dir = os.environ.get('RESNET_JAX_TEST_DATA_DIR') or str(
      tmp_path_factory.mktemp('tfds'))
  # Reads the cache when it is there, else prepares it with TFDS (~30 s).
  in_memory.load_in_memory(datasets.get('fashion_mnist'),
                                data_dir=data_dir,
                                manual_dir=str(FASHION_MNIST_FILES))
  return data_dir


def write_stream_dataset(data_dir: str, name: str, sizes: dict[str, int],
                         shape=(28, 28, 1), num_classes: int = 10,
                         fmt: str = 'PNG', seed: int = 0,
                         same_image: bool = False) -> str:
  """A dataset in TFDS's ArrayRecord layout (`<data_dir>/<name>/1.0.0/`),
  each example a tf.train.Example of an encoded image and its label, as
  TFDS writes them. `shape` None: JPEGs of random sizes (ImageNet-like).
  Learnable like write_fake_dataset: each class a brightness pattern."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from resnet_jax.data import records
  rng = np.random.default_rng(seed)
  folder = os.path.join(data_dir, name, '1.0.0')
  lengths = {}
  first = None
  for split, n in sizes.items():
    serialized = []
    for _ in range(n):
      label = int(rng.integers(0, num_classes))
      if shape is None:
        h, w = (int(v) for v in rng.integers(24, 72, 2))
        pixels = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
      else:
        level = (label * 255) // max(num_classes - 1, 1)
        pixels = np.clip(level + rng.integers(-40, 41, shape), 0,
                         255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else
                      pixels).save(buf, format='JPEG' if shape is None
                                   else fmt, quality=90)
      first = first if (first and same_image) else buf.getvalue()
      serialized.append(records.serialize_example(
          {'image': first, 'label': label}))
    lengths[split] = records.write_split(folder, name, split, serialized,
                                         num_shards=2 if n > 20 else 1)
  records.write_info(folder, name, '1.0.0', lengths,
                     [f'class_{i}' for i in range(num_classes)])
  return folder
