"""`ResNet`: a stem, stages of residual blocks, and a pooled dense head.

The first block of every stage after the first halves the resolution. The
blocks and stems are `blocks.py`'s; the layers they are built from are one
`Layers` value (`layers.py`). The model sows named features into the
`intermediates` collection (stem conv, stem pool, each stage, pooled
features) so that summaries and feature extraction need no second model:
`apply(..., mutable=['intermediates'])`.
"""

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.blocks import ImageNetStem
from resnet_jax.models.layers import FLAX, Layers

ModuleDef = Any
# He et al. 2015 initialisation for convs followed by ReLU, as torchvision.
_HE_NORMAL_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class ResNet(nn.Module):
  """A residual network: stem -> stages -> [final BN-ReLU] -> pool -> dense.

  Attributes:
    stage_sizes: number of blocks per stage.
    block_cls: a block (or factory) called as block_cls(features, strides=...).
    num_classes: size of the output logits.
    stage_widths: `features` of the blocks of each stage.
    stem_cls: `ImageNetStem` or `CifarStem`.
    stem_width: output channels of the stem conv.
    preact: pre-activation network (ResNet v2): a final BN -> ReLU.
    conv_bias: convolutions keep a bias (only the textbook model does).
    zero_init_residual: start the last norm (or conv) of each branch at zero.
    block_kwargs: extra fields for every block (groups, shortcut, ...).
    layers: the conv, norm and pool implementations (Flax's by default;
      `layers.Layers`, the one hook for a platform's faster drop-ins).
    dtype: compute dtype; parameters stay in `param_dtype`.
    bn_momentum, bn_epsilon: in Flax's convention (PyTorch's 0.1 is 0.9 here).
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  stem_cls: ModuleDef = ImageNetStem
  stem_width: int = 64
  preact: bool = False
  conv_bias: bool = False
  zero_init_residual: bool = False
  block_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  layers: Layers = FLAX
  act: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(self.layers.conv, use_bias=self.conv_bias,
                             kernel_init=_HE_NORMAL_FAN_OUT,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(self.layers.norm, momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    layers = dict(conv=conv, norm=norm, act=self.act)
    x = jnp.asarray(x, self.dtype)
    x = self.stem_cls(self.stem_width, preact=self.preact, name='stem',
                      pool=self.layers.pool, **layers)(x, train)
    for i, (num_blocks, width) in enumerate(
        zip(self.stage_sizes, self.stage_widths)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(width, strides=strides,
                           zero_init_last=self.zero_init_residual,
                           name=f'layer{i + 1}_{j}', **layers,
                           **self.block_kwargs)(x, train)
      self.sow('intermediates', f'stage{i + 1}', x)
    if self.preact:
      x = self.act(norm(use_running_average=not train, name='bn_final')(x))
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'pool', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype,
                 param_dtype=self.param_dtype, name='fc')(x)
    # Logits in float32 so the loss is accurate under bfloat16 compute.
    return jnp.asarray(x, jnp.float32)


def network_order(name: str) -> tuple:
  """Sort key of a ResNet's top-level names, parameters' and sown features'
  alike, in the order the input meets them (stem, layer1_0, layer1_1, ...,
  stage1, ..., bn_final, pool, fc), where pytrees sort them alphabetically;
  for listings and for naming the first mismatch."""
  name = str(name)
  layer = re.fullmatch(r'layer(\d+)_(\d+)', name)
  if layer:
    return (1, int(layer.group(1)), int(layer.group(2)), '')
  stage = re.fullmatch(r'stage(\d+)', name)
  if stage:  # the features sown after the stage's last block
    return (1, int(stage.group(1)), 1 << 30, '')
  return ({'stem': 0, 'bn_final': 2, 'pool': 3, 'fc': 4}.get(name, 1), 0, 0,
          name)
