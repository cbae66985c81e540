"""python -m resnet_jax.tools.native_check: build the native CPU kernels (if
needed), load them, check them against XLA and say where they are.

Each oneDNN convolution pass is compared with XLA's on a few small layers
(3x3 strided and padded asymmetrically, 1x1, 7x7, grouped); the max-pool's
value and gradient must equal XLA's bitwise (ties included).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from resnet_jax import cli
from resnet_jax.cpu import native, onednn, pooling
from resnet_jax.errors import UserError


def onednn_differences() -> dict[str, float]:
  """Largest relative difference from XLA's convolutions, per pass, over a
  few small layers (3x3 strided and padded asymmetrically, 1x1, 7x7,
  grouped)."""
  rng = np.random.default_rng(0)
  worst = {}
  for (n, h, w, c, k, o, s, pads, g) in [
      (2, 9, 8, 4, 3, 6, (2, 1), ((2, 1), (0, 3)), 1),
      (3, 7, 7, 8, 1, 16, (2, 2), ((0, 0), (0, 0)), 1),
      (2, 11, 11, 3, 7, 8, (2, 2), ((3, 3), (3, 3)), 1),
      (2, 6, 6, 8, 3, 12, (1, 1), ((1, 1), (1, 1)), 4)]:
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, c // g, o)), jnp.float32)

    def xla(x, kernel, s=s, pads=pads, g=g):
      return lax.conv_general_dilated(
          x, kernel, s, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=g, precision=lax.Precision.HIGHEST)

    y, vjp = jax.vjp(xla, x, kernel)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    dx, dk = vjp(dy)
    ours = {'forward': (onednn.conv_forward(x, kernel, s, pads, g), y),
            'input_grad': (onednn.conv_input_grad(dy, kernel, x.shape, s, pads, g), dx),
            **{f'kernel_grad {v}': (onednn.conv_kernel_grad(x, dy, kernel.shape, s, pads,
                                                      g, v), dk)
               for v in onednn.KERNEL_GRAD_VARIANTS}}
    for what, (a, b) in ours.items():
      err = float(np.abs(np.asarray(a) - np.asarray(b)).max() /
                  np.abs(np.asarray(b)).max())
      worst[what] = max(worst.get(what, 0.0), err)
  return worst


def max_pool_matches_xla() -> bool:
  """Whether `max_pool`'s value and gradient equal XLA's bitwise, on
  small integers (many ties, routed to the first maximum as XLA does)."""
  rng = np.random.default_rng(0)
  cases = [((2, 9, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
           ((3, 7, 7, 5), (2, 2), (1, 1), ((0, 1), (1, 0)))]
  for shape, window, strides, padding in cases:
    x = jnp.asarray(rng.integers(0, 4, shape), jnp.float32)
    y, vjp = jax.vjp(lambda x, w=window, s=strides, p=padding:
                     nn.max_pool(x, w, s, p), x)
    dy = jnp.asarray(rng.integers(-3, 4, y.shape), jnp.float32)
    ours, our_vjp = jax.vjp(lambda x, w=window, s=strides, p=padding:
                            pooling.max_pool(x, w, s, p), x)
    if not (np.array_equal(y, ours) and np.array_equal(vjp(dy)[0], our_vjp(dy)[0])):
      return False
  return True


def main(argv: list[str]) -> None:
  del argv
  try:
    native.load()
  except native.Unavailable as e:
    raise UserError(f'native CPU kernels unavailable: {e}') from None
  print(f'library: {native.build()}')
  print(f'oneDNN {native.onednn_version()}, {native.threads_per_device()} '
        f'threads per call, OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY")}')
  worst = onednn_differences()
  print('oneDNN convolutions, largest relative difference from XLA: ' +
        ', '.join(f'{k} {v:.1e}' for k, v in worst.items()))
  pool = max_pool_matches_xla()
  print(f'max-pool: forward and gradient equal to XLA\'s: {pool}')
  if max(worst.values()) > 1e-4 or not pool:
    raise UserError('native kernels disagree with XLA; set RESNET_JAX_NATIVE=0 '
                    'and report this')


if __name__ == '__main__':
  cli.run(main)
