"""python -m resnet_jax.tools.suite --smoke: every stage of the accelerator suite,
tiny, on the CPU; a failing stage is recorded and the next one still runs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from helpers import subprocess_env

# Subprocesses and every config end to end: the full tier.
pytestmark = pytest.mark.full

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _suite(*args, timeout=900):
  return subprocess.run([sys.executable, '-m', 'resnet_jax.tools.suite', *args],
                        capture_output=True, text=True, cwd=ROOT, env=subprocess_env(),
                        timeout=timeout)


def test_smoke_runs_every_stage(fake_data_dir, tmp_path):
  out_dir = tmp_path / 'suite'
  out = _suite(f'--out={out_dir}', f'--data_dir={fake_data_dir}', '--smoke')
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  results = json.loads((out_dir / 'results.json').read_text())
  assert {k: v['status'] for k, v in results.items()} == {
      'env': 'ok', 'bench': 'ok', 'textbook': 'ok', 'best': 'ok'}
  assert results['env']['device_count'] >= 1
  assert results['env']['versions']['jax']
  rows = results['bench']['rows']
  assert set(rows) == {'resnet50_bf16', 'd2l_resnet18_f32',
                       'd2l_resnet18_bf16', 'cifar_resnet20_f32'}
  for name, row in rows.items():
    figures = row['figures']
    assert figures['images_per_s'] > 0, name
    assert figures['compile_s'] > 0, name
    assert figures['flops_per_example'] > 0, name  # counted on the CPU
  # Prepared in the data dir: the input pipeline measured against synthetic.
  for name in ('d2l_resnet18_f32', 'd2l_resnet18_bf16', 'cifar_resnet20_f32'):
    assert rows[name]['figures']['real_over_synthetic'] > 0
  assert 'streamed' in rows['resnet50_bf16']['real_data']
  for stage in ('textbook', 'best'):
    final = results[stage]['final']
    assert 0 <= final['test_accuracy'] <= 1
    assert (out_dir / f'{stage}_curves.png').stat().st_size > 0
  # The best recipe tunes on a held-out split, then tests once.
  assert 0 <= results['best']['final']['val_accuracy'] <= 1
  assert results['best']['test_eval']['status'] == 'ok'
  table = (out_dir / 'results.md').read_text()
  assert '| textbook ResNet-18, 96x96x1, bfloat16, batch 256 |' in table
  assert '| best (configs/fashion_mnist_best.py) |' in table


def test_a_failing_stage_is_recorded_and_the_next_runs(tmp_path):
  out_dir = tmp_path / 'suite'
  out = _suite(f'--out={out_dir}', '--stages=bench,env', '--smoke',
               '--stage_timeout=0.5')
  assert out.returncode == 1
  results = json.loads((out_dir / 'results.json').read_text())
  assert results['bench']['status'] == 'failed'
  assert all('timed out after 0.5 s' in row['error']
             for row in results['bench']['rows'].values())
  assert results['env']['status'] == 'ok'
  assert 'failed' in (out_dir / 'results.md').read_text()
  assert os.path.exists(out_dir / 'logs' / 'bench_resnet50_bf16.log')
