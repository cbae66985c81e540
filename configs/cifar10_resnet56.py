"""CIFAR-10 ResNet-56 as in He et al. 2016, section 4.2: the ResNet-20
recipe (configs/cifar10_resnet20.py) on the deeper network."""

from configs import cifar10_resnet20


def get_config():
  c = cifar10_resnet20.get_config()
  c.model.name = 'cifar_resnet56'
  return c
