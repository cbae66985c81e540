"""Streamed datasets: Grain over TFDS's ArrayRecord files, without TensorFlow.

Used when a run's data pipeline is 'stream' (ImageNet always; Fashion-MNIST,
MNIST and CIFAR when `--config.data.pipeline=stream`).

Batch k is a pure function of (seed, k), so a resumed run starts at step k
and reads nothing before it:
  * epoch e = k // steps_per_epoch orders the train split by a permutation
    that depends on (seed, e) only (the in-memory pipeline's,
    `input_pipeline.epoch_permutation`);
  * global step k of the epoch is positions [k*B, (k+1)*B) of that order;
    process p of P takes its contiguous slice of B/P of them;
  * every example's augmentation (the Inception crop and flip of ImageNet)
    draws from its own generator seeded by (seed, epoch, position in the
    epoch), so the draws do not depend on which process reads the example,
    and no two examples share them.
Grain maps step numbers to batches (`BatchLoader`, random access into the
ArrayRecord files) and decodes them in worker processes
(`data.stream_workers`, default one per core the process may use, less
one for the training loop); its output order does not depend on the number
of workers.

Evaluation batch k is positions [k*B, (k+1)*B) of the split in file order,
each process taking its slice; positions past the end are padding (zeros,
mask False), so every process yields ceil(N / B) batches and every example
is counted once.

Decoding: JPEGs with libjpeg-turbo through simplejpeg (scaled down in the
DCT when the crop is at least twice the output), other formats (TFDS stores
the small datasets as PNG) with Pillow; the crops resized with OpenCV.
Datasets of one image size are decoded as stored and augmented on the device
like in-memory data; ImageNet is cropped on the host: Inception crop (area
0.08-1, aspect 3/4-4/3, 10 tries, else the whole image) + flip for training,
the centre image_size/(image_size + eval_crop_padding) of the shorter side
for evaluation, resized bicubically to image_size (as tf.data did).

This module imports no JAX, TensorFlow or TFDS at import time: Grain's
workers import it (Grain itself imports JAX there, but no worker starts a
JAX backend; preparing a dataset imports TFDS on demand).
"""

import dataclasses
import functools
import io
import math
import os
from typing import Iterator

import numpy as np

from resnet_jax import datasets, input_pipeline, records
from resnet_jax.errors import UserError

# ---------------------------------------------------------------- decoding


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


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The augmentation generator of the example at `position` of `epoch`'s
  order: the same whichever process or worker reads it."""
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
      [seed % (1 << 64), epoch, position, 0x5EED])))


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

  @property
  def local_batch(self) -> int:
    return self.batch_size // self.process_count

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  @property
  def eval_batches(self) -> int:
    return -(-self.num_examples // self.batch_size)


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
      self._perm = (epoch, input_pipeline.epoch_permutation(
          self.plan.num_examples, self.plan.seed, epoch))
    return self._perm[1]

  def positions(self, k: int) -> tuple[int, np.ndarray]:
    """(epoch, positions in the epoch's order) of this process's rows."""
    p = self.plan
    epoch, step = divmod(k, p.steps_per_epoch) if p.train else (0, k)
    start = step * p.batch_size + p.process_index * p.local_batch
    return epoch, np.arange(start, start + p.local_batch)

  def _image(self, encoded: bytes, epoch: int, position: int) -> np.ndarray:
    p = self.plan
    if p.out_size is None:
      return decode(encoded, p.channels)
    if p.train:
      rng = example_rng(p.seed, epoch, position)
      return crop_resize(encoded, lambda h, w: inception_window(rng, h, w),
                         p.out_size, p.channels, flip=bool(rng.random() < 0.5))
    return crop_resize(encoded, lambda h, w: centre_window(
        h, w, p.out_size, p.crop_padding), p.out_size, p.channels)

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    p = self.plan
    epoch, positions = self.positions(int(k))
    real = positions < p.num_examples
    if p.train:
      indices = self._permutation(epoch)[positions]
    else:
      indices = np.where(real, positions, 0)
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
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
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
  from resnet_jax import tfds_io  # pylint: disable=g-import-not-at-top
  data_dir = data_dir or tfds_io.default_data_dir()
  found = records.find(spec.name, data_dir, _tfds_splits(spec))
  if found is None and prepare:
    import importlib.util  # pylint: disable=g-import-not-at-top
    if importlib.util.find_spec('tensorflow_datasets') is not None:
      tfds_io.prepare_array_record(spec.name, data_dir, manual_dir)
      found = records.find(spec.name, data_dir, _tfds_splits(spec))
  if found is None:
    raise UserError(
        f'{spec.name} is not prepared as ArrayRecord in {data_dir}; prepare '
        f'it where TensorFlow and TFDS are installed with `python -m '
        f'resnet_jax.input_pipeline --dataset={spec.name} --pipeline=stream '
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
               process_count: int, workers: int | None = None):
    self.spec, self.found, self.workers = spec, found, workers
    self.sizes = {'train': split_size(found, spec.train_split)}
    self.sizes.update({k: split_size(found, v)
                       for k, v in spec.eval_splits.items()})
    # Datasets of one image size are decoded as stored (the device resizes
    # and augments them as in-memory data); others are cropped here.
    out_size = None if spec.native_size is not None else image_size
    self._common = dict(image_key=found.image_key, label_key=found.label_key,
                        process_index=process_index,
                        process_count=process_count, seed=seed,
                        channels=spec.channels, out_size=out_size)

  def plan(self, split: str, batch_size: int) -> Plan:
    train = split == 'train'
    tfds_split = self.spec.train_split if train else self.spec.eval_splits[
        split]
    count = self._common['process_count']
    if batch_size % count:
      raise UserError(f'batch size {batch_size} does not divide by the '
                      f'{count} processes')
    return Plan(tuple(self.found.files(tfds_split)),
                num_examples=self.sizes[split], batch_size=batch_size,
                train=train, crop_padding=self.spec.eval_crop_padding or 0,
                **self._common)

  def train(self, batch_size: int, start_step: int
            ) -> Iterator[dict[str, np.ndarray]]:
    plan = self.plan('train', batch_size)
    if plan.steps_per_epoch < 1:
      raise UserError(f'the train split has {plan.num_examples} examples, '
                      f'fewer than one batch of {batch_size}')
    return iterate(plan, start_step, start_step + (1 << 40), self.workers)

  def evaluation(self, split: str, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    plan = self.plan(split, batch_size)
    return iterate(plan, 0, plan.eval_batches, self.workers)


def label_names(found: records.PreparedDataset) -> list[str] | None:
  return records.label_names(found.folder, found.label_key)

