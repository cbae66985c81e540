"""On-device preprocessing: shapes, normalisation, augmentations, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import config
from resnet_jax.data import datasets, preprocess as pp

_FASHION_MNIST = datasets.get('fashion_mnist')
MEAN, STD = _FASHION_MNIST.mean, _FASHION_MNIST.std


def _images(n=8, h=28, w=28, c=1, seed=0):
  return jnp.asarray(
      np.random.default_rng(seed).integers(0, 256, (n, h, w, c), np.uint8))


def _run(images, rng, augment, image_size=28, mean=MEAN, std=STD, **kw):
  fn = jax.jit(lambda x, r: pp.preprocess_batch(
      x, r, image_size=image_size, mean=mean, std=std, augment=augment, **kw))
  return fn(images, rng)


def test_normalisation_values_and_identity_without_augment():
  images = _images()
  out = _run(images, jax.random.key(0), None)
  assert out.shape == (8, 28, 28, 1) and out.dtype == jnp.float32
  want = (np.asarray(images, np.float32) / 255 - MEAN[0]) / STD[0]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # augment=None ignores the rng; an AugmentConfig without rng is identity too.
  np.testing.assert_array_equal(out, _run(images, None, None))
  np.testing.assert_array_equal(
      out, _run(images, None, pp.AugmentConfig(crop_padding=4, flip=True)))


def test_per_channel_stats_and_dtype():
  cifar10 = datasets.get('cifar10')
  mean, std = cifar10.mean, cifar10.std
  images = jnp.full((2, 32, 32, 3), 255, jnp.uint8)
  out = _run(images, None, None, image_size=32, mean=mean, std=std,
             dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  want = (1 - np.asarray(mean)) / np.asarray(std)
  np.testing.assert_allclose(np.asarray(out[0, 0, 0], np.float32), want,
                             rtol=1e-2)
  with pytest.raises(ValueError, match='mean/std'):
    _run(images, None, None, image_size=32, mean=(0.5, 0.5), std=(1, 1))


def test_resize_28_to_96():
  images = _images(n=2)
  out = _run(images, None, None, image_size=96)
  assert out.shape == (2, 96, 96, 1)
  ref = jax.image.resize(
      (np.asarray(images, np.float32) / 255 - MEAN[0]) / STD[0],
      (2, 96, 96, 1), 'bilinear')
  np.testing.assert_allclose(out, ref, atol=1e-4)
  # A constant image stays constant through the resize.
  flat = _run(jnp.full((1, 28, 28, 1), 100, jnp.uint8), None, None,
              image_size=96)
  np.testing.assert_allclose(flat, (100 / 255 - MEAN[0]) / STD[0], atol=1e-5)


def test_crop_is_a_zero_padded_shift_and_reproducible():
  images = _images(n=64)
  aug = pp.AugmentConfig(crop_padding=4)
  base = np.asarray(_run(images, None, None))
  a = np.asarray(_run(images, jax.random.key(1), aug))
  np.testing.assert_array_equal(a, _run(images, jax.random.key(1), aug))
  assert not np.array_equal(a, _run(images, jax.random.key(2), aug))
  zero = np.asarray(_run(jnp.zeros((1, 28, 28, 1), jnp.uint8), None,
                         None))[0, 0, 0, 0]
  padded = np.pad(base, ((0, 0), (4, 4), (4, 4), (0, 0)), constant_values=zero)
  shifts = []
  for i in range(len(a)):  # each output is exactly one window of the padding
    hits = [(dy, dx) for dy in range(9) for dx in range(9)
            if np.array_equal(a[i], padded[i, dy:dy + 28, dx:dx + 28])]
    assert hits, f'example {i} is not a crop of its padded image'
    shifts.append(hits[0])
  assert len(set(shifts)) > 10  # per-example offsets, not one for the batch


def test_flip_mirrors_about_half_of_the_batch():
  images = _images(n=200)
  base = np.asarray(_run(images, None, None))
  out = np.asarray(_run(images, jax.random.key(3),
                        pp.AugmentConfig(flip=True)))
  flipped = np.array([np.array_equal(o, b[:, ::-1]) for o, b in zip(out, base)])
  same = np.array([np.array_equal(o, b) for o, b in zip(out, base)])
  assert np.all(flipped | same)
  assert 60 < flipped.sum() < 140


def test_random_erasing_rectangles():
  images = jnp.zeros((400, 28, 28, 1), jnp.uint8)
  aug = pp.AugmentConfig(random_erasing=0.5)
  out = np.asarray(_run(images, jax.random.key(4), aug))
  zero = np.asarray(_run(images, None, None))[0, 0, 0, 0]
  changed = out != zero  # noise pixels (almost surely != exactly 0)
  erased = changed.any(axis=(1, 2, 3))
  assert 140 < erased.sum() < 260  # probability 0.5
  for img in changed[erased][:50]:  # the erased region is one rectangle
    rows, cols = np.where(img[..., 0].any(1))[0], np.where(img[..., 0].any(0))[0]
    box = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1, 0]
    assert box.mean() > 0.95
    assert 0.02 * 784 * 0.5 <= box.size <= 0.4 * 784 * 1.5
  np.testing.assert_array_equal(out, _run(images, jax.random.key(4), aug))


def _augment_section(**values):
  section = config.base_config().data.augment
  section.update(values)
  return section


def test_augment_config_from_the_data_augment_section():
  # The schema's default recipe flips and nothing else.
  assert pp.augment_config_from(config.base_config().data.augment) == (
      pp.AugmentConfig(flip=True))
  assert pp.augment_config_from(_augment_section(flip=False)) is None
  assert pp.augment_config_from(_augment_section(crop_padding=4)) == (
      pp.AugmentConfig(crop_padding=4, flip=True))
  erasing = pp.augment_config_from(
      _augment_section(flip=False, random_erasing=0.25))
  assert erasing == pp.AugmentConfig(random_erasing=0.25)
  # Every field of the section is read: a recipe's augmentation reaches the
  # step.
  fields = {k: v for k, v in config.FIELDS.items()
            if k.startswith('data.augment.')}
  assert set(fields) == {'data.augment.crop_padding', 'data.augment.flip',
                         'data.augment.random_erasing'}


def test_gather():
  images = jnp.arange(10 * 2 * 2 * 1, dtype=jnp.uint8).reshape(10, 2, 2, 1)
  labels = jnp.arange(10, dtype=jnp.int32) * 3
  idx = jnp.array([7, 0, 7])
  bi, bl = jax.jit(pp.gather)(images, labels, idx)
  np.testing.assert_array_equal(bi, np.asarray(images)[[7, 0, 7]])
  np.testing.assert_array_equal(bl, [21, 0, 21])
