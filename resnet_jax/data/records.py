"""TFDS datasets prepared as ArrayRecord, read without TensorFlow or TFDS.

TFDS writes each split as `{name}-{split}.array_record-{i:05d}-of-{n:05d}`
files in `<data_dir>/<name>/<version>/`, beside `dataset_info.json` and
`features.json`; each record is a serialized `tf.train.Example`. This module
finds those files, reads records by index through Grain's
`ArrayRecordDataSource` (random access, so a resumed run reads only what it
needs) and parses the protos in pure Python: a streamed run needs neither
TensorFlow nor TFDS (an accelerator image often has neither).

It also writes the same layout (`write_split`, `write_info`), which is what the
tests use for tiny datasets; real datasets are prepared by TFDS
(`python -m resnet_jax.tools.prepare_data --pipeline=stream`, tfds_io.py).

Imports only the standard library, NumPy and (when reading) Grain: Grain's
decoding workers import this module.
"""

import dataclasses
import glob
import json
import os
import re
import struct
from typing import Any

from resnet_jax import atomic_files
from resnet_jax.errors import UserError

SUFFIX = 'array_record'

# ------------------------------------------------ tf.train.Example codec
# Example { Features features = 1; }  Features { map<string, Feature> feature
# = 1; }  Feature { oneof { BytesList bytes_list = 1; FloatList float_list =
# 2; Int64List int64_list = 3; } }  each list: `repeated T value = 1`.


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, pos
    shift += 7


def _fields(buf: bytes):
  """(field number, wire type, value) of a message: value is an int for
  varints, bytes for length-delimited fields, raw bytes for fixed ones."""
  pos, end = 0, len(buf)
  while pos < end:
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 2:
      n, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    else:
      raise ValueError(f'unsupported protobuf wire type {wire}')
    yield number, wire, value


def _signed(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def _feature_values(buf: bytes) -> list:
  for kind, _, lst in _fields(buf):
    values = []
    for _, wire, v in _fields(lst):
      if kind == 1:
        values.append(bytes(v))
      elif kind == 2:
        values.extend(struct.unpack(f'<{len(v) // 4}f', v) if wire == 2
                      else struct.unpack('<f', v))
      elif kind == 3:
        if wire == 2:  # packed
          pos = 0
          while pos < len(v):
            x, pos = _varint(v, pos)
            values.append(_signed(x))
        else:
          values.append(_signed(v))
    return values
  return []


def parse_example(serialized: bytes) -> dict[str, list]:
  """A serialized tf.train.Example as {feature name: list of values}."""
  out = {}
  for number, _, features in _fields(serialized):
    if number != 1:
      continue
    for _, _, entry in _fields(features):
      key, value = None, b''
      for n, _, v in _fields(entry):
        if n == 1:
          key = bytes(v).decode()
        elif n == 2:
          value = v
      out[key] = _feature_values(value)
  return out


def _len_delimited(number: int, payload: bytes) -> bytes:
  return (_encode_varint(number << 3 | 2) + _encode_varint(len(payload)) +
          payload)


def _encode_varint(v: int) -> bytes:
  v &= (1 << 64) - 1
  out = bytearray()
  while True:
    b = v & 0x7F
    v >>= 7
    if v:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def serialize_example(features: dict[str, bytes | int]) -> bytes:
  """A tf.train.Example of bytes and int64 features (one value each), as
  TFDS writes an encoded image and its label."""
  entries = b''
  for key in sorted(features):
    value = features[key]
    if isinstance(value, bytes):
      feature = _len_delimited(1, _len_delimited(1, value))
    else:
      feature = _len_delimited(3, _len_delimited(1, _encode_varint(value)))
    entries += _len_delimited(1, _len_delimited(1, key.encode()) +
                              _len_delimited(2, feature))
  return _len_delimited(1, entries)


# ------------------------------------------------------------ the layout


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  """A TFDS dataset version folder holding ArrayRecord files."""
  folder: str
  name: str
  image_key: str
  label_key: str
  split_sizes: dict[str, int]  # TFDS split -> examples

  def files(self, split: str) -> list[str]:
    return split_files(self.folder, self.name, split)


def split_files(folder: str, name: str, split: str) -> list[str]:
  pattern = os.path.join(folder, f'{glob.escape(name)}-{split}.{SUFFIX}-*-of-*')
  return sorted(f for f in glob.glob(pattern)
                if re.search(r'-\d{5}-of-\d{5}$', f))


def _version_key(folder: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in os.path.basename(folder).split('.'))
  except ValueError:
    return (-1,)


def find(name: str, data_dir: str, splits: tuple[str, ...]
         ) -> PreparedDataset | None:
  """The newest version of `name` under `data_dir` with ArrayRecord files
  for every one of `splits` (TFDS names); None when there is none."""
  candidates = sorted(glob.glob(os.path.join(glob.escape(data_dir),
                                             glob.escape(name), '*',
                                             'dataset_info.json')),
                      key=lambda p: _version_key(os.path.dirname(p)),
                      reverse=True)
  for info_path in candidates:
    folder = os.path.dirname(info_path)
    if all(split_files(folder, name, s) for s in splits):
      return read_info(folder, name)
  return None


def read_info(folder: str, name: str) -> PreparedDataset:
  with open(os.path.join(folder, 'dataset_info.json'), encoding='utf-8') as f:
    info = json.load(f)
  sizes = {s['name']: sum(int(n) for n in s.get('shardLengths', []))
           for s in info.get('splits', [])}
  try:
    items = info['supervisedKeys']['tuple']['items']
    image_key, label_key = (i['featureKey'] for i in items)
  except (KeyError, ValueError, TypeError):
    image_key, label_key = 'image', 'label'
  return PreparedDataset(folder, name, image_key, label_key, sizes)


def label_names(folder: str, label_key: str) -> list[str] | None:
  path = os.path.join(folder, f'{label_key}.labels.txt')
  try:
    with open(path, encoding='utf-8') as f:
      return f.read().splitlines()
  except OSError:
    return None


def open_source(files: list[str]) -> Any:
  """Random access to the records of `files`, in order, by global index."""
  try:
    import grain  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'streamed datasets need grain and array-record ({e}): '
                    'pip install -r requirements.txt') from None
  return grain.sources.ArrayRecordDataSource(files)


# ------------------------------------------------------------- writing


def write_split(folder: str, name: str, split: str, records: list[bytes],
                num_shards: int = 1) -> list[int]:
  """Writes serialized examples as TFDS names them; returns shard lengths."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  lengths = []
  for i in range(num_shards):
    shard = records[i * len(records) // num_shards:
                    (i + 1) * len(records) // num_shards]
    path = os.path.join(
        folder, f'{name}-{split}.{SUFFIX}-{i:05d}-of-{num_shards:05d}')
    writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
    for r in shard:
      writer.write(r)
    writer.close()
    lengths.append(len(shard))
  return lengths


def write_info(folder: str, name: str, version: str,
               shard_lengths: dict[str, list[int]],
               class_names: list[str]) -> None:
  """The parts of TFDS's dataset_info.json this module reads, and the label
  names file."""
  info = {'name': name, 'version': version, 'fileFormat': SUFFIX,
          'splits': [{'name': s, 'shardLengths': [str(n) for n in lengths],
                      'filepathTemplate':
                      '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'}
                     for s, lengths in shard_lengths.items()],
          'supervisedKeys': {'tuple': {'items': [{'featureKey': 'image'},
                                                 {'featureKey': 'label'}]}}}
  with open(os.path.join(folder, 'dataset_info.json'), 'w',
            encoding='utf-8') as f:
    json.dump(info, f, indent=1)
  with open(os.path.join(folder, 'label.labels.txt'), 'w',
            encoding='utf-8') as f:
    f.write('\n'.join(class_names) + '\n')


def read_tfrecord(path: str):
  """The records of a TFRecord file (length, CRC, data, CRC each; the CRCs
  are not checked)."""
  with open(path, 'rb') as f:
    while True:
      header = f.read(12)
      if not header:
        return
      if len(header) < 12:
        raise ValueError(f'{path} is truncated')
      (n,) = struct.unpack('<Q', header[:8])
      data = f.read(n)
      f.read(4)
      if len(data) < n:
        raise ValueError(f'{path} is truncated')
      yield data


def convert_tfrecord_folder(folder: str, name: str) -> list[str]:
  """An ArrayRecord file beside each `{name}-{split}.tfrecord-*` file of a
  TFDS dataset folder, with the same records in the same order; returns
  them. Each is written under a temporary name and renamed when whole."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  written = []
  pattern = os.path.join(glob.escape(folder),
                         f'{glob.escape(name)}-*.tfrecord-*')
  for path in sorted(glob.glob(pattern)):
    target = path.replace('.tfrecord-', f'.{SUFFIX}-')
    with atomic_files.temporary_path(target) as tmp:
      writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
      for record in read_tfrecord(path):
        writer.write(record)
      writer.close()
    written.append(target)
  if not written:
    raise UserError(f'no TFRecord files of {name} in {folder} to convert')
  return written
