"""Train-step throughput of the same ResNets in PyTorch (CPU) and JAX, side by side.

  python -m resnet_jax.tools.pytorch_compare [--models=d2l_resnet18,resnet18,cifar_resnet20]
      [--impls=auto,xla] [--steps=3] [--rounds=5] [--threads=2] [--notorch]

Optional: torch is not a dependency of resnet_jax; install it into the venv
first (`pip install -r requirements-torch.txt`, a CPU-capable build), or
pass --notorch to time the JAX implementations only.

One train step = forward + backward + SGD-momentum update in float32, with
BatchNorm in training mode and a softmax cross-entropy loss; PyTorch runs in
channels_last, JAX in NHWC with every conv implementation of --impls
(models from `resnet_jax.models.create_model`); 'auto-nonative' is 'auto'
with the native CPU kernels switched off (RESNET_JAX_NATIVE=0: no oneDNN
convolutions, the strided-view max-pool), the CPU path before them.

Each framework (and each JAX implementation) runs in **its own process**: in
one process each framework's idle thread pool slows the other (PyTorch's
ResNet-18 at 32x32 measured 489 images/s inside one script, 675 alone). For
each model the workers start one after another and compile / warm up; then
in each of --rounds rounds every worker in turn times --steps steps while
the others wait blocked on a pipe, with a pause between turns so that
spinning threads go to sleep; the median step time over all rounds gives
images/s. It is reported twice: over every timed step, and back to back,
leaving out the first step of each turn (the one that wakes the process
from the pause; a training loop never pauses: on a 2-core Zen 3 JAX's
first step after a 1 s pause took ~10 % longer than the next, PyTorch's
~1 %). Alternating spreads a disturbance from other processes over all
of them alike. Results are made ready (jax.block_until_ready / a synchronous
PyTorch CPU step) before the clock stops. Every worker applies
`malloc.configure_cpu_malloc`, so both frameworks get the same allocator.

Inputs: d2l_resnet18 at 96x96x1 batch 256 (the textbook model), resnet18 and
cifar_resnet20 at 32x32x3 batch 128. The measured figures, with date and
machine, are in docs/performance.md.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

from absl import flags
import jax
import numpy as np
import optax

from resnet_jax import cli, models
from resnet_jax.cpu import native
from resnet_jax.cpu import layers as cpu_layers
from resnet_jax.cpu import malloc
from resnet_jax.errors import UserError

# name -> (input HWC, batch)
SETUPS = {
    'd2l_resnet18': ((96, 96, 1), 256),
    'resnet18': ((32, 32, 3), 128),
    'cifar_resnet20': ((32, 32, 3), 128),
}
PAUSE_S = 1.0  # between turns: idle OpenMP / XLA pool threads stop spinning
# --impls: conv implementations, plus 'auto' without the native kernels.
IMPLS = cpu_layers.CONV_IMPLS + ('auto-nonative',)


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


def _names(value: str, flag: str, what: str, choices) -> list[str]:
  names = [n.strip() for n in value.split(',') if n.strip()]
  unknown = [n for n in names if n not in choices]
  if unknown or not names:
    raise UserError(f'--{flag}: unknown {what} '
                    f'{", ".join(unknown) or "(none given)"}; choose from '
                    f'{",".join(choices)} (comma-separated)')
  return names


def _check_flags(f) -> tuple[list[str], list[str]]:
  names = _names(f.models, 'models', 'model', tuple(SETUPS))
  impls = _names(f.impls, 'impls', 'conv implementation', IMPLS)
  for flag in ('steps', 'rounds', 'threads'):
    if getattr(f, flag) < 1:
      raise UserError(f'--{flag}={getattr(f, flag)}: give 1 or more')
  if f.torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise UserError(
          f'--torch: PyTorch is not installed ({e}): pip install -r '
          'requirements-torch.txt into the venv, or pass --notorch to time '
          'JAX only') from None
  return names, impls


# ----------------------------------------------------------------------------- processes


def worker(label: str, name: str, steps: int, threads: int) -> None:
  """One framework in this process: warm up, then time `steps` steps each
  time a line 'run' arrives on stdin; one JSON line per answer."""
  malloc.configure_cpu_malloc()
  shape, batch = SETUPS[name]
  t = time.perf_counter()
  if label == 'torch':
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    step = torch_stepper(name, shape, batch)
    version = f'torch {torch.__version__} ({torch.get_num_threads()} threads)'
  else:
    impl = label.removeprefix('jax-')
    if impl == 'auto-nonative':
      os.environ['RESNET_JAX_NATIVE'] = '0'
      impl = 'auto'
    step = jax_stepper(name, shape, batch, impl)
    version = f'jax {jax.__version__} ({jax.default_backend()})'
    if impl in ('auto', 'onednn') and native.available():
      version += f', oneDNN {native.onednn_version()}'
  step()
  step()
  print(json.dumps({'ready': time.perf_counter() - t, 'version': version}),
        flush=True)
  for line in sys.stdin:
    if line.strip() != 'run':
      break
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      step()
      times.append(time.perf_counter() - t)
    print(json.dumps({'times': times}), flush=True)


class _Worker:
  """A worker process and its pipe."""

  def __init__(self, label: str, name: str, steps: int, threads: int):
    self.label = label
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'resnet_jax.tools.pytorch_compare',
         f'--worker={label}', f'--models={name}', f'--steps={steps}',
         f'--threads={threads}'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
    self.hello = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      code = self.proc.wait()
      raise UserError(f'the {self.label} worker exited with code {code} '
                      '(its error is above)')
    return json.loads(line)

  def run(self) -> list[float]:
    self.proc.stdin.write('run\n')
    self.proc.stdin.flush()
    return self._read()['times']

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def compare(name: str, labels: list[str], steps: int, rounds: int,
            threads: int) -> dict[str, list[list[float]]]:
  """Step times of each label for `name` per turn, frameworks taking turns."""
  workers = []
  try:
    for label in labels:  # one at a time: compilation does not overlap
      workers.append(_Worker(label, name, steps, threads))
      print(f'  {name} {label}: {workers[-1].hello["version"]}, warm-up '
            f'{workers[-1].hello["ready"]:.1f} s', flush=True)
    times = {w.label: [] for w in workers}
    for _ in range(rounds):
      for w in workers:
        time.sleep(PAUSE_S)
        times[w.label].append(w.run())
    return times
  finally:
    for w in workers:
      w.close()


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  if f.worker:
    worker(f.worker, f.models, f.steps, f.threads)
    return
  names, impls = _check_flags(f)
  labels = (['torch'] if f.torch else []) + [f'jax-{i}' for i in impls]
  print(f'each in its own process, {f.rounds} rounds of {f.steps} steps')
  for name in names:
    shape, batch = SETUPS[name]
    turns = compare(name, labels, f.steps, f.rounds, f.threads)
    print(f'{name} {shape[0]}x{shape[1]}x{shape[2]} batch {batch}:')
    _report(batch, {k: [t for turn in v for t in turn] for k, v in turns.items()},
            'every timed step')
    if f.steps > 1:
      _report(batch, {k: [t for turn in v for t in turn[1:]] for k, v in turns.items()},
              'back to back (the first step of each turn left out)')


def _report(batch: int, times: dict[str, list[float]], what: str) -> None:
  print(f'  {what}:')
  rate = {k: batch / float(np.median(v)) for k, v in times.items()}
  for label, r in rate.items():
    spread = np.percentile(times[label], [10, 90])
    ratio = f'  {r / rate["torch"]:.2f}x torch' if 'torch' in rate else ''
    print(f'  {label:>18}: {r:7.1f} images/s  (step {np.median(times[label]) * 1e3:.0f} ms, '
          f'p10-p90 {spread[0] * 1e3:.0f}-{spread[1] * 1e3:.0f} ms){ratio}', flush=True)


def _define_flags() -> None:
  flags.DEFINE_string(
      'models', ','.join(SETUPS),
      f'Comma-separated models to time: {", ".join(SETUPS)}.')
  flags.DEFINE_string(
      'impls', 'auto,xla',
      f'Comma-separated JAX conv implementations: {", ".join(IMPLS)}.')
  flags.DEFINE_integer('steps', 3, 'Timed steps per turn.')
  flags.DEFINE_integer('rounds', 5, 'Rounds (frameworks take turns).')
  flags.DEFINE_integer('threads', 2, 'torch.set_num_threads.')
  flags.DEFINE_boolean('torch', True, 'Time PyTorch too (--notorch: JAX '
                       'only, no torch install needed).')
  flags.DEFINE_string('worker', None, 'Internal: run one framework (torch or '
                      'jax-IMPL) as a worker process for --models.')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
