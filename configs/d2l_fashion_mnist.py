"""The textbook recipe exactly (d2l.ai, "Residual Networks (ResNet)").

d2l ResNet-18 on Fashion-MNIST resized to 96x96, batch 256, plain SGD at
learning rate 0.05 (no momentum, no weight decay), 10 epochs, no augmentation.
The textbook reports test accuracy 0.865-0.899 across its editions.
"""

from configs import default


def get_config():
  c = default.base_config()
  c.model = 'd2l_resnet18'
  c.zero_init_residual = False
  c.dataset = 'fashion_mnist'
  c.image_size = 96
  c.batch_size = 256
  c.eval_batch_size = 256
  c.num_epochs = 10.0
  c.optimizer = 'sgd'
  c.momentum = 0.0
  c.nesterov = False
  c.learning_rate = 0.05
  c.schedule = 'constant'
  c.warmup_epochs = 0.0
  c.weight_decay = 0.0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  return c
