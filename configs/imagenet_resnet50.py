"""ResNet-50 on ImageNet, the modern recipe (Goyal et al. 2017; He et al. 2019).

Batch 1024, learning rate 0.1 x batch/256, 5 warmup epochs then cosine, SGD
Nesterov 0.9, weight decay 1e-4 not on BN parameters and biases, label
smoothing 0.1, bfloat16 compute, 90 epochs, Inception-style random-resized
crop + flip for training, resize 256 + centre crop 224 for evaluation
(streamed: ImageNet does not fit in memory; the crop and the flip are made
on the host as the images are decoded).
"""

from resnet_jax import config


def get_config():
  c = config.base_config()
  c.model.name = 'resnet50'
  c.model.zero_init_residual = True
  c.model.dtype = 'bfloat16'
  c.data.dataset = 'imagenet2012'
  c.data.image_size = 224
  c.data.batch_size = 1024
  c.data.eval_batch_size = 1024
  c.optim.optimizer = 'sgd'
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.learning_rate = 0.1 * c.data.batch_size / 256
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 5.0
  c.optim.weight_decay = 1e-4
  c.optim.decay_bn_and_bias = False
  c.optim.label_smoothing = 0.1
  c.run.num_epochs = 90.0
  c.run.log_every_steps = 100
  c.run.checkpoint_every_steps = 2000
  return c
