"""Batch order, eval coverage, and loading real Fashion-MNIST offline."""

import gzip
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from absl import flags as absl_flags

from resnet_jax.data import datasets, in_memory as ip, order, tfds_io
from resnet_jax.tools import prepare_data
from resnet_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = datasets.get('fashion_mnist')
MNIST = datasets.get('mnist')
FASHION_DIR = os.path.join(REPO, '..', 'shared', 'data', 'fashion_mnist')
# Machines without TensorFlow/TFDS (some accelerator boxes) still run the rest.
needs_tfds = pytest.mark.skipif(
    importlib.util.find_spec('tensorflow_datasets') is None,
    reason='tensorflow_datasets is not installed')
needs_fashion = pytest.mark.skipif(
    not os.path.isdir(FASHION_DIR),
    reason=f'Fashion-MNIST download files not found in {FASHION_DIR}')

# ----------------------------------------------------------------- order


def test_epoch_permutation_is_pure_function_of_seed_and_epoch():
  a = order.epoch_permutation(1000, seed=3, epoch=2)
  np.testing.assert_array_equal(a, order.epoch_permutation(1000, 3, 2))
  np.testing.assert_array_equal(np.sort(a), np.arange(1000))
  assert not np.array_equal(a, order.epoch_permutation(1000, 3, 3))
  assert not np.array_equal(a, order.epoch_permutation(1000, 4, 2))
  assert not np.array_equal(a, np.arange(1000))


def test_train_batch_indices_cover_an_epoch_without_repeats():
  batches = order.train_batch_indices(1000, 64, seed=0, epoch=5)
  assert batches.shape == (15, 64)  # 1000 // 64, incomplete batch dropped
  assert len(np.unique(batches)) == 15 * 64
  assert batches.max() < 1000
  # The dropped examples differ between epochs.
  other = order.train_batch_indices(1000, 64, seed=0, epoch=6)
  assert set(batches.ravel()) != set(other.ravel())
  with pytest.raises(UserError, match='batch_size'):
    order.train_batch_indices(10, 64, seed=0, epoch=0)


def test_resume_mid_epoch_gives_the_same_remaining_batches():
  n, bs, seed = 500, 32, 7  # 15 steps per epoch
  full = [b for _, b in zip(range(40), order.train_index_stream(n, bs, seed))]
  assert all(b.shape == (bs,) for b in full)
  for start in (0, 9, 15, 22):
    resumed = [b for _, b in zip(range(40 - start), order.train_index_stream(
        n, bs, seed, start_step=start))]
    np.testing.assert_array_equal(np.stack(resumed), np.stack(full[start:]))
  # Equivalent with train_batch_indices at (epoch, offset).
  epoch, offset = divmod(22, 15)
  np.testing.assert_array_equal(
      order.train_batch_indices(n, bs, seed, epoch)[offset:],
      np.stack(full[22:30]))


@pytest.mark.parametrize('n,bs', [(100, 10), (103, 10), (7, 10), (1, 1)])
def test_eval_batches_count_each_example_once(n, bs):
  batches = list(order.eval_batches(n, bs))
  assert len(batches) == -(-n // bs)
  counts = np.zeros(n, int)
  for idx, mask in batches:
    assert idx.shape == mask.shape == (bs,) and mask.dtype == bool
    assert idx.min() >= 0 and idx.max() < n
    np.add.at(counts, idx[mask], 1)
  np.testing.assert_array_equal(counts, 1)
  assert sum(m.sum() for _, m in batches) == n


# ------------------------------------------------------------ offline errors


@needs_tfds
def test_unprepared_dataset_offline_explains_how_to_prepare(tmp_path,
                                                            monkeypatch):
  # Never touch the network here, whatever machine runs the test.
  monkeypatch.setattr(tfds_io, '_network_reachable', lambda urls, **kw: False)
  with pytest.raises(UserError) as e:
    ip.load_in_memory(MNIST, data_dir=str(tmp_path))
  msg = str(e.value)
  assert 'tfds_manual_dir' in msg and 'train-images-idx3-ubyte.gz' in msg
  assert 'resnet_jax_cache' in msg
  # An existing but empty manual dir: the same advice, still no download.
  empty = tmp_path / 'manual'
  empty.mkdir()
  with pytest.raises(UserError, match='tfds_manual_dir'):
    ip.load_in_memory(MNIST, data_dir=str(tmp_path), manual_dir=str(empty))
  # None (the config's "unset") means no manual dir, not a missing one.
  with pytest.raises(UserError, match='cannot be downloaded'):
    ip.load_in_memory(MNIST, data_dir=str(tmp_path), manual_dir=None)


@needs_tfds
def test_missing_manual_dir_and_unknown_names(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    ip.load_in_memory(MNIST, data_dir=str(tmp_path),
                      manual_dir=str(tmp_path / 'nope'))
  with pytest.raises(UserError, match='fashion_mnist.*cifar100'):
    datasets.get('no_such_dataset_xyz')
  with pytest.raises(UserError, match='too large'):
    ip.load_in_memory(datasets.get('imagenet2012'), data_dir=str(tmp_path))


def test_network_probe_is_bounded():
  start = time.monotonic()
  assert not tfds_io._network_reachable(['https://host.invalid/f.gz'],
                                        timeout=2)
  assert time.monotonic() - start < 10


# ------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope='module')
def fashion(fashion_mnist_data_dir):
  """Fashion-MNIST as the session fixture prepared it with TFDS from the
  shared download files (from scratch in CI), read back from the cache."""
  pytest.importorskip('tensorflow_datasets')
  data_dir = fashion_mnist_data_dir
  splits = ip.load_in_memory(FASHION, data_dir=data_dir,
                             manual_dir=FASHION_DIR)
  return data_dir, splits, splits.train, splits.evals['test']


def _raw_idx(name):
  with gzip.open(os.path.join(FASHION_DIR, name)) as f:
    data = f.read()
  return np.frombuffer(data, np.uint8, offset=16 if 'images' in name else 8)


@pytest.mark.full
@needs_fashion
def test_fashion_mnist_shapes_labels_and_class_names(fashion):
  _, splits, train, test = fashion
  assert list(splits.evals) == ['test']  # the eval splits of datasets.py
  assert train.images.shape == (60000, 28, 28, 1)
  assert test.images.shape == (10000, 28, 28, 1)
  assert train.images.dtype == test.images.dtype == np.uint8
  assert train.labels.dtype == np.int32
  # The table in datasets.py agrees with the data.
  assert (len(train), len(test)) == (FASHION.num_train,
                                     FASHION.eval_sizes['test'])
  assert train.images.shape[1:] == FASHION.image_shape == (28, 28, 1)
  assert FASHION.num_classes == 10 and FASHION.storage == 'memory'
  assert splits.class_names == ('T-shirt/top', 'Trouser', 'Pullover',
                                'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                                'Bag', 'Ankle boot')
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  # TFDS's fixed example order (its generator shuffles the raw files).
  np.testing.assert_array_equal(train.labels[:10], [2, 1, 8, 4, 1, 9, 2, 2, 0,
                                                    2])
  np.testing.assert_array_equal(test.labels[:10], [4, 4, 9, 7, 5, 1, 0, 5, 7,
                                                   4])


@pytest.mark.full
@needs_fashion
def test_fashion_mnist_pixels_match_the_download_files(fashion):
  _, _, train, _ = fashion
  raw_images = _raw_idx('train-images-idx3-ubyte.gz').reshape(60000, 784)
  raw_labels = _raw_idx('train-labels-idx1-ubyte.gz')
  by_bytes = {img.tobytes(): lab for img, lab in zip(raw_images, raw_labels)}
  flat = train.images.reshape(60000, 784)
  assert all(by_bytes.get(img.tobytes()) == lab
             for img, lab in zip(flat, train.labels))
  # The normalisation constants in datasets.py.
  assert abs(train.images.mean() / 255 - FASHION.mean[0]) < 1e-3
  assert abs(train.images.std() / 255 - FASHION.std[0]) < 1e-3


@pytest.mark.full
@needs_fashion
def test_validation_holdout_is_the_tail_of_train(fashion):
  data_dir, _, train, test = fashion
  splits = ip.load_in_memory(FASHION, data_dir=data_dir,
                             validation_examples=5000)
  tr, val = splits.train, splits.evals['val']
  # The held-out split comes first (it selects the best checkpoint), and
  # the test split is still there, untouched.
  assert list(splits.evals) == ['val', 'test'] == list(
      datasets.eval_split_names(FASHION, 5000))
  assert tr.images.shape == (55000, 28, 28, 1)
  assert val.images.shape == (5000, 28, 28, 1)
  np.testing.assert_array_equal(val.images, train.images[55000:])
  np.testing.assert_array_equal(val.labels, train.labels[55000:])
  np.testing.assert_array_equal(tr.labels, train.labels[:55000])
  np.testing.assert_array_equal(splits.evals['test'].labels, test.labels)
  with pytest.raises(UserError, match='validation_examples'):
    ip.load_in_memory(FASHION, data_dir=data_dir, validation_examples=60000)


_NO_TF_LOADER = r'''
import hashlib, json, sys
class _Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, _Block())
from resnet_jax.data import datasets, in_memory as ip
splits = ip.load_in_memory(datasets.get(sys.argv[1]))
assert not any(m.startswith('tensorflow') for m in sys.modules)
train, test = splits.train, splits.evals['test']
h = lambda a: hashlib.sha256(a.tobytes()).hexdigest()
print(json.dumps({'class_names': splits.class_names,
      'evals': list(splits.evals), 'hashes': [h(train.images),
      h(train.labels), h(test.images), h(test.labels)],
      'dtypes': [str(train.images.dtype), str(train.labels.dtype)]}))
'''


@pytest.mark.full
@needs_fashion
def test_cache_is_read_without_tensorflow(fashion):
  data_dir, splits, train, test = fashion
  folder = ip.cache_dir('fashion_mnist', data_dir)
  assert sorted(os.listdir(folder)) == ['info.json', 'test.npz', 'train.npz']
  env = dict(os.environ, TFDS_DATA_DIR=data_dir, PYTHONPATH=REPO,
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _NO_TF_LOADER, 'fashion_mnist'],
                       capture_output=True, text=True, env=env, timeout=120,
                       check=False)
  assert out.returncode == 0, out.stderr
  got = json.loads(out.stdout.strip().splitlines()[-1])
  h = lambda a: hashlib.sha256(a.tobytes()).hexdigest()
  assert got['hashes'] == [h(train.images), h(train.labels), h(test.images),
                           h(test.labels)]
  assert got['class_names'] == list(splits.class_names)
  assert got['evals'] == ['test']
  assert got['dtypes'] == ['uint8', 'int32']


@pytest.mark.full
@needs_fashion
def test_cli_reports_the_cache(fashion, capsys, monkeypatch):
  data_dir = fashion[0]
  # The fixture already ran the preparation the CLI calls; skip redoing it.
  monkeypatch.setattr(prepare_data, 'prepare_cache',
                      lambda name, data_dir, manual_dir: ip.cache_dir(
                          name, data_dir))
  # main reads the absl flags that _define_flags declares.
  monkeypatch.setattr(absl_flags, 'FLAGS', types.SimpleNamespace(
      dataset='fashion_mnist', data_dir=data_dir, manual_dir=None,
      pipeline=None))
  assert not prepare_data.main(['prepare_data'])
  folder, size = capsys.readouterr().out.split()[:2]
  assert folder == ip.cache_dir('fashion_mnist', data_dir)
  assert 10 < float(size) < 60  # MiB, compressed


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'resnet_jax.tools.prepare_data',
                         *args], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=120, check=False)


def test_cli_errors_are_one_line(tmp_path):
  for args, expected in [
      (['--dataset=no_such_dataset_xyz', f'--data_dir={tmp_path}'],
       'unknown dataset'),
      ([f'--data_dir={tmp_path}'], 'dataset'),  # a required flag
      (['--dataset=mnist', '--datadir=x'], 'datadir'),
  ]:
    out = _cli(*args)
    assert out.returncode == 2, (args, out.stderr[-2000:])
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and expected in last, (args, last)
    assert 'Traceback' not in out.stderr


# ------------------------------------------------ streamed datasets
# (Grain over ArrayRecord: tests/test_streaming.py)


IMAGENET = datasets.get('imagenet2012')


def test_imagenet_row_streams_and_evaluates_on_val():
  assert IMAGENET.storage == 'stream' and IMAGENET.image_shape is None
  assert IMAGENET.num_classes == 1000 and IMAGENET.channels == 3
  # TFDS calls the labelled evaluation split 'validation'; we call it 'val'.
  assert IMAGENET.eval_splits == {'val': 'validation'}
  assert datasets.eval_split_names(IMAGENET, 0) == ('val',)
  # Evaluation and predict.py: a 224 centre crop of the shorter side at 256.
  assert IMAGENET.eval_crop_padding == 32
  with pytest.raises(UserError, match='image_size'):
    datasets.image_size(IMAGENET, None)
  assert datasets.image_size(IMAGENET, 224) == 224
