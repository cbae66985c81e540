"""Streamed datasets: Grain over TFDS's ArrayRecord files, without TensorFlow.

Used when a run's data pipeline is 'stream' (ImageNet always; Fashion-MNIST,
MNIST and CIFAR when `--config.data.pipeline=stream`).

Batch k is a pure function of (seed, k), so a resumed run starts at step k
and reads nothing before it:
  * the examples of each batch, and the generator of each example's
    augmentation (the Inception crop and flip of ImageNet), are
    `order.py`'s, as in memory; process p of P takes its contiguous slice
    of B/P rows of each global batch.
Grain maps step numbers to batches (`BatchLoader`, random access into the
ArrayRecord files) and decodes them in worker processes
(`data.stream_workers`, default one per core the process may use, less
one for the training loop); its output order does not depend on the number
of workers.

Evaluation batches are `order.eval_batch`'s, padded rows zeros with mask
False, each process taking its slice: every process yields the same number
of batches and every example is counted once.

Datasets of one image size are decoded as stored and augmented on the
device like in-memory data; ImageNet is cropped on the host
(`host_decode.py`).

This module imports no JAX, TensorFlow or TFDS at import time: Grain's
workers import it (Grain itself imports JAX there, but no worker starts a
JAX backend; preparing a dataset imports TFDS on demand).
"""

import dataclasses
import functools
import importlib.util
import os
import threading
import time
from typing import Iterator

import numpy as np

from resnet_jax.data import datasets, order, records, tfds_io
from resnet_jax.data.host_decode import (centre_window, crop_resize, decode,
                                         inception_window)
from resnet_jax.durations import steps_per_epoch
from resnet_jax.errors import UserError

# ------------------------------------------------------------ the batches


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a (worker) process needs to make batches of one split."""
  files: tuple[str, ...]
  image_key: str
  label_key: str
  num_examples: int
  batch_size: int         # global
  process_index: int
  process_count: int
  seed: int
  train: bool
  channels: int
  out_size: int | None    # None: decode as stored (one size per dataset)
  crop_padding: int = 0   # evaluation centre crop, with out_size
  flip: bool = True       # training crops, with out_size: random flips

  @property
  def local_batch(self) -> int:
    return self.batch_size // self.process_count

  @property
  def eval_batches(self) -> int:
    return order.eval_batch_count(self.num_examples, self.batch_size)


class BatchLoader:
  """step (train) or batch number (eval) -> this process's uint8 batch.

  Picklable: Grain sends it to its workers, each of which opens the files
  on first use.
  """

  def __init__(self, plan: Plan):
    self.plan = plan
    self._source = None
    self._perm: tuple[int, np.ndarray] | None = None

  def __getstate__(self):
    return {'plan': self.plan, '_source': None, '_perm': None}

  def _read(self, indices: list[int]) -> list[bytes]:
    if self._source is None:
      self._source = records.open_source(list(self.plan.files))
    if len(indices) > 1:
      try:
        return self._source.__getitems__(indices)  # parallel reads
      except ValueError:  # array_record: no spare core for its reader pool
        pass
    return [self._source[i] for i in indices]

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm is None or self._perm[0] != epoch:
      self._perm = (epoch, order.epoch_permutation(
          self.plan.num_examples, self.plan.seed, epoch))
    return self._perm[1]

  def rows(self, k: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(epoch, positions in the epoch's order, example indices, mask) of
    this process's rows of batch k (`order.py`); evaluation's padding rows
    have index 0 and mask False."""
    p = self.plan
    mine = slice(p.process_index * p.local_batch,
                 (p.process_index + 1) * p.local_batch)
    if p.train:
      epoch, positions = order.train_positions(k, p.num_examples,
                                               p.batch_size)
      positions = positions[mine]
      return (epoch, positions, self._permutation(epoch)[positions],
              np.ones(len(positions), bool))
    indices, mask = order.eval_batch(k, p.num_examples, p.batch_size)
    return 0, indices[mine], indices[mine], mask[mine]

  def _image(self, encoded: bytes, epoch: int, position: int) -> np.ndarray:
    p = self.plan
    if p.out_size is None:
      return decode(encoded, p.channels)
    if p.train:
      rng = order.example_rng(p.seed, epoch, position)
      coin = bool(rng.random() < 0.5)  # drawn before the window, always
      return crop_resize(encoded, lambda h, w: inception_window(rng, h, w),
                         p.out_size, p.channels, flip=coin and p.flip)
    return crop_resize(encoded, lambda h, w: centre_window(
        h, w, p.out_size, p.crop_padding), p.out_size, p.channels)

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    p = self.plan
    epoch, positions, indices, real = self.rows(int(k))
    rows = [int(i) for i, r in zip(indices, real) if r]
    examples = [records.parse_example(s) for s in self._read(rows)]
    images, labels = [], []
    for example, position in zip(examples, positions[real]):
      images.append(self._image(example[p.image_key][0], epoch, int(position)))
      labels.append(example[p.label_key][0])
    if images:
      image = np.stack(images)
    else:  # a batch of padding only (evaluation, several processes)
      image = np.zeros((0,) + (self._shape() or (1, 1, p.channels)), np.uint8)
    n_pad = p.local_batch - len(images)
    if n_pad:
      image = np.concatenate([image, np.zeros((n_pad,) + image.shape[1:],
                                              np.uint8)])
    label = np.zeros(p.local_batch, np.int32)
    label[:len(labels)] = labels
    batch = {'image': image, 'label': label}
    if not p.train:
      batch['mask'] = real
    return batch

  def _shape(self) -> tuple[int, int, int] | None:
    p = self.plan
    if p.out_size is not None:
      return (p.out_size, p.out_size, p.channels)
    # One size per dataset: any example says which.
    first = records.parse_example(self._read([0])[0])[p.image_key][0]
    return decode(first, p.channels).shape


MAX_DEFAULT_WORKERS = 32  # ~15,000 ImageNet images/s at ~470 per core


def default_workers() -> int:
  """One decoding process per core this process may use, less one for the
  training loop, at most MAX_DEFAULT_WORKERS (each holds its own Python and
  buffers); 0 (decode in this process's threads) on a single core."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 1
  return min(max(cores - 1, 0), MAX_DEFAULT_WORKERS)


def _exit_with_parent(parent: int, worker_index: int, worker_count: int
                      ) -> None:
  """In each Grain worker: exit as soon as the training process `parent` is
  gone (killed with SIGKILL, it cannot stop its workers, which would live
  on holding its output pipes; a worker may also still be starting then)."""
  del worker_index, worker_count
  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True).start()


def iterate(plan: Plan, start: int, stop: int, workers: int | None = None
            ) -> Iterator[dict[str, np.ndarray]]:
  """Batches start, start+1, ..., stop-1 of `plan`, decoded by Grain.

  Nothing before `start` is read. `workers` processes decode (None: as
  `default_workers`); 0 decodes in threads of this process.
  """
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if workers and not flags.FLAGS.is_parsed():
    # Grain's workers read its absl flags; outside an absl app (a library
    # call, a test) their defaults are the values.
    flags.FLAGS.mark_as_parsed()
  workers = default_workers() if workers is None else workers
  ds = grain.MapDataset.range(start, stop).map(BatchLoader(plan))
  if workers > 0:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                              prefetch_buffer_size=1))
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=2),
                        worker_init_fn=functools.partial(_exit_with_parent,
                                                         os.getpid()))
  else:
    threads = max(1, min(4, os.cpu_count() or 1))
    it = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=threads))
  return iter(it)


# ------------------------------------------------ the dataset on the disk


def _tfds_splits(spec: datasets.DatasetSpec) -> tuple[str, ...]:
  return (spec.train_split, *spec.eval_splits.values())


def prepared(spec: datasets.DatasetSpec, data_dir: str | None,
             manual_dir: str | None = None, *, prepare: bool = True
             ) -> records.PreparedDataset:
  """The dataset's ArrayRecord files, found without TensorFlow; if absent
  (and `prepare`), prepared with TFDS first (that needs TensorFlow)."""
  data_dir = data_dir or tfds_io.default_data_dir()
  found = records.find(spec.name, data_dir, _tfds_splits(spec))
  if found is None and prepare:
    if importlib.util.find_spec('tensorflow_datasets') is not None:
      tfds_io.prepare_array_record(spec.name, data_dir, manual_dir)
      found = records.find(spec.name, data_dir, _tfds_splits(spec))
  if found is None:
    raise UserError(
        f'{spec.name} is not prepared as ArrayRecord in {data_dir}; prepare '
        f'it where TensorFlow and TFDS are installed with `python -m '
        f'resnet_jax.tools.prepare_data --dataset={spec.name} '
        f'--pipeline=stream '
        f'--data_dir={data_dir}` (offline: --manual_dir=DIR)')
  return found


def split_size(found: records.PreparedDataset, tfds_split: str) -> int:
  n = found.split_sizes.get(tfds_split)
  if not n:
    n = len(records.open_source(found.files(tfds_split)))
  return n


class Stream:
  """A prepared dataset's train and evaluation batches for this process."""

  def __init__(self, spec: datasets.DatasetSpec, found: records.PreparedDataset,
               *, image_size: int, seed: int, process_index: int,
               process_count: int, workers: int | None = None,
               flip: bool = True):
    self.spec, self.found, self.workers = spec, found, workers
    self.sizes = {'train': split_size(found, spec.train_split)}
    self.sizes.update({k: split_size(found, v)
                       for k, v in spec.eval_splits.items()})
    # Decoded as stored (None), or cropped here to image_size.
    out_size = image_size if spec.cropped_on_host else None
    self._common = dict(image_key=found.image_key, label_key=found.label_key,
                        process_index=process_index,
                        process_count=process_count, seed=seed,
                        channels=spec.channels, out_size=out_size,
                        flip=flip)

  def plan(self, split: str, batch_size: int) -> Plan:
    train = split == 'train'
    tfds_split = self.spec.train_split if train else self.spec.eval_splits[
        split]
    # Whole per-process slices: sharding.check_batch_size made the batch a
    # multiple of the device count, and every process has as many devices.
    assert batch_size % self._common['process_count'] == 0, batch_size
    return Plan(tuple(self.found.files(tfds_split)),
                num_examples=self.sizes[split], batch_size=batch_size,
                train=train, crop_padding=self.spec.eval_crop_padding or 0,
                **self._common)

  def train(self, batch_size: int, start_step: int
            ) -> Iterator[dict[str, np.ndarray]]:
    plan = self.plan('train', batch_size)
    steps_per_epoch(plan.num_examples, batch_size)  # one line if too few
    return iterate(plan, start_step, start_step + (1 << 40), self.workers)

  def evaluation(self, split: str, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    plan = self.plan(split, batch_size)
    return iterate(plan, 0, plan.eval_batches, self.workers)


def label_names(found: records.PreparedDataset) -> list[str] | None:
  return records.label_names(found.folder, found.label_key)

