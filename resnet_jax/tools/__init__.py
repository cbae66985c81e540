"""Every command line but train.py and predict.py, each
`python -m resnet_jax.tools.<name>`:

  config         every config field with its default and meaning
  summary        a network's layer shapes, parameters and FLOPs
  benchmark      train/eval step speed and memory of a config
  suite          every accelerator figure in one command (GPU/TPU)
  lower          prove a config's steps lower for GPU/TPU, on a CPU
  prepare_data   prepare a dataset once (in-memory cache or ArrayRecord)
  convert        torchvision weights into a workdir
  native_check   build and check the native CPU kernels
  profile_conv   time each convolution pass of each layer shape (CPU)
  pytorch_compare  our CPU step beside PyTorch's, each in its own process

Library code never imports this folder.
"""
