"""Checkpoints: exact resume after SIGKILL and SIGTERM, also after random
kills anywhere; one run per workdir; a failing write during a save; fallback
from a corrupt checkpoint, evaluation, warm start, mismatches, non-finite
stops. (In-process fault tests: test_faults.py.)"""

import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from resnet_jax.checkpoint import checkpointing
from resnet_jax.train import train_loop
from resnet_jax.errors import UserError
from helpers import (ROOT, final_state, free_port, leaves, metric_records,
                     run_check, run_until, scalars, subprocess_env,
                     tiny_config)

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


# The recipe features that add state, on in every run compared bitwise:
# the weight EMA (warmed up) and gradient accumulation (2 micro-batches).
FEATURES = ('--config.optim.ema_decay=0.9', '--config.optim.ema_warmup=True',
            '--config.optim.grad_accum_steps=2')


def _cmd_features(workdir, data_dir, *extra):
  return _cmd(workdir, data_dir, *FEATURES, *extra)


@pytest.fixture(scope='module')
def reference(fake_data_dir, tmp_path_factory):
  """The uninterrupted run of `_cmd_features`: 20 steps, 8 per epoch."""
  ref = tmp_path_factory.mktemp('reference')
  out = subprocess.run(_cmd_features(ref, fake_data_dir), env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return ref


def _assert_same_run(ref, run):
  """Bitwise the same final state, and the same metrics records."""
  a, b = final_state(ref), final_state(run)
  for section in ('params', 'batch_stats', 'opt_state', 'step', 'rng',
                  'metric_sums', 'ema'):
    leaves_a = [np.asarray(x) for x in leaves(a[section])]
    leaves_b = [np.asarray(x) for x in leaves(b[section])]
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(x, y, err_msg=section)
  assert metric_records(ref) == metric_records(run)


@pytest.mark.full
def test_resume_after_kills_and_sigterm_is_bitwise_identical(fake_data_dir,
                                                              reference,
                                                              tmp_path):
  run = tmp_path / 'interrupted'
  # Kill points: right after the first checkpoint, after the epoch boundary
  # (step 8, with its evaluation), then a preemption by SIGTERM.
  for step, sig in ((3, signal.SIGKILL), (9, signal.SIGKILL),
                    (15, signal.SIGTERM)):
    code, _, err = run_until(_cmd_features(run, fake_data_dir), run,
                              step, sig)
    if sig == signal.SIGTERM:
      assert code == 0, err[-3000:]  # a clean preemption for schedulers
      assert 'resume with the same command' in err
    else:
      assert code == -signal.SIGKILL
  out = subprocess.run(_cmd_features(run, fake_data_dir), env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  _assert_same_run(reference, run)


# Where a random kill lands is read from what the run leaves: its output
# (stdout and stderr in one pipe, in the order written) and an unfinished
# Orbax save folder. 8 steps per epoch: epoch ends at 8 and 16, the end at
# 20, each evaluated; a progress line every 2 steps; checkpoints every 3.
_PROGRESS = re.compile(r'\] epoch (\d+): (\d+)/8 ')
_EVAL_STEPS = (8, 16, 20)


def _progress_step(line: str) -> int | None:
  m = _PROGRESS.search(line)
  return (int(m.group(1)) - 1) * 8 + int(m.group(2)) if m else None


class _Attempt:
  """One start of the command, its output collected as it is written."""

  def __init__(self, cmd, workdir):
    self.checkpoints = pathlib.Path(workdir) / 'checkpoints'
    self.started = time.time()
    self.proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line.rstrip('\n'))

  def saving(self) -> bool:
    """An Orbax temporary folder written by this attempt exists."""
    try:
      return any('orbax-checkpoint-tmp' in e.name and
                 e.stat().st_mtime > self.started - 1
                 for e in os.scandir(self.checkpoints))
    except OSError:
      return False

  def training(self) -> bool:
    return any(_progress_step(l) for l in self.lines[-50:])

  def wait_for(self, condition, timeout=400, at_most=None) -> bool:
    """Whether `condition` held before the run ended by itself (or before
    `at_most` seconds, when given)."""
    deadline = time.time() + timeout
    limit = None if at_most is None else time.time() + at_most
    while self.proc.poll() is None:
      if condition() or (limit is not None and time.time() > limit):
        return True
      assert time.time() < deadline, '\n'.join(self.lines[-30:])
      time.sleep(0.002)
    return False

  def kill_after(self, delay: float) -> None:
    time.sleep(delay)
    self.proc.kill()
    self.proc.wait()
    self._reader.join()

  def landed(self) -> str:
    """Where the kill landed: what the main thread was doing (its last
    output), and whether an asynchronous save was in flight."""
    if self.proc.returncode == 0:
      return 'none (the run had ended)'
    events = [l for l in self.lines
              if _progress_step(l) or l.startswith('epoch ')]
    if not events:
      phase = 'start-up'
    elif (self.checkpoints / '20').is_dir():
      phase = 'after the last checkpoint'
    elif events[-1].startswith('epoch 2.50'):
      phase = 'final curves'
    elif _progress_step(events[-1]) in _EVAL_STEPS:
      phase = 'evaluation'
    else:
      phase = 'training'
    return f'{phase}, in a save' if self.saving() else phase


def _trigger(attempt: _Attempt, kind: str, rng: random.Random) -> float:
  """Waits for the moment `kind` aims at; returns a random delay after it."""
  if kind == 'start':  # a random moment before the first progress line
    attempt.wait_for(attempt.training, at_most=rng.uniform(0.5, 4.0))
    return 0.0
  if kind == 'save':
    condition = lambda: attempt.training() and attempt.saving()
    delay = rng.uniform(0, 0.02)
  elif kind == 'eval':
    condition = lambda: attempt.lines and _progress_step(
        attempt.lines[-1]) in _EVAL_STEPS
    delay = rng.uniform(0, 0.05)
  elif kind == 'between':
    condition = attempt.training
    delay = rng.uniform(0, 0.3)
  else:  # 'curves': after the last epoch line
    condition = lambda: any(l.startswith('epoch 2.50') for l in attempt.lines)
    delay = rng.uniform(0, 0.3)
  return delay if attempt.wait_for(condition) else 0.0


@pytest.mark.full
def test_random_kills_anywhere_end_bitwise_like_an_uninterrupted_run(
    fake_data_dir, reference, tmp_path):
  # 11 SIGKILLs, each a random delay after a moment it aims at: an Orbax
  # save in flight, an evaluation, training between saves, start-up, and
  # (last, so that the run is not over before the others) the final curves.
  rng = random.Random(17)
  kinds = ['save'] * 3 + ['eval'] * 3 + ['between'] * 2 + ['start']
  rng.shuffle(kinds)
  kinds += ['curves'] * 2
  run = tmp_path / 'killed'
  cmd = _cmd_features(run, fake_data_dir)
  landed = []
  for kind in kinds:
    attempt = _Attempt(cmd, run)
    attempt.kill_after(_trigger(attempt, kind, rng))
    landed.append(attempt.landed())
    assert attempt.proc.returncode in (0, -signal.SIGKILL), (
        '\n'.join(attempt.lines[-30:]))
  print('random kills landed:', landed)
  out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  _assert_same_run(reference, run)
  assert not [n for n in os.listdir(run / 'checkpoints') if not n.isdigit()]
  # TensorBoard shows each step once, with the uninterrupted run's values
  # (examples or images per second are measured anew).
  ref_tb, run_tb = scalars(reference / 'tensorboard'), scalars(
      run / 'tensorboard')
  assert sorted(ref_tb) == sorted(run_tb)
  for tag, series in ref_tb.items():
    assert [s for s, _ in run_tb[tag]] == [s for s, _ in series], tag
    if not tag.endswith('_per_sec'):
      assert run_tb[tag] == series, tag
  # The command of the finished run prints its result and exits 0.
  out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('the run ended at step 20 (epoch 2.50): test '
                               'loss ')
  # Most kills interrupted the run (one aimed at a moment that had passed
  # may find it over).
  assert sum(not l.startswith('none') for l in landed) >= 8, landed


@pytest.mark.full
def test_a_second_run_on_a_live_workdir_stops_at_once(fake_data_dir,
                                                      reference, tmp_path):
  run = tmp_path / 'live'
  cmd = _cmd_features(run, fake_data_dir)
  first = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 400
    while not (run / 'checkpoints' / '3').is_dir():
      assert first.poll() is None, first.communicate()[1][-3000:]
      assert time.time() < deadline, 'no checkpoint 3 after 400 s'
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # alive, holding the lock, for as
    try:                               # long as the second run needs
      second = subprocess.run(cmd, env=subprocess_env(), capture_output=True,
                              text=True, timeout=300)
    finally:
      first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert second.stderr.startswith(
        f'error: workdir {str(run)!r} is in use by another training run '
        f'(process {first.pid} on ')
    _, err = first.communicate(timeout=600)
  finally:
    first.kill()
  assert first.returncode == 0, err[-3000:]  # the first run is unharmed
  _assert_same_run(reference, run)


def _with_file_size_limit(cmd, limit: int):
  """`cmd` (a Python command) where writes past `limit` bytes fail with
  EFBIG, as writes to a disk that fills up fail with ENOSPC."""
  setup = ('import os, resource, signal, sys; '
           'signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
           f'resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); '
           'os.execv(sys.executable, [sys.executable] + sys.argv[1:])')
  return [sys.executable, '-c', setup, *cmd[1:]]


@pytest.mark.full
def test_a_failing_write_during_a_save_keeps_the_previous_checkpoint(
    fake_data_dir, reference, tmp_path):
  del reference  # its programs are in the shared compilation cache
  run = tmp_path / 'full'
  cmd = _cmd_features(run, fake_data_dir)
  code, _, _ = run_until(cmd, run, 3, signal.SIGKILL)
  assert code == -signal.SIGKILL
  # Checkpoint files are larger than 12 KB, the metrics and events written
  # before step 9 smaller. The compilation cache is read but not written:
  # an entry cut at the limit would stay in the shared cache.
  out = subprocess.run(
      _with_file_size_limit(cmd, 12_000), capture_output=True, text=True,
      env=subprocess_env(JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=str(2**62)),
      timeout=600)
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: cannot save the checkpoint of step 6 in ')
  assert 'File too large writing ' in last
  assert 'the checkpoint of step 3 is still the latest and restorable' in last
  assert 'Traceback' not in out.stderr  # Orbax's threads log one line each
  assert any('orbax-checkpoint-tmp' in n
             for n in os.listdir(run / 'checkpoints'))
  ckpt = checkpointing.Checkpointer(str(run), read_only=True,
                                    async_save=False)
  assert ckpt.all_steps() == [3]  # the temporary folder is not a checkpoint
  assert ckpt.restore_raw(3)[1]['step'] == 3  # its checksums verified


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
  from resnet_jax.train import run_setup
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
    state = final_state(tmp_path, step)
    assert all(np.all(np.isfinite(x)) for x in leaves(state['params']))


@pytest.mark.full
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


def _two_processes(workdir, data_dir, port, *extra):
  return [subprocess.Popen(
      _cmd(workdir, data_dir, *extra), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      env=subprocess_env(XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i),
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}'))
          for i in range(2)]


@pytest.mark.full
def test_two_processes_equal_one_process_and_survive_preemption(
    fake_data_dir, tmp_path):
  # Two processes of 4 simulated devices each, against one process of 8.
  one = tmp_path / 'one'
  out = subprocess.run(
      _cmd(one, fake_data_dir), capture_output=True, text=True, timeout=600,
      env=subprocess_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert out.returncode == 0, out.stderr[-3000:]
  # The scheduler's SIGTERM reaches only process 1: both must agree to stop
  # at the same step, save together and exit 0.
  two = tmp_path / 'two'
  procs = _two_processes(two, fake_data_dir, free_port())
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
  procs = _two_processes(two, fake_data_dir, free_port())
  results = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  # Only process 0 prints the epoch line and writes logs and plots.
  assert 'test acc' in results[0][0] and 'test acc' not in results[1][0]
  assert (two / 'curves.png').exists() and (two / 'metrics.jsonl').exists()
  a, b = final_state(one), final_state(two)
  for section in ('params', 'batch_stats', 'opt_state'):
    for x, y in zip(leaves(a[section]), leaves(b[section])):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                                 atol=1e-6, err_msg=section)
  assert [r['loss'] for r in metric_records(one) if 'loss' in r] == pytest.approx(
      [r['loss'] for r in metric_records(two) if 'loss' in r], rel=1e-5)
  # The checkpoint the two processes wrote restores in one process.
  from multidevice_checks import restore_and_compare  # pylint: disable=g-import-not-at-top
  assert restore_and_compare(str(two)) == {'devices': 1, 'equal': True,
                                           'step': 20}
