"""Shared fixtures: small datasets in the project's uint8 cache format, and
real Fashion-MNIST prepared once per session from ../shared/data."""

import os
import tempfile

# One persistent XLA compilation cache for the session, shared with the
# subprocesses the tests start: the same small programs compile once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      tempfile.mkdtemp(prefix='resnet_jax_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# torchvision (the conversion tests, its ImageNet class names) must be
# imported before TensorFlow has started tf.data threads (the streaming
# tests): imported after them, it crashes the process in this environment.
try:
  import torchvision.models  # noqa: E402,F401  pylint: disable=unused-import
except ImportError:
  pass

import jax  # noqa: E402
import pytest  # noqa: E402

from helpers import FAST_COMPILE, ROOT, write_fake_dataset  # noqa: E402
from resnet_jax.data import datasets, in_memory  # noqa: E402

# Fast compilation for this process (the processes the tests start get it
# from helpers.subprocess_env); XLA reads it when the backend starts.
os.environ['XLA_FLAGS'] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()

jax.config.update('jax_compilation_cache_dir',
                  os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

FASHION_MNIST_FILES = ROOT.parent / 'shared' / 'data' / 'fashion_mnist'


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


