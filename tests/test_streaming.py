"""Streamed datasets (Grain over ArrayRecord, streaming.py and records.py):
tiny datasets in TFDS's layout written here; batches a pure function of
(seed, step); processes' slices and random draws; padded evaluation; the
decoders; real Fashion-MNIST converted from TFDS's files; and train.py
killed with SIGKILL and resumed with TensorFlow not importable."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import (ROOT, blocked_tensorflow, final_state, free_port, leaves,
                     metric_records, run_until, subprocess_env,
                     write_stream_dataset)
from resnet_jax import config as config_lib
from resnet_jax.data import (datasets, host_decode, in_memory, order, records,
                             streaming)
from resnet_jax.errors import UserError

FASHION = datasets.get('fashion_mnist')
IMAGENET = datasets.get('imagenet2012')


@pytest.fixture(scope='module')
def stream_dir(tmp_path_factory) -> str:
  """A Fashion-MNIST-shaped dataset (PNGs) and an ImageNet-like one (JPEGs
  of random sizes), as ArrayRecord files only: no uint8 cache."""
  data_dir = str(tmp_path_factory.mktemp('stream_tfds'))
  write_stream_dataset(data_dir, 'fashion_mnist', {'train': 256, 'test': 100})
  write_stream_dataset(data_dir, 'imagenet2012',
                       {'train': 40, 'validation': 21}, shape=None,
                       num_classes=1000)
  write_stream_dataset(data_dir, 'cifar10', {'train': 32, 'test': 32},
                       shape=None, num_classes=10, same_image=True)
  return data_dir


def _stream(data_dir, spec=FASHION, process=(0, 1), seed=0, image_size=None):
  found = streaming.prepared(spec, data_dir, prepare=False)
  return streaming.Stream(spec, found, image_size=image_size, seed=seed,
                          process_index=process[0], process_count=process[1],
                          workers=0)


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_example_codec_and_tfrecord_conversion(tmp_path):
  ex = records.serialize_example({'image': b'\x89PNG...', 'label': 7,
                                  'neg': -3})
  assert records.parse_example(ex) == {'image': [b'\x89PNG...'], 'label': [7],
                                       'neg': [-3]}
  # A TFRecord file (length, CRC, data, CRC) becomes an ArrayRecord file
  # beside it, same records in the same order.
  folder = tmp_path / 'ds' / '1.0.0'
  folder.mkdir(parents=True)
  with open(folder / 'ds-train.tfrecord-00000-of-00001', 'wb') as f:
    for r in (b'a', b'bc', ex):
      f.write(len(r).to_bytes(8, 'little') + b'\0' * 4 + r + b'\0' * 4)
  records.write_info(str(folder), 'ds', '1.0.0', {'train': [3]}, ['x'])
  records.convert_tfrecord_folder(str(folder), 'ds')
  found = records.find('ds', str(tmp_path), ('train',))
  assert found.split_sizes == {'train': 3}
  assert list(records.open_source(found.files('train'))) == [b'a', b'bc', ex]


def test_train_batch_k_is_a_pure_function_of_seed_and_k(stream_dir):
  s = _stream(stream_dir)
  plan = s.plan('train', 32)
  assert plan.num_examples == 256  # 8 steps an epoch: step 8 starts epoch 1
  assert order.train_positions(8, plan.num_examples, 32)[0] == 1
  run = list(streaming.iterate(plan, 0, 10, workers=0))
  for b in run:
    assert b['image'].shape == (32, 28, 28, 1) and b['image'].dtype == np.uint8
    assert b['label'].dtype == np.int32
  # Resumed at step 6: the same batches, and steps 0-5 are never read.
  loader = streaming.BatchLoader(plan)
  read = []
  loader._read = lambda idx, f=loader._read: read.extend(idx) or f(idx)
  resumed = [loader(k) for k in range(6, 10)]
  assert all(_equal(a, b) for a, b in zip(run[6:], resumed))
  assert len(read) == 4 * 32
  # The epoch's order is the in-memory pipeline's permutation: each example
  # once, step k its positions [32k, 32k + 32).
  perm = order.epoch_permutation(256, 0, 0)
  labels = np.concatenate([b['label'] for b in run[:8]])
  ordered = [records.parse_example(r)['label'][0] for r in
             records.open_source(list(plan.files)).__getitems__(
                 [int(i) for i in perm])]
  np.testing.assert_array_equal(labels, ordered)
  # Another epoch, another order; another seed, another order.
  assert not np.array_equal(run[8]['label'], run[0]['label'])
  other = streaming.BatchLoader(_stream(stream_dir, seed=1).plan('train', 32))
  assert not _equal(other(0), run[0])


@pytest.mark.full
def test_two_processes_slice_the_one_process_batch(stream_dir):
  one = streaming.BatchLoader(_stream(stream_dir, IMAGENET, image_size=16)
                              .plan('train', 8))
  halves = [streaming.BatchLoader(_stream(
      stream_dir, IMAGENET, process=(p, 2), image_size=16).plan('train', 4 * 2))
            for p in range(2)]
  for k in (0, 3, 7):  # epoch 0 and, after 5 steps of 8, epoch 1
    whole = one(k)
    parts = [h(k) for h in halves]
    for key in whole:
      np.testing.assert_array_equal(
          whole[key], np.concatenate([p[key] for p in parts]))


def test_random_draws_differ_across_processes_and_examples(stream_dir):
  # 'cifar10' here holds one JPEG 32 times (and varying sizes: cropped on
  # the host like ImageNet only when the row's size is unset, so use the
  # ImageNet path directly): every row's crop and flip must differ, in
  # particular row r of process 0 and row r of process 1.
  spec = datasets.DatasetSpec('cifar10', 10, 3, None, (0.5,) * 3, (0.5,) * 3,
                              'stream', 32, {'test': 'test'}, {'test': 32})
  loaders = [streaming.BatchLoader(_stream(
      stream_dir, spec, process=(p, 2), image_size=16).plan('train', 16))
             for p in range(2)]
  rows = np.concatenate([loader(0)['image'] for loader in loaders])
  assert len({r.tobytes() for r in rows}) == 16
  seeds = {order.example_rng(0, e, i).integers(1 << 62)
           for e in range(3) for i in range(1000)}
  assert len(seeds) == 3000


def test_evaluation_pads_masks_and_counts_every_example_once(stream_dir):
  # 21 ImageNet validation images, batches of 8 over 2 processes (4 each):
  # 3 batches in both processes, the last with 5 real rows of 8.
  for p in range(2):
    batches = list(_stream(stream_dir, IMAGENET, process=(p, 2),
                           image_size=16).evaluation('val', 8))
    assert len(batches) == 3
    assert all(b['image'].shape == (4, 16, 16, 3) for b in batches)
    masks = np.stack([b['mask'] for b in batches])
    assert masks.sum() == (12 if p == 0 else 9)
    assert np.all(batches[-1]['image'][~batches[-1]['mask']] == 0)
  one = list(_stream(stream_dir, IMAGENET, image_size=16).evaluation('val', 8))
  assert sum(b['mask'].sum() for b in one) == 21


def test_decoders_crop_png_and_jpeg():
  # 64x48 image: black border, white centre; the eval crop keeps the centre.
  image = np.zeros((64, 48, 3), np.uint8)
  image[12:52, 4:44] = 255
  for fmt in ('PNG', 'JPEG'):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, quality=100)
    encoded = buf.getvalue()
    assert host_decode.image_shape(encoded) == (64, 48)
    centre = host_decode.crop_resize(encoded, lambda h, w: host_decode
                                   .centre_window(h, w, 16, 32), 16, 3)
    assert centre.shape == (16, 16, 3) and centre.min() > 240
    whole = host_decode.crop_resize(encoded, lambda h, w: host_decode
                                  .centre_window(h, w, 16, 0), 16, 3)
    assert whole[8, 8].min() > 240 and whole[0, 0].max() < 60
  rng = np.random.default_rng(0)
  for _ in range(200):
    y, x, h, w = host_decode.inception_window(rng, 375, 500)
    assert 0 <= y and y + h <= 375 and 0 <= x and x + w <= 500
    assert 0.08 * 0.9 <= h * w / (375 * 500) <= 1.0
    assert (h, w) == (375, 500) or 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_pipeline_field_and_its_errors(stream_dir):
  c = config_lib.base_config()
  c.data.pipeline = 'stream'
  config_lib.validate(c)
  c.data.dataset, c.data.image_size, c.data.pipeline = 'imagenet2012', 64, (
      'memory')
  with pytest.raises(UserError, match="data.pipeline='memory'.*does not fit"):
    config_lib.validate(c)
  with pytest.raises(UserError, match='not prepared as ArrayRecord.*'
                     '--pipeline=stream'):
    streaming.prepared(datasets.get('mnist'), stream_dir, prepare=False)


@pytest.mark.full
def test_real_fashion_mnist_converted_from_tfds_streams_its_pixels(
    fashion_mnist_data_dir, tmp_path):
  # TFDS prepared the session's Fashion-MNIST as TFRecord files; converted
  # to ArrayRecord (as for a dataset prepared before streaming existed),
  # the stream decodes the pixels and labels of TFDS's own decoder.
  src = os.path.join(fashion_mnist_data_dir, 'fashion_mnist')
  shutil.copytree(src, tmp_path / 'fashion_mnist')
  version = next((tmp_path / 'fashion_mnist').iterdir())
  records.convert_tfrecord_folder(str(version), 'fashion_mnist')
  s = _stream(str(tmp_path))
  assert s.sizes == {'train': 60_000, 'test': 10_000}
  assert streaming.label_names(s.found)[:2] == ['T-shirt/top', 'Trouser']
  cached = in_memory.load_in_memory(FASHION,
                                         data_dir=fashion_mnist_data_dir)
  test = cached.evals['test']
  batch = streaming.BatchLoader(s.plan('test', 500))(3)
  np.testing.assert_array_equal(batch['image'], test.images[1500:2000])
  np.testing.assert_array_equal(batch['label'], test.labels[1500:2000])
  train = streaming.BatchLoader(s.plan('train', 64))(0)
  perm = order.epoch_permutation(60_000, 0, 0)[:64]
  np.testing.assert_array_equal(train['image'], cached.train.images[perm])


def _cmd(workdir, data_dir, *extra):
  return [sys.executable, str(ROOT / 'train.py'),
          f'--workdir={workdir}', f'--config.data.tfds_data_dir={data_dir}',
          '--config.data.pipeline=stream', '--config.model.width=4',
          '--config.data.batch_size=32', '--config.data.eval_batch_size=40',
          '--config.run.num_train_steps=12', '--config.optim.warmup_epochs=0',
          '--config.run.log_every_steps=2',
          '--config.run.checkpoint_every_steps=3',
          '--config.data.augment.crop_padding=2',
          '--config.run.progress_bar=False', *extra]


@pytest.mark.full
def test_streamed_run_killed_and_resumed_equals_uninterrupted_without_tf(
    stream_dir, tmp_path):
  # Every run here has TensorFlow and TFDS not importable. The reference
  # decodes in its own threads, the interrupted run in a Grain worker
  # process; it is killed right after its step-9 checkpoint (past the epoch
  # boundary at 8 and its evaluation) and resumed mid-epoch. The killed
  # run's worker exits with it (else communicate() would wait on its pipes).
  env = subprocess_env(PYTHONPATH=f'{blocked_tensorflow(tmp_path)}:{ROOT}')
  ref, run = tmp_path / 'reference', tmp_path / 'interrupted'
  out = subprocess.run(_cmd(ref, stream_dir, '--config.data.stream_workers=0'),
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'test acc' in out.stdout
  workers = '--config.data.stream_workers=1'
  code, _, err = run_until(_cmd(run, stream_dir, workers), run, 9,
                           signal.SIGKILL, env=env)
  assert code == -signal.SIGKILL, err[-3000:]
  out = subprocess.run(_cmd(run, stream_dir, workers), env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  a, b = final_state(ref, 12), final_state(run, 12)
  for section in ('params', 'batch_stats', 'opt_state', 'step',
                  'metric_sums'):
    for x, y in zip(leaves(a[section]), leaves(b[section])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                    err_msg=section)
  # Step by step: every loss record and both evaluations (top-5 included).
  ref_records, run_records = metric_records(ref), metric_records(run)
  assert ref_records == run_records
  evals = [r for r in ref_records if 'test_accuracy' in r]
  assert [r['test_count'] for r in evals] == [100, 100]
  assert all(r['test_accuracy'] <= r['test_top5_accuracy'] for r in evals)


@pytest.mark.full
def test_two_processes_assemble_the_one_process_batches(stream_dir):
  # Each of 2 processes (2 simulated devices each) decodes its half of every
  # global batch; assembled with make_array_from_process_local_data they
  # are the batches of 1 process on 4 devices, evaluation included.
  script = [sys.executable, str(ROOT / 'tests' / 'multidevice_checks.py'),
            'stream_batches', stream_dir]
  port = free_port()

  def env(processes, index):
    devices = 4 // processes
    extra = {} if processes == 1 else dict(
        JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(index),
        JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}')
    return subprocess_env(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
                **extra)

  procs = [subprocess.Popen(script, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(n, i))
           for n, i in ((1, 0), (2, 0), (2, 1))]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  one, two = results[0], results[1:]
  assert one['processes'] == 1 and all(r['processes'] == 2 for r in two)
  assert all(r['devices'] == 4 for r in results) and one['eval_count'] == 100
  for r in two:
    assert (r['train'], r['eval_count'], r['eval_label_sum']) == (
        one['train'], 100, one['eval_label_sum'])
