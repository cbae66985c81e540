"""Per-layer profile of the convolution implementations on XLA's CPU backend.

  python -m resnet_jax.tools.profile_conv [--nets=r18_96,r20_32] [--reps=5]

For every distinct conv layer shape of the network it times, separately and
with jit + warm-up + median of --reps calls: the forward convolution (fwd), the
input gradient (dgrad) and the weight gradient (wgrad), for each
implementation ('xla', 'patches', and 'auto': the per-pass choice of
conv.auto_plan), and prints ms per call and GFLOP/s. Then it adds the
per-layer times up over the network (times the number of layers of each
shape) and times BatchNorm + ReLU forward+backward on every conv output, so a
step splits into conv fwd / dgrad / wgrad and BatchNorm; compare the sum with
a whole step from `python -m resnet_jax.tools.benchmark` (the rest is the loss,
the optimizer and the residual adds).

What it found is encoded in resnet_jax/cpu/conv.py, with the reasons there: XLA's
kernel-gradient convolution is its slowest pass, so `conv.auto_plan` takes
it from the matmul form everywhere; XLA's forward and input gradient are slow
on small maps with many channels and on 1x1 convolutions, where patches win,
while on large maps with few channels copying out the patches dominates and
XLA's own convolution is kept. Patch chunks are cache-sized
(`passes.PATCH_BYTES_LIMIT`), and `malloc.configure_cpu_malloc`, applied here as
in training, keeps XLA:CPU from page-faulting its big temporaries in again
every step (a cost that can exceed the arithmetic). Timings on a shared
machine are noisy: compare implementations within one run, and rerun. The
measured figures, with date and machine, are in docs/performance.md.
"""

from __future__ import annotations

import collections
import functools
import time

from absl import flags

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax import cli
from resnet_jax.cpu import conv, native
from resnet_jax.cpu import malloc
from resnet_jax.cpu import passes
from resnet_jax.errors import UserError

# (H, W, Cin, Cout, k, stride, pad, count) per layer shape.
Layer = collections.namedtuple('Layer', 'h w cin cout k s p count')

NETS = {
    # d2l "textbook" ResNet-18 at 96x96x1, batch 256.
    'r18_96': (256, [
        Layer(96, 96, 1, 64, 7, 2, 3, 1),
        Layer(24, 24, 64, 64, 3, 1, 1, 4),
        Layer(24, 24, 64, 128, 3, 2, 1, 1),
        Layer(24, 24, 64, 128, 1, 2, 0, 1),
        Layer(12, 12, 128, 128, 3, 1, 1, 3),
        Layer(12, 12, 128, 256, 3, 2, 1, 1),
        Layer(12, 12, 128, 256, 1, 2, 0, 1),
        Layer(6, 6, 256, 256, 3, 1, 1, 3),
        Layer(6, 6, 256, 512, 3, 2, 1, 1),
        Layer(6, 6, 256, 512, 1, 2, 0, 1),
        Layer(3, 3, 512, 512, 3, 1, 1, 3),
    ]),
    # CIFAR ResNet-20 at 32x32x3, batch 128 (option-A shortcuts: no 1x1 convs).
    'r20_32': (128, [
        Layer(32, 32, 3, 16, 3, 1, 1, 1),
        Layer(32, 32, 16, 16, 3, 1, 1, 6),
        Layer(32, 32, 16, 32, 3, 2, 1, 1),
        Layer(16, 16, 32, 32, 3, 1, 1, 5),
        Layer(16, 16, 32, 64, 3, 2, 1, 1),
        Layer(8, 8, 64, 64, 3, 1, 1, 5),
    ]),
    # The default config: CIFAR-style ResNet-8 at 28x28x1, batch 128.
    'r8_28': (128, [
        Layer(28, 28, 1, 16, 3, 1, 1, 1),
        Layer(28, 28, 16, 16, 3, 1, 1, 2),
        Layer(28, 28, 16, 32, 3, 2, 1, 1),
        Layer(14, 14, 32, 32, 3, 1, 1, 1),
        Layer(14, 14, 32, 64, 3, 2, 1, 1),
        Layer(7, 7, 64, 64, 3, 1, 1, 1),
    ]),
    # The textbook ResNet-18 at Fashion-MNIST's own 28x28x1, batch 256.
    'r18_28': (256, [
        Layer(28, 28, 1, 64, 7, 2, 3, 1),
        Layer(7, 7, 64, 64, 3, 1, 1, 4),
        Layer(7, 7, 64, 128, 3, 2, 1, 1),
        Layer(7, 7, 64, 128, 1, 2, 0, 1),
        Layer(4, 4, 128, 128, 3, 1, 1, 3),
        Layer(4, 4, 128, 256, 3, 2, 1, 1),
        Layer(4, 4, 128, 256, 1, 2, 0, 1),
        Layer(2, 2, 256, 256, 3, 1, 1, 3),
        Layer(2, 2, 256, 512, 3, 2, 1, 1),
        Layer(2, 2, 256, 512, 1, 2, 0, 1),
        Layer(1, 1, 512, 512, 3, 1, 1, 3),
    ]),
    # torchvision ResNet-18 at 32x32x3, batch 128.
    'r18_32': (128, [
        Layer(32, 32, 3, 64, 7, 2, 3, 1),
        Layer(8, 8, 64, 64, 3, 1, 1, 4),
        Layer(8, 8, 64, 128, 3, 2, 1, 1),
        Layer(8, 8, 64, 128, 1, 2, 0, 1),
        Layer(4, 4, 128, 128, 3, 1, 1, 3),
        Layer(4, 4, 128, 256, 3, 2, 1, 1),
        Layer(4, 4, 128, 256, 1, 2, 0, 1),
        Layer(2, 2, 256, 256, 3, 1, 1, 3),
        Layer(2, 2, 256, 512, 3, 2, 1, 1),
        Layer(2, 2, 256, 512, 1, 2, 0, 1),
        Layer(1, 1, 512, 512, 3, 1, 1, 3),
    ]),
}


# Formulations to compare: (fwd, dgrad, wgrad) as passes.conv_forward & co. take them.
IMPLS = {'xla': ('xla', 'xla', 'xla'), 'patches': conv.PATCHES_PLAN}

_NETS = flags.DEFINE_string(
    'nets', 'r18_96,r20_32',
    f'Comma-separated networks whose layer shapes to time: {", ".join(NETS)}.')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed calls per op (median; after one '
                             'warm-up call).')



def bench(fn, *args, reps: int) -> float:
  """Median seconds per call of jitted fn after one warm-up call."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def xla_conv(x, w, s, pads):
  return lax.conv_general_dilated(x, w, (s, s), pads,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def layer_ops(layer: Layer, batch: int):
  """{impl: {op: (fn, args)}} for one layer shape."""
  kx, kw_, kd = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (batch, layer.h, layer.w, layer.cin))
  w = jax.random.normal(kw_, (layer.k, layer.k, layer.cin, layer.cout))
  pads = ((layer.p, layer.p), (layer.p, layer.p))
  s = layer.s
  y_shape = jax.eval_shape(lambda x, w: xla_conv(x, w, s, pads), x, w).shape
  dy = jax.random.normal(kd, y_shape)
  ops = {}
  args = ((s, s), pads, None)
  plans = dict(IMPLS)
  if native.available():
    plans['onednn'] = conv.ONEDNN_PLAN
  plans['auto'] = conv.auto_plan(w.shape, (s, s), y_shape[1:3],
                                 use_onednn=native.available())
  for name, (f_how, d_how, w_how) in plans.items():
    ops[name] = {
        'fwd': (functools.partial(passes.conv_forward, strides=(s, s), pads=pads,
                                  precision=None, how=f_how), (x, w)),
        'dgrad': (lambda dy, w, h=d_how: passes.conv_input_grad(dy, w, x.shape, *args, h),
                  (dy, w)),
        'wgrad': (lambda x, dy, h=w_how: passes.conv_kernel_grad(x, dy, w.shape, *args, h),
                  (x, dy)),
    }
  return ops


def batchnorm_relu_seconds(shape: tuple[int, ...], reps: int) -> float:
  """BatchNorm (training mode) + ReLU, forward and backward, on one activation."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  bn = nn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.PRNGKey(1), x)

  def loss(params, x):
    y, _ = bn.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                    mutable=['batch_stats'])
    return jnp.sum(jax.nn.relu(y) * x)

  return bench(jax.grad(loss, argnums=(0, 1)), variables['params'], x, reps=reps)


def profile_layers(net: str, reps: int) -> dict:
  batch, layers = NETS[net]
  totals = collections.defaultdict(float)
  print(f'\n== {net}: batch {batch} ==')
  print(f'{"layer":>28} {"impl":>8} ' + ' '.join(f'{op + " ms":>9} {"GF/s":>5}'
                                                 for op in ('fwd', 'dgrad', 'wgrad')))
  for layer in layers:
    ho = (layer.h + 2 * layer.p - layer.k) // layer.s + 1
    flops = 2 * batch * ho * ho * layer.k * layer.k * layer.cin * layer.cout
    name = f'{layer.h}x{layer.w} {layer.cin}->{layer.cout} k{layer.k}s{layer.s} x{layer.count}'
    for impl, ops in layer_ops(layer, batch).items():
      cells = []
      for op, (fn, args) in ops.items():
        t = bench(fn, *args, reps=reps)
        totals[(impl, op)] += t * layer.count
        cells.append(f'{t * 1e3:9.2f} {flops / t / 1e9:5.0f}')
      print(f'{name:>28} {impl:>8} ' + ' '.join(cells))
    if layer.k > 1:  # One BN per 3x3/7x7 conv; 1x1 shortcuts' BNs are left out.
      totals['batchnorm'] += layer.count * batchnorm_relu_seconds(
          (batch, ho, ho, layer.cout), reps)
  return totals


def _nets() -> list[str]:
  nets = [n.strip() for n in _NETS.value.split(',') if n.strip()]
  unknown = [n for n in nets if n not in NETS]
  if unknown or not nets:
    raise UserError(f'--nets: unknown network {", ".join(unknown) or "(none given)"}'
                    f'; choose from {",".join(NETS)} (comma-separated)')
  return nets


def main(argv: list[str]) -> None:
  del argv
  nets = _nets()
  if _REPS.value < 1:
    raise UserError(f'--reps={_REPS.value}: give 1 or more timed calls per op')
  malloc.configure_cpu_malloc()
  print(f'jax {jax.__version__} backend {jax.default_backend()}')
  for net in nets:
    totals = profile_layers(net, _REPS.value)
    for impl in ('xla', 'patches', 'onednn', 'auto'):
      if (impl, 'fwd') not in totals:
        continue
      parts = {op: totals[(impl, op)] for op in ('fwd', 'dgrad', 'wgrad')}
      print(f'{net} {impl:>8} conv totals per step: ' + ', '.join(
          f'{op} {t * 1e3:.0f} ms' for op, t in parts.items())
            + f', sum {sum(parts.values()) * 1e3:.0f} ms')
    print(f'{net} BatchNorm + ReLU fwd+bwd per step: {totals["batchnorm"] * 1e3:.0f} ms')


if __name__ == '__main__':
  cli.run(main)
