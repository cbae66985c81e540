"""Checkpoints: exact resume after SIGKILL and SIGTERM, fallback from a
corrupt checkpoint, evaluation, warm start, mismatches, non-finite stops."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from resnet_jax import checkpointing, train_loop
from resnet_jax.errors import UserError
from test_training import ROOT, _env, run_check, tiny_config

TIMING_FIELDS = ('images_per_sec', 'examples_per_sec')


def _cmd(workdir, data_dir, *extra):
  return [sys.executable, str(ROOT / 'train.py'), f'--workdir={workdir}',
          f'--config.data.tfds_data_dir={data_dir}', '--config.model.width=4',
          '--config.data.batch_size=32', '--config.data.eval_batch_size=40',
          '--config.run.num_train_steps=20', '--config.optim.warmup_epochs=0',
          '--config.run.log_every_steps=2',
          '--config.run.checkpoint_every_steps=3',
          '--config.data.augment.crop_padding=2',
          '--config.data.augment.flip=True',
          '--config.run.progress_bar=False', *extra]


def _run_until(cmd, workdir, step, sig):
  """Starts a run, sends `sig` once the checkpoint of `step` is complete."""
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  target = pathlib.Path(workdir) / 'checkpoints' / str(step)
  deadline = time.time() + 400
  while not target.is_dir():
    if proc.poll() is not None:
      raise AssertionError(f'run ended before step {step}: '
                           f'{proc.stderr.read()[-3000:]}')
    if time.time() > deadline:
      proc.kill()
      raise AssertionError(f'no checkpoint {step} after 400 s')
    time.sleep(0.05)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def _final_state(workdir, step=20):
  """The stored state of `step` on one device, whatever device count wrote it."""
  return checkpointing.Checkpointer(str(workdir), read_only=True,
                                    async_save=False).restore_raw(step)[0]


def _records(workdir):
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k not in TIMING_FIELDS}
          for l in lines]


# The recipe features that add state: the weight EMA (warmed up) and
# gradient accumulation (2 micro-batches of 16).
FEATURES = ('--config.optim.ema_decay=0.9', '--config.optim.ema_warmup=True',
            '--config.optim.grad_accum_steps=2')


def test_resume_after_kills_and_sigterm_is_bitwise_identical(fake_data_dir,
                                                              tmp_path):
  ref, run = tmp_path / 'reference', tmp_path / 'interrupted'
  out = subprocess.run(_cmd(ref, fake_data_dir, *FEATURES), env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  # Kill points: right after the first checkpoint, after the epoch boundary
  # (step 8, with its evaluation), then a preemption by SIGTERM.
  for step, sig in ((3, signal.SIGKILL), (9, signal.SIGKILL),
                    (15, signal.SIGTERM)):
    code, _, err = _run_until(_cmd(run, fake_data_dir, *FEATURES), run,
                              step, sig)
    if sig == signal.SIGTERM:
      assert code == 0, err[-3000:]  # a clean preemption for schedulers
      assert 'resume with the same command' in err
    else:
      assert code == -signal.SIGKILL
  out = subprocess.run(_cmd(run, fake_data_dir, *FEATURES), env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  a, b = _final_state(ref), _final_state(run)
  for section in ('params', 'batch_stats', 'opt_state', 'step', 'rng',
                  'metric_sums', 'ema'):
    leaves_a = [np.asarray(x) for x in _leaves(a[section])]
    leaves_b = [np.asarray(x) for x in _leaves(b[section])]
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(x, y, err_msg=section)
  assert _records(ref) == _records(run)


def _leaves(tree):
  if isinstance(tree, dict):
    for k in sorted(tree):
      yield from _leaves(tree[k])
  elif isinstance(tree, (list, tuple)):
    for v in tree:
      yield from _leaves(v)
  else:
    yield tree


@pytest.fixture(scope='module')
def trained(fake_data_dir, tmp_path_factory):
  """A finished tiny run with checkpoints at steps 4 and 8 (end of epoch)."""
  workdir = tmp_path_factory.mktemp('trained')
  config = tiny_config('default', fake_data_dir, **{
      'model.width': 4, 'data.batch_size': 32, 'run.num_train_steps': 8,
      'run.checkpoint_every_steps': 4, 'data.eval_batch_size': 40})
  result = train_loop.train_and_evaluate(config, str(workdir))
  return config, workdir, result


def test_eval_mode_reports_the_full_test_set(trained, capsys):
  config, workdir, result = trained
  config = config.copy_and_resolve_references()
  config.run.mode = 'eval'
  evaluated = train_loop.evaluate_checkpoint(config, str(workdir))
  assert evaluated['step'] == 8 and evaluated['test_count'] == 100
  assert evaluated['test_accuracy'] == pytest.approx(result['test_accuracy'])
  assert 'step 8: test loss' in capsys.readouterr().out
  config.run.eval_step = 4
  assert train_loop.evaluate_checkpoint(config, str(workdir))['step'] == 4


def test_corrupt_latest_checkpoint_falls_back_to_previous(trained, tmp_path,
                                                         caplog):
  config, workdir, _ = trained
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  for f in (copy / 'checkpoints' / '8' / 'state').rglob('*'):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(b'\0' * 17)  # truncated, garbage array data
  config = config.copy_and_resolve_references()
  config.run.mode = 'eval'
  result = train_loop.evaluate_checkpoint(config, str(copy))
  assert result['step'] == 4
  assert 'unreadable' in caplog.text
  assert (copy / 'checkpoints' / '8').is_dir()  # nothing deleted
  for f in (copy / 'checkpoints' / '4' / 'state').rglob('*'):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(b'\0' * 17)
  with pytest.raises(UserError, match='no readable checkpoint'):
    train_loop.evaluate_checkpoint(config, str(copy))


def test_warm_start_with_a_new_head_and_rgb_input(trained, fake_data_dir,
                                                 tmp_path):
  _, workdir, _ = trained
  # The trained run's ResNet-8 (cifar_resnet20 with one block per stage),
  # but 8 wide instead of 4: the first parameter that differs is named.
  config = tiny_config('cifar10_resnet20', fake_data_dir, **{
      'model.width': 8, 'data.dataset': 'cifar100', 'run.num_train_steps': 1,
      'optim.weight_decay': 0.0, 'model.stage_sizes': (1, 1, 1),
      'run.init_from': f'{workdir}:8'})
  with pytest.raises(UserError, match=r'params/stem/bn1/bias has shape \(4,\)'):
    train_loop.train_and_evaluate(config, str(tmp_path / 'a'))
  # Same architecture, 100 classes instead of 10, RGB instead of gray. A
  # learning rate of 1e-30 (0 is not a valid config) moves no weight by an
  # ulp in the one step, so the checkpoint after it holds the warm start.
  config.model.width, config.model.zero_init_residual = 4, True
  config.optim.learning_rate = 1e-30
  train_loop.train_and_evaluate(config, str(tmp_path / 'b'))
  source, _ = checkpointing.Checkpointer(
      str(workdir), read_only=True, async_save=False).restore_variables(8)
  warm, meta = checkpointing.Checkpointer(
      str(tmp_path / 'b'), read_only=True, async_save=False).restore_variables()
  assert meta['step'] == 1  # its own step count, not the source's
  np.testing.assert_array_equal(source['params']['layer2_0']['conv1']['kernel'],
                                warm['params']['layer2_0']['conv1']['kernel'])
  assert warm['params']['fc']['kernel'].shape == (16, 100)
  assert warm['params']['stem']['conv1']['kernel'].shape == (3, 3, 3, 4)


def test_restoring_into_another_architecture_names_the_parameter(trained):
  config, workdir, _ = trained
  # A workdir names its network: another width is refused by name ...
  config = config.copy_and_resolve_references()
  config.run.mode, config.model.width = 'eval', 8
  with pytest.raises(UserError, match=r"model.width=4, but this command asks "
                     r'for model.width=8'):
    train_loop.evaluate_checkpoint(config, str(workdir))
  # ... and a checkpoint restored into another network names the parameter.
  from resnet_jax import run_setup  # pylint: disable=g-import-not-at-top
  run = run_setup.build(config)
  ckpt = checkpointing.Checkpointer(str(workdir), read_only=True,
                                    async_save=False)
  with pytest.raises(UserError, match=r'params/stem/bn1/bias has shape '
                     r'\(4,\) in the checkpoint but \(8,\) in the model'):
    ckpt.restore(run_setup.init_state(run), run.replicated)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(fake_data_dir,
                                                             tmp_path):
  config = tiny_config('default', fake_data_dir, **{
      'model.width': 4, 'data.batch_size': 32, 'run.num_train_steps': 8,
      'run.checkpoint_every_steps': 2, 'run.log_every_steps': 4,
      'optim.learning_rate': 1e30, 'optim.schedule': 'constant'})
  with pytest.raises(train_loop.NonFiniteError, match=r'in steps \d+-\d+'):
    train_loop.train_and_evaluate(config, str(tmp_path))
  steps = checkpointing.Checkpointer(str(tmp_path), read_only=True,
                                     async_save=False).all_steps()
  for step in steps:
    state = _final_state(tmp_path, step)
    assert all(np.all(np.isfinite(x)) for x in _leaves(state['params']))


def test_checkpoint_restores_on_another_device_count(trained, fake_data_dir,
                                                     tmp_path):
  _, workdir, _ = trained
  # Written on 1 device, restored on 8: the values are equal.
  r = run_check('restore_and_compare', str(workdir))
  assert r == {'devices': 8, 'equal': True, 'step': 8}
  # Written on 8 devices, restored on 1.
  eight = tmp_path / 'eight'
  assert run_check('train_tiny', str(eight), fake_data_dir)['devices'] == 8
  from multidevice_checks import restore_and_compare  # pylint: disable=g-import-not-at-top
  assert restore_and_compare(str(eight)) == {'devices': 1, 'equal': True,
                                             'step': 8}


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(workdir, data_dir, port, *extra):
  return [subprocess.Popen(
      _cmd(workdir, data_dir, *extra), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i),
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}'))
          for i in range(2)]


def test_two_processes_equal_one_process_and_survive_preemption(
    fake_data_dir, tmp_path):
  # Two processes of 4 simulated devices each, against one process of 8.
  one = tmp_path / 'one'
  out = subprocess.run(
      _cmd(one, fake_data_dir), capture_output=True, text=True, timeout=600,
      env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert out.returncode == 0, out.stderr[-3000:]
  # The scheduler's SIGTERM reaches only process 1: both must agree to stop
  # at the same step, save together and exit 0.
  two = tmp_path / 'two'
  procs = _two_processes(two, fake_data_dir, _free_port())
  deadline = time.time() + 400
  while not (two / 'checkpoints' / '9').is_dir():
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      for p in procs:
        p.kill()
      errs = [p.communicate()[1][-2000:] for p in procs]
      raise AssertionError(f'no checkpoint 9: process 0: {errs[0]}\n'
                           f'process 1: {errs[1]}')
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  results = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
    assert 'resume with the same command' in err, err[-3000:]
  stopped = [int(s) for s in os.listdir(two / 'checkpoints') if s.isdigit()]
  assert 9 < max(stopped) < 20
  # The same command continues, and ends where one process ends.
  procs = _two_processes(two, fake_data_dir, _free_port())
  results = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  # Only process 0 prints the epoch line and writes logs and plots.
  assert 'test acc' in results[0][0] and 'test acc' not in results[1][0]
  assert (two / 'curves.png').exists() and (two / 'metrics.jsonl').exists()
  a, b = _final_state(one), _final_state(two)
  for section in ('params', 'batch_stats', 'opt_state'):
    for x, y in zip(_leaves(a[section]), _leaves(b[section])):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                                 atol=1e-6, err_msg=section)
  assert [r['loss'] for r in _records(one) if 'loss' in r] == pytest.approx(
      [r['loss'] for r in _records(two) if 'loss' in r], rel=1e-5)
  # The checkpoint the two processes wrote restores in one process.
  from multidevice_checks import restore_and_compare  # pylint: disable=g-import-not-at-top
  assert restore_and_compare(str(two)) == {'devices': 1, 'equal': True,
                                           'step': 20}
