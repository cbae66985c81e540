"""Every module imports on its own, and the tools whose whole runs are in
the full tier (lowering, the suite, the native check) work in-process on
tiny inputs."""

import importlib
import pkgutil

import numpy as np
import pytest

import resnet_jax
from helpers import tiny_config
from resnet_jax.errors import UserError
from resnet_jax.tools import lower, native_check, suite


def test_every_module_imports():
  names = [m.name for m in pkgutil.walk_packages(resnet_jax.__path__,
                                                 'resnet_jax.')]
  assert len(names) > 40
  for name in names:
    importlib.import_module(name)


def test_the_default_recipe_lowers_for_cuda_and_tpu_on_this_device(
    fake_data_dir):
  config = tiny_config('default', fake_data_dir, **{'model.width': 4})
  lowered = lower.lower_steps(config, ['cuda', 'tpu'])
  assert [(s.step, s.platforms, s.conv_impl) for s in lowered] == [
      ('train', ('cuda', 'tpu'), 'xla'), ('eval', ('cuda', 'tpu'), 'xla')]
  # XLA's own convolutions on accelerators: no custom call of the CPU path.
  assert all(not any('resnet_jax' in t for t in s.custom_calls)
             for s in lowered)
  with pytest.raises(UserError, match='unknown platform'):
    lower.check_platforms(['cuda', 'gpu9'])


def test_collectives_are_counted_with_their_bytes():
  hlo = ('%a = f32[8,16]{1,0} all-reduce(f32[8,16]{1,0} %x), to_apply=%add\n'
         '%b = (bf16[4]{0}, f32[2]{0}) all-gather-start(%y)\n')
  assert lower.collectives_in(hlo) == {
      'all-reduce': {'count': 1, 'bytes': 8 * 16 * 4},
      'all-gather': {'count': 1, 'bytes': 4 * 2 + 2 * 4}}


def test_the_suite_tables_name_a_failed_stage():
  table = suite.markdown({'textbook': {
      'status': 'failed', 'error': 'out of memory', 'config': 'x.py',
      'finished': '2026-12-08T03:00:00'}})
  assert 'out of memory' in table


def test_native_kernels_match_xla():
  if not native_check.native.available():
    pytest.skip(native_check.native.unavailable_reason())
  assert native_check.max_pool_matches_xla()
  assert max(native_check.onednn_differences().values()) < 1e-4
  assert np.isfinite(list(native_check.onednn_differences().values())).all()
