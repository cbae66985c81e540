"""Decoding and cropping encoded images on the host (the streamed pipeline).

JPEGs with libjpeg-turbo through simplejpeg (scaled down in the DCT when the
crop is at least twice the output), other formats (TFDS stores the small
datasets as PNG) with Pillow; crops resized with OpenCV. The windows: the
Inception crop (area 0.08-1, aspect 3/4-4/3, 10 tries, else the whole image)
for training, the centre image_size/(image_size + eval_crop_padding) of the
shorter side for evaluation. NumPy only at import: Grain's decoding workers
import this module; the codecs are imported on first use (optional for
datasets that are not decoded here).
"""

import io
import math

import numpy as np

from resnet_jax.errors import UserError


def _is_jpeg(encoded: bytes) -> bool:
  return encoded[:3] == b'\xff\xd8\xff'


def image_shape(encoded: bytes) -> tuple[int, int]:
  """(height, width) of an encoded image, from its header."""
  if _is_jpeg(encoded):
    try:
      import simplejpeg  # pylint: disable=g-import-not-at-top
      h, w, _, _ = simplejpeg.decode_jpeg_header(encoded)
      return h, w
    except (ImportError, ValueError):
      pass
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(encoded)) as im:
    return im.height, im.width


def decode(encoded: bytes, channels: int, min_hw: tuple[int, int] | None = None
           ) -> np.ndarray:
  """uint8 (H', W', channels); JPEGs may come scaled down in the DCT to no
  less than `min_hw`."""
  if _is_jpeg(encoded):
    try:
      import simplejpeg  # pylint: disable=g-import-not-at-top
      kw = {} if min_hw is None else dict(min_height=min_hw[0],
                                          min_width=min_hw[1])
      image = simplejpeg.decode_jpeg(
          encoded, colorspace='RGB' if channels == 3 else 'GRAY', **kw)
      return image.reshape(image.shape[0], image.shape[1], channels)
    except (ImportError, ValueError):
      pass  # CMYK and other rare JPEGs: Pillow converts them
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(encoded)) as im:
    image = np.asarray(im.convert('RGB' if channels == 3 else 'L'))
  return image.reshape(image.shape[0], image.shape[1], channels)


def inception_window(rng: np.random.Generator, h: int, w: int
                     ) -> tuple[int, int, int, int]:
  """(y, x, height, width): area 8-100% of the image, aspect 3/4-4/3
  (log-uniform); after 10 misses the whole image."""
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(0.08, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      return (int(rng.integers(0, h - ch + 1)),
              int(rng.integers(0, w - cw + 1)), ch, cw)
  return 0, 0, h, w


def centre_window(h: int, w: int, size: int, padding: int
                  ) -> tuple[int, int, int, int]:
  """The centre square of size/(size + padding) of the shorter side."""
  crop = max(1, int(size / (size + padding) * min(h, w)))
  return (h - crop + 1) // 2, (w - crop + 1) // 2, crop, crop


def _cv2():
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'streaming ImageNet-style datasets needs opencv-'
                    f'python-headless ({e}): pip install -r '
                    'requirements.txt') from None
  cv2.setNumThreads(1)  # one image per call; the parallelism is Grain's
  return cv2


def crop_resize(encoded: bytes, window_fn, size: int, channels: int,
                flip: bool = False) -> np.ndarray:
  """Decodes the window `window_fn(h, w)` of `encoded`, resized bicubically
  (OpenCV: 5x Pillow's speed; no antialiasing, like tf.image.resize) to
  (size, size, channels) uint8, mirrored when `flip`."""
  cv2 = _cv2()
  h, w = image_shape(encoded)
  y, x, ch, cw = window_fn(h, w)
  scale = 1
  while scale < 8 and min(ch, cw) >= 2 * scale * size:
    scale *= 2  # libjpeg decodes at 1/2, 1/4, 1/8 for a fraction of the cost
  image = decode(encoded, channels, (-(-h // scale), -(-w // scale))
                 if scale > 1 else None)
  fy, fx = image.shape[0] / h, image.shape[1] / w
  y0, x0 = int(y * fy), int(x * fx)
  y1 = max(min(int(round((y + ch) * fy)), image.shape[0]), y0 + 1)
  x1 = max(min(int(round((x + cw) * fx)), image.shape[1]), x0 + 1)
  out = cv2.resize(image[y0:y1, x0:x1], (size, size),
                   interpolation=cv2.INTER_CUBIC)
  if flip:
    out = out[:, ::-1]
  return np.ascontiguousarray(out).reshape(size, size, channels)
