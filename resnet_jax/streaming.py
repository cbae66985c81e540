"""tf.data streaming for datasets too large for memory (imagenet2012).

Only reads datasets whose row in `datasets.py` says storage='stream'.

Each process reads its own shard of the split, decodes and crops on the host
(Inception-style random-resized-crop + flip for train, centre crop for eval)
and yields uint8 batches; normalisation happens on the device with
`preprocess.preprocess_batch` (its resize is then a no-op). The order is a
pure function of (seed, epoch, process) where tf.data allows: seeded file and
example shuffles, stateless per-example crop/flip seeds, deterministic maps.

Eval batches are padded to full size with a 'mask', and every process yields
the same number of batches (multi-host collectives need that).
"""

from typing import Iterator

import jax
import numpy as np

from resnet_jax import datasets, tfds_io
from resnet_jax.errors import UserError

_SHUFFLE_BUFFER = 16_384


def _fold(*numbers: int) -> int:
  """One 31-bit seed from several integers (SeedSequence mixes them well)."""
  return int(np.random.SeedSequence([n % (1 << 63) for n in numbers])
             .generate_state(1)[0] >> 1)


def _decode_and_crop(tf, encoded, crop_fn):
  """Decodes `encoded` cropped to the window `crop_fn(shape)` -> (y, x, h, w).

  JPEGs decode only the window (much cheaper for ImageNet); other formats
  (PNG, GIF, BMP) decode whole, then slice.
  """

  def jpeg():
    y, x, h, w = crop_fn(tf.io.extract_jpeg_shape(encoded))
    return tf.io.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]),
                                      channels=3)

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    y, x, h, w = crop_fn(tf.shape(image))
    return image[y:y + h, x:x + w]

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _to_uint8(tf, image, size: int):
  image = tf.image.resize(image, (size, size), method='bicubic')
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _train_decode(tf, image_size: int):
  """Inception crop (area 0.08-1, aspect 3/4-4/3) + flip, stateless seeds."""

  def fn(encoded, seed):
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))

    def window(shape):
      begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
          shape, bounding_boxes=tf.constant([[[0., 0., 1., 1.]]]),
          seed=crop_seed, min_object_covered=0.1,
          aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
          max_attempts=10, use_image_if_no_bounding_boxes=True)
      return begin[0], begin[1], size[0], size[1]

    image = _decode_and_crop(tf, encoded, window)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return _to_uint8(tf, image, image_size)

  return fn


def _eval_decode(tf, image_size: int, crop_padding: int):
  """Centre crop of image_size/(image_size+crop_padding) of the shorter side."""

  def window(shape):
    h, w = shape[0], shape[1]
    frac = image_size / (image_size + crop_padding)
    crop = tf.cast(frac * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    return (h - crop + 1) // 2, (w - crop + 1) // 2, crop, crop

  def fn(encoded):
    return _to_uint8(tf, _decode_and_crop(tf, encoded, window), image_size)

  return fn


def streaming_dataset(
    spec: datasets.DatasetSpec, split: str, *, batch_size_per_process: int,
    image_size: int, train: bool, seed: int, data_dir: str | None = None,
    manual_dir: str | None = None, epoch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of uint8 batches of `split` (our name) for this process.

  Yields {'image': uint8 (B, image_size, image_size, 3), 'label': int32 (B,)}
  and, for eval, 'mask': bool (B,) marking real examples (the last batch is
  padded; processes with fewer examples get extra all-False batches).
  Train drops the incomplete last batch.
  """
  tf, tfds = tfds_io.import_tfds()
  with tfds_io.OPEN_LOCK:
    builder = tfds_io.builder(spec.name, data_dir)
    tfds_io.ensure_prepared(builder, manual_dir)
  keys = builder.info.supervised_keys
  if not keys:
    raise UserError(f'{spec.name} has no (image, label) supervised keys')
  image_key, label_key = keys
  bs = batch_size_per_process
  index, count = jax.process_index(), jax.process_count()
  fold = _fold(seed, epoch, index)
  tfds_split = spec.train_split if train else spec.eval_splits[split]

  options = tf.data.Options()
  options.deterministic = True
  read_config = tfds.ReadConfig(shuffle_seed=fold, options=options)
  # Train shards are equal (drop_remainder) so every process runs the same
  # number of steps; eval keeps every example and pads instead.
  process_split = tfds.split_for_jax_process(tfds_split, drop_remainder=train)
  with tfds_io.OPEN_LOCK:
    ds = builder.as_dataset(
        split=process_split, shuffle_files=train, read_config=read_config,
        decoders={image_key: tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))

  if train:
    ds = ds.shuffle(_SHUFFLE_BUFFER, seed=fold, reshuffle_each_iteration=False)
    decode = _train_decode(tf, image_size)
    # Per-example seeds from (fold, position): reproducible under parallelism.
    ds = ds.enumerate().map(
        lambda i, ex: {'image': decode(ex[0], tf.stack([tf.constant(
            fold, tf.int64), i])), 'label': ex[1]},
        num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(bs, drop_remainder=True)
  else:
    decode = _eval_decode(tf, image_size, spec.eval_crop_padding or 0)
    ds = ds.map(lambda image, label: {
        'image': decode(image), 'label': label,
        'mask': tf.constant(True)}, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(bs).map(lambda b: _pad_to(tf, b, bs))
    if count > 1:
      batches = eval_batches_per_process(
          split_size(builder, spec, split), count, bs)
      filler = {'image': tf.zeros((bs, image_size, image_size, 3), tf.uint8),
                'label': tf.zeros((bs,), tf.int32),
                'mask': tf.zeros((bs,), tf.bool)}
      ds = ds.concatenate(
          tf.data.Dataset.from_tensors(filler).repeat()).take(batches)
  ds = ds.with_options(options).prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds))


def split_size(builder, spec: datasets.DatasetSpec, split: str) -> int:
  """Examples of `split` (our name) as prepared, else as the table says
  (TFDS's mock data has no split metadata)."""
  tfds_split = spec.train_split if split == 'train' else spec.eval_splits[split]
  try:
    n = builder.info.splits[tfds_split].num_examples
  except (KeyError, ValueError):
    n = 0
  return n or (spec.num_train if split == 'train' else spec.eval_sizes[split])


def eval_batches_per_process(total: int, process_count: int, bs: int) -> int:
  """Batches every process yields for an eval split of `total` examples."""
  # Even splits differ by at most one example: all pad to the largest shard.
  largest_shard = -(-total // process_count)
  return -(-largest_shard // bs)


def _pad_to(tf, batch, bs: int):
  """Pads a short final batch to `bs` rows (mask False on the padding)."""
  short = bs - tf.shape(batch['label'])[0]
  return {k: tf.pad(v, [[0, short]] + [[0, 0]] * (len(v.shape) - 1))
          for k, v in batch.items()}
