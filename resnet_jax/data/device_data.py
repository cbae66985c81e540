"""Batches on the devices, ready for the train and eval steps.

Both kinds of dataset share one interface, `Data`: what a run trains on
(`spec`, `num_train`), its named evaluation sets (`eval_sizes`), and global,
sharded batches from any step on (`train_batches`) or of a named set
(`eval_batches`). A batch is {'image': uint8 NHWC, 'label': int32} (plus
'mask' for evaluation), preprocessed inside the step.

In memory (`InMemoryData`): the dataset is copied to every device once, as
uint8; a train batch is a gather by a (global, sharded) index array inside a
jitted function, so per step the host ships only `batch_size` integers and
never starves the accelerator. Streamed (`StreamingData`, ImageNet, or any
dataset with data.pipeline='stream'): Grain over ArrayRecord files on each
process, and a background thread assembles the global batches and puts them
on the devices ahead of the step. Either way the order of examples
is a pure function of (seed, epoch), and `train_batches(step)` continues
exactly where an uninterrupted run would be.
"""

import abc
import collections
import functools
import threading
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from resnet_jax.data import (datasets, in_memory, order, preprocess,
                             streaming)
from resnet_jax import sharding

Batch = dict[str, jax.Array]


class Data(abc.ABC):
  """A run's dataset on the devices: train batches and named eval sets."""

  def __init__(self, spec: datasets.DatasetSpec, mesh: Mesh, num_train: int,
               eval_sizes: dict[str, int], batch_size: int,
               eval_batch_size: int, seed: int):
    self.spec = spec
    self.mesh = mesh
    self.num_train = num_train
    self.eval_sizes = eval_sizes  # ordered: the selecting split first
    self.batch_size = batch_size
    self.eval_batch_size = eval_batch_size
    self.seed = seed

  @property
  def eval_splits(self) -> tuple[str, ...]:
    return tuple(self.eval_sizes)

  @abc.abstractmethod
  def train_batches(self, start_step: int) -> Iterator[Batch]:
    """Endless train batches from global step `start_step` on."""

  @abc.abstractmethod
  def eval_batches(self, split: str) -> Iterator[Batch]:
    """Every example of `split` once, in padded batches with a 'mask'."""


class InMemoryData(Data):
  """A dataset resident on the devices, with index-driven batches."""

  def __init__(self, spec: datasets.DatasetSpec, mesh: Mesh,
               splits: in_memory.InMemorySplits, batch_size: int,
               eval_batch_size: int, seed: int):
    super().__init__(spec, mesh, len(splits.train),
                     {k: len(v) for k, v in splits.evals.items()}, batch_size,
                     eval_batch_size, seed)
    put = functools.partial(sharding.global_array_from_host, mesh, spec=P())
    self._train = (put(splits.train.images), put(splits.train.labels))
    self._evals = {k: (put(v.images), put(v.labels))
                   for k, v in splits.evals.items()}
    out = sharding.batch_sharded(mesh)
    self._gather = jax.jit(preprocess.gather, out_shardings=(out, out))

  def _sharded(self, values: np.ndarray) -> jax.Array:
    return sharding.global_array_from_host(self.mesh, values,
                                           P(sharding.DATA_AXIS))

  def _batch(self, arrays: tuple[jax.Array, jax.Array],
             indices: np.ndarray) -> Batch:
    """The examples at `indices` of resident (images, labels), sharded."""
    image, label = self._gather(*arrays, self._sharded(
        indices.astype(np.int32)))
    return {'image': image, 'label': label}

  def train_batches(self, start_step: int) -> Iterator[Batch]:
    for indices in order.train_index_stream(
        self.num_train, self.batch_size, self.seed, start_step=start_step):
      yield self._batch(self._train, indices)

  def eval_batches(self, split: str) -> Iterator[Batch]:
    for indices, mask in order.eval_batches(self.eval_sizes[split],
                                            self.eval_batch_size):
      yield {**self._batch(self._evals[split], indices),
             'mask': self._sharded(mask)}


class StreamingData(Data):
  """A dataset streamed from ArrayRecord files by Grain (streaming.py): each
  process decodes its slice of every global batch, and a background thread
  assembles the global batches on the devices ahead of the step."""

  def __init__(self, spec: datasets.DatasetSpec, mesh: Mesh, data_config: Any,
               image_size: int, seed: int):
    found = streaming.prepared(spec, data_config.tfds_data_dir,
                               data_config.tfds_manual_dir)
    self._stream = streaming.Stream(
        spec, found, image_size=image_size, seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        workers=data_config.stream_workers,
        flip=bool(data_config.augment.flip))
    workers = data_config.stream_workers
    # Processes decoding: the workers, else this process's threads.
    self.decoding_processes = (streaming.default_workers() if workers is None
                               else workers) or 1
    sizes = self._stream.sizes
    super().__init__(spec, mesh, sizes['train'],
                     {k: sizes[k] for k in spec.eval_splits},
                     data_config.batch_size, data_config.eval_batch_size, seed)

  def train_batches(self, start_step: int) -> Iterator[Batch]:
    # Batch k is a pure function of (seed, k): a resumed run reads nothing
    # before its step.
    return _prefetch_to_device(
        self.mesh, self._stream.train(self.batch_size, start_step))

  def eval_batches(self, split: str) -> Iterator[Batch]:
    return _prefetch_to_device(
        self.mesh, self._stream.evaluation(split, self.eval_batch_size))


def _prefetch_to_device(mesh: Mesh, batches: Iterator[dict[str, np.ndarray]],
                        size: int = 2) -> Iterator[Batch]:
  """Global device batches, assembled `size` steps ahead in a thread.

  Closing the returned generator (or dropping it) stops the thread, which
  then closes `batches` (Grain's iterator: its worker processes and shared
  memory).
  """
  queue: collections.deque = collections.deque()
  ready = threading.Semaphore(0)
  space = threading.Semaphore(size)
  stop = threading.Event()
  done = object()

  def produce():
    try:
      for batch in batches:
        while not space.acquire(timeout=0.2):
          if stop.is_set():
            return
        if stop.is_set():
          return
        queue.append(sharding.global_batch_from_local(mesh, batch))
        ready.release()
    except BaseException as e:  # pylint: disable=broad-except
      queue.append(e)
      ready.release()
      return
    finally:
      close = getattr(batches, 'close', None)
      if close is not None:
        close()
    queue.append(done)
    ready.release()

  threading.Thread(target=produce, daemon=True).start()
  try:
    while True:
      ready.acquire()
      item = queue.popleft()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      space.release()
      yield item
  finally:
    stop.set()


def load(config: Any, mesh: Mesh) -> Data:
  """The run's dataset (config.data), on the devices."""
  d = config.data
  spec = datasets.get(d.dataset)
  if datasets.pipeline(d.dataset, d.pipeline) == 'stream':
    return StreamingData(spec, mesh, d, datasets.image_size(spec, d.image_size),
                         config.run.seed)
  splits = in_memory.load_in_memory(
      spec, data_dir=d.tfds_data_dir, manual_dir=d.tfds_manual_dir,
      validation_examples=d.validation_examples)
  return InMemoryData(spec, mesh, splits, d.batch_size, d.eval_batch_size,
                      config.run.seed)
