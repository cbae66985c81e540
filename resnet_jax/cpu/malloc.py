"""glibc's allocator settings for XLA's CPU backend (Linux; process-wide)."""

import ctypes
import sys


def configure_cpu_malloc() -> bool:
  """Keeps glibc from returning big freed buffers to the OS (Linux; process-wide).

  XLA:CPU allocates every step's large temporaries afresh. glibc serves
  allocations above 32 MiB with mmap and unmaps them on free, so each step
  page-faults (and zeroes) all of its activations and patch buffers again, a
  cost that can exceed the arithmetic (docs/cpu.md). Serving
  them from the heap and never trimming it reuses the same pages. Costs:
  resident memory stays at its peak. Returns whether the settings were
  applied. Idempotent.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):  # Not glibc (e.g. musl).
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  # One arena: a buffer under 64 MiB freed in a per-thread arena would still
  # be unmapped with the (mmap-ed) heap that held it. A trim threshold of -1
  # turns trimming off; the largest positive one, 2**31 - 1, still trimmed
  # whenever a step freed more than 2 GiB at the top of the heap, as the
  # textbook ResNet-18 at batch 256 does: every second or third step then
  # faulted 1.4 GB back in (361k page faults, up to 6 s of system time on
  # top of a 4 s step).
  return all(mallopt(option, value) for option, value in (
      (m_mmap_max, 0), (m_trim_threshold, -1), (m_arena_max, 1)))
