"""What checkpointing.py needs to tell damage and failures apart: checksums
of every array of a state (recorded in a checkpoint's meta when it is saved,
checked when it is restored), and one line from the errors Orbax and
TensorStore raise for a failed write or an unreadable file.

A damaged file does not always raise: a flipped bit in a compressed chunk
reads back as other values, which only the checksums reveal.
"""

import os
import re
from typing import Any

import jax
import jax.numpy as jnp


def fingerprint(tree: Any) -> dict[str, int]:
  """A 32-bit checksum of each array's bits, by path ('params/fc/kernel'),
  computed where the arrays are (the same on any device count)."""
  paths, leaves = _paths_and_leaves(tree)
  sums = jax.device_get(_checksums(leaves))
  return {p: int(x) for p, x in zip(paths, sums)}


def mismatch(tree: Any, recorded: dict[str, int] | None) -> str | None:
  """What differs from the checksums recorded at save time (checkpoints
  written before they were recorded are not checked)."""
  if not recorded:
    return None
  now = fingerprint(tree)
  bad = [p for p in recorded if now.get(p) != recorded[p]]
  if not bad:
    return None
  more = f' and {len(bad) - 1} more' if len(bad) > 1 else ''
  return (f'{bad[0]}{more} read back other values than were saved (checksum '
          'mismatch)')


def _paths_and_leaves(tree: Any) -> tuple[list[str], list[Any]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = ['/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(
      k, 'name', k)))) for k in path) for path, _ in flat]
  return names, [leaf for _, leaf in flat]


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_checksum(x) for x in leaves]


def _checksum(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words, each weighted by an odd multiple of
  its position (sums modulo 2**32 are exact in any order)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    x = jax.lax.bitcast_convert_type(
        x, jnp.dtype(f'uint{x.dtype.itemsize * 8}'))
  words = x.ravel().astype(jnp.uint32)
  position = jnp.arange(words.size, dtype=jnp.uint32)
  weights = position * jnp.uint32(2654435761) | jnp.uint32(1)
  return jnp.sum((words ^ (words >> 16)) * weights, dtype=jnp.uint32)


def os_error(e: BaseException) -> str | None:
  """'<strerror> writing <file>' when `e` (or its cause) is an operating
  system error, as Python raises it or TensorStore reports it."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      where = f' writing {e.filename}' if e.filename else ''
      return f'{e.strerror or os.strerror(e.errno)}{where}'
    text = str(e)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
      files = re.findall(r'(?:local file|writing:?) "([^"]+)"', text)
      where = f' writing {files[-1]}' if files else ''
      return f'{os.strerror(int(code.group(1)))}{where}'
    e = e.__cause__ or e.__context__
  return None


def read_error(e: BaseException) -> str:
  """One line from a restore error, naming the array or file that failed
  and why (TensorStore's error, which Orbax wraps, says both)."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e)
  arrays = (re.findall(r'Error reading "([^"/]+)/', text) or
            re.findall(r"'path': '([^/'][^']*?)/?'", text))
  files = re.findall(r'local file "([^"]+)"', text)
  where = (arrays[-1].replace('.', '/') if arrays else
           files[-1] if files else 'a file')
  first = text.splitlines()[0] if text else ''
  why = first.split(' See full TensorStore details')[0].split('": ')[-1]
  return f'{where} is unreadable ({type(e).__name__}: {why[:200]})'
