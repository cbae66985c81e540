"""CIFAR-10 ResNet-110 as in He et al. 2016, section 4.2: the ResNet-20
recipe (configs/cifar10_resnet20.py), but the paper warms up at learning
rate 0.01 for the first 400 iterations before 0.1 (then /10 at 32k, 48k)."""

from configs import cifar10_resnet20


def get_config():
  c = cifar10_resnet20.get_config()
  c.model.name = 'cifar_resnet110'
  c.optim.learning_rate = 0.01
  c.optim.lr_boundaries = (400, 32_000, 48_000)
  c.optim.lr_scales = (10.0, 0.1, 0.1)
  return c
