"""The embedded default: a small CIFAR-style ResNet on Fashion-MNIST at 28x28.

ResNet-8 (the CIFAR ResNet family with one basic block per stage, 16/32/64
channels, 78k parameters), 7 epochs of batch 64, SGD Nesterov + cosine. Sized
for a 2-core CPU: there this model trains at ~1,200 images/s at batch 64 but
only ~840 at batch 128 (the smaller batch's activations stay in the caches;
`python -m resnet_jax.benchmark --config configs/default.py --batch_size N`
shows it), so the run finishes in under 8 minutes end to end (README,
results table).
Every field any recipe uses is declared in `base_config()` with its meaning;
the other config files start from it and change what their recipe needs.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with its meaning; recipes start from here."""
  c = ml_collections.ConfigDict()

  # Model: a name from resnet_jax.models.available_models().
  c.model = 'cifar_resnet20'
  c.width = 0                  # stem width override, 0 = the model's own
  c.stage_sizes = ()           # blocks per stage override, () = the model's
  c.zero_init_residual = True  # Goyal et al. 2017: blocks start as identity
  c.conv_impl = 'auto'         # auto: per-layer fastest on CPU, XLA's on GPU/TPU;
                               # or 'xla' | 'patches' | 'hybrid'
  c.half_precision = False     # bfloat16 compute, float32 params and state

  # Data: a TFDS name; offline, point tfds_manual_dir at the download files.
  c.dataset = 'fashion_mnist'
  c.tfds_data_dir = ''         # '' = TFDS's default (~/tensorflow_datasets)
  c.tfds_manual_dir = ''
  c.image_size = 0             # 0 = native resolution, else resized on device
  c.validation_examples = 0    # >0: hold out the last N train images, eval there
  c.augment = ml_collections.ConfigDict()
  c.augment.crop_padding = 0
  c.augment.flip = False
  c.augment.random_erasing = 0.0

  # Duration and batch.
  c.batch_size = 128           # global, over all devices and processes
  c.eval_batch_size = 1000
  c.num_epochs = 6.0
  c.num_train_steps = -1       # > 0 overrides num_epochs

  # Optimisation (Optax).
  c.optimizer = 'sgd'          # sgd | adamw
  c.momentum = 0.9             # 0 = plain SGD
  c.nesterov = True
  c.learning_rate = 0.2        # peak learning rate
  c.schedule = 'cosine'        # constant | piecewise | cosine
  c.warmup_epochs = 0.3        # linear warmup from 0 (cosine and constant)
  c.warmup_steps = -1          # > 0 overrides warmup_epochs
  c.lr_boundaries = ()         # piecewise: steps where the rate is scaled...
  c.lr_scales = ()             # ...by these factors
  c.weight_decay = 5e-4
  c.decay_bn_and_bias = False  # False: no decay on BN parameters and biases
  c.label_smoothing = 0.0
  c.grad_clip_norm = 0.0       # > 0: clip by global norm

  # Bookkeeping.
  c.seed = 0
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3       # the last K, plus the best by test accuracy
  c.mode = 'train'             # train | eval
  c.eval_step = -1             # eval mode: -1 = latest checkpoint
  c.init_from = ''             # warm start: another workdir (optionally :STEP)
  c.progress_bar = True        # on a terminal only
  return c


def get_config() -> ml_collections.ConfigDict:
  """The default recipe: ResNet-8 (one block per stage), 7 epochs, flips."""
  c = base_config()
  c.stage_sizes = (1, 1, 1)
  c.batch_size = 64
  c.learning_rate = 0.1        # 0.2 per 128 examples, scaled linearly
  c.num_epochs = 7.0
  c.augment.flip = True
  return c
