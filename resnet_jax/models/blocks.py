"""Residual blocks and stems, built from injected conv, norm and activation.

Every block receives `conv` and `norm` as module factories (usually
`functools.partial` of `nn.Conv` / `nn.BatchNorm` with dtype, bias and
momentum already bound) and `act` as a function, so a variant — another
convolution implementation, GroupNorm, bfloat16 — is a different argument,
not a different block. `train` is a call argument: BatchNorm uses batch
statistics and updates `batch_stats` in training, running averages otherwise.

Sub-module names follow torchvision's (`conv1`, `bn1`, ..., `downsample_conv`)
so that converting its checkpoints is a mechanical rename.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
Array = jax.Array


def _norm(norm: ModuleDef, train: bool, name: str, zero_init: bool = False):
  """A norm layer in the right mode; `zero_init` starts its scale at zero so a
  fresh residual branch outputs zero (Goyal et al. 2017)."""
  kwargs = {'scale_init': nn.initializers.zeros} if zero_init else {}
  return norm(use_running_average=not train, name=name, **kwargs)


class Residual(nn.Module):
  """The textbook residual block (d2l.ai, "Residual Networks (ResNet)").

  3x3 conv (strides) -> BN -> ReLU -> 3x3 conv -> BN, plus the input or its
  1x1 projection (same strides) when `use_1x1conv`; then ReLU.
  """
  num_channels: int
  use_1x1conv: bool = False
  strides: int = 1
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  act: Callable[[Array], Array] = nn.relu
  zero_init_last: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    s = (self.strides, self.strides)
    y = self.conv(self.num_channels, (3, 3), s, padding=1, name='conv1')(x)
    y = self.act(_norm(self.norm, train, 'bn1')(y))
    y = self.conv(self.num_channels, (3, 3), padding=1, name='conv2')(y)
    y = _norm(self.norm, train, 'bn2', self.zero_init_last)(y)
    if self.use_1x1conv:
      x = self.conv(self.num_channels, (1, 1), s, padding=0, name='conv3')(x)
    return self.act(y + x)


def textbook_block(features: int, strides: int = 1, **kwargs) -> Residual:
  """`Residual` with the chapter's rule: a 1x1 conv exactly where it strides."""
  return Residual(features, use_1x1conv=strides != 1, strides=strides,
                  **kwargs)


class BasicBlock(nn.Module):
  """Two 3x3 convs (He et al. 2016, Table 1, ResNet-18/34; CIFAR ResNets).

  The shortcut is the identity unless the shape changes; then it is option B
  (1x1 projection + BN, the ImageNet default) or option A (subsample and
  zero-pad channels, parameter-free, the CIFAR ResNets of section 4.2).
  """
  features: int
  strides: int = 1
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  act: Callable[[Array], Array] = nn.relu
  zero_init_last: bool = False
  shortcut: str = 'B'

  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    s = (self.strides, self.strides)
    y = self.conv(self.features, (3, 3), s, padding=1, name='conv1')(x)
    y = self.act(_norm(self.norm, train, 'bn1')(y))
    y = self.conv(self.features, (3, 3), padding=1, name='conv2')(y)
    y = _norm(self.norm, train, 'bn2', self.zero_init_last)(y)
    return self.act(y + self._shortcut(x, train))

  def _shortcut(self, x: Array, train: bool) -> Array:
    if x.shape[-1] == self.features and self.strides == 1:
      return x
    if self.shortcut == 'A':
      return zero_pad_shortcut(x, self.features, self.strides)
    return projection(self, x, self.features, self.strides, train)


def zero_pad_shortcut(x: Array, features: int, strides: int) -> Array:
  """Option A of He et al. 2016: subsample, then pad the new channels with 0."""
  x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


def projection(block: nn.Module, x: Array, features: int, strides: int,
               train: bool) -> Array:
  """Option B: a strided 1x1 conv + BN (torchvision's `downsample`)."""
  x = block.conv(features, (1, 1), (strides, strides), padding=0,
                 name='downsample_conv')(x)
  return _norm(block.norm, train, 'downsample_bn')(x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 with expansion 4 (ResNet-50/101/152, ResNeXt, WRN).

  `groups` is the cardinality of ResNeXt (the number of groups of the 3x3
  conv) and `base_width` the width per group at the first stage, so the 3x3
  conv has int(features * base_width / 64) * groups channels. Downsampling is
  on the 3x3 conv ("ResNet v1.5") unless `stride_in_1x1` (original v1).
  """
  features: int
  strides: int = 1
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  act: Callable[[Array], Array] = nn.relu
  zero_init_last: bool = False
  groups: int = 1
  base_width: int = 64
  stride_in_1x1: bool = False

  expansion = 4

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    width = int(self.features * self.base_width / 64) * self.groups
    out = self.features * self.expansion
    s = (self.strides, self.strides)
    s1, s3 = (s, (1, 1)) if self.stride_in_1x1 else ((1, 1), s)
    y = self.conv(width, (1, 1), s1, padding=0, name='conv1')(x)
    y = self.act(_norm(self.norm, train, 'bn1')(y))
    y = self.conv(width, (3, 3), s3, padding=1, feature_group_count=self.groups,
                  name='conv2')(y)
    y = self.act(_norm(self.norm, train, 'bn2')(y))
    y = self.conv(out, (1, 1), padding=0, name='conv3')(y)
    y = _norm(self.norm, train, 'bn3', self.zero_init_last)(y)
    if x.shape[-1] != out or self.strides != 1:
      x = projection(self, x, out, self.strides, train)
    return self.act(y + x)


class PreActBasicBlock(nn.Module):
  """Pre-activation basic block (He et al. 2016, "Identity Mappings", Fig. 1b).

  BN -> ReLU -> conv, twice; the projection shortcut, where the shape changes,
  is applied to the pre-activated input. The sum is not activated.
  `zero_init_last` zeroes the last conv, since no BN closes the branch.
  """
  features: int
  strides: int = 1
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  act: Callable[[Array], Array] = nn.relu
  zero_init_last: bool = False

  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    s = (self.strides, self.strides)
    pre = self.act(_norm(self.norm, train, 'bn1')(x))
    shortcut = _preact_shortcut(self, x, pre, self.features, self.strides)
    y = self.conv(self.features, (3, 3), s, padding=1, name='conv1')(pre)
    y = self.act(_norm(self.norm, train, 'bn2')(y))
    y = self.conv(self.features, (3, 3), padding=1, name='conv2',
                  **_zero_kernel(self.zero_init_last))(y)
    return y + shortcut


class PreActBottleneck(nn.Module):
  """Pre-activation bottleneck: (BN -> ReLU -> conv) x 3, 1x1-3x3-1x1."""
  features: int
  strides: int = 1
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  act: Callable[[Array], Array] = nn.relu
  zero_init_last: bool = False

  expansion = 4

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    out = self.features * self.expansion
    pre = self.act(_norm(self.norm, train, 'bn1')(x))
    shortcut = _preact_shortcut(self, x, pre, out, self.strides)
    y = self.conv(self.features, (1, 1), padding=0, name='conv1')(pre)
    y = self.act(_norm(self.norm, train, 'bn2')(y))
    y = self.conv(self.features, (3, 3), (self.strides, self.strides),
                  padding=1, name='conv2')(y)
    y = self.act(_norm(self.norm, train, 'bn3')(y))
    y = self.conv(out, (1, 1), padding=0, name='conv3',
                  **_zero_kernel(self.zero_init_last))(y)
    return y + shortcut


def _preact_shortcut(block: nn.Module, x: Array, pre: Array, features: int,
                     strides: int) -> Array:
  if x.shape[-1] == features and strides == 1:
    return x
  return block.conv(features, (1, 1), (strides, strides), padding=0,
                    name='downsample_conv')(pre)


def _zero_kernel(zero: bool) -> dict[str, Any]:
  return {'kernel_init': nn.initializers.zeros} if zero else {}


class ImageNetStem(nn.Module):
  """7x7/2 conv (padding 3) -> BN -> ReLU -> 3x3/2 max-pool (padding 1).

  With `preact` (ResNet v2) the BN and ReLU are left to the first block.
  """
  features: int = 64
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  act: Callable[[Array], Array] = nn.relu
  preact: bool = False
  pool: Callable[..., Array] = nn.max_pool  # `Layers.pool`

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    x = self.conv(self.features, (7, 7), (2, 2), padding=3, name='conv1')(x)
    self.sow('intermediates', 'stem_conv', x)
    if not self.preact:
      x = self.act(_norm(self.norm, train, 'bn1')(x))
    x = self.pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    self.sow('intermediates', 'stem_pool', x)
    return x


class CifarStem(nn.Module):
  """3x3 conv (16 channels in the paper) -> BN -> ReLU, no pooling.

  `pool` is accepted (and unused) so that every stem is built alike."""
  features: int = 16
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  act: Callable[[Array], Array] = nn.relu
  preact: bool = False
  pool: Callable[..., Array] | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    x = self.conv(self.features, (3, 3), padding=1, name='conv1')(x)
    self.sow('intermediates', 'stem_conv', x)
    if not self.preact:
      x = self.act(_norm(self.norm, train, 'bn1')(x))
    return x
