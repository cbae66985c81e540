"""One training run per workdir: an exclusive lock that dies with its process.

Training takes `fcntl.flock` on `<workdir>/.lock` (process 0 of a
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
import os
import socket
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax.errors import UserError

LOCK_FILE = '.lock'


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
