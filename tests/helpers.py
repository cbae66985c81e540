"""What several test files share: the environment of the subprocesses they
start, shrunk recipes, small datasets in the project's formats, and readers
of what a run wrote. Fixtures live in conftest.py; test files import these
helpers from here, never from one another."""

import importlib
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from resnet_jax import config as config_lib
from resnet_jax.checkpoint import checkpointing
from resnet_jax.data import in_memory, records
from resnet_jax.train import optim, tensorboard_files, train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tests' programs are tiny and compiled once each: LLVM's optimisation
# passes would cost more time than they save (a quarter of the suite's CPU
# time). Same arithmetic, only less optimised machine code; conftest.py sets
# it for this process, `subprocess_env` for the processes the tests start.
FAST_COMPILE = '--xla_backend_optimization_level=0'
EIGHT_DEVICES = '--xla_force_host_platform_device_count=8'
# Fields of metrics.jsonl that measure time, not the run.
TIMING_FIELDS = ('images_per_sec', 'examples_per_sec')


# ------------------------------------------------------------ subprocesses


def subprocess_env(**extra) -> dict:
  """The environment of a subprocess: this checkout, the CPU, and the fast
  compile flag plus any XLA flags given (e.g. a simulated device count)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = f"{FAST_COMPILE} {extra.pop('XLA_FLAGS', '')}".strip()
  env.update(extra)
  return env


def run_check(name: str, *args: str) -> dict:
  """A check of tests/multidevice_checks.py in its own process (8 simulated
  devices); its last line of output, as JSON."""
  out = subprocess.run(
      [sys.executable, str(ROOT / 'tests' / 'multidevice_checks.py'), name,
       *args], capture_output=True, text=True, env=subprocess_env(),
      timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def blocked_tensorflow(tmp_path) -> str:
  """A sitecustomize folder (for PYTHONPATH) under which TensorFlow and
  TFDS look not installed: imports fail and importlib.util.find_spec
  returns None (as etils asks)."""
  block = pathlib.Path(tmp_path) / 'block_tf'
  block.mkdir()
  (block / 'sitecustomize.py').write_text(
      'import importlib.util, sys\n'
      'BLOCKED = ("tensorflow", "tensorflow_datasets")\n'
      'class _Block:\n'
      '  def find_spec(self, name, path=None, target=None):\n'
      '    if name.split(".")[0] in BLOCKED:\n'
      '      raise ModuleNotFoundError(f"No module named {name!r}")\n'
      'sys.meta_path.insert(0, _Block())\n'
      '_find_spec = importlib.util.find_spec\n'
      'def find_spec(name, package=None):\n'
      '  if name.split(".")[0] in BLOCKED:\n'
      '    return None\n'
      '  return _find_spec(name, package)\n'
      'importlib.util.find_spec = find_spec\n')
  return str(block)


def run_until(cmd: list[str], workdir, step: int, sig: int,
              env: dict | None = None):
  """Starts `cmd` (in `env`, default `subprocess_env()`), sends `sig` once
  the checkpoint of `step` is complete; (exit code, stdout, stderr)."""
  proc = subprocess.Popen(cmd, env=env or subprocess_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  target = pathlib.Path(workdir) / 'checkpoints' / str(step)
  deadline = time.time() + 400
  while not target.is_dir():
    if proc.poll() is not None:
      raise AssertionError(f'run ended before step {step}: '
                           f'{proc.stderr.read()[-3000:]}')
    if time.time() > deadline:
      proc.kill()
      raise AssertionError(f'no checkpoint {step} after 400 s')
    time.sleep(0.05)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


# ----------------------------------------------------------------- configs


def tiny_config(name: str, data_dir: str, **overrides):
  """configs/<name>.py shrunk to 3 steps of batch 8; `overrides` are dotted
  field paths, e.g. tiny_config('default', d, **{'model.width': 4})."""
  config = importlib.import_module(f'configs.{name}').get_config()
  config.data.tfds_data_dir = data_dir
  config.data.batch_size = 8
  config.data.eval_batch_size = 64
  config.run.num_train_steps = 3
  config.run.log_every_steps = 1
  config.run.checkpoint_every_steps = 2
  config.run.progress_bar = False
  config.optim.warmup_epochs = 0.0
  config.optim.warmup_steps = None
  boundaries = tuple(b for b in config.optim.lr_boundaries if b < 3)
  config.optim.lr_scales = config.optim.lr_scales[:len(boundaries)]
  config.optim.lr_boundaries = boundaries
  config.update_from_flattened_dict(overrides)
  return config


# ------------------------------------------------- a tiny model for steps


class Tiny(nn.Module):
  """Dense -> (BatchNorm) -> ReLU -> Dense on 6 features: the train step's
  arithmetic without a ResNet's compile time."""
  bn: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(10)(nn.relu(x))


def tiny_state(bn: bool, ema: bool = False, tx=None):
  """A TrainState of `Tiny`, with the project's SGD unless `tx` is given."""
  model = Tiny(bn=bn)
  if tx is None:  # the project's SGD: Nesterov momentum, coupled decay
    params = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 6)), train=False))['params']
    tx = optim.create_optimizer(config_lib.base_config().optim,
                                optax.constant_schedule(0.1), params)
  return train_step.create_train_state(model, tx, jax.random.key(0), (1, 6),
                                       ema=ema)


def tiny_batches(n: int, size: int = 16) -> list[dict]:
  rng = np.random.default_rng(0)
  return [{'image': rng.normal(size=(size, 6)).astype(np.float32),
           'label': rng.integers(0, 10, size).astype(np.int32)}
          for _ in range(n)]


# ---------------------------------------------------------------- datasets


def write_fake_dataset(data_dir: str, name: str, shape=(28, 28, 1),
                       num_classes: int = 10, num_train: int = 256,
                       num_test: int = 100, seed: int = 0) -> None:
  """A learnable dataset in the uint8 cache format: each class a distinct
  brightness pattern + noise."""
  rng = np.random.default_rng(seed)
  patterns = rng.integers(0, 256, (num_classes,) + shape)

  def split(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    noise = rng.integers(-40, 41, (n,) + shape)
    images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
    return in_memory.ArrayDataset(images, labels)

  meta = {'name': name, 'tfds_version': 'fake', 'num_classes': num_classes,
          'class_names': [f'class_{i}' for i in range(num_classes)],
          'image_shape': list(shape)}
  in_memory.write_cache(
      in_memory.cache_dir(name, data_dir), meta,
      {'train': split(num_train), 'test': split(num_test)})


def write_stream_dataset(data_dir: str, name: str, sizes: dict[str, int],
                         shape=(28, 28, 1), num_classes: int = 10,
                         fmt: str = 'PNG', seed: int = 0,
                         same_image: bool = False) -> str:
  """A dataset in TFDS's ArrayRecord layout (`<data_dir>/<name>/1.0.0/`),
  each example a tf.train.Example of an encoded image and its label, as
  TFDS writes them. `shape` None: JPEGs of random sizes (ImageNet-like).
  Learnable like write_fake_dataset: each class a brightness pattern."""
  rng = np.random.default_rng(seed)
  folder = os.path.join(data_dir, name, '1.0.0')
  lengths = {}
  first = None
  for split, n in sizes.items():
    serialized = []
    for _ in range(n):
      label = int(rng.integers(0, num_classes))
      if shape is None:
        h, w = (int(v) for v in rng.integers(24, 72, 2))
        pixels = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
      else:
        level = (label * 255) // max(num_classes - 1, 1)
        pixels = np.clip(level + rng.integers(-40, 41, shape), 0,
                         255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else
                      pixels).save(buf, format='JPEG' if shape is None
                                   else fmt, quality=90)
      first = first if (first and same_image) else buf.getvalue()
      serialized.append(records.serialize_example(
          {'image': first, 'label': label}))
    lengths[split] = records.write_split(folder, name, split, serialized,
                                         num_shards=2 if n > 20 else 1)
  records.write_info(folder, name, '1.0.0', lengths,
                     [f'class_{i}' for i in range(num_classes)])
  return folder


# ------------------------------------------------------- what a run wrote


def metric_records(workdir) -> list[dict]:
  """metrics.jsonl without its timing fields."""
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k not in TIMING_FIELDS}
          for l in lines]


def final_state(workdir, step: int = 20) -> dict:
  """The stored state of `step` on one device, whatever device count wrote
  it."""
  return checkpointing.Checkpointer(str(workdir), read_only=True,
                                    async_save=False).restore_raw(step)[0]


def leaves(tree):
  """The leaves of nested dicts/lists in key order."""
  if isinstance(tree, dict):
    for k in sorted(tree):
      yield from leaves(tree[k])
  elif isinstance(tree, (list, tuple)):
    for v in tree:
      yield from leaves(v)
  else:
    yield tree


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] of every TensorBoard event file of `logdir`, in
  file order."""
  # tensorboard's tensor_util looks for TensorFlow on import: only here.
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  series = {}
  for path in tensorboard_files.event_files(str(logdir)):
    for event in tensorboard_files.read_events(path):
      for v in event.summary.value:
        series.setdefault(v.tag, []).append(
            (event.step, float(tensor_util.make_ndarray(v.tensor))))
  return series
