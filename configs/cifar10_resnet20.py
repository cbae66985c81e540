"""CIFAR-10 ResNet-20 as in He et al. 2016, section 4.2.

Batch 128, SGD momentum 0.9, weight decay 1e-4, learning rate 0.1 divided by
10 at 32k and 48k iterations, stop at 64k; 4-pixel padding, random 32x32
crop, horizontal flip.
"""

from configs import default


def get_config():
  c = default.base_config()
  c.model = 'cifar_resnet20'
  c.zero_init_residual = False
  c.dataset = 'cifar10'
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_train_steps = 64_000
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.nesterov = False
  c.schedule = 'piecewise'
  c.warmup_epochs = 0.0
  c.learning_rate = 0.1
  c.lr_boundaries = (32_000, 48_000)
  c.lr_scales = (0.1, 0.1)
  c.weight_decay = 1e-4
  c.decay_bn_and_bias = True  # the paper decays every weight
  c.augment.crop_padding = 4
  c.augment.flip = True
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c
