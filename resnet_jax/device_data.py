"""Batches on the devices, ready for the train and eval steps.

Datasets that fit in memory are copied to every device once, as uint8; a
train batch is then a gather by a (global, sharded) index array inside a
jitted function, so per step the host ships only `batch_size` integers and
never starves the accelerator. Large datasets (ImageNet) stream through
tf.data on each process, and a background thread assembles the global
batches and puts them on the devices ahead of the step. Either way the order
of examples is a pure function of (seed, epoch), and `train_batches(step)`
continues exactly where an uninterrupted run would be.
"""

import collections
import dataclasses
import functools
import threading
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from resnet_jax import input_pipeline, preprocess, sharding, streaming
from resnet_jax.errors import UserError


@dataclasses.dataclass
class InMemoryData:
  """A dataset resident on the devices, with index-driven batches."""
  info: input_pipeline.DatasetInfo
  mesh: Mesh
  train_images: jax.Array
  train_labels: jax.Array
  eval_images: jax.Array
  eval_labels: jax.Array

  def __post_init__(self):
    out = sharding.batch_sharded(self.mesh)
    self._gather = jax.jit(preprocess.gather, out_shardings=(out, out))

  def _indices(self, indices: np.ndarray) -> jax.Array:
    return sharding.global_array_from_host(
        self.mesh, np.asarray(indices, np.int32), P(sharding.DATA_AXIS))

  def train_batches(self, start_step: int, batch_size: int,
                    seed: int) -> Iterator[dict[str, jax.Array]]:
    """Endless train batches from global step `start_step` on."""
    for _, _, indices in input_pipeline.train_index_stream(
        self.info.num_train, batch_size, seed, start_step=start_step):
      image, label = self._gather(self.train_images, self.train_labels,
                                  self._indices(indices))
      yield {'image': image, 'label': label}

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, jax.Array]]:
    for indices, mask in input_pipeline.eval_batches(self.info.num_eval,
                                                     batch_size):
      image, label = self._gather(self.eval_images, self.eval_labels,
                                  self._indices(indices))
      yield {'image': image, 'label': label,
             'mask': sharding.global_array_from_host(
                 self.mesh, mask.astype(np.int32), P(sharding.DATA_AXIS))}


@dataclasses.dataclass
class StreamingData:
  """A dataset read through tf.data, each process reading its own share."""
  info: input_pipeline.DatasetInfo
  mesh: Mesh
  config: Any
  image_size: int

  def _stream(self, split: str, batch_size: int, train: bool, epoch: int):
    return streaming.streaming_dataset(
        self.info.name, split, batch_size_per_process=batch_size //
        jax.process_count(), image_size=self.image_size, train=train,
        seed=self.config.seed, epoch=epoch,
        data_dir=self.config.tfds_data_dir or None,
        manual_dir=self.config.tfds_manual_dir or None)

  def train_batches(self, start_step: int, batch_size: int,
                    seed: int) -> Iterator[dict[str, jax.Array]]:
    del seed  # the stream is seeded from the config
    steps = input_pipeline.steps_per_epoch(self.info.num_train, batch_size)
    epoch, offset = divmod(start_step, steps)

    def host_batches():
      e, skip = epoch, offset
      while True:
        for i, batch in enumerate(self._stream('train', batch_size, True, e)):
          if i >= steps:
            break
          if i >= skip:  # resuming: the epoch's order is fixed, skip ahead
            yield batch
        e, skip = e + 1, 0

    return _prefetch_to_device(self.mesh, host_batches())

  def __post_init__(self):
    # Once, before any prefetch thread opens a stream.
    self.eval_split = streaming.eval_split_name(input_pipeline.tfds_builder(
        self.info.name, self.config.tfds_data_dir or None))

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, jax.Array]]:
    return _prefetch_to_device(
        self.mesh, self._stream(self.eval_split, batch_size, False, 0))


def _prefetch_to_device(mesh: Mesh, batches: Iterator[dict[str, np.ndarray]],
                        size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Global device batches, assembled `size` steps ahead in a thread."""
  queue: collections.deque = collections.deque()
  ready = threading.Semaphore(0)
  space = threading.Semaphore(size)
  done = object()

  def produce():
    try:
      for batch in batches:
        space.acquire()
        queue.append(sharding.global_batch_from_local(mesh, batch))
        ready.release()
    except BaseException as e:  # pylint: disable=broad-except
      queue.append(e)
      ready.release()
      return
    queue.append(done)
    ready.release()

  threading.Thread(target=produce, daemon=True).start()
  while True:
    ready.acquire()
    item = queue.popleft()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    space.release()
    yield item


def load(config: Any, mesh: Mesh, image_size: int = 0
         ) -> InMemoryData | StreamingData:
  """Reads the dataset named in the config and places it on the devices."""
  if streaming.is_streaming(config.dataset, config.tfds_data_dir or None):
    info = streaming.streaming_info(config.dataset,
                                    data_dir=config.tfds_data_dir or None)
    if not image_size:
      raise UserError(f'{config.dataset} has images of varying size; set '
                      '--config.image_size (e.g. 224)')
    return StreamingData(info, mesh, config, image_size)
  info, train, test = input_pipeline.load_in_memory(
      config.dataset, data_dir=config.tfds_data_dir or None,
      manual_dir=config.tfds_manual_dir or None,
      validation_examples=config.validation_examples)
  put = functools.partial(sharding.global_array_from_host, mesh, spec=P())
  return InMemoryData(info, mesh, put(train.images), put(train.labels),
                      put(test.images), put(test.labels))


def make_preprocess(config: Any, info: input_pipeline.DatasetInfo,
                    image_size: int, dtype: Any, train: bool):
  """The on-device preprocessing closure for the train or eval step."""
  if info.name not in preprocess.DATASET_STATS:
    raise UserError(f'no normalisation statistics for dataset {info.name!r}; '
                    'add them to resnet_jax.preprocess.DATASET_STATS')
  mean, std = preprocess.DATASET_STATS[info.name]
  augment = preprocess.augment_config_from(config) if train else None
  return functools.partial(preprocess.preprocess_batch, image_size=image_size,
                           mean=mean, std=std, augment=augment, dtype=dtype)
