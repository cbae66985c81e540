"""oneDNN's CPU convolutions inside XLA programs, as FFI custom calls.

XLA's CPU backend has no fast convolutions of its own (the released jaxlib
is built without its oneDNN rewrites); PyTorch's CPU convolutions are
oneDNN's. `onednn_conv.cc` wraps oneDNN's three convolution primitives
(forward, input gradient, kernel gradient; NHWC activations read and written
in place, HWIO kernels) as XLA FFI handlers, and this module builds it on
first use, loads it, registers the handlers and calls them:

    conv_forward(x, kernel, strides, pads, groups)
    conv_input_grad(dy, kernel, x_shape, strides, pads, groups)
    conv_kernel_grad(x, dy, kernel_shape, strides, pads, groups)

(float32 only; `conv.py` ties them together with a custom VJP and splits
them over the devices of a mesh.)

Building: g++ (or $CXX) against oneDNN's headers and library, found in this
environment (the pinned `onednn-devel-cpu-gomp` wheels of requirements.txt
put them under sys.prefix), in $RESNET_JAX_ONEDNN_ROOT, or in /usr (Debian's
libdnnl-dev); the FFI headers ship with jaxlib. The shared library goes to
a cache ($RESNET_JAX_CACHE_DIR, else $XDG_CACHE_HOME/resnet_jax, else
~/.cache/resnet_jax) under a name that hashes everything it was built from,
so an upgrade rebuilds it; concurrent first uses build it once (a file
lock). `python -m resnet_jax.onednn` builds it, checks it against XLA's
convolutions and prints where it is. Without a compiler or oneDNN,
`available()` is False, one line is logged saying why, and 'auto' keeps its
other CPU path: never a failure. RESNET_JAX_ONEDNN=0 switches it off.

Threads: oneDNN runs OpenMP teams of the cores this process may use,
divided among the CPU devices when several are simulated. OpenMP threads
sleep as soon as a convolution ends (OMP_WAIT_POLICY=PASSIVE, unless set),
so they do not spin against XLA's own thread pool between custom calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

SOURCE = Path(__file__).with_name('onednn_conv.cc')
_HANDLERS = {'forward': 'ResnetOnednnConvForward',
             'forward_bias': 'ResnetOnednnConvForwardBias',
             'input_grad': 'ResnetOnednnConvInputGrad',
             'kernel_grad': 'ResnetOnednnConvKernelGrad'}
_TARGET = 'resnet_jax_onednn_conv_{}'
_FLAGS = ('-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w')

Pads = tuple[tuple[int, int], tuple[int, int]]


class Unavailable(Exception):
  """Why the oneDNN path cannot be built or loaded here."""


def cache_dir() -> Path:
  if os.environ.get('RESNET_JAX_CACHE_DIR'):
    return Path(os.environ['RESNET_JAX_CACHE_DIR'])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return Path(base) / 'resnet_jax'


def find_onednn() -> tuple[Path, Path]:
  """(include dir, lib dir) of a oneDNN with headers and a shared library."""
  roots = [os.environ.get('RESNET_JAX_ONEDNN_ROOT'), sys.prefix, '/usr/local',
           '/usr']
  for root in filter(None, roots):
    include = Path(root) / 'include'
    if not (include / 'oneapi' / 'dnnl' / 'dnnl.hpp').is_file():
      continue
    for lib in (Path(root) / 'lib', Path(root) / 'lib64',
                Path(root) / 'lib' / f'{os.uname().machine}-linux-gnu'):
      if any(lib.glob('libdnnl.so*')):
        return include, lib
  raise Unavailable(
      'oneDNN not found (no include/oneapi/dnnl/dnnl.hpp with lib/libdnnl.so '
      f'under {", ".join(filter(None, roots))}): pip install -r '
      'requirements.txt, or set RESNET_JAX_ONEDNN_ROOT')


def _compiler() -> str:
  cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not cxx:
    raise Unavailable('no C++ compiler (g++ or $CXX) to build the oneDNN '
                      'convolutions')
  return cxx


def _command(cxx: str, include: Path, lib: Path, out: Path) -> list[str]:
  return [cxx, *_FLAGS, str(SOURCE), f'-I{jax.ffi.include_dir()}',
          f'-I{include}', f'-L{lib}', '-ldnnl', f'-Wl,-rpath,{lib}',
          '-o', str(out)]


def _library_path(cxx: str, include: Path, lib: Path) -> Path:
  """The cached library's path: a hash of what it is built from."""
  digest = hashlib.sha256()
  digest.update(SOURCE.read_bytes())
  for header in ('api.h', 'c_api.h', 'ffi.h'):
    digest.update((Path(jax.ffi.include_dir()) / 'xla' / 'ffi' / 'api' /
                   header).read_bytes())
  digest.update((include / 'oneapi' / 'dnnl' / 'dnnl_version.h').read_bytes())
  digest.update(' '.join(_command(cxx, include, lib, Path('x'))).encode())
  return cache_dir() / f'onednn_conv-{digest.hexdigest()[:16]}.so'


def build() -> Path:
  """Compiles the FFI library into the cache unless it is there already."""
  include, lib = find_onednn()
  cxx = _compiler()
  path = _library_path(cxx, include, lib)
  if path.is_file():
    return path
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_suffix('.lock'), 'w')  # pylint: disable=consider-using-with
  except OSError as e:
    raise Unavailable(f'cannot write the build cache {path.parent}: {e}; set '
                      'RESNET_JAX_CACHE_DIR to a writable folder') from None
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it
    if path.is_file():
      return path
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix='.so.tmp')
    os.close(fd)
    start = time.monotonic()
    try:
      done = subprocess.run(_command(cxx, include, lib, Path(tmp)),
                            capture_output=True, text=True, check=False)
      if done.returncode:
        errors = [l for l in done.stderr.splitlines() if 'error' in l]
        raise Unavailable(f'{Path(cxx).name} failed to build {SOURCE.name}: '
                          f'{(errors or done.stderr.splitlines() or ["?"])[0]}')
      os.replace(tmp, path)  # atomic: a reader never sees half a library
      logging.info('built the oneDNN convolutions in %.1f s: %s',
                   time.monotonic() - start, path)
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
  return path


def _threads_per_device() -> int:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (
      os.cpu_count() or 1)
  return max(1, cores // max(1, len(jax.local_devices(backend='cpu'))))


@functools.cache
def _load() -> ctypes.CDLL:
  if os.environ.get('RESNET_JAX_ONEDNN', '1') == '0':
    raise Unavailable('switched off by RESNET_JAX_ONEDNN=0')
  path = build()
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # read when libgomp loads
  try:
    library = ctypes.CDLL(str(path))
  except OSError as e:
    raise Unavailable(f'cannot load {path.name}: {e}') from None
  for what, symbol in _HANDLERS.items():
    jax.ffi.register_ffi_target(_TARGET.format(what),
                                jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  library.ResnetOnednnSetThreads(_threads_per_device())
  return library


@functools.cache
def unavailable_reason() -> str | None:
  """None when the oneDNN convolutions are ready; else why not (logged once)."""
  try:
    _load()
    return None
  except Unavailable as e:
    logging.warning('oneDNN convolutions unavailable: %s; the CPU falls back to '
                    "conv_impl='per_layer'", e)
    return str(e)


def available() -> bool:
  """Whether the oneDNN convolutions are built, loaded and registered."""
  return unavailable_reason() is None


def version() -> str:
  """oneDNN's version, as the loaded library reports it."""
  v = _load().ResnetOnednnVersion()
  return f'{v // 10000}.{v // 100 % 100}.{v % 100}'


def _params(strides: tuple[int, int], pads: Pads, groups: int) -> np.ndarray:
  (top, bottom), (left, right) = pads
  return np.array([*strides, top, bottom, left, right, groups], np.int64)


def _call(what: str, out_shape: tuple[int, ...], operands: tuple[jax.Array, ...],
          strides: tuple[int, int], pads: Pads, groups: int) -> jax.Array:
  _load()
  return jax.ffi.ffi_call(
      _TARGET.format(what), jax.ShapeDtypeStruct(out_shape, operands[0].dtype),
      vmap_method='sequential')(*operands, params=_params(strides, pads, groups))


def out_hw(x_shape, kernel_shape, strides, pads) -> tuple[int, int]:
  return tuple((x_shape[1 + a] + sum(pads[a]) - kernel_shape[a]) // strides[a] + 1
               for a in range(2))


def conv_forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 pads: Pads, groups: int = 1,
                 bias: jax.Array | None = None) -> jax.Array:
  """NHWC x (float32) convolved with an HWIO kernel, plus `bias` if given
  (added by the convolution's kernel as it writes its output: no second
  pass over the output)."""
  shape = (x.shape[0], *out_hw(x.shape, kernel.shape, strides, pads),
           kernel.shape[3])
  if bias is None:
    return _call('forward', shape, (x, kernel), strides, pads, groups)
  return _call('forward_bias', shape, (x, kernel, bias), strides, pads, groups)


def conv_input_grad(dy: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...],
                    strides: tuple[int, int], pads: Pads,
                    groups: int = 1) -> jax.Array:
  """d<conv(x), dy>/dx."""
  return _call('input_grad', tuple(x_shape), (dy, kernel), strides, pads, groups)


def conv_kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...],
                     strides: tuple[int, int], pads: Pads,
                     groups: int = 1) -> jax.Array:
  """d<conv(x), dy>/dkernel."""
  return _call('kernel_grad', tuple(kernel_shape), (x, dy), strides, pads, groups)


def self_check() -> dict[str, float]:
  """Largest relative difference from XLA's convolutions, per pass, over a
  few small layers (3x3 strided and padded asymmetrically, 1x1, 7x7,
  grouped)."""
  from jax import lax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  worst = {'forward': 0.0, 'input_grad': 0.0, 'kernel_grad': 0.0}
  for (n, h, w, c, k, o, s, pads, g) in [
      (2, 9, 8, 4, 3, 6, (2, 1), ((2, 1), (0, 3)), 1),
      (3, 7, 7, 8, 1, 16, (2, 2), ((0, 0), (0, 0)), 1),
      (2, 11, 11, 3, 7, 8, (2, 2), ((3, 3), (3, 3)), 1),
      (2, 6, 6, 8, 3, 12, (1, 1), ((1, 1), (1, 1)), 4)]:
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, c // g, o)), jnp.float32)

    def xla(x, kernel, s=s, pads=pads, g=g):
      return lax.conv_general_dilated(
          x, kernel, s, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=g, precision=lax.Precision.HIGHEST)

    y, vjp = jax.vjp(xla, x, kernel)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    dx, dk = vjp(dy)
    ours = {'forward': (conv_forward(x, kernel, s, pads, g), y),
            'input_grad': (conv_input_grad(dy, kernel, x.shape, s, pads, g), dx),
            'kernel_grad': (conv_kernel_grad(x, dy, kernel.shape, s, pads, g), dk)}
    for what, (a, b) in ours.items():
      err = float(np.abs(np.asarray(a) - np.asarray(b)).max() /
                  np.abs(np.asarray(b)).max())
      worst[what] = max(worst[what], err)
  return worst


def main(argv: list[str]) -> None:
  """python -m resnet_jax.onednn: build (if needed), load, check, report."""
  del argv
  from resnet_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    _load()
  except Unavailable as e:
    raise UserError(f'oneDNN convolutions unavailable: {e}') from None
  print(f'library: {build()}')
  print(f'oneDNN {version()}, {_threads_per_device()} threads per call, '
        f'OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY")}')
  worst = self_check()
  print('largest relative difference from XLA: ' + ', '.join(
      f'{k} {v:.1e}' for k, v in worst.items()))
  if max(worst.values()) > 1e-4:
    raise UserError('oneDNN convolutions disagree with XLA\'s; set '
                    'RESNET_JAX_ONEDNN=0 and report this')


if __name__ == '__main__':
  from resnet_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
