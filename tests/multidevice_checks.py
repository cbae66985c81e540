"""Checks that need several (simulated) CPU devices, run in a subprocess:

    python tests/multidevice_checks.py NAME [ARGS]   ->  prints one JSON line

XLA_FLAGS must be set before JAX starts, so these cannot run inside the
pytest process; tests/test_*.py call them and assert on the JSON.
"""

import json
import os
import sys

if __name__ == '__main__':
  os.environ.setdefault('XLA_FLAGS',
                        '--xla_force_host_platform_device_count=8')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from configs import default  # noqa: E402
from resnet_jax import models, optim, preprocess, sharding, train_step  # noqa: E402


def _one_step(mesh: Mesh, state, batch):
  """One train step with the batch split over `mesh`."""
  prep = functools.partial(
      preprocess.preprocess_batch, image_size=16, mean=(0.5,) * 3,
      std=(0.25,) * 3, augment=preprocess.AugmentConfig(crop_padding=2,
                                                        flip=True))
  train_fn, _ = train_step.jit_steps(
      sharding.replicated(mesh), sharding.batch_sharded(mesh),
      preprocess=prep, eval_preprocess=prep, num_classes=10)
  state = jax.device_put(state, sharding.replicated(mesh))
  batch = jax.device_put(batch, sharding.batch_sharded(mesh))
  new_state, metrics = train_fn(state, batch)
  return jax.device_get((new_state.params, new_state.batch_stats, metrics,
                         new_state.opt_state))


def sharded_step() -> dict:
  """The same step on 8 devices and on 1: loss, params, BN statistics."""
  assert jax.device_count() == 8, jax.devices()
  config = default.get_config()
  config.warmup_epochs = 0.0
  model = models.create_model('cifar_resnet20', num_classes=10, width=4)
  schedule = optim.create_schedule(config, 100, 10)
  shape = (1, 16, 16, 3)
  variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
  tx = optim.create_optimizer(config, schedule, variables['params'])
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (32, 16, 16, 3)).astype(np.uint8),
           'label': rng.integers(0, 10, 32).astype(np.int32)}
  results = {}
  for n in (1, 8):
    state = train_step.create_train_state(model, tx, jax.random.key(1), shape)
    mesh = Mesh(np.array(jax.devices()[:n]), (sharding.DATA_AXIS,))
    results[n] = _one_step(mesh, state, batch)
  (p1, b1, m1, _), (p8, b8, m8, _) = results[1], results[8]

  def max_rel(a, b):
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  return {'loss': [float(m1['loss_sum']), float(m8['loss_sum'])],
          'grad_norm': [float(m1['grad_norm']), float(m8['grad_norm'])],
          'correct': [int(m1['correct']), int(m8['correct'])],
          'params_max_rel': max_rel(p1, p8),
          'batch_stats_max_rel': max_rel(b1, b8),
          'devices': jax.device_count()}


if __name__ == '__main__':
  print(json.dumps(globals()[sys.argv[1]](*sys.argv[2:])))
