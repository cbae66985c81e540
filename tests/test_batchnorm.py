"""batchnorm.BatchNorm: Flax's outputs, running statistics and gradients,
with the hand-written training-mode gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.cpu import batchnorm
from resnet_jax import models


def _rel(a, b) -> float:
  return float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12))


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('zero_scale', [False, True])
def test_equals_flax_batchnorm_values_statistics_and_gradients(train, zero_scale):
  x = jax.random.normal(jax.random.key(0), (8, 5, 6, 7)) * 2 + 0.5
  kwargs = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5)
  if zero_scale:  # as the last BatchNorm of a block starts
    kwargs['scale_init'] = nn.initializers.zeros
  ref, ours = nn.BatchNorm(**kwargs), batchnorm.BatchNorm(**kwargs)
  variables = ref.init(jax.random.key(1), x)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x))
          == jax.tree.map(jnp.shape, variables))
  # Away from the initial values, so that every term of the gradient shows.
  variables = jax.tree.map(lambda v: v + 0.3, variables)
  cot = jax.random.normal(jax.random.key(2), x.shape)

  def run(module):
    def loss(v, x):
      y, stats = module.apply(v, x, mutable=['batch_stats'])
      return jnp.sum(jax.nn.relu(y) * cot), (y, stats)
    (_, aux), grads = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True))(variables, x)
    return aux, grads

  (y_ref, stats_ref), g_ref = run(ref)
  (y, stats), g = run(ours)
  assert _rel(y, y_ref) < 1e-6
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
    assert _rel(a, b) < 1e-6
  assert jax.tree.structure(g) == jax.tree.structure(g_ref)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert _rel(a, b) < 1e-5


def test_the_statistics_outputs_have_their_own_gradient():
  """Cotangents of the returned mean and variance (zero in the models,
  where they only feed the running averages) still reach x."""
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5))
  scale, bias = jnp.full((5,), 1.5), jnp.full((5,), 0.2)

  def reference(x):
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.maximum(0.0, jnp.mean(x * x, (0, 1, 2)) - mean ** 2)
    y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
    return jnp.sum(y ** 2) + jnp.sum(mean * 3.0) + jnp.sum(var * 2.0)

  def ours(x):
    y, mean, var = batchnorm.batch_norm(x, scale, bias, 1e-5)
    return jnp.sum(y ** 2) + jnp.sum(mean * 3.0) + jnp.sum(var * 2.0)

  assert _rel(jax.grad(ours)(x), jax.grad(reference)(x)) < 1e-5


def test_bfloat16_takes_flax_path():
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5)).astype(jnp.bfloat16)
  kwargs = dict(use_running_average=False, dtype=jnp.bfloat16)
  ref, ours = nn.BatchNorm(**kwargs), batchnorm.BatchNorm(**kwargs)
  v = ref.init(jax.random.key(1), x)
  y_ref, _ = ref.apply(v, x, mutable=['batch_stats'])
  y, _ = ours.apply(v, x, mutable=['batch_stats'])
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))


def test_cpu_paths_use_it_and_xla_keeps_flax_batchnorm():
  assert models.create_model('cifar_resnet20',
                             conv_impl='xla').layers.norm is nn.BatchNorm
  if jax.default_backend() == 'cpu':
    assert (models.create_model('cifar_resnet20', conv_impl='auto').layers.norm
            is batchnorm.BatchNorm)
