"""CIFAR-10 ResNet-20 as in He et al. 2016, section 4.2.

Batch 128, SGD momentum 0.9, weight decay 1e-4 on every weight, learning rate
0.1 divided by 10 at 32k and 48k iterations, stop at 64k; 4-pixel padding,
random 32x32 crop, horizontal flip.
"""

from resnet_jax import config


def get_config():
  c = config.base_config()
  c.model.name = 'cifar_resnet20'
  c.model.zero_init_residual = False
  c.data.dataset = 'cifar10'
  c.data.batch_size = 128
  c.data.eval_batch_size = 1000
  c.data.augment.crop_padding = 4
  c.data.augment.flip = True
  c.optim.optimizer = 'sgd'
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.schedule = 'piecewise'
  c.optim.warmup_epochs = 0.0
  c.optim.learning_rate = 0.1
  c.optim.lr_boundaries = (32_000, 48_000)
  c.optim.lr_scales = (0.1, 0.1)
  c.optim.weight_decay = 1e-4
  c.optim.decay_bn_and_bias = True  # the paper decays every weight
  c.run.num_train_steps = 64_000
  c.run.log_every_steps = 100
  c.run.checkpoint_every_steps = 2000
  return c
