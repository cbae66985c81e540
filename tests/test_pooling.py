"""pooling.max_pool: nn.max_pool's values and exactly XLA's gradient
(select_and_scatter's routing: the first max in window order, ties included),
on both of its paths: the native kernels and the strided views."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models
from resnet_jax.cpu import native, pooling


@pytest.fixture(params=['native', 'views'])
def path(request, monkeypatch):
  if request.param == 'native':
    if not native.available():
      pytest.skip(f'no native kernels here: {native.unavailable_reason()}')
  else:
    monkeypatch.setattr(pooling, '_use_native', lambda x: False)
  return request.param


@pytest.mark.parametrize('shape,window,strides,padding', [
    ((2, 9, 9, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),    # the ImageNet stem
    ((3, 8, 11, 4), (3, 3), (2, 2), ((1, 1), (1, 1))),   # even, odd sides
    ((2, 7, 6, 2), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((1, 10, 10, 2), (3, 3), (1, 1), ((1, 1), (1, 1))),  # overlapping windows
])
def test_values_and_gradient_equal_xla(shape, window, strides, padding, path):
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))  # zero ties
  x = x.at[0, 0, :2, 0].set(1.0)  # a tie between two positive values
  reference = jax.jit(lambda x: nn.max_pool(x, window, strides, padding))
  ours = jax.jit(lambda x: pooling.max_pool(x, window, strides, padding))
  y_ref, vjp_ref = jax.vjp(reference, x)
  y, vjp = jax.vjp(ours, x)
  np.testing.assert_array_equal(y, y_ref)
  # Small integer cotangents: every sum is exact in float32 whatever its
  # order, so equal gradients mean the same routing, ties included.
  dy = jax.random.randint(jax.random.key(1), y.shape, -4, 5).astype(x.dtype)
  np.testing.assert_array_equal(vjp(dy)[0], vjp_ref(dy)[0])
  lowered = jax.jit(lambda x: jax.vjp(ours, x)[1](dy)).lower(x).as_text()
  assert ('resnet_jax_max_pool' in lowered) == (path == 'native')


def test_cpu_paths_use_it_and_xla_keeps_nn_max_pool():
  assert models.create_model('d2l_resnet18', conv_impl='xla').layers.pool is (
      nn.max_pool)
  if jax.default_backend() == 'cpu':
    assert models.create_model('d2l_resnet18', conv_impl='auto').layers.pool is (
        pooling.max_pool)


def test_bfloat16():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)).astype(jnp.bfloat16)
  g = jax.grad(lambda x: pooling.max_pool(x).astype(jnp.float32).sum())(x)
  g_ref = jax.grad(lambda x: nn.max_pool(
      x, (3, 3), (2, 2), ((1, 1), (1, 1))).astype(jnp.float32).sum())(x)
  assert g.dtype == jnp.bfloat16
  np.testing.assert_array_equal(g, g_ref)
