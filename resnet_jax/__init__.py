"""resnet_jax: residual networks in JAX/Flax.

The names a user reaches for, importable from the top:

    from resnet_jax import create_model, Residual, from_torchvision

Importing them loads neither TensorFlow, torch, the CPU kernels nor the
tools: each name is imported on first use. The layout (one folder a layer)
is in README.md: `models/` holds the networks, `data/` the input, `train/`
the steps and the loop, `checkpoint/` the resume logic, `cpu/` the CPU path,
`tools/` the command lines.
"""

import importlib
from typing import Any

# Public name -> the module that owns it.
_EXPORTS = {
    'ResNet': 'resnet_jax.models',
    'Residual': 'resnet_jax.models',
    'BasicBlock': 'resnet_jax.models',
    'Bottleneck': 'resnet_jax.models',
    'PreActBasicBlock': 'resnet_jax.models',
    'PreActBottleneck': 'resnet_jax.models',
    'Layers': 'resnet_jax.models',
    'create_model': 'resnet_jax.models',
    'available_models': 'resnet_jax.models',
    'from_config': 'resnet_jax.models',
    'from_torchvision': 'resnet_jax.models.torchvision_weights',
    'load_state_dict': 'resnet_jax.models.torchvision_weights',
    'adapt_input_channels': 'resnet_jax.models.weights',
    'replace_head': 'resnet_jax.models.weights',
    'base_config': 'resnet_jax.config',
    'train_and_evaluate': 'resnet_jax.train.train_loop',
    'evaluate_checkpoint': 'resnet_jax.train.train_loop',
    'Predictor': 'resnet_jax.predictor',
    'UserError': 'resnet_jax.errors',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(list(globals()) + __all__)
