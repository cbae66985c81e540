"""ResNet-50 on ImageNet, the modern recipe (Goyal et al. 2017; He et al. 2019).

Batch 1024, learning rate 0.1 x batch/256, 5 warmup epochs then cosine, SGD
Nesterov 0.9, weight decay 1e-4 not on BN parameters and biases, label
smoothing 0.1, bfloat16 compute, 90 epochs, Inception-style random-resized
crop + flip for training, resize 256 + centre crop 224 for evaluation
(streamed through tf.data: ImageNet does not fit in memory).
"""

from configs import default


def get_config():
  c = default.base_config()
  c.model = 'resnet50'
  c.zero_init_residual = True
  c.dataset = 'imagenet2012'
  c.image_size = 224
  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.num_epochs = 90.0
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.nesterov = True
  c.learning_rate = 0.1 * c.batch_size / 256
  c.schedule = 'cosine'
  c.warmup_epochs = 5.0
  c.weight_decay = 1e-4
  c.decay_bn_and_bias = False
  c.label_smoothing = 0.1
  c.half_precision = True
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return c
