"""A workdir holds one run: writable, locked while it trains, and only ever
resumed with the network and data it was started with (`check_same_run`).

The lock: training takes `fcntl.flock` on `<workdir>/.lock` (process 0 of a
multi-process run only) and writes its pid, host and start time into the
file for the message a second run prints. The kernel releases the lock when
the holder exits in any way, SIGKILL included, so a lock left behind by a
killed run never blocks the next start; the file itself stays (deleting it
would let two runs lock two different files). Evaluation (run.mode=eval)
only reads finished checkpoints and takes no lock, so a live run can be
evaluated. On NFS, flock is emulated with the server's byte-range locks.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import tempfile
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import atomic_files, config as config_lib
from resnet_jax.errors import UserError

LOCK_FILE = '.lock'
# The config a workdir's run was made with: what every later command on the
# workdir (resume, eval, predict, summary, warm start) builds its network
# and data from.
CONFIG_FILE = 'config.json'


class WorkdirLock:
  """Holds `<workdir>/.lock` from `acquire` until `release` or process exit."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> None:
    """Takes the lock, or raises UserError naming the process that has it."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode('utf-8', 'replace').strip()
      os.close(fd)
      raise UserError(
          f'workdir {os.path.dirname(self.path)!r} is in use by another '
          f'training run ({holder or "holder unknown"}); wait for it to end '
          'or stop it, or train in another workdir') from None
    except OSError as e:
      os.close(fd)
      raise UserError(f'cannot lock {self.path!r} ({e.strerror}); use a '
                      'workdir on a file system with file locks') from None
    started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
    text = (f'process {os.getpid()} on {socket.gethostname()}, started '
            f'{started}\n')
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


@contextlib.contextmanager
def held(workdir: str) -> Iterator[None]:
  """The workdir locked for the block, by process 0; every process raises
  the same UserError when it is taken (none would start alone)."""
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    taken = multihost_utils.process_allgather(np.int32(error is not None))
    if error is None and np.max(taken):
      error = UserError(f'workdir {workdir!r} is in use by another training '
                        'run (process 0 names it)')
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def prepare(workdir: str) -> None:
  """Creates `workdir` if needed; one UserError when it cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # A uniquely named probe: every process of a multi-process run checks
    # the same workdir at the same moment (a shared name let one process
    # delete another's probe, fail, and leave the others at the shutdown
    # barrier).
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_test_'):
      pass
  except OSError as e:
    raise UserError(f'cannot write to workdir {workdir!r} ({e.strerror}); '
                    'choose a directory you can write to') from None


# What a resumed run may not change: the network's parameters and what it
# is fed (conv_impl and dtype only change how it computes).
_IDENTITY = ('model.name', 'model.num_classes', 'model.width',
             'model.stage_sizes', 'data.dataset', 'data.image_size')


def check_same_run(config: Any, workdir: str) -> None:
  """A workdir holds one run: resuming it with another network or dataset is
  refused, naming the first field that differs."""
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    return
  recorded = read_config(workdir)
  for path in _IDENTITY:
    was, now = config_lib.get(recorded, path), config_lib.get(config, path)
    if was != now:
      raise UserError(
          f'{workdir!r} holds a run with {path}={was!r}, but this command '
          f'asks for {path}={now!r}; resume with the same config, or train '
          'in a new workdir')
  # The checkpoints hold an EMA model exactly when the run keeps one (its
  # decay may change; turning it on or off may not).
  was, now = recorded.optim.ema_decay, config.optim.ema_decay
  if bool(was) != bool(now):
    raise UserError(
        f'{workdir!r} holds a run with optim.ema_decay={was!r}, but this '
        f'command asks for optim.ema_decay={now!r}: its checkpoints '
        f'{"hold" if was else "have no"} EMA weights; resume with the EMA '
        f'{"on" if was else "off"}, or train in a new workdir')


def write_config(workdir: str, config: Any) -> None:
  """Writes `workdir/config.json` (whole or not at all)."""
  atomic_files.write_text(os.path.join(workdir, CONFIG_FILE),
                          config_lib.to_json(config))


def read_config(workdir: str) -> Any:
  """The config a workdir's run was made with (its config.json)."""
  if not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir!r} does not exist; give the workdir of '
                    'a training run or of python -m resnet_jax.tools.convert')
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      values = json.load(f)
  except FileNotFoundError:
    raise UserError(f'no {CONFIG_FILE} in {workdir!r}; is it a workdir of '
                    'train.py or of python -m resnet_jax.tools.convert?') from None
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path!r} ({e}); rerun the training or '
                    'conversion that wrote it') from None
  if not isinstance(values, dict):
    raise UserError(f'{path!r} does not hold a config (a JSON object)')
  return config_lib.from_dict(values, path)
