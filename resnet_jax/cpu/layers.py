"""The CPU path's layers, behind the model's one hook (`models.Layers`).

`layers_for(conv_impl)` is what `create_model(conv_impl=...)` builds a
network from: Flax's own layers for 'xla' and, for 'auto', on every backend
but the CPU; on the CPU, a convolution whose passes are planned per layer
(`conv.py`), the native max-pool (`pooling.py`) and BatchNorm with a
hand-written gradient (`batchnorm.py`). All have Flax's parameters and
numbers, so a checkpoint does not depend on the layers that trained it.
"""

import flax.linen as nn
import jax

from resnet_jax.cpu import batchnorm, native, pooling
from resnet_jax.cpu.conv import AutoConv, HybridConv, OnednnConv, PatchConv
from resnet_jax.cpu.malloc import configure_cpu_malloc
from resnet_jax.errors import UserError
from resnet_jax.models.layers import FLAX, Layers

# Every value of config.model.conv_impl.
CONV_IMPLS = ('auto', 'xla', 'patches', 'hybrid', 'onednn')


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


def get_conv(impl: str = 'auto') -> type[nn.Module]:
  """Module class with nn.Conv's constructor and parameters for `impl`.

  'xla' is `flax.linen.Conv` itself; 'patches' is `PatchConv` (all three
  passes as matmuls); 'hybrid' keeps XLA's forward and input-gradient
  convolutions and computes only the (slow in XLA) kernel gradient as a
  matmul; 'onednn' is oneDNN in every pass; 'auto' is `AutoConv` on the CPU
  backend (each pass of each layer as `conv.auto_plan` chooses) and 'xla'
  elsewhere. An unknown name raises `UserError` listing `CONV_IMPLS`.
  """
  impl = resolve_conv_impl(impl)
  if impl == 'onednn' and not native.available():
    raise UserError(f'conv_impl="onednn": {native.unavailable_reason()}; or '
                    'use conv_impl="auto", which then takes the other CPU '
                    'paths')
  if impl != 'xla' and jax.default_backend() == 'cpu':
    configure_cpu_malloc()
  return {'xla': nn.Conv, 'patches': PatchConv, 'hybrid': HybridConv,
          'per_layer': AutoConv, 'onednn': OnednnConv}[impl]


def layers_for(conv_impl: str = 'auto') -> Layers:
  """The layers of a network with `conv_impl`: Flax's where that resolves to
  XLA's convolution, else the CPU path's conv, BatchNorm and max-pool."""
  conv = get_conv(conv_impl)
  if conv is nn.Conv:
    return FLAX
  return Layers(conv=conv, norm=batchnorm.BatchNorm, pool=pooling.max_pool)
