"""The order of examples, for both pipelines: which examples make each batch.

A run's data order is a pure function of (seed, step), so a resumed run
continues exactly where an uninterrupted one would be and reads nothing
before its step:

  * Training: epoch e orders the train split by `epoch_permutation(seed, e)`;
    global step k is batch k mod steps_per_epoch of that order (the
    incomplete last batch of each epoch is dropped: `durations`), and a
    process of several takes its contiguous slice of the batch rows.
  * Augmentation on the host (the streamed ImageNet crops) draws, per
    example, from `example_rng(seed, epoch, position)`: the same whichever
    process or worker reads the example.
  * Evaluation: batch k is positions [k*B, (k+1)*B) of the split in its
    stored order, all batches of the same size B (one compiled shape); rows
    past the end are padding, index 0 with mask False, so every example is
    counted exactly once (`eval_batch`).

NumPy only: the streamed pipeline's decoding workers import this module.
"""

from typing import Iterator

import numpy as np

from resnet_jax.durations import steps_per_epoch


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """A permutation of range(num_examples), a pure function of (seed, epoch)."""
  # SeedSequence mixes both numbers, so nearby seeds/epochs give unrelated
  # streams; every process computes the same permutation.
  rng = np.random.Generator(
      np.random.PCG64(np.random.SeedSequence([seed % (1 << 64), epoch])))
  return rng.permutation(num_examples).astype(np.int64)


def train_positions(step: int, num_examples: int, batch_size: int
                    ) -> tuple[int, np.ndarray]:
  """(epoch, positions in that epoch's permutation) of global train step
  `step`'s `batch_size` examples."""
  epoch, k = divmod(step, steps_per_epoch(num_examples, batch_size))
  return epoch, np.arange(k * batch_size, (k + 1) * batch_size)


def train_batch_indices(num_examples: int, batch_size: int, seed: int,
                        epoch: int) -> np.ndarray:
  """(steps_per_epoch, batch_size) example indices of one epoch: row k is
  `epoch_permutation(...)[train_positions(step)[1]]` for its step k."""
  steps = steps_per_epoch(num_examples, batch_size)
  perm = epoch_permutation(num_examples, seed, epoch)
  return perm[:steps * batch_size].reshape(steps, batch_size)


def train_index_stream(num_examples: int, batch_size: int, seed: int, *,
                       start_step: int = 0) -> Iterator[np.ndarray]:
  """Endless batches of example indices from global step `start_step` on."""
  epoch, offset = divmod(start_step, steps_per_epoch(num_examples, batch_size))
  while True:
    yield from train_batch_indices(num_examples, batch_size, seed,
                                   epoch)[offset:]
    epoch, offset = epoch + 1, 0


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The host augmentation generator of the example at `position` of
  `epoch`'s order: the same whichever process or worker reads it."""
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
      [seed % (1 << 64), epoch, position, 0x5EED])))


def eval_batch_count(num_examples: int, batch_size: int) -> int:
  """Batches of an evaluation: ceil(num_examples / batch_size)."""
  return -(-num_examples // batch_size)


def eval_batch(k: int, num_examples: int, batch_size: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """(indices, mask) of evaluation batch k: int64 example indices, and a
  bool mask that is False for the padding rows (index 0) past the end."""
  positions = np.arange(k * batch_size, (k + 1) * batch_size)
  mask = positions < num_examples
  return np.where(mask, positions, 0), mask


def eval_batches(num_examples: int, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`eval_batch` for every batch of an evaluation, in order."""
  for k in range(eval_batch_count(num_examples, batch_size)):
    yield eval_batch(k, num_examples, batch_size)
