"""Max-pooling whose gradient is fast on XLA's CPU backend.

XLA differentiates `reduce_window(max)` into `select_and_scatter`, which its
CPU backend runs as a slow scalar loop: on the textbook ResNet-18 (the stem's
3x3/2 pool over 48x48x64 maps at batch 256) it costs about a third of a
second per train step. `max_pool` computes the same forward pass and the
same gradient, in float32 on the CPU with the native kernels (`native.py`:
one pass each, per device), else from strided views: the max is recomputed
from the kh*kw window views in the backward pass (comparing the views with
the forward's output instead can lose gradients where XLA fused the forward
differently),
and each view passes `dy` to the first position in window order that holds
the max, as `select_and_scatter` does, so ties (the zeros after a ReLU) get
exactly XLA's gradient. The strided scatter is an interior-padded `lax.pad`
per view, which XLA fuses into one loop.

One of the CPU path's layers (`layers.py`); Flax's `nn.max_pool` elsewhere.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax.cpu import native, onednn
from resnet_jax import sharding

Pairs = tuple[tuple[int, int], tuple[int, int]]


def _windows(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: Pairs, out_hw: tuple[int, int]):
  """The padded input and its kh*kw strided views, each of the output's shape."""
  low = jnp.array(-jnp.inf, x.dtype)
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)),
               constant_values=low)
  n, _, _, c = x.shape
  views = []
  for i in range(window[0]):
    for j in range(window[1]):
      limit = (n, i + (out_hw[0] - 1) * strides[0] + 1,
               j + (out_hw[1] - 1) * strides[1] + 1, c)
      views.append(((i, j), lax.slice(xp, (0, i, j, 0), limit,
                                      (1, strides[0], strides[1], 1))))
  return xp, views


def _params(window, strides, padding) -> np.ndarray:
  return np.array([*window, *strides, padding[0][0], padding[1][0]], np.int64)


def _use_native(x: jax.Array) -> bool:
  return x.dtype == jnp.float32 and native.available()


def _forward(x, window, strides, padding):
  if _use_native(x):
    def pool(x):
      shape = (x.shape[0], *onednn.out_hw(x.shape, window, strides, padding), x.shape[3])
      return native.call('resnet_jax_max_pool', jax.ShapeDtypeStruct(shape, x.dtype),
                         x, params=_params(window, strides, padding))
    return sharding.per_device(pool, (True,))(x)
  return lax.reduce_window(
      x, jnp.array(-jnp.inf, x.dtype), lax.max, (1,) + window + (1,),
      (1,) + strides + (1,), ((0, 0),) + padding + ((0, 0),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: tuple[int, int] = (3, 3),
             strides: tuple[int, int] = (2, 2),
             padding: Pairs = ((1, 1), (1, 1))) -> jax.Array:
  """`flax.linen.max_pool(x, window, strides, padding)` for NHWC `x`, with
  explicit padding pairs."""
  return _forward(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
  return _forward(x, window, strides, padding), x


def _max_pool_bwd(window, strides, padding, x, dy):
  if _use_native(x):
    return (sharding.per_device(
        lambda x, dy: native.call(
            'resnet_jax_max_pool_input_grad', jax.ShapeDtypeStruct(x.shape, x.dtype),
            x, dy, params=_params(window, strides, padding)),
        (True, True))(x, dy),)
  xp, views = _windows(x, window, strides, padding, dy.shape[1:3])
  y = functools.reduce(jnp.maximum, (v for _, v in views))
  taken = jnp.zeros(dy.shape, bool)
  dxp = jnp.zeros(xp.shape, dy.dtype)
  for (i, j), v in views:
    first = (v == y) & ~taken
    taken = taken | first
    contribution = jnp.where(first, dy, jnp.zeros_like(dy))
    dxp = dxp + lax.pad(contribution, jnp.zeros((), dy.dtype), (
        (0, 0, 0),
        (i, xp.shape[1] - i - ((dy.shape[1] - 1) * strides[0] + 1),
         strides[0] - 1),
        (j, xp.shape[2] - j - ((dy.shape[2] - 1) * strides[1] + 1),
         strides[1] - 1),
        (0, 0, 0)))
  (top, _), (left, _) = padding
  return (dxp[:, top:top + x.shape[1], left:left + x.shape[2], :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
