"""Train-step throughput of the same ResNets in PyTorch (CPU) and JAX, side by side.

  python -m resnet_jax.pytorch_compare [--models=d2l_resnet18,resnet18,cifar_resnet20]
      [--impls=xla,patches] [--steps=3] [--rounds=3] [--threads=2] [--notorch]

Optional: torch is not a dependency of resnet_jax; install it into the venv
first (`pip install -r requirements-torch.txt`, a CPU-capable build), or
pass --notorch to time the JAX implementations only.

One train step = forward + backward + SGD-momentum update in float32, with
BatchNorm in training mode and a softmax cross-entropy loss; PyTorch runs in
channels_last, JAX in NHWC with every conv implementation of --impls
(models from `resnet_jax.models.create_model`). Everything is compiled /
warmed up first; then --rounds rounds each time --steps steps of every
framework in turn (so a disturbance from other processes on the shared cores
hits all of them alike), and the median step time over all rounds gives
images/s. Results are made ready (jax.block_until_ready / a synchronous
PyTorch CPU step) before the clock stops. `conv.configure_cpu_malloc` is
applied once for the whole process, so both frameworks get the same
allocator.

Inputs: d2l_resnet18 at 96x96x1 batch 256 (the textbook model), resnet18 and
cifar_resnet20 at 32x32x3 batch 128. The measured figures, with date and
machine, are in README.md, Performance.
"""

from __future__ import annotations

import functools
import time

from absl import flags
import jax
import numpy as np
import optax

from resnet_jax import cli, conv, models
from resnet_jax.errors import UserError

# name -> (input HWC, batch)
SETUPS = {
    'd2l_resnet18': ((96, 96, 1), 256),
    'resnet18': ((32, 32, 3), 128),
    'cifar_resnet20': ((32, 32, 3), 128),
}

_MODELS = flags.DEFINE_string(
    'models', ','.join(SETUPS),
    f'Comma-separated models to time: {", ".join(SETUPS)}.')
_IMPLS = flags.DEFINE_string(
    'impls', 'xla,patches',
    f'Comma-separated JAX conv implementations: {", ".join(conv.CONV_IMPLS)}.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds (frameworks take turns).')
_THREADS = flags.DEFINE_integer('threads', 2, 'torch.set_num_threads.')
_TORCH = flags.DEFINE_boolean('torch', True, 'Time PyTorch too (--notorch: '
                              'JAX only, no torch install needed).')


# ----------------------------------------------------------------------------- PyTorch


def torch_model(name: str, in_channels: int):
  """The PyTorch twin of `models.create_model(name, num_classes=10)`."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    """Basic block: 3x3-BN-ReLU-3x3-BN + shortcut, ReLU. shortcut: 'conv' (1x1, no
    BN: textbook), 'convbn' (1x1 + BN: torchvision), 'pad' (option A), None."""

    def __init__(self, cin, cout, stride, bias, shortcut):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=bias)
      self.bn2 = nn.BatchNorm2d(cout)
      self.stride, self.extra = stride, cout - cin
      self.shortcut = None
      if shortcut == 'conv':
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=bias)
      elif shortcut == 'convbn':
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))
      self.pad = shortcut == 'pad'

    def forward(self, x):
      y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
      if self.shortcut is not None:
        x = self.shortcut(x)
      elif self.pad:
        x = x[:, :, ::self.stride, ::self.stride]
        x = nn.functional.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      return torch.relu(y + x)

  def stages(widths, blocks, stem_width, bias, shortcut):
    layers, cin = [], stem_width
    for i, (w, n) in enumerate(zip(widths, blocks)):
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        layers.append(Block(cin, w, stride, bias, shortcut if stride != 1 else None))
        cin = w
    return layers

  if name in ('d2l_resnet18', 'resnet18'):
    bias = name == 'd2l_resnet18'
    stem = [nn.Conv2d(in_channels, 64, 7, 2, 3, bias=bias), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1)]
    body = stages((64, 128, 256, 512), (2, 2, 2, 2), 64, bias,
                  'conv' if bias else 'convbn')
    width = 512
  elif name == 'cifar_resnet20':
    stem = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    body = stages((16, 32, 64), (3, 3, 3), 16, False, 'pad')
    width = 64
  else:
    raise ValueError(f'no PyTorch twin for {name}')
  return nn.Sequential(*stem, *body, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(width, 10))


def torch_stepper(name: str, shape, batch: int):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torch_model(name, shape[-1]).to(memory_format=torch.channels_last).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  x = torch.randn(batch, shape[2], shape[0], shape[1]).to(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch,))
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()  # CPU ops are synchronous; item() makes that explicit.

  return step


# ----------------------------------------------------------------------------- JAX


def jax_stepper(name: str, shape, batch: int, impl: str):
  model = models.create_model(name, num_classes=10, conv_impl=impl)
  x = jax.random.normal(jax.random.PRNGKey(0), (batch,) + shape)
  labels = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, 10)
  variables = model.init(jax.random.PRNGKey(2), x[:2], train=False)
  tx = optax.sgd(0.1, momentum=0.9)
  state = (variables['params'], variables['batch_stats'], tx.init(variables['params']))

  @functools.partial(jax.jit, donate_argnums=0)  # as the real train step
  def train_step(state, x, labels):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                    train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  holder = [state]

  def step():
    holder[0], loss = train_step(holder[0], x, labels)
    return float(jax.block_until_ready(loss))

  return step


def _names(flag, what: str, choices) -> list[str]:
  names = [n.strip() for n in flag.value.split(',') if n.strip()]
  unknown = [n for n in names if n not in choices]
  if unknown or not names:
    raise UserError(f'--{flag.name}: unknown {what} '
                    f'{", ".join(unknown) or "(none given)"}; choose from '
                    f'{",".join(choices)} (comma-separated)')
  return names


def _check_flags() -> tuple[list[str], list[str]]:
  names = _names(_MODELS, 'model', tuple(SETUPS))
  impls = _names(_IMPLS, 'conv implementation', conv.CONV_IMPLS)
  for flag in (_STEPS, _ROUNDS, _THREADS):
    if flag.value < 1:
      raise UserError(f'--{flag.name}={flag.value}: give 1 or more')
  if _TORCH.value:
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise UserError(
          f'--torch: PyTorch is not installed ({e}): pip install -r '
          'requirements-torch.txt into the venv, or pass --notorch to time '
          'JAX only') from None
  return names, impls


def main(argv: list[str]) -> None:
  del argv
  names, impls = _check_flags()
  # Applied once for the whole process, so both frameworks get the same allocator.
  conv.configure_cpu_malloc()
  if _TORCH.value:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(_THREADS.value)
    print(f'torch {torch.__version__} threads {torch.get_num_threads()}; ', end='')
  print(f'jax {jax.__version__} backend {jax.default_backend()}')

  for name in names:
    shape, batch = SETUPS[name]
    steppers = {}
    if _TORCH.value:
      steppers['torch'] = torch_stepper(name, shape, batch)
    for impl in impls:
      steppers[f'jax-{impl}'] = jax_stepper(name, shape, batch, impl)
    times = {k: [] for k in steppers}
    for label, step in steppers.items():  # Compile / warm up.
      t = time.perf_counter()
      step()
      step()
      print(f'  {name} {label}: warm-up {time.perf_counter() - t:.1f} s', flush=True)
    for _ in range(_ROUNDS.value):
      for label, step in steppers.items():
        for _ in range(_STEPS.value):
          t = time.perf_counter()
          step()
          times[label].append(time.perf_counter() - t)
    print(f'{name} {shape[0]}x{shape[1]}x{shape[2]} batch {batch}:')
    rate = {k: batch / float(np.median(v)) for k, v in times.items()}
    for label, r in rate.items():
      spread = np.percentile(times[label], [10, 90])
      ratio = f'  {r / rate["torch"]:.2f}x torch' if 'torch' in rate else ''
      print(f'  {label:>14}: {r:7.1f} images/s  (step {np.median(times[label]) * 1e3:.0f} ms, '
            f'p10-p90 {spread[0] * 1e3:.0f}-{spread[1] * 1e3:.0f} ms){ratio}', flush=True)


if __name__ == '__main__':
  cli.run(main)
