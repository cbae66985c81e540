"""Fine-tune ImageNet weights from torchvision (ResNet-18) on Fashion-MNIST.

First convert the PyTorch weights (docs/checkpoints.md, "PyTorch weights"):

  python -m resnet_jax.tools.convert --model=resnet18 --src=resnet18.pth \
      --dst=workdirs/torchvision_resnet18

then train, pointing `run.init_from` at that directory if it lives elsewhere:

  python train.py --config=configs/finetune_fashion_mnist.py \
      --workdir=workdirs/finetune_fm \
      --config.run.init_from=workdirs/torchvision_resnet18

The warm start (resnet_jax/checkpoint/init_from.py) loads every layer but the
1000-class head, which starts fresh with 10 outputs, and sums the RGB stem
kernel over its input channels for the 1-channel images (exactly what the RGB
network computes on a gray image replicated to three channels). The first
BatchNorm normalises with batch statistics while training, so Fashion-MNIST's
own mean/std instead of ImageNet's only shifts what it absorbs.

Images are resized 28 -> 64 on the device. ImageNet ResNets downsample by 32,
so 28 or 32 pixels would leave a 1x1 map before the pool (and an 8x8 one after
the stem); 64 gives 2x2 at about 1/12 of the cost of 224x224. On a GPU,
--config.data.image_size=112 or 224 brings the objects closer to the scale
the filters learnt, at 3x or 12x the cost.

A small learning rate with a short warmup and cosine decay, a few epochs and
ImageNet's weight decay, as usual for fine-tuning: large steps would wipe out
the pretrained features before the new head has learnt to use them.
"""

from resnet_jax import config


def get_config():
  c = config.base_config()
  c.model.name = 'resnet18'  # the converted weights' own width and depth
  c.model.zero_init_residual = False
  c.data.dataset = 'fashion_mnist'
  c.data.image_size = 64
  c.data.augment.flip = True
  c.data.batch_size = 128
  c.data.eval_batch_size = 1000
  c.optim.optimizer = 'sgd'
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.learning_rate = 0.02
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0.1
  c.optim.weight_decay = 1e-4
  c.run.num_epochs = 3.0
  # A directory written by `python -m resnet_jax.tools.convert` (or any workdir of
  # a resnet18 run); DIR:STEP picks a step. Replace with your own path.
  c.run.init_from = 'workdirs/torchvision_resnet18'
  c.run.log_every_steps = 50
  c.run.checkpoint_every_steps = 1000
  return c
