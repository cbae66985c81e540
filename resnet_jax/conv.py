"""Convolution modules: XLA's own, and the fast paths for XLA's CPU backend.

XLA's CPU backend runs a 2-D matmul at close to the machine's peak, but its
convolutions much slower, and the weight-gradient convolution slowest of all.
Each of the three convolutions of a layer (forward, input gradient, kernel
gradient) can instead be computed by oneDNN (`onednn.py`: PyTorch's CPU
convolutions, as custom calls into the native kernels) or as patches plus a
matmul; `auto_plan` chooses per layer and pass, `planned_conv` ties the
three together with a custom VJP. The patch form writes a convolution as

    y = patches(x) @ W        patches: (N*Ho*Wo, kh*kw*Cin), W: (kh*kw*Cin, Cout)

where patches(x) concatenates the kh*kw shifted (strided) views of the padded
input along channels, and gives it a custom VJP that again uses one matmul each:

    dW = patches(x)^T @ dy    (patches recomputed from x: only x is kept)
    dx = col2im(dy @ W^T)     (sum of the kh*kw shifted pads of dy @ W^T)

`HybridConv` ('hybrid') keeps XLA's forward and input-gradient convolutions
and only takes the kernel gradient from the matmul form. Which is fastest
depends on the layer, and per pass: patches win big on small feature maps
with many channels (on 1x1 and 2x2 maps with 256-512 channels XLA's forward
and input-gradient convolutions are far from the matmul's speed), on 1x1
convolutions (a plain matmul) and in the kernel gradient; XLA's own
convolutions win on large maps with few channels (16-32 channels at 28x28),
where copying out the patches dominates. `AutoConv` ('auto' on the CPU)
therefore chooses per layer and per pass (`auto_plan`).
`configure_cpu_malloc` matters for all.

Memory and speed: the patches of a layer are kh*kw times its input. They are
computed in batch chunks of at most `PATCH_BYTES_LIMIT` bytes each, a
sequential loop over chunks, so a 3x3 layer never holds more than that in
patches at once, and the matmul reads each chunk's patches back from the
cache that their extraction just wrote them to, instead of from memory:
whole-batch patches make the patch passes memory-bound, and the cache-sized
chunks are what lets the matmul kernel gradient beat XLA's on every layer
shape measured.

The parameters ('kernel' HWIO, 'bias') have the names, shapes and initialisers
of `flax.linen.Conv`, so checkpoints are interchangeable between
implementations. `python -m resnet_jax.profile_conv` times each pass of each
layer shape: the measurements behind the choices made here. The figures,
with date and machine, are in README.md, Performance.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from flax.linen import linear as flax_linear
from jax import lax

from resnet_jax import native, onednn, sharding
from resnet_jax.errors import UserError

CONV_IMPLS = ('auto', 'xla', 'patches', 'hybrid', 'onednn')

Pads = tuple[tuple[int, int], tuple[int, int]]

# Largest patch buffer (bytes) materialised at once; bigger ones are chunked
# over the batch. Cache-sized, so that the matmul reads a chunk's patches
# from the cache their extraction wrote them to: much larger chunks (let alone
# whole-batch patches, kh*kw times a layer's input) make the patch passes
# memory-bound, much smaller ones cost loop overhead and thin matmuls. The
# value is the fastest of the sizes tried, per layer and on whole train steps
# (python -m resnet_jax.profile_conv; figures in README.md, Performance).
PATCH_BYTES_LIMIT = 8 * 2**20


def resolve_conv_impl(impl: str, platform: str | None = None) -> str:
  """The implementation `impl` stands for on `platform` ('cpu', 'cuda',
  'tpu', ...; default: this process's backend).

  'auto' is 'per_layer' (`AutoConv`) on the CPU and 'xla' elsewhere: only
  XLA's CPU convolutions are slow, GPU/TPU convolutions are not.
  """
  if impl not in CONV_IMPLS:
    raise UserError(
        f'unknown conv_impl {impl!r}: choose one of {", ".join(CONV_IMPLS)}')
  if impl == 'auto':
    platform = platform or jax.default_backend()
    return 'per_layer' if platform == 'cpu' else 'xla'
  return impl


def configure_cpu_malloc() -> bool:
  """Keeps glibc from returning big freed buffers to the OS (Linux; process-wide).

  XLA:CPU allocates every step's large temporaries afresh. glibc serves
  allocations above 32 MiB with mmap and unmaps them on free, so each step
  page-faults (and zeroes) all of its activations and patch buffers again, a
  cost that can exceed the arithmetic (see README.md, Performance). Serving
  them from the heap and never trimming it reuses the same pages. Costs:
  resident memory stays at its peak. Returns whether the settings were
  applied. Idempotent.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):  # Not glibc (e.g. musl).
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  # One arena: a buffer under 64 MiB freed in a per-thread arena would still
  # be unmapped with the (mmap-ed) heap that held it. A trim threshold of -1
  # turns trimming off; the largest positive one, 2**31 - 1, still trimmed
  # whenever a step freed more than 2 GiB at the top of the heap, as the
  # textbook ResNet-18 at batch 256 does: every second or third step then
  # faulted 1.4 GB back in (361k page faults, up to 6 s of system time on
  # top of a 4 s step).
  return all(mallopt(option, value) for option, value in (
      (m_mmap_max, 0), (m_trim_threshold, -1), (m_arena_max, 1)))


def get_conv(impl: str = 'auto') -> type[nn.Module]:
  """Module class with nn.Conv's constructor and parameters for `impl`.

  'xla' is `flax.linen.Conv` itself; 'patches' is `PatchConv` (all three
  passes as matmuls); 'hybrid' keeps XLA's forward and input-gradient
  convolutions and computes only the (slow in XLA) kernel gradient as a
  matmul; 'auto' is `AutoConv` on the CPU backend (each pass of each layer
  as `auto_plan` chooses) and 'xla' elsewhere. An unknown name raises `UserError` listing `CONV_IMPLS`.
  """
  impl = resolve_conv_impl(impl)
  if impl == 'onednn' and not native.available():
    raise UserError(f'conv_impl="onednn": {native.unavailable_reason()}; or use '
                    'conv_impl="auto", which then takes the other CPU paths')
  if impl != 'xla' and jax.default_backend() == 'cpu':
    configure_cpu_malloc()
  return {'xla': nn.Conv, 'patches': PatchConv, 'hybrid': HybridConv,
          'per_layer': AutoConv, 'onednn': OnednnConv}[impl]


def extract_patches(x: jax.Array, kernel_size: tuple[int, int],
                    strides: tuple[int, int], pads: Pads) -> jax.Array:
  """(N, H, W, C) -> (N, Ho, Wo, kh*kw*C), ordered (i, j, c) like an HWIO kernel.

  Built from kh*kw strided slices of the padded input (cheap copies that XLA
  fuses into one concatenate) rather than lax.conv_general_dilated_patches,
  which is itself a convolution and orders features channel-major.
  """
  (kh, kw), (sh, sw) = kernel_size, strides
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  if any(map(any, pads)):
    # Materialise the padded input (a cheap x-sized copy). Otherwise XLA
    # rewrites each slice-of-pad into its own padded copy and concatenates
    # those in a second pass: several times the memory traffic of one fused
    # concatenate.
    xp = lax.optimization_barrier(xp)
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  views = [
      lax.slice(xp, (0, i, j, 0),
                (xp.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, xp.shape[3]),
                (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)
  ]
  return views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)


def _col2im(dpatches: jax.Array, x_shape: tuple[int, ...], kernel_size: tuple[int, int],
            strides: tuple[int, int], pads: Pads) -> jax.Array:
  """Transpose of `extract_patches`: scatters (N, Ho, Wo, kh*kw*C) back onto x."""
  (kh, kw), (sh, sw) = kernel_size, strides
  n, h, w, c = x_shape
  hp, wp = h + sum(pads[0]), w + sum(pads[1])
  _, ho, wo, _ = dpatches.shape
  total = None
  for i in range(kh):
    for j in range(kw):
      k = i * kw + j
      view = dpatches[..., k * c:(k + 1) * c]
      # Interior padding undoes the stride; edge padding puts the view at (i, j).
      hi_h = hp - i - (ho - 1) * sh - 1
      hi_w = wp - j - (wo - 1) * sw - 1
      placed = lax.pad(view, jnp.zeros((), view.dtype),
                       ((0, 0, 0), (i, hi_h, sh - 1), (j, hi_w, sw - 1), (0, 0, 0)))
      total = placed if total is None else total + placed
  (pt, _), (pl, _) = pads
  return total[:, pt:pt + h, pl:pl + w, :]


def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int],
            precision: lax.PrecisionLike) -> jax.Array:
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         precision=precision)


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Pads,
              precision: lax.PrecisionLike, groups: int = 1) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, strides, pads, precision=precision,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=groups)


def batch_chunks(batch: int, bytes_per_example: int,
                 limit: int = PATCH_BYTES_LIMIT) -> int:
  """Fewest equal batch chunks (a divisor of `batch`) of at most `limit` bytes."""
  for chunks in range(1, batch + 1):
    if batch % chunks == 0 and (batch // chunks) * bytes_per_example <= limit:
      return chunks
  return batch


def _patch_bytes(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                 out_hw: tuple[int, int], itemsize: int) -> int:
  """Bytes of one example's patches."""
  kh, kw, cin, _ = kernel_shape
  return out_hw[0] * out_hw[1] * kh * kw * cin * itemsize


def _over_chunks(fn, chunks: int, *arrays: jax.Array) -> jax.Array:
  """fn applied to `chunks` equal batch slices in sequence (bounded memory)."""
  if chunks == 1:
    return fn(*arrays)
  split = [a.reshape((chunks, a.shape[0] // chunks) + a.shape[1:]) for a in arrays]
  out = lax.map(lambda xs: fn(*xs), split)
  return out.reshape((-1,) + out.shape[2:])


def conv_forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Pads,
                 precision: lax.PrecisionLike, how: str,
                 limit: int = PATCH_BYTES_LIMIT, groups: int = 1) -> jax.Array:
  """The convolution itself: 'patches' (one matmul per chunk), 'onednn' or
  'xla' (lax.conv)."""
  if how == 'onednn':
    return onednn.conv_forward(x, kernel, strides, pads, groups)
  if how == 'xla':
    return _xla_conv(x, kernel, strides, pads, precision, groups)
  kh, kw, cin, cout = kernel.shape

  def one(x):
    p = extract_patches(x, (kh, kw), strides, pads)
    y = _matmul(p.reshape(-1, kh * kw * cin), kernel.reshape(-1, cout), (1, 0),
                precision)
    return y.reshape(p.shape[:3] + (cout,))

  out_hw = onednn.out_hw(x.shape, kernel.shape, strides, pads)
  chunks = batch_chunks(x.shape[0], _patch_bytes(x.shape, kernel.shape, out_hw,
                                                 x.dtype.itemsize), limit)
  return _over_chunks(one, chunks, x)


def conv_input_grad(dy: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...],
                    strides: tuple[int, int], pads: Pads, precision: lax.PrecisionLike,
                    how: str, limit: int = PATCH_BYTES_LIMIT,
                    groups: int = 1) -> jax.Array:
  """d<conv(x), dy>/dx: 'col2im' (one matmul, then a sum of shifted pads),
  'onednn' or 'xla'."""
  if how == 'onednn':
    return onednn.conv_input_grad(dy, kernel, x_shape, strides, pads, groups)
  if how == 'xla':
    x = jax.ShapeDtypeStruct(x_shape, dy.dtype)
    return jax.linear_transpose(
        lambda x: _xla_conv(x, kernel, strides, pads, precision, groups), x)(dy)[0]
  kh, kw, cin, cout = kernel.shape

  def one(dy):
    dp = _matmul(dy.reshape(-1, cout), kernel.reshape(-1, cout), (1, 1), precision)
    return _col2im(dp.reshape(dy.shape[:3] + (kh * kw * cin,)),
                   (dy.shape[0],) + tuple(x_shape[1:]), (kh, kw), strides, pads)

  chunks = batch_chunks(dy.shape[0], _patch_bytes(
      x_shape, kernel.shape, dy.shape[1:3], dy.dtype.itemsize), limit)
  return _over_chunks(one, chunks, dy)


def conv_kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...],
                     strides: tuple[int, int], pads: Pads, precision: lax.PrecisionLike,
                     how: str, limit: int = PATCH_BYTES_LIMIT,
                     groups: int = 1) -> jax.Array:
  """d<conv(x), dy>/dkernel: 'patches' (patches^T @ dy, one matmul per chunk,
  summed over chunks), 'onednn' ('onednn-blocked', 'onednn-gemm': oneDNN's
  other ways, onednn.KERNEL_GRAD_VARIANTS) or 'xla'."""
  if how.startswith('onednn'):
    variant = how.partition('-')[2] or 'nhwc'
    return onednn.conv_kernel_grad(x, dy, kernel_shape, strides, pads, groups,
                                   variant)
  if how == 'xla':
    k = jax.ShapeDtypeStruct(kernel_shape, dy.dtype)
    return jax.linear_transpose(
        lambda k: _xla_conv(x, k, strides, pads, precision, groups), k)(dy)[0]
  kh, kw, cin, cout = kernel_shape

  def one(x, dy):
    p = extract_patches(x, (kh, kw), strides, pads).reshape(-1, kh * kw * cin)
    return _matmul(p, dy.reshape(-1, cout), (0, 0), precision)

  chunks = batch_chunks(x.shape[0], _patch_bytes(
      x.shape, kernel_shape, dy.shape[1:3], x.dtype.itemsize), limit)
  if chunks == 1:
    return one(x, dy).reshape(kernel_shape)
  split = [a.reshape((chunks, a.shape[0] // chunks) + a.shape[1:]) for a in (x, dy)]
  acc_dtype = jnp.promote_types(dy.dtype, jnp.float32)
  total = lax.fori_loop(
      0, chunks, lambda i, acc: acc + one(split[0][i], split[1][i]).astype(acc_dtype),
      jnp.zeros((kh * kw * cin, cout), acc_dtype))
  return total.astype(dy.dtype).reshape(kernel_shape)


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
  resnet_jax.profile_conv), then checked on whole train steps (figures in
  README.md, Performance).

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
