"""Convolution modules for XLA's CPU backend: each pass planned per layer.

XLA's CPU backend runs a 2-D matmul at close to the machine's peak, but its
convolutions much slower, and the weight-gradient convolution slowest of all.
Each of the three convolutions of a layer (forward, input gradient, kernel
gradient) can instead be computed by oneDNN (PyTorch's CPU convolutions, as
custom calls into the native kernels) or as patches plus a matmul
(`passes.py`); `auto_plan` chooses per layer and pass, `planned_conv` ties
the three together with a custom VJP.

Which is fastest depends on the layer, and per pass: patches win big on
small feature maps with many channels, on 1x1 convolutions (a plain matmul)
and in the kernel gradient; XLA's own convolutions win on large maps with
few channels, where copying out the patches dominates; oneDNN wins on most
3x3 layers when it is built. `AutoConv` ('auto' on the CPU) therefore
chooses per layer and per pass.

The parameters ('kernel' HWIO, 'bias') have the names, shapes and initialisers
of `flax.linen.Conv`, so checkpoints are interchangeable between
implementations. `python -m resnet_jax.tools.profile_conv` times each pass of
each layer shape: the measurements behind the choices made here (figures in
docs/performance.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from flax.linen import linear as flax_linear
from jax import lax

from resnet_jax import sharding
from resnet_jax.cpu import native, onednn
from resnet_jax.cpu.passes import (PATCH_BYTES_LIMIT, Pads, conv_forward,
                                   conv_input_grad, conv_kernel_grad)
from resnet_jax.errors import UserError


# How each of the three convolutions of a layer is computed: (forward, input
# gradient, kernel gradient), as accepted by the three functions above.
Plan = tuple[str, str, str]
PATCHES_PLAN: Plan = ('patches', 'col2im', 'patches')
HYBRID_PLAN: Plan = ('xla', 'xla', 'patches')
XLA_PLAN: Plan = ('xla', 'xla', 'xla')
ONEDNN_PLAN: Plan = ('onednn', 'onednn', 'onednn')


def auto_plan(kernel_shape: tuple[int, ...], strides: tuple[int, int],
              out_hw: tuple[int, int], groups: int = 1,
              use_onednn: bool = False) -> Plan:
  """The faster formulation of each pass of one layer on XLA's CPU backend.

  Rules read off per-layer timings of every layer shape of ResNet-8/20 at
  28-32 px and ResNet-18 at 28, 32 and 96 px (python -m
  resnet_jax.tools.profile_conv), then checked on whole train steps (figures
  in docs/performance.md).

  With oneDNN (`use_onednn`: built here, float32 compute):
  - 1x1 kernels are plain matmuls: patches in every pass, except on maps of
    10x10 outputs or more, where oneDNN's forward and kernel gradient win.
  - Otherwise oneDNN's forward and input gradient (1.3-2x the patch passes
    and XLA's on most layers). Its kernel gradient: on maps of 20x20
    outputs or more with 32+ input channels on blocked copies of x and dy
    (faster than in place by more than the copies cost); with 128+ input
    channels, stride 1 and 6x6 to 12x12 outputs its im2col + GEMM
    implementation; on
    other maps of 7x7 outputs or more in place; on smaller maps oneDNN's
    (3.2, AVX2) direct kernel gradient falls to 10-60 GFLOP/s (1x1 maps
    with 512 channels: 10x slower than the matmul), so there it is the
    patches' matmul.
  - Grouped convolutions: oneDNN in every pass.

  Without it:
  - 1x1 kernels are plain matmuls (no patch copy): patches in every pass.
  - Outputs of at most 3x3 positions: patches in every pass; XLA's forward
    and input-gradient convolutions are at their slowest there. Also 64 or
    more output channels on maps of at most 8x8 (whole train steps of
    ResNet-18 at 32x32 were faster than with XLA's forward there).
  - Otherwise the forward pass stays XLA's (equal or faster: copying the
    patches costs as much as the matmul at these sizes); the input gradient
    is a matmul + col2im for strided layers (XLA's strided transposed conv
    is slower) and for 64 or more output channels.
  - The kernel gradient is always the matmul: with cache-sized patch chunks
    it beat XLA's on every layer shape measured, and whole train steps beat
    the earlier rule (XLA's kernel gradient below 64 channels) on every
    model timed.
  - Grouped convolutions have no patch form: XLA's.
  """
  kh, kw, _, cout = kernel_shape
  positions = out_hw[0] * out_hw[1]
  if use_onednn:
    if groups > 1:
      return ONEDNN_PLAN
    if kh * kw == 1:
      return ('onednn', 'col2im', 'onednn') if positions >= 100 else PATCHES_PLAN
    cin = kernel_shape[2]
    if positions >= 400 and cin >= 32:
      wgrad = 'onednn-blocked'
    elif cin >= 128 and positions >= 36 and max(strides) == 1:
      wgrad = 'onednn-gemm'
    elif positions >= 49:
      wgrad = 'onednn'
    else:
      wgrad = 'patches'
    return ('onednn', 'onednn', wgrad)
  if groups > 1:
    return XLA_PLAN
  if kh * kw == 1 or positions <= 9 or (cout >= 64 and positions <= 64):
    return PATCHES_PLAN
  dgrad = 'col2im' if max(strides) > 1 or cout >= 64 else 'xla'
  return ('xla', dgrad, 'patches')


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def planned_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                 strides: tuple[int, int], pads: Pads,
                 precision: lax.PrecisionLike = None, plan: Plan = PATCHES_PLAN,
                 limit: int = PATCH_BYTES_LIMIT, groups: int = 1) -> jax.Array:
  """2-D NHWC convolution with an HWIO kernel (plus `bias`, if not None),
  each pass computed as `plan` says (per device, see `sharding.per_device`),
  patches chunked to at most `limit` bytes. oneDNN adds the bias as it
  writes the output (the textbook model's convolutions have one: a whole
  extra pass over every activation otherwise)."""
  if bias is not None and plan[0] == 'onednn':
    return sharding.per_device(
        lambda x, k, b: onednn.conv_forward(x, k, strides, pads, groups, b),
        (True, False, False))(x, kernel, bias)
  y = sharding.per_device(
      lambda x, k: conv_forward(x, k, strides, pads, precision, plan[0], limit, groups),
      (True, False))(x, kernel)
  return y if bias is None else y + bias


def _planned_conv_fwd(x, kernel, bias, strides, pads, precision, plan, limit, groups):
  # Keep x, not its patches (up to kh*kw times larger): the backward pass
  # recomputes them, which costs a copy, not a matmul.
  return (planned_conv(x, kernel, bias, strides, pads, precision, plan, limit, groups),
          (x, kernel, bias is not None))


def _planned_conv_bwd(strides, pads, precision, plan, limit, groups, res, dy):
  x, kernel, has_bias = res
  dx = sharding.per_device(
      lambda dy, k: conv_input_grad(dy, k, dy.shape[:1] + x.shape[1:], strides, pads,
                                    precision, plan[1], limit, groups),
      (True, False))(dy, kernel)
  dkernel = sharding.per_device(
      lambda x, dy: conv_kernel_grad(x, dy, kernel.shape, strides, pads, precision,
                                     plan[2], limit, groups),
      (True, True), summed=True)(x, dy)
  dbias = jnp.sum(dy, axis=(0, 1, 2)) if has_bias else None
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype), dbias


planned_conv.defvjp(_planned_conv_fwd, _planned_conv_bwd)


class Conv(nn.Conv):
  """`flax.linen.Conv` with each pass computed as `plan` says (by default
  patches @ kernel; fast on XLA's CPU backend).

  Named `Conv` so that Flax auto-names its instances 'Conv_0', 'Conv_1', ...
  exactly like nn.Conv's, which keeps parameter trees interchangeable.

  Same fields, parameters and numbers as nn.Conv. Configurations the plan
  does not cover (dilated convolutions, negative padding, grouped ones
  without oneDNN) use lax.conv_general_dilated on the same parameters;
  padding modes other than
  'SAME', 'VALID' and explicit integers, masks and non-2-D inputs raise.
  """

  # How the forward and the two gradients are computed; None: `auto_plan`.
  plan: Plan | None = PATCHES_PLAN
  patch_bytes_limit: int = PATCH_BYTES_LIMIT

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel_size = ((self.kernel_size,) * 2 if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    if len(kernel_size) != 2 or self.mask is not None:
      raise UserError('conv_impl="patches" supports 2-D convolutions without '
                      'masks only: use conv_impl="xla" for this layer')
    strides, input_dilation, kernel_dilation = (
        _pair(v) for v in (self.strides, self.input_dilation, self.kernel_dilation))

    batch_shape = inputs.shape[:-3]
    x = inputs.reshape((-1,) + inputs.shape[-3:])
    in_features = x.shape[-1]
    if in_features % self.feature_group_count:
      raise UserError(f'input features {in_features} are not divisible by '
                      f'feature_group_count={self.feature_group_count}')
    kernel = self.param(
        'kernel', self.kernel_init,
        kernel_size + (in_features // self.feature_group_count, self.features),
        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = flax_dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)

    pads = _explicit_padding(self.padding, x.shape[1:3], kernel_size, strides,
                             kernel_dilation)
    groups = self.feature_group_count
    plan = self.plan
    if plan is None or any(how.startswith('onednn') for how in plan):
      # oneDNN's convolutions are float32 (bfloat16 compute takes the others).
      use_onednn = x.dtype == jnp.float32 and native.available()
      if plan is None or not use_onednn:
        plan = auto_plan(kernel.shape, strides,
                         onednn.out_hw(x.shape, kernel.shape, strides, pads), groups,
                         use_onednn)
    plan = tuple(plan)
    if (input_dilation == (1, 1) and kernel_dilation == (1, 1)
        and min(min(pads)) >= 0 and plan != XLA_PLAN
        and (groups == 1 or set(plan) <= {'onednn', 'xla'})):
      y = planned_conv(x, kernel, bias, strides, pads, self.precision, plan,
                       self.patch_bytes_limit, groups)
    else:
      y = lax.conv_general_dilated(
          x, kernel, strides, pads, lhs_dilation=input_dilation,
          rhs_dilation=kernel_dilation, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=groups, precision=self.precision)
      if bias is not None:
        y = y + bias
    return y.reshape(batch_shape + y.shape[1:])


PatchConv = Conv


class HybridConv(Conv):
  """`Conv` with XLA's forward and input gradient, and the kernel gradient as a matmul."""
  plan: Plan = HYBRID_PLAN


class AutoConv(Conv):
  """`Conv` with each pass of each layer chosen by `auto_plan` (from shapes)."""
  plan: Plan | None = None


class OnednnConv(Conv):
  """`Conv` with oneDNN's forward and gradients (float32; `auto_plan`'s
  other paths for bfloat16 compute)."""
  plan: Plan = ONEDNN_PLAN


# Auto-named like nn.Conv ('Conv_0', ...) so that parameter trees stay interchangeable.
HybridConv.__name__ = 'Conv'
AutoConv.__name__ = 'Conv'
OnednnConv.__name__ = 'Conv'


def _pair(value: None | int | Sequence[int]) -> tuple[int, int]:
  if value is None:
    return (1, 1)
  if isinstance(value, int):
    return (value, value)
  return tuple(value)


def _explicit_padding(padding, spatial: tuple[int, int], kernel_size: tuple[int, int],
                      strides: tuple[int, int], dilation: tuple[int, int]) -> Pads:
  """nn.Conv's padding argument as ((top, bottom), (left, right))."""
  padding = flax_linear.canonicalize_padding(padding, 2)
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      raise UserError(f'conv_impl="patches" does not support padding={padding!r}: '
                      'use conv_impl="xla" for this layer')
    dilated = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
    padding = lax.padtype_to_pads(spatial, dilated, strides, padding)
  return tuple(tuple(int(v) for v in p) for p in padding)
