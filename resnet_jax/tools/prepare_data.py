"""python -m resnet_jax.tools.prepare_data: prepare a dataset once, to train
from it anywhere (TensorFlow and TFDS are needed here, not where it trains).

  python -m resnet_jax.tools.prepare_data --dataset=fashion_mnist \
      --data_dir=D [--manual_dir=M]          # the in-memory uint8 cache
  python -m resnet_jax.tools.prepare_data --dataset=imagenet2012 \
      --pipeline=stream --data_dir=D         # ArrayRecord files to stream

Prints the folder and its size; offline, --manual_dir is a folder with the
download files.
"""

import os

from absl import flags

from resnet_jax import cli
from resnet_jax.data import datasets, in_memory, streaming
from resnet_jax.errors import UserError


def prepare_cache(name: str, data_dir: str | None = None,
                  manual_dir: str | None = None) -> str:
  """Prepares `name` with TFDS, writes the uint8 cache; returns its folder."""
  return in_memory.prepare(datasets.get(name), data_dir, manual_dir)[0]


def prepare_stream(name: str, data_dir: str | None = None,
                   manual_dir: str | None = None) -> tuple[str, list[str]]:
  """Prepares `name` as ArrayRecord files for streaming (TFDS generates
  them, or converts a TFRecord preparation); returns the folder and the
  files."""
  spec = datasets.get(name)
  found = streaming.prepared(spec, data_dir, manual_dir)
  files = [f for split in (spec.train_split, *spec.eval_splits.values())
           for f in found.files(split)]
  return found.folder, files


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  spec = datasets.get(f.dataset)
  if datasets.pipeline(f.dataset, f.pipeline) == 'stream':
    folder, files = prepare_stream(f.dataset, f.data_dir, f.manual_dir)
  else:
    if spec.storage == 'stream':
      raise UserError(f'{spec.name} does not fit in memory: use '
                      '--pipeline=stream')
    folder = prepare_cache(f.dataset, f.data_dir, f.manual_dir)
    files = [os.path.join(folder, name) for name in os.listdir(folder)]
  size = sum(os.path.getsize(path) for path in files)
  print(f'{folder} {size / 2**20:.1f} MiB')


def _define_flags() -> None:
  flags.DEFINE_string('dataset', None,
                      'A dataset of resnet_jax/data/datasets.py.',
                      required=True)
  flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: TFDS\'s).')
  flags.DEFINE_string('manual_dir', None,
                      'Offline: folder with the download files.')
  flags.DEFINE_enum('pipeline', None, ['memory', 'stream'],
                    "memory: the uint8 cache; stream: ArrayRecord files for "
                    "data.pipeline=stream (TFDS's, converted from TFRecord "
                    "when prepared before); unset: the dataset's own.")


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
