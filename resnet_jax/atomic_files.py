"""Files that appear whole or not at all.

Each is written under a temporary name in its own folder (so the rename
stays on one file system) and renamed into place when complete: a kill
mid-write leaves the previous file (or none) and a stray temporary, never
half a file, and concurrent writers never share a temporary.
"""

import contextlib
import os
import threading
from typing import IO, Iterator


@contextlib.contextmanager
def temporary_path(path: str) -> Iterator[str]:
  """A temporary name beside `path`, renamed onto `path` when the block
  completes and removed when it raises."""
  folder, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(folder,
                     f'.tmp-{os.getpid()}-{threading.get_ident()}-{name}')
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def open_atomic(path: str, mode: str = 'w') -> Iterator[IO]:
  """`open(path, mode)` for writing, replacing `path` whole when closed."""
  encoding = None if 'b' in mode else 'utf-8'
  with temporary_path(path) as tmp:
    with open(tmp, mode, encoding=encoding) as f:
      yield f


def write_text(path: str, text: str) -> None:
  with open_atomic(path, 'w') as f:
    f.write(text)
