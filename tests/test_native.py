"""The native CPU kernels (oneDNN convolutions, max-pool): built from the
pinned wheels, cached, rebuilt when their inputs change, and, where they
cannot be built, one logged line and the JAX paths instead of a failure."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from resnet_jax.cpu import native

ROOT = pathlib.Path(__file__).resolve().parents[1]

# In a fresh process: which conv plan the models use, whether they still
# match flax's convolutions, and what an explicit conv_impl='onednn' says.
_PROBE = textwrap.dedent('''
    import json
    from absl import logging
    logging.set_verbosity('info')
    import jax, jax.numpy as jnp, numpy as np
    from resnet_jax.cpu import layers as cpu_layers, native
    from resnet_jax import models
    from resnet_jax.errors import UserError
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    ref = models.create_model('d2l_resnet18', conv_impl='xla', width=8)
    auto = models.create_model('d2l_resnet18', conv_impl='auto', width=8)
    v = ref.init(jax.random.PRNGKey(1), x)
    lowered = jax.jit(lambda v, x: auto.apply(v, x)).lower(v, x).as_text()
    err = float(jnp.abs(auto.apply(v, x) - ref.apply(v, x)).max())
    try:
      cpu_layers.get_conv('onednn')
      explicit = 'ok'
    except UserError as e:
      explicit = str(e)
    print(json.dumps({'available': native.available(), 'err': err,
                      'conv_calls': lowered.count('resnet_jax_onednn_conv'),
                      'pool_calls': lowered.count('resnet_jax_max_pool'),
                      'explicit': explicit}))
''')


def _probe(tmp_path, **env) -> tuple[dict, str]:
  import json  # pylint: disable=g-import-not-at-top
  out = subprocess.run(
      [sys.executable, '-c', _PROBE], capture_output=True, text=True,
      timeout=300, check=False, cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
               RESNET_JAX_CACHE_DIR=str(tmp_path / 'cache'), **env))
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def _has_onednn() -> bool:
  try:
    native.find_onednn()
    return True
  except native.Unavailable:
    return False


needs_onednn = pytest.mark.skipif(not _has_onednn(),
                                  reason='no oneDNN headers and library here')


def _probe_processes(cache, count: int, **env) -> list[tuple[dict, str]]:
  """`count` probes started together on the cache folder `cache`."""
  import json  # pylint: disable=g-import-not-at-top
  procs = [subprocess.Popen(
      [sys.executable, '-c', _PROBE], stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
               RESNET_JAX_CACHE_DIR=str(cache), **env))
           for _ in range(count)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    results.append((json.loads(out.strip().splitlines()[-1]), err))
  return results


@pytest.mark.full
@needs_onednn
def test_concurrent_first_uses_build_once_and_auto_uses_it(tmp_path):
  """The session's one cold build. Processes of one job (or parallel test
  workers) start together on an empty cache: one builds, under a lock,
  the others wait and load the library, which appears atomically; every
  model then runs oneDNN and the native max-pool, matching Flax."""
  cache = tmp_path / 'cache'
  runs = _probe_processes(cache, 3)
  for r, _ in runs:
    assert r['available'] and r['explicit'] == 'ok'
    # 'auto' chose oneDNN for the 3x3 and 7x7 layers; the stem pools natively.
    assert r['conv_calls'] > 0 and r['pool_calls'] == 1
    assert r['err'] < 1e-4
  assert sum('built the native CPU kernels' in log for _, log in runs) == 1
  built = list(cache.glob('cpu_kernels-*.so'))
  assert len(built) == 1
  assert [p.name for p in cache.iterdir() if p.suffix != '.lock'] == [
      built[0].name]  # no temporary files left behind
  # A later process loads the cached library instead of compiling again.
  (r, log), = _probe_processes(cache, 1)
  assert r['available'] and 'built the native' not in log
  assert list(cache.glob('cpu_kernels-*.so')) == built


@pytest.mark.parametrize('env,why', [
    ({'CXX': '/bin/false'}, 'false failed to build cpu_kernels.cc'),
    # (the interpreter starts by its absolute path: only the compiler
    # lookup sees the empty PATH)
    ({'CXX': '', 'PATH': '/nonexistent'}, 'no C++ compiler'),
    ({'RESNET_JAX_NATIVE': '0'}, 'switched off by RESNET_JAX_NATIVE=0'),
])
@pytest.mark.full
def test_without_a_compiler_auto_falls_back_with_one_logged_line(tmp_path, env, why):
  r, log = _probe(tmp_path, **env)
  assert not r['available']
  # The patch/XLA convolutions and the strided-view max-pool.
  assert r['conv_calls'] == 0 and r['pool_calls'] == 0 and r['err'] < 1e-4
  warnings = [l for l in log.splitlines() if 'native CPU kernels' in l]
  assert len(warnings) == 1 and why in warnings[0], log[-2000:]
  # Asked for by name, it is a user error that says why and what to use.
  assert why in r['explicit'] and 'conv_impl="auto"' in r['explicit']


@needs_onednn
def test_a_changed_source_builds_a_new_library(tmp_path, monkeypatch):
  # The compiler is a stand-in that records its calls and writes the -o
  # file: what is tested is when a build happens and where its library
  # goes, not g++ again (test_concurrent_first_uses... compiles for real).
  calls = tmp_path / 'calls'
  fake = tmp_path / 'fake-g++'
  fake.write_text('#!/bin/sh\necho "$@" >> ' + str(calls) + '\n'
                  'while [ "$1" != "-o" ]; do shift; done\n'
                  'echo library > "$2"\n')
  fake.chmod(0o755)
  monkeypatch.setenv('CXX', str(fake))
  monkeypatch.setenv('RESNET_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  first = native.build()
  assert native.build() == first  # cached: no second build
  source = tmp_path / 'cpu_kernels.cc'
  source.write_text(native.SOURCE.read_text() + '\n// changed\n')
  monkeypatch.setattr(native, 'SOURCE', source)
  second = native.build()
  assert second != first and first.is_file() and second.is_file()
  assert len(calls.read_text().splitlines()) == 2


@pytest.mark.full
@needs_onednn
def test_the_command_builds_checks_and_reports():
  out = subprocess.run([sys.executable, '-m', 'resnet_jax.tools.native_check'],
                       capture_output=True, text=True, timeout=300,
                       check=False, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'oneDNN 3.' in out.stdout
  assert "max-pool: forward and gradient equal to XLA's: True" in out.stdout
  line = [l for l in out.stdout.splitlines() if 'largest relative' in l][0]
  errors = [float(part.split()[-1]) for part in line.split(': ')[1].split(',')]
  assert len(errors) == 5 and max(errors) < 1e-5  # fwd, dgrad, 3 wgrad variants
