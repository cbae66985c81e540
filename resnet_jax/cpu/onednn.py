"""oneDNN's convolutions inside XLA programs (float32, NHWC, HWIO kernels).

XLA's CPU backend has no fast convolutions of its own (the released jaxlib
is built without its oneDNN rewrites); PyTorch's CPU convolutions are
oneDNN's. These are the three oneDNN primitives of a convolution as custom
calls into the native kernels (`native.py`, `cpu_kernels.cc`):

    conv_forward(x, kernel, strides, pads, groups, bias=None)
    conv_input_grad(dy, kernel, x_shape, strides, pads, groups)
    conv_kernel_grad(x, dy, kernel_shape, strides, pads, groups)

`conv.py` ties them together with a custom VJP, chooses them per pass
(`conv.auto_plan`) and runs them on each device's slice of the batch.
"""

from __future__ import annotations

import jax
import numpy as np

from resnet_jax.cpu import native

Pads = tuple[tuple[int, int], tuple[int, int]]


# How oneDNN computes a kernel gradient (cpu_kernels.cc, Variant): on the
# NHWC activations in place, on copies in its preferred blocked layout, or
# with its im2col + GEMM implementation.
KERNEL_GRAD_VARIANTS = ('nhwc', 'blocked', 'gemm')


def _params(strides: tuple[int, int], pads: Pads, groups: int,
            variant: str = 'nhwc') -> np.ndarray:
  (top, bottom), (left, right) = pads
  return np.array([*strides, top, bottom, left, right, groups,
                   KERNEL_GRAD_VARIANTS.index(variant)], np.int64)


def _call(what: str, out_shape: tuple[int, ...], operands: tuple[jax.Array, ...],
          strides: tuple[int, int], pads: Pads, groups: int,
          variant: str = 'nhwc') -> jax.Array:
  return native.call(f'resnet_jax_onednn_conv_{what}',
                     jax.ShapeDtypeStruct(out_shape, operands[0].dtype), *operands,
                     params=_params(strides, pads, groups, variant))


def out_hw(x_shape, kernel_shape, strides, pads) -> tuple[int, int]:
  """Output height and width of a window of kernel_shape[:2] (a convolution's
  kernel or a pooling window) sliding over NHWC `x_shape`."""
  return tuple((x_shape[1 + a] + sum(pads[a]) - kernel_shape[a]) // strides[a] + 1
               for a in range(2))


def conv_forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 pads: Pads, groups: int = 1,
                 bias: jax.Array | None = None) -> jax.Array:
  """NHWC x (float32) convolved with an HWIO kernel, plus `bias` if given
  (added by the convolution's kernel as it writes its output: no second
  pass over the output)."""
  shape = (x.shape[0], *out_hw(x.shape, kernel.shape, strides, pads),
           kernel.shape[3])
  if bias is None:
    return _call('forward', shape, (x, kernel), strides, pads, groups)
  return _call('forward_bias', shape, (x, kernel, bias), strides, pads, groups)


def conv_input_grad(dy: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...],
                    strides: tuple[int, int], pads: Pads,
                    groups: int = 1) -> jax.Array:
  """d<conv(x), dy>/dx."""
  return _call('input_grad', tuple(x_shape), (dy, kernel), strides, pads, groups)


def conv_kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...],
                     strides: tuple[int, int], pads: Pads, groups: int = 1,
                     variant: str = 'nhwc') -> jax.Array:
  """d<conv(x), dy>/dkernel, computed as `variant` (KERNEL_GRAD_VARIANTS)."""
  return _call('kernel_grad', tuple(kernel_shape), (x, dy), strides, pads, groups,
               variant)
