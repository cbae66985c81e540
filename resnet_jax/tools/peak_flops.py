"""The peak FLOP/s a benchmark's achieved FLOP/s is a fraction of: a table
of accelerators, and the CPU's from its cores, clock and vector units."""

import os
import subprocess
from typing import Any

import jax

# device_kind substring (lower case; first match wins) -> dense peak FLOP/s per
# device (bfloat16, float32). GPU float32 is the non-tensor-core figure: JAX's
# default precision may use TF32 tensor cores there, so the float32 fraction
# can exceed 1. TPUs run float32 matmuls as bfloat16 passes at default
# precision, hence the same figure.
PEAK_FLOPS = (
    ('h100 pcie', 756e12, 51e12), ('h100', 989e12, 67e12),
    ('h200', 989e12, 67e12), ('a100', 312e12, 19.5e12),
    ('tpu v4', 275e12, 275e12), ('tpu v5 lite', 197e12, 197e12),
    ('tpu v5e', 197e12, 197e12), ('tpu v5', 459e12, 459e12),
)


def _cpuinfo() -> dict[str, Any]:
  info = {'mhz': [], 'flags': set(), 'vendor': '', 'family': 0}
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        key, _, value = (s.strip() for s in line.partition(':'))
        if key == 'cpu MHz':
          info['mhz'].append(float(value))
        elif key == 'flags':
          info['flags'] = set(value.split())
        elif key == 'vendor_id':
          info['vendor'] = value
        elif key == 'cpu family':
          info['family'] = int(value)
  except OSError:
    pass
  if not info['mhz']:  # e.g. /proc/cpuinfo without clocks: ask lscpu
    try:
      out = subprocess.run(['lscpu'], capture_output=True, text=True,
                           timeout=10, check=False).stdout
      info['mhz'] = [float(line.split(':')[1]) for line in out.splitlines()
                     if line.startswith(('CPU max MHz', 'CPU MHz'))]
    except (OSError, ValueError, subprocess.SubprocessError):
      pass
  return info


def _fp32_flops_per_cycle(info: dict) -> tuple[int, str]:
  flags = info['flags']
  full_avx512 = 'avx512f' in flags and (
      info['vendor'] == 'GenuineIntel' or
      (info['vendor'] == 'AuthenticAMD' and info['family'] >= 26))
  if full_avx512:  # two 512-bit FMA pipes (Intel server cores, AMD Zen 5)
    return 64, '2 FMA x 16 fp32 lanes x 2'
  if 'fma' in flags:  # Zen 2-4 (Zen 4 splits AVX-512 over 256-bit pipes)
    return 32, '2 FMA x 8 fp32 lanes x 2'
  if 'avx' in flags:
    return 16, '8-lane add + 8-lane mul'
  return 8, '4-lane add + 4-lane mul'


def cpu_peak_flops() -> tuple[float | None, str]:
  """cores (this process's affinity) x max clock x fp32 FLOPs per cycle."""
  info = _cpuinfo()
  cores = len(os.sched_getaffinity(0))
  if not info['mhz']:
    return None, 'CPU clock unknown (no cpu MHz in /proc/cpuinfo or lscpu)'
  ghz = max(info['mhz']) / 1000
  per_cycle, how = _fp32_flops_per_cycle(info)
  return cores * ghz * 1e9 * per_cycle, (
      f'{cores} cores x {ghz:.3f} GHz x {per_cycle} fp32 FLOP/cycle ({how})')


def peak_flops(device: Any, dtype: str) -> tuple[float | None, str]:
  """Peak FLOP/s of all devices together, and where the figure comes from."""
  if device.platform == 'cpu':  # simulated CPU devices share the same cores
    return cpu_peak_flops()
  kind = device.device_kind.lower()
  for key, bf16, fp32 in PEAK_FLOPS:
    if key in kind:
      per_device = bf16 if dtype == 'bfloat16' else fp32
      return per_device * jax.device_count(), (
          f'{jax.device_count()} x {per_device / 1e12:g} TFLOP/s '
          f'({device.device_kind}, {dtype} dense)')
  return None, f'no peak known for {device.device_kind!r}'
