"""The embedded default: ResNet-8 (`cifar_resnet8`, the CIFAR family with one
basic block per stage, 16/32/64 channels, 75k parameters) on Fashion-MNIST at
its native 28x28, 7 epochs of batch 64, SGD Nesterov at 0.1 with a short
warmup and cosine decay, random flips. Sized for a 2-core CPU (docs/results.md).

The recipe is the schema's defaults (resnet_jax/config.py declares every
field with its meaning and valid range), so this file only returns them;
the other recipes start from the same defaults and change what they need.
"""

from resnet_jax import config


def get_config():
  return config.base_config()
