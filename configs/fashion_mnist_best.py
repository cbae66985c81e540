"""Our recipe for the highest Fashion-MNIST test accuracy from this zoo.

A wide CIFAR-style ResNet-20 (stages of 64/128/256 channels, a stride-1 3x3
stem, so the native 28x28 keeps its detail; about 4.3M parameters), SGD with
Nesterov momentum, weight decay, warmup + cosine, label smoothing, random crop
with 2-pixel padding, horizontal flip and random erasing. Tune on a held-out
validation split (`--config.data.validation_examples=5000`), then evaluate
the test split once (`--config.run.mode=eval`).
"""

from resnet_jax import config


def get_config():
  c = config.base_config()
  c.model.name = 'cifar_resnet20'
  c.model.width = 64
  c.data.dataset = 'fashion_mnist'
  c.data.batch_size = 128
  c.data.eval_batch_size = 1000
  c.data.augment.crop_padding = 2
  c.data.augment.flip = True
  c.data.augment.random_erasing = 0.5
  c.optim.optimizer = 'sgd'
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.learning_rate = 0.1
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 2.0
  c.optim.weight_decay = 5e-4
  c.optim.label_smoothing = 0.1
  c.run.num_epochs = 60.0
  c.run.checkpoint_every_steps = 2000
  return c
