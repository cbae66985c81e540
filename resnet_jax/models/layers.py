"""The one hook for platform-specific layers: `Layers(conv, norm, pool)`.

A `ResNet` builds every convolution, BatchNorm and max-pool from its
`layers` value. The default is Flax's own (`nn.Conv`, `nn.BatchNorm`,
`nn.max_pool`), which XLA compiles well on GPUs and TPUs. Another platform
supplies drop-ins with the same constructor, parameters and numbers
(`resnet_jax.cpu.layers.layers_for('auto')` gives the CPU path's), so
checkpoints move freely between them. A variant with, say, GroupNorm is
`partial(ResNet, layers=Layers(norm=MyNorm))`.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax

ModuleDef = Any


@dataclasses.dataclass(frozen=True)
class Layers:
  """The layer implementations a network is built from.

  Attributes:
    conv: a module with `nn.Conv`'s constructor and parameters.
    norm: a module with `nn.BatchNorm`'s constructor and variables.
    pool: a function with `nn.max_pool`'s signature (the ImageNet stem's).
  """
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  pool: Callable[..., jax.Array] = nn.max_pool


FLAX = Layers()
