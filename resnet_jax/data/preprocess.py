"""On-device preprocessing: uint8 NHWC batch -> normalised, augmented floats.

Everything here is pure jnp and jittable, so it fuses into the train step and
the host only ships uint8 (4x less than float32). Augmentations draw one set
of random numbers per example from a single rng, so a batch is reproducible
given (rng, images) whatever the device layout.

Order: random crop (zero padding) -> horizontal flip -> random erasing, all at
the native resolution where they are cheapest, then resize and normalise.
"""

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from resnet_jax.data import datasets


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Which train-time augmentations to apply; all off by default."""
  crop_padding: int = 0  # Random crop of the native size after zero padding.
  flip: bool = False  # Random horizontal flip with probability 1/2.
  random_erasing: float = 0.0  # Probability of erasing one rectangle.
  # Zhong et al. 2017 (Random Erasing): area fraction and aspect-ratio ranges;
  # the rectangle is filled with uniform random pixel values.
  erasing_area: tuple[float, float] = (0.02, 0.4)
  erasing_aspect: tuple[float, float] = (0.3, 1 / 0.3)

  @property
  def active(self) -> bool:
    return self.crop_padding > 0 or self.flip or self.random_erasing > 0


def augment_config_from(augment: Any, flip_on_host: bool = False
                        ) -> AugmentConfig | None:
  """The `data.augment` section of a run's config as the device's
  AugmentConfig (without the flip when the host makes it); None when
  nothing is switched on."""
  aug = AugmentConfig(crop_padding=int(augment.crop_padding),
                      flip=bool(augment.flip) and not flip_on_host,
                      random_erasing=float(augment.random_erasing))
  return aug if aug.active else None


def _random_crop(images: jax.Array, rng: jax.Array, pad: int) -> jax.Array:
  """Per-example random crop of the native size from the zero-padded image."""
  n, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(rng, (n, 2), 0, 2 * pad + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                 (h, w, image.shape[-1]))

  return jax.vmap(crop)(padded, offsets)


def _random_flip(images: jax.Array, rng: jax.Array) -> jax.Array:
  flip = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def _random_erasing(images: jax.Array, rng: jax.Array,
                    aug: AugmentConfig) -> jax.Array:
  """Random erasing (Zhong et al.) on floats in 0-1 pixel units.

  Each example, with probability `aug.random_erasing`, gets one rectangle of
  area fraction ~U(erasing_area) and log-uniform aspect ratio filled with
  uniform noise. Instead of Zhong's rejection loop (not vectorisable) the
  sides are clipped to the image, which only matters for extreme draws.
  """
  n, h, w, _ = images.shape
  k_apply, k_area, k_aspect, k_y, k_x, k_fill = jax.random.split(rng, 6)
  apply = jax.random.bernoulli(k_apply, aug.random_erasing, (n,))
  area = jax.random.uniform(k_area, (n,), minval=aug.erasing_area[0],
                            maxval=aug.erasing_area[1]) * (h * w)
  log_aspect = jax.random.uniform(
      k_aspect, (n,), minval=math.log(aug.erasing_aspect[0]),
      maxval=math.log(aug.erasing_aspect[1]))
  aspect = jnp.exp(log_aspect)
  eh = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, h).astype(jnp.int32)
  ew = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, w).astype(jnp.int32)
  y0 = jnp.floor(jax.random.uniform(k_y, (n,)) * (h - eh + 1)).astype(jnp.int32)
  x0 = jnp.floor(jax.random.uniform(k_x, (n,)) * (w - ew + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  in_rows = (rows >= y0[:, None]) & (rows < (y0 + eh)[:, None])  # (n, h)
  in_cols = (cols >= x0[:, None]) & (cols < (x0 + ew)[:, None])  # (n, w)
  mask = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]
  noise = jax.random.uniform(k_fill, images.shape, images.dtype)
  return jnp.where(mask[..., None], noise, images)


def preprocess_batch(images_u8: jax.Array, rng: jax.Array | None, *,
                     image_size: int, mean: Sequence[float],
                     std: Sequence[float], augment: AugmentConfig | None,
                     dtype=jnp.float32) -> jax.Array:
  """uint8 (N, H, W, C) -> `dtype` (N, image_size, image_size, C).

  Augments only when both `augment` and `rng` are given. Resizes bilinearly
  when (H, W) differs from image_size (no work when it matches), then
  normalises per channel with `mean`/`std` in 0-1 pixel units.
  """
  if images_u8.ndim != 4:
    raise ValueError(f'expected NHWC images, got shape {images_u8.shape}')
  n, h, w, c = images_u8.shape
  if len(mean) not in (1, c) or len(std) not in (1, c):
    raise ValueError(f'mean/std have {len(mean)}/{len(std)} entries for '
                     f'{c}-channel images')
  images = images_u8
  if augment is not None and rng is not None:
    k_crop, k_flip, k_erase = jax.random.split(rng, 3)
    # Crop and flip move uint8 pixels (cheaper than floats).
    if augment.crop_padding > 0:
      images = _random_crop(images, k_crop, augment.crop_padding)
    if augment.flip:
      images = _random_flip(images, k_flip)
    images = images.astype(jnp.float32) * (1.0 / 255.0)
    if augment.random_erasing > 0:
      images = _random_erasing(images, k_erase, augment)
  else:
    images = images.astype(jnp.float32) * (1.0 / 255.0)
  if (h, w) != (image_size, image_size):
    images = jax.image.resize(images, (n, image_size, image_size, c),
                              method='bilinear')
  mean_arr = jnp.asarray(mean, jnp.float32)
  inv_std = 1.0 / jnp.asarray(std, jnp.float32)
  return ((images - mean_arr) * inv_std).astype(dtype)


def gather(images: jax.Array, labels: jax.Array,
           indices: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A batch from device-resident arrays (jit it with the wanted shardings)."""
  return jnp.take(images, indices, axis=0), jnp.take(labels, indices, axis=0)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The on-device preprocessing of a run, for training and evaluation."""
  train: Any
  eval: Any


def make_preprocess(data_config: Any, spec: datasets.DatasetSpec,
                    image_size: int, dtype: Any) -> Preprocessing:
  """Resize to image_size, normalise with the dataset's statistics and (for
  training) augment as `data_config.augment` says. Datasets of varying
  image sizes (ImageNet) are cropped and flipped on the host as they are
  decoded (`streaming.py`), so their flip is not repeated here."""
  common = dict(image_size=image_size, mean=spec.mean, std=spec.std,
                dtype=dtype)
  augment = augment_config_from(data_config.augment,
                                flip_on_host=spec.cropped_on_host)
  return Preprocessing(
      functools.partial(preprocess_batch, augment=augment, **common),
      functools.partial(preprocess_batch, augment=None, **common))
