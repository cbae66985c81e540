"""Checks that need several (simulated) CPU devices, run in a subprocess:

    python tests/multidevice_checks.py NAME [ARGS]   ->  prints one JSON line

XLA_FLAGS must be set before JAX starts, so these cannot run inside the
pytest process; tests/test_*.py call them and assert on the JSON.
"""

import json
import os
import sys

if __name__ == '__main__':
  if 'device_count' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_force_host_platform_device_count=8')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from resnet_jax.checkpoint import workdir as workdir_lib

from resnet_jax import config as config_lib
from resnet_jax import durations
from resnet_jax import models, sharding
from resnet_jax.train import optim, train_step
from resnet_jax.data import preprocess
from helpers import tiny_batches, tiny_config, tiny_state

_STEPS = durations.Steps(total=100, per_epoch=10, warmup=0, log_every=10,
                          eval_every=10, checkpoint_every=10)


def _one_step(mesh: Mesh, state, batch, hlo: dict | None = None):
  """One train step with the batch split over `mesh` (its compiled
  program's text into `hlo['text']`, when given)."""
  prep = functools.partial(
      preprocess.preprocess_batch, image_size=16, mean=(0.5,) * 3,
      std=(0.25,) * 3, augment=preprocess.AugmentConfig(crop_padding=2,
                                                        flip=True))
  train_fn, _ = train_step.jit_steps(
      sharding.replicated(mesh), sharding.batch_sharded(mesh),
      train_step.StepOptions(preprocess=prep, eval_preprocess=prep,
                             num_classes=10, steps=_STEPS))
  state = jax.device_put(state, sharding.replicated(mesh))
  batch = jax.device_put(batch, sharding.batch_sharded(mesh))
  new_state = train_fn(state, batch)
  if hlo is not None:
    hlo['text'] = train_fn.lower(state, batch).compile().as_text()
  return jax.device_get((new_state.params, new_state.batch_stats,
                         new_state.metric_sums['window'],
                         new_state.opt_state))


def sharded_step(conv_impl: str = 'xla', model_name: str = 'cifar_resnet20') -> dict:
  """The same step on 8 devices and on 1: loss, params, BN statistics, and
  the collectives of the 8-device program. conv_impl 'chunked' is the patch
  convolutions with batch chunks of 4 examples (the chunk loops that made
  the partitioner gather the batch before `conv.per_device`)."""
  assert jax.device_count() == 8, jax.devices()
  from resnet_jax.cpu import conv
  config = config_lib.base_config()
  impl = {'conv_impl': conv_impl}
  if conv_impl == 'chunked':  # one example's patches: 16*16*36*4 bytes
    impl = {'layers': models.Layers(conv=functools.partial(
        conv.PatchConv, patch_bytes_limit=4 * 16 * 16 * 36 * 4))}
  model = models.create_model(model_name, num_classes=10, width=4, **impl)
  schedule = optim.create_schedule(config.optim, _STEPS)
  shape = (1, 16, 16, 3)
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
  tx = optim.create_optimizer(config.optim, schedule, variables['params'])
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (32, 16, 16, 3)).astype(np.uint8),
           'label': rng.integers(0, 10, 32).astype(np.int32)}
  results = {}
  init = train_step.create_train_state(model, tx, jax.random.key(1),
                                       shape).params
  hlo = {}
  for n in (1, 8):
    state = train_step.create_train_state(model, tx, jax.random.key(1), shape)
    mesh = Mesh(np.array(jax.devices()[:n]), (sharding.DATA_AXIS,))
    results[n] = _one_step(mesh, state, batch, hlo if n == 8 else None)
  (p1, b1, m1, _), (p8, b8, m8, _) = results[1], results[8]

  def max_rel(a, b):
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  return {'loss': [float(m1['loss_sum']), float(m8['loss_sum'])],
          'grad_norm': [float(m1['grad_norm_sum']),
                        float(m8['grad_norm_sum'])],
          'correct': [int(m1['correct']), int(m8['correct'])],
          'params_max_rel': max_rel(p1, p8),
          'update_max_abs': max(float(np.max(np.abs(x - y))) for x, y in zip(
              jax.tree.leaves(p1), jax.tree.leaves(jax.device_get(init)))),
          'params_max_abs': max(float(np.max(np.abs(x - y))) for x, y in zip(
              jax.tree.leaves(p1), jax.tree.leaves(p8))),
          'batch_stats_max_rel': max_rel(b1, b8),
          'devices': jax.device_count(),
          'all_gathers': hlo['text'].count(' all-gather('),
          'all_reduces': hlo['text'].count(' all-reduce('),
          'onednn_calls': hlo['text'].count('resnet_jax_onednn_conv'),
          'pool_calls': hlo['text'].count('resnet_jax_max_pool')}


def accumulated_step() -> dict:
  """Two steps of 2 micro-batches on 8 devices against two of the whole
  batch on 1, for a model without BatchNorm (test_recipe_features.Tiny)."""
  assert jax.device_count() == 8, jax.devices()
  params = {}
  for n, k in ((1, 1), (8, 2)):
    mesh = Mesh(np.array(jax.devices()[:n]), (sharding.DATA_AXIS,))
    train_fn, _ = train_step.jit_steps(
        sharding.replicated(mesh), sharding.batch_sharded(mesh),
        train_step.StepOptions(
            preprocess=lambda images, key: images,
            eval_preprocess=lambda images, key: images, num_classes=10,
            steps=_STEPS, grad_accum_steps=k))
    state = jax.device_put(tiny_state(bn=False), sharding.replicated(mesh))
    for batch in tiny_batches(2, size=32):
      state = train_fn(state, jax.device_put(batch,
                                             sharding.batch_sharded(mesh)))
    params[n] = jax.device_get(state.params)
  return {'params_max_rel': max(
      float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))
      for x, y in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[8]))),
          'devices': jax.device_count()}


def restore_and_compare(workdir: str) -> dict:
  """Restores the latest checkpoint of `workdir` onto all local devices and
  compares every value with the raw arrays on disk."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from resnet_jax.checkpoint import checkpointing
  from resnet_jax.train import run_setup
  run = run_setup.build(workdir_lib.read_config(workdir))
  ckpt = checkpointing.Checkpointer(workdir, read_only=True, async_save=False)
  state, meta = ckpt.restore(run_setup.init_state(run), run.replicated)
  restored = serialization.to_state_dict(state)
  raw, _ = ckpt.restore_raw(meta['step'])  # unsharded, one device
  pairs = zip(jax.tree.leaves({k: restored[k] for k in raw}),
              jax.tree.leaves(raw))
  equal = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
  on_all = all(len(x.sharding.device_set) == jax.device_count()
               for x in jax.tree.leaves(state.params))
  return {'devices': jax.device_count(), 'equal': bool(equal and on_all),
          'step': int(meta['step'])}


def train_tiny(workdir: str, data_dir: str) -> dict:
  """The tiny run of test_checkpoints, on every (simulated) device."""
  from resnet_jax.train import train_loop
  config = tiny_config('default', data_dir, **{
      'model.width': 4, 'data.batch_size': 32, 'run.num_train_steps': 8,
      'run.checkpoint_every_steps': 4, 'data.eval_batch_size': 40})
  train_loop.train_and_evaluate(config, workdir)
  return {'devices': jax.device_count()}


def stream_batches(data_dir: str) -> dict:
  """Global batches of a streamed dataset, as every process sees them:
  train steps 5-7 (a resume mid-epoch) and one evaluation, each process
  decoding its slice (JAX_NUM_PROCESSES etc. make it one of several)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from resnet_jax.data import device_data
  sharding.initialize_distributed()
  config = config_lib.base_config()
  config.data.update(dict(tfds_data_dir=data_dir, pipeline='stream',
                          batch_size=16, eval_batch_size=24,
                          stream_workers=0))
  data = device_data.load(config, sharding.make_mesh())
  digest = hashlib.sha256()
  batches = data.train_batches(5)
  for _ in range(3):
    batch = next(batches)
    for key in ('image', 'label'):
      digest.update(np.asarray(multihost_utils.process_allgather(
          batch[key], tiled=True)).tobytes())
  batches.close()
  count = correct = 0
  for batch in data.eval_batches('test'):
    mask, label = (np.asarray(multihost_utils.process_allgather(
        batch[k], tiled=True)) for k in ('mask', 'label'))
    count += int(mask.sum())
    correct += int(label[mask].sum())
  result = {'processes': jax.process_count(), 'devices': jax.device_count(),
            'train': digest.hexdigest(), 'eval_count': count,
            'eval_label_sum': correct}
  sharding.shutdown_distributed()
  return result


if __name__ == '__main__':
  print(json.dumps(globals()[sys.argv[1]](*sys.argv[2:])))
