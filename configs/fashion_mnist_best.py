"""Our recipe for the highest Fashion-MNIST test accuracy from this zoo.

A wide CIFAR-style ResNet-20 (stages of 64/128/256 channels, a stride-1 3x3
stem, so the native 28x28 keeps its detail; about 4.3M parameters), SGD with
Nesterov momentum, weight decay, warmup + cosine, label smoothing, random crop
with 2-pixel padding, horizontal flip and random erasing. Tune on a held-out
validation split (`--config.validation_examples=5000`), report the test set
once at the end.
"""

from configs import default


def get_config():
  c = default.base_config()
  c.model = 'cifar_resnet20'
  c.width = 64
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 60.0
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.nesterov = True
  c.learning_rate = 0.1
  c.schedule = 'cosine'
  c.warmup_epochs = 2.0
  c.weight_decay = 5e-4
  c.label_smoothing = 0.1
  c.augment.crop_padding = 2
  c.augment.flip = True
  c.augment.random_erasing = 0.5
  c.checkpoint_every_steps = 2000
  return c
