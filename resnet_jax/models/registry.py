"""The model registry: every named network as a row, and `create_model`.

Each named model is one row of `_REGISTRY`: a block, a stage list and a few
options of `ResNet`. `create_model(name, num_classes=...)` builds one;
`available_models()` lists the names; `from_config(config.model)` builds the
network a run's config names (its keys are `create_model`'s arguments). A new
variant is a new row, or `functools.partial(ResNet, ...)` in user code.
"""

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp

from resnet_jax.errors import UserError
from resnet_jax.models.blocks import (BasicBlock, Bottleneck, CifarStem,
                                      ImageNetStem, PreActBasicBlock,
                                      PreActBottleneck, textbook_block)
from resnet_jax.models.resnet import ResNet


@dataclasses.dataclass(frozen=True)
class _Entry:
  """How to build one named model, and what it is."""
  description: str
  fields: dict[str, Any]
  num_classes: int = 1000


_IMAGENET = dict(stem_cls=ImageNetStem)
_CIFAR = dict(stem_cls=CifarStem, stem_width=16, stage_widths=(16, 32, 64),
              block_cls=BasicBlock, block_kwargs={'shortcut': 'A'})

_DEPTHS = {18: (BasicBlock, PreActBasicBlock, (2, 2, 2, 2)),
           34: (BasicBlock, PreActBasicBlock, (3, 4, 6, 3)),
           50: (Bottleneck, PreActBottleneck, (3, 4, 6, 3)),
           101: (Bottleneck, PreActBottleneck, (3, 4, 23, 3)),
           152: (Bottleneck, PreActBottleneck, (3, 8, 36, 3))}


def _build_registry() -> dict[str, _Entry]:
  reg = {'d2l_resnet18': _Entry(
      'ResNet-18 of the d2l.ai textbook (convs with bias, 1x1 conv where it '
      'strides)',
      dict(_IMAGENET, block_cls=textbook_block, stage_sizes=(2, 2, 2, 2),
           conv_bias=True), num_classes=10)}
  for depth, (block, preact_block, sizes) in _DEPTHS.items():
    reg[f'resnet{depth}'] = _Entry(
        f'ResNet-{depth}, He et al. 2016 Table 1 (v1.5 strides)',
        dict(_IMAGENET, block_cls=block, stage_sizes=sizes))
    reg[f'resnetv2_{depth}'] = _Entry(
        f'Pre-activation ResNet-{depth} (He et al. 2016, Identity Mappings)',
        dict(_IMAGENET, block_cls=preact_block, stage_sizes=sizes,
             preact=True))
  reg['resnext50_32x4d'] = _Entry(
      'ResNeXt-50, cardinality 32, width 4 per group (Xie et al. 2017)',
      dict(_IMAGENET, block_cls=Bottleneck, stage_sizes=(3, 4, 6, 3),
           block_kwargs={'groups': 32, 'base_width': 4}))
  reg['resnext101_32x8d'] = _Entry(
      'ResNeXt-101, cardinality 32, width 8 per group (Xie et al. 2017)',
      dict(_IMAGENET, block_cls=Bottleneck, stage_sizes=(3, 4, 23, 3),
           block_kwargs={'groups': 32, 'base_width': 8}))
  reg['wide_resnet50_2'] = _Entry(
      'Wide ResNet-50-2: bottleneck 3x3 convs twice as wide',
      dict(_IMAGENET, block_cls=Bottleneck, stage_sizes=(3, 4, 6, 3),
           block_kwargs={'base_width': 128}))
  for depth in (8, 20, 32, 44, 56, 110):
    n = (depth - 2) // 6
    reg[f'cifar_resnet{depth}'] = _Entry(
        f'CIFAR ResNet-{depth} (He et al. 2016 section 4.2, 6n+2 with n={n})',
        dict(_CIFAR, stage_sizes=(n, n, n)), num_classes=10)
  return reg


_REGISTRY = _build_registry()

# Overrides that are not ResNet fields but are resolved here.
_BLOCK_OPTIONS = ('shortcut', 'stride_in_1x1', 'groups', 'base_width')


def available_models() -> list[str]:
  """The names `create_model` accepts."""
  return list(_REGISTRY)


def _lookup(name: str) -> _Entry:
  if name not in _REGISTRY:
    raise UserError(f'unknown model {name!r}; choose one of: '
                    f'{", ".join(_REGISTRY)}')
  return _REGISTRY[name]


_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_model(name: str, num_classes: int | None = None, *,
                 conv_impl: str = 'xla', width: int | None = None,
                 stage_sizes: Sequence[int] | None = None,
                 dtype: Any = jnp.float32, **overrides: Any) -> ResNet:
  """Builds a registered model.

  Args:
    name: one of `available_models()`.
    num_classes: logits size; defaults to the model's (1000 for the ImageNet
      family, 10 for the textbook and CIFAR models).
    conv_impl: 'xla' (Flax's layers) or 'auto' or another name of
      `resnet_jax.cpu.layers.CONV_IMPLS`: the layers `cpu.layers.layers_for`
      gives (Flax's on GPU/TPU, the CPU path's on a CPU), with the same
      parameters and outputs.
    width: stem width; stage widths scale with it (64 -> 64/128/256/512 for
      the ImageNet family, 16 -> 16/32/64 for CIFAR), for narrow variants.
    stage_sizes: blocks per stage instead of the model's own.
    dtype: compute dtype (a jnp dtype, 'float32' or 'bfloat16'); parameters
      stay float32.
    **overrides: `ResNet` fields (zero_init_residual, bn_momentum, ...) or
      block options (shortcut='A'|'B', stride_in_1x1, groups, base_width).
  """
  entry = _lookup(name)
  fields = dict(entry.fields)
  fields['block_kwargs'] = dict(fields.get('block_kwargs', {}))
  for key in _BLOCK_OPTIONS:
    if key in overrides:
      fields['block_kwargs'][key] = overrides.pop(key)
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ResNet)}
                   - {'parent', 'name'})
  if unknown:
    raise UserError(f'unknown model option(s) {", ".join(unknown)} for '
                    f'{name!r}; valid: {", ".join(_valid_options())}')
  if width is not None:
    base = fields.get('stem_width', 64)
    widths = fields.get('stage_widths', ResNet.stage_widths)
    fields['stage_widths'] = tuple(w * width // base for w in widths)
    fields['stem_width'] = width
  if stage_sizes is not None:
    fields['stage_sizes'] = tuple(stage_sizes)
  if conv_impl != 'xla':
    # The platform hook, imported only when asked for: a model with Flax's
    # layers never loads the CPU path.
    from resnet_jax.cpu import layers  # pylint: disable=g-import-not-at-top
    fields['layers'] = layers.layers_for(conv_impl)
  fields.update(overrides)
  return ResNet(num_classes=num_classes or entry.num_classes,
                dtype=_DTYPES.get(dtype, dtype), **fields)


def from_config(model_config: Any) -> ResNet:
  """The network a config's `model` section describes (a ConfigDict, or the
  dict a workdir's config.json holds): `create_model(**section)`."""
  return create_model(**dict(model_config))


def check_image_size(model: ResNet, image_size: int) -> None:
  """Each stride halves the map (rounding up, as the padding does), so any
  size gives at least 1x1 at the end; a size is too small when the map is
  already 1x1 before the last downsampling, where the remaining stages could
  only see single pixels. The textbook ResNet-18 at 28x28 (maps 14, 7, 4, 2,
  1) is fine; at 16 it is not."""
  stem = 4 if model.stem_cls is ImageNetStem else 1
  factor = stem * 2 ** (len(model.stage_sizes) - 1)
  smallest = factor // 2 + 1
  if image_size < smallest:
    raise UserError(f'image_size={image_size} is too small for this model, '
                    f'which downsamples by {factor}: its last stages would '
                    'see only 1x1 maps; use --config.data.image_size of at '
                    f'least {smallest}')


def _valid_options() -> list[str]:
  names = [f.name for f in dataclasses.fields(ResNet)
           if f.name not in ('parent', 'name', 'stage_sizes', 'block_cls',
                             'num_classes')]
  return sorted(names + list(_BLOCK_OPTIONS) + ['conv_impl', 'width',
                                                'stage_sizes'])
