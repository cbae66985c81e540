"""Batches on the devices, ready for the train and eval steps.

Datasets that fit in memory are copied to every device once, as uint8; a
train batch is then a gather by a (global, sharded) index array inside a
jitted function, so per step the host ships only `batch_size` integers and
never starves the accelerator. The order of examples is the input
pipeline's pure function of (seed, epoch).
"""

import dataclasses
import functools
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from resnet_jax import input_pipeline, preprocess, sharding
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

  def train_batch(self, indices: np.ndarray) -> dict[str, jax.Array]:
    image, label = self._gather(self.train_images, self.train_labels,
                                self._indices(indices))
    return {'image': image, 'label': label}

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, jax.Array]]:
    for indices, mask in input_pipeline.eval_batches(self.info.num_eval,
                                                     batch_size):
      image, label = self._gather(self.eval_images, self.eval_labels,
                                  self._indices(indices))
      yield {'image': image, 'label': label,
             'mask': sharding.global_array_from_host(
                 self.mesh, mask.astype(np.int32), P(sharding.DATA_AXIS))}


def load(config: Any, mesh: Mesh) -> InMemoryData:
  """Reads the dataset named in the config and places it on the devices."""
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
