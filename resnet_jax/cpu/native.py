"""The CPU kernels XLA lacks, compiled on first use and called as FFI custom calls.

`cpu_kernels.cc` holds oneDNN's convolutions (forward, input gradient,
kernel gradient; `onednn.py` calls them) and a max-pool with its gradient
(`pooling.py`). This module builds it, loads it, registers its handlers and
calls them (`call`).

Building: g++ (or $CXX) against oneDNN's headers and library, found in this
environment (the pinned `onednn-devel-cpu-gomp` wheels of requirements.txt
put them under sys.prefix), in $RESNET_JAX_ONEDNN_ROOT, or in /usr (Debian's
libdnnl-dev); the FFI headers ship with jaxlib. The shared library goes to
a cache ($RESNET_JAX_CACHE_DIR, else $XDG_CACHE_HOME/resnet_jax, else
~/.cache/resnet_jax) under a name that hashes everything it was built from,
so an upgrade rebuilds it; concurrent first uses build it once (a file
lock), and it appears atomically. `python -m resnet_jax.tools.native_check` builds it,
checks it against XLA and prints where it is. Without a compiler or oneDNN,
`available()` is False, one line is logged saying why, and the models keep
their JAX paths: never a failure. RESNET_JAX_NATIVE=0 switches it off.

Threads: the kernels run OpenMP teams of the cores this process may use,
divided among the CPU devices when several are simulated. OpenMP threads
sleep as soon as a kernel ends (OMP_WAIT_POLICY=PASSIVE, unless set), so
they do not spin against XLA's own thread pool between custom calls (with
spinning, a CIFAR ResNet-20 step was 1.9x slower).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging

from resnet_jax import atomic_files

SOURCE = Path(__file__).with_name('cpu_kernels.cc')
# Custom-call target -> the library's handler symbol.
TARGETS = {'resnet_jax_onednn_conv_forward': 'ResnetOnednnConvForward',
           'resnet_jax_onednn_conv_forward_bias': 'ResnetOnednnConvForwardBias',
           'resnet_jax_onednn_conv_input_grad': 'ResnetOnednnConvInputGrad',
           'resnet_jax_onednn_conv_kernel_grad': 'ResnetOnednnConvKernelGrad',
           'resnet_jax_max_pool': 'ResnetMaxPoolForward',
           'resnet_jax_max_pool_input_grad': 'ResnetMaxPoolInputGrad'}
_FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w')


class Unavailable(Exception):
  """Why the native kernels cannot be built or loaded here."""


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
    raise Unavailable('no C++ compiler (g++ or $CXX) to build the native '
                      'CPU kernels')
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
  return cache_dir() / f'cpu_kernels-{digest.hexdigest()[:16]}.so'


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
    start = time.monotonic()
    # A reader never sees half a library.
    with atomic_files.temporary_path(str(path)) as tmp:
      done = subprocess.run(_command(cxx, include, lib, Path(tmp)),
                            capture_output=True, text=True, check=False)
      if done.returncode:
        errors = [l for l in done.stderr.splitlines() if 'error' in l]
        raise Unavailable(f'{Path(cxx).name} failed to build {SOURCE.name}: '
                          f'{(errors or done.stderr.splitlines() or ["?"])[0]}')
    logging.info('built the native CPU kernels in %.1f s: %s',
                 time.monotonic() - start, path)
  return path


def threads_per_device() -> int:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (
      os.cpu_count() or 1)
  return max(1, cores // max(1, len(jax.local_devices(backend='cpu'))))


@functools.cache
def load() -> ctypes.CDLL:
  """Builds (if needed) and loads the library and registers its handlers,
  once per process; raises `Unavailable` saying why it cannot."""
  if os.environ.get('RESNET_JAX_NATIVE', '1') == '0':
    raise Unavailable('switched off by RESNET_JAX_NATIVE=0')
  path = build()
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # read when libgomp loads
  try:
    library = ctypes.CDLL(str(path))
  except OSError as e:
    raise Unavailable(f'cannot load {path.name}: {e}') from None
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  library.ResnetCpuKernelsSetThreads(threads_per_device())
  return library


@functools.cache
def unavailable_reason() -> str | None:
  """None when the native kernels are ready; else why not (logged once)."""
  try:
    load()
    return None
  except Unavailable as e:
    logging.warning('native CPU kernels (oneDNN convolutions, max-pool) '
                    'unavailable: %s; using the JAX ones instead', e)
    return str(e)


def available() -> bool:
  """Whether the native kernels are built, loaded and registered (the CPU
  backend only: they are host code)."""
  return jax.default_backend() == 'cpu' and unavailable_reason() is None


def onednn_version() -> str:
  """oneDNN's version, as the loaded library reports it."""
  v = load().ResnetOnednnVersion()
  return f'{v // 10000}.{v // 100 % 100}.{v % 100}'


def call(target: str, result: jax.ShapeDtypeStruct, *operands: jax.Array,
         params: np.ndarray) -> jax.Array:
  """The custom call `target` (a key of TARGETS) on `operands`, with the
  integer attribute `params`."""
  load()
  return jax.ffi.ffi_call(target, result, vmap_method='sequential')(
      *operands, params=np.asarray(params, np.int64))
