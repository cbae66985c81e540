"""Fine-tune ImageNet weights from torchvision (ResNet-18) on Fashion-MNIST.

First convert the PyTorch weights (docs/using_pytorch_weights.md):

  python -m resnet_jax.convert --from torchvision --model resnet18 \
      --src resnet18.pth --dst workdirs/torchvision_resnet18

then train, pointing `init_from` at that directory if it lives elsewhere:

  python train.py --config=configs/finetune_fashion_mnist.py \
      --workdir=workdirs/finetune_fm \
      --config.init_from=workdirs/torchvision_resnet18

The warm start (resnet_jax.run_setup.warm_start) loads every layer but the
1000-class head, which starts fresh with 10 outputs, and sums the RGB stem
kernel over its input channels for the 1-channel images (exactly what the RGB
network computes on a gray image replicated to three channels). The first
BatchNorm normalises with batch statistics while training, so Fashion-MNIST's
own mean/std instead of ImageNet's only shifts what it absorbs.

Images are resized 28 -> 64 on the device. ImageNet ResNets downsample by 32,
so 28 or 32 pixels would leave a 1x1 map before the pool (and an 8x8 one after
the stem); 64 gives 2x2 at about 0.15 GFLOPs an image, 1/12 of 224x224. That is
still an accelerator recipe: on our shared 2-core CPU (load ~6) it trained
at ~30 images/s, half an hour an epoch. On a GPU, --config.image_size=112 or
224 brings the objects closer to the scale the filters learnt, at 3x or 12x
the cost.

A small learning rate with a short warmup and cosine decay, a few epochs and
ImageNet's weight decay, as usual for fine-tuning: large steps would wipe out
the pretrained features before the new head has learnt to use them.
"""

from configs import default


def get_config():
  c = default.base_config()
  c.model = 'resnet18'
  c.width = 0                  # must match the converted weights (64)
  # A directory written by `python -m resnet_jax.convert` (or any workdir of a
  # resnet18 run); DIR:STEP picks a step. Replace with your own path.
  c.init_from = 'workdirs/torchvision_resnet18'
  c.dataset = 'fashion_mnist'
  c.image_size = 64
  c.augment.flip = True
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 3.0
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.nesterov = True
  c.learning_rate = 0.02
  c.schedule = 'cosine'
  c.warmup_epochs = 0.1
  c.weight_decay = 1e-4
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  return c
