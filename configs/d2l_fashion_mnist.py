"""The textbook recipe exactly (d2l.ai, "Residual Networks (ResNet)").

d2l ResNet-18 on Fashion-MNIST resized to 96x96, batch 256, plain SGD at
learning rate 0.05 (no momentum, no weight decay), 10 epochs, no augmentation.
The textbook's editions report test accuracy 0.865-0.899.
"""

from resnet_jax import config


def get_config():
  c = config.base_config()
  c.model.name = 'd2l_resnet18'
  c.model.zero_init_residual = False
  c.data.dataset = 'fashion_mnist'
  c.data.image_size = 96
  c.data.batch_size = 256
  c.data.eval_batch_size = 256
  c.data.augment.flip = False
  c.optim.optimizer = 'sgd'
  c.optim.momentum = 0.0
  c.optim.nesterov = False
  c.optim.learning_rate = 0.05
  c.optim.schedule = 'constant'
  c.optim.warmup_epochs = 0.0
  c.optim.weight_decay = 0.0
  c.run.num_epochs = 10.0
  c.run.log_every_steps = 50
  c.run.checkpoint_every_steps = 1000
  return c
