"""Per-layer profile of the convolution implementations on XLA's CPU backend.

Usage (from the repo root):
  python benchmarks/profile_conv.py [--nets r18_96,r20_32] [--reps 5]

For every distinct conv layer shape of the network it times, separately and
with jit + warm-up + median of --reps calls: the forward convolution (fwd), the
input gradient (dgrad) and the weight gradient (wgrad), for each
implementation ('xla', 'patches', and 'auto': the per-pass choice of
conv.auto_plan), and prints ms per call and GFLOP/s. Then it adds the
per-layer times up over the network (times the number of layers of each
shape) and times BatchNorm + ReLU forward+backward on every conv output, so a
step splits into conv fwd / dgrad / wgrad and BatchNorm; compare the sum with
a whole step from `python -m resnet_jax.benchmark` (the rest is the loss,
the optimizer and the residual adds).

Findings (2-core Zen 4 dev machine, shared with other jobs, so noisy; jax 0.10.2):
- Per layer, r18_96 with XLA's convs: fwd 3.1 s, dgrad 3.3 s, wgrad 7.4 s per
  step (sum 13.8 s): the kernel gradient runs at 5-30 GFLOP/s (1x1 strided:
  5-13), fwd/dgrad at 30-100. The patches formulation's kernel gradient
  reaches 20-70 GFLOP/s, and 1x1 convs as plain matmuls are 3-15x faster in
  wgrad than XLA's.
- The biggest single cost was not arithmetic but page faults: XLA:CPU
  allocates each step's big temporaries afresh and glibc mmaps/unmaps them
  (>32 MiB, or per-thread arenas), so every step re-faults and zeroes them
  (~156k faults, 0.3 s sys per 3x3 64->64 conv at 24x24 b256). With
  conv.configure_cpu_malloc() (no mmap, no trim, one arena) the faults go to 0
  and that layer's patches forward drops 550 -> 250 ms.
- Patch extraction: XLA turns slice(pad(x)) into one padded copy per tap and
  then a separate concatenate: ~3x the memory traffic of the patches. For
  small channel counts (CIFAR 16-32 channels) this copy dominates, and XLA's
  own conv is faster (r20_32 layers: patches 2-8x slower per op).
- Quieter rerun (2026-11-23, all nets): XLA's forward and input-gradient
  convolutions collapse on tiny maps with many channels: 2x2 256->256 at
  batch 256 takes 170 ms (7 GFLOP/s) against 7 ms as patches (172), 1x1
  512->512 79 ms against 6.5 ms; the strided input gradient 4x4 128->256
  75 ms against 6 ms. On 16-32 channels at 28-32 px XLA is 2-3x faster in
  forward and input gradient and ~1.5-2x in the kernel gradient; from 64
  channels the matmul kernel gradient is 1.2-1.5x faster. Single layers
  reached up to ~210 GFLOP/s, above the nominal 166 (the cores boost).
  conv.auto_plan encodes these findings per pass.
- 2-core Zen 3 (2026-11-24): patch chunks of 128 MiB made the patch passes
  memory-bound; cache-sized chunks (conv.PATCH_BYTES_LIMIT, now 8 MiB) made
  them 1.2-2x faster (r20_32 16->16 kernel gradient 24 -> 12 ms, XLA's 31;
  r18_96 24x24 64->64: fwd 180 -> 96, dgrad 127 -> 94, wgrad 170 -> 134 ms,
  XLA's wgrad 1,317 ms), so the matmul kernel gradient now wins on every
  layer shape and auto_plan uses it everywhere. BatchNorm + ReLU
  forward+backward is ~6 % of a ResNet-20 step (3.4 ms per 32x32x16
  activation at batch 128).
- Whole-step (benchmarks/pytorch_compare.py, one run, loaded machine):
  resnet18 at 32x32x3 b128 patches 126.5 img/s vs xla 28.4 vs hybrid 27.2
  (XLA's convs on 1x1..8x8 maps are slow in all three passes); d2l ResNet-18
  at 96x96x1 b256 too noisy to separate (p10 step: xla 5.9 s, patches 6.0 s,
  hybrid 10.7 s, torch 3.4 s).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from resnet_jax import conv  # noqa: E402

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


# Formulations to compare: (fwd, dgrad, wgrad) as conv.conv_forward & co. take them.
IMPLS = {'xla': ('xla', 'xla', 'xla'), 'patches': conv.PATCHES_PLAN}


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
  plans = dict(IMPLS, auto=conv.auto_plan(w.shape, (s, s), y_shape[1:3]))
  for name, (f_how, d_how, w_how) in plans.items():
    ops[name] = {
        'fwd': (functools.partial(conv.conv_forward, strides=(s, s), pads=pads,
                                  precision=None, how=f_how), (x, w)),
        'dgrad': (lambda dy, w, h=d_how: conv.conv_input_grad(dy, w, x.shape, *args, h),
                  (dy, w)),
        'wgrad': (lambda x, dy, h=w_how: conv.conv_kernel_grad(x, dy, w.shape, *args, h),
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--nets', default='r18_96,r20_32')
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args()
  conv.configure_cpu_malloc()
  print(f'jax {jax.__version__} backend {jax.default_backend()}')
  for net in args.nets.split(','):
    totals = profile_layers(net, args.reps)
    for impl in ('xla', 'patches', 'auto'):
      parts = {op: totals[(impl, op)] for op in ('fwd', 'dgrad', 'wgrad')}
      print(f'{net} {impl:>8} conv totals per step: ' + ', '.join(
          f'{op} {t * 1e3:.0f} ms' for op, t in parts.items())
            + f', sum {sum(parts.values()) * 1e3:.0f} ms')
    print(f'{net} BatchNorm + ReLU fwd+bwd per step: {totals["batchnorm"] * 1e3:.0f} ms')


if __name__ == '__main__':
  main()
