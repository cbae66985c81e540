"""The networks: residual blocks and stems (`blocks.py`), the `ResNet` module
(`resnet.py`), the layers it is built from (`layers.py`, the one hook for a
platform's faster layers) and the registry of named models (`registry.py`).
`torchvision_weights.py` maps torchvision's ResNet weights onto these
modules, and `weights.py` adapts a stem or a head of loaded weights.

Adding a variant: a row in `registry._build_registry`, or in user code
`functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)`.
Nothing here depends on the data, the training loop or the platform.
"""

from resnet_jax.models.blocks import (BasicBlock, Bottleneck, CifarStem,
                                      ImageNetStem, PreActBasicBlock,
                                      PreActBottleneck, Residual)
from resnet_jax.models.layers import FLAX, Layers
from resnet_jax.models.registry import (available_models, check_image_size,
                                        create_model, from_config)
from resnet_jax.models.resnet import ResNet

__all__ = ['BasicBlock', 'Bottleneck', 'CifarStem', 'FLAX', 'ImageNetStem',
           'Layers', 'PreActBasicBlock', 'PreActBottleneck', 'ResNet',
           'Residual', 'available_models', 'check_image_size', 'create_model',
           'from_config']
