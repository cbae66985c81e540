"""The three passes of a 2-D convolution (forward, input gradient, kernel
gradient), each computable three ways: as patches and a matmul, by oneDNN
(`onednn.py`) or by XLA's own convolution. `conv.py` chooses per layer.

The patch form writes a convolution as

    y = patches(x) @ W        patches: (N*Ho*Wo, kh*kw*Cin), W: (kh*kw*Cin, Cout)

where patches(x) concatenates the kh*kw shifted (strided) views of the padded
input along channels; its gradients are again one matmul each:

    dW = patches(x)^T @ dy    (patches recomputed from x: only x is kept)
    dx = col2im(dy @ W^T)     (sum of the kh*kw shifted pads of dy @ W^T)

Memory and speed: the patches of a layer are kh*kw times its input. They are
computed in batch chunks of at most `PATCH_BYTES_LIMIT` bytes each, a
sequential loop over chunks, so a 3x3 layer never holds more than that in
patches at once, and the matmul reads each chunk's patches back from the
cache that their extraction just wrote them to, instead of from memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.cpu import onednn

Pads = tuple[tuple[int, int], tuple[int, int]]

# Largest patch buffer (bytes) materialised at once; bigger ones are chunked
# over the batch. Cache-sized, so that the matmul reads a chunk's patches
# from the cache their extraction wrote them to: much larger chunks (let alone
# whole-batch patches, kh*kw times a layer's input) make the patch passes
# memory-bound, much smaller ones cost loop overhead and thin matmuls. The
# value is the fastest of the sizes tried, per layer and on whole train steps
# (python -m resnet_jax.tools.profile_conv; figures in docs/performance.md).
PATCH_BYTES_LIMIT = 8 * 2**20


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
