"""Faults around a run, in-process: the command of a finished run run again,
the workdir lock, damaged checkpoint files and TensorBoard after resumes.
Those that need a training subprocess (random kills, two runs on a workdir,
a failing write during a save) are in test_checkpoints.py, next to the
uninterrupted run they compare with."""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from resnet_jax.checkpoint import checkpointing
from resnet_jax.checkpoint import workdir as workdir_lib
from resnet_jax.train import (metric_writers, run_setup,
                              train_loop)
from resnet_jax.errors import UserError
from helpers import final_state, leaves, scalars, subprocess_env, tiny_config


@pytest.fixture(scope='module')
def finished(fake_data_dir, tmp_path_factory):
  """A finished run of 8 steps (one epoch) with checkpoints at 4 and 8."""
  workdir = tmp_path_factory.mktemp('finished')
  config = tiny_config('default', fake_data_dir, **{
      'model.width': 4, 'data.batch_size': 32, 'run.num_train_steps': 8,
      'run.checkpoint_every_steps': 4, 'run.log_every_steps': 2,
      'data.eval_batch_size': 40})
  result = train_loop.train_and_evaluate(config, str(workdir))
  return config, workdir, result


def _snapshot(workdir) -> dict[str, tuple[int, str]]:
  """Every file under `workdir` but the lock: mtime and content hash."""
  files = {}
  for f in sorted(pathlib.Path(workdir).rglob('*')):
    if f.is_file() and f.name != workdir_lib.LOCK_FILE:
      files[str(f.relative_to(workdir))] = (
          f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
  return files


def test_a_finished_run_prints_its_result_and_writes_nothing(
    finished, tmp_path, capsys):
  config, original, result = finished
  workdir = tmp_path / 'w'
  shutil.copytree(original, workdir)
  before = _snapshot(workdir)
  capsys.readouterr()
  again = train_loop.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert again == result
  assert out.startswith('the run ended at step 8 (epoch 1): test loss ')
  assert (f'test acc {result["test_accuracy"]:.4f} (top-5 '
          f'{result["test_top5_accuracy"]:.4f}) over 100 examples') in out
  assert _snapshot(workdir) == before  # no checkpoint, record, event, curve
  # A longer run continues to its new end.
  longer = config.copy_and_resolve_references()
  longer.run.num_train_steps = 10
  train_loop.train_and_evaluate(longer, str(workdir))
  ckpt = checkpointing.Checkpointer(str(workdir), read_only=True,
                                    async_save=False)
  assert ckpt.all_steps()[-1] == 10
  records = [(r['step'], 'epoch' in r)
             for r in metric_writers.read_records(workdir)]
  assert records == sorted(set(records)) and records[-1] == (10, True)


def test_the_workdir_lock_names_its_holder_and_dies_with_it(tmp_path):
  lock = workdir_lib.WorkdirLock(str(tmp_path))
  lock.acquire()
  # flock conflicts between open files, even within one process.
  with pytest.raises(UserError, match=rf'in use by another training run '
                     rf'\(process {os.getpid()} on '):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  lock.release()
  # A holder killed with SIGKILL leaves the file, not the lock.
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from resnet_jax.checkpoint '
       'import workdir; workdir.WorkdirLock(sys.argv[1]).acquire(); '
       'print("locked", flush=True); time.sleep(600)', str(tmp_path)],
      env=subprocess_env(), stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'locked'
  with pytest.raises(UserError, match=f'process {holder.pid} '):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  holder.kill()
  holder.wait()
  assert (tmp_path / workdir_lib.LOCK_FILE).exists()
  workdir_lib.WorkdirLock(str(tmp_path)).acquire()


def _array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest file of array data (OCDBT's `d/` folders) of a step."""
  return max((f for f in step_dir.rglob('*')
              if f.is_file() and f.parent.name == 'd'),
             key=lambda f: f.stat().st_size)


def _truncate(f):
  f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def _zero(f):
  f.write_bytes(b'\0' * f.stat().st_size)


def _flip_a_bit(f):
  """Reads back without an error (in a compressed chunk): garbage values."""
  data = bytearray(f.read_bytes())
  data[len(data) // 4] ^= 0x10
  f.write_bytes(bytes(data))


# When one read of a damaged checkpoint fails, Orbax leaves the coroutines
# of the others unawaited; Python reports them when they are collected.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_damaged_latest_checkpoint_is_named_and_skipped(finished, tmp_path,
                                                          caplog):
  config, original, result = finished
  run = run_setup.build(config)
  for damage in (_truncate, _zero, _flip_a_bit):
    workdir = tmp_path / damage.__name__
    shutil.copytree(original, workdir)
    damaged = _array_file(workdir / 'checkpoints' / '8')
    damage(damaged)
    content = damaged.read_bytes()
    caplog.clear()
    ckpt = checkpointing.Checkpointer(str(workdir), read_only=True,
                                      async_save=False)
    _, meta = ckpt.restore(run_setup.init_state(run), run.replicated)
    ckpt.close()
    assert meta['step'] == 4, damage.__name__
    warning = [r.getMessage() for r in caplog.records
               if 'is damaged' in r.getMessage()]
    assert len(warning) == 1, caplog.text
    assert warning[0].startswith(
        f'checkpoint of step 8 ({workdir / "checkpoints" / "8"}) is damaged')
    assert '/kernel ' in warning[0]  # the array that reads back wrong
    assert damaged.read_bytes() == content  # nothing deleted or repaired
  # Training resumes from step 4 (here after the flipped bit, which reads
  # back without an error), moves step 8 aside and ends as before.
  assert train_loop.train_and_evaluate(config, str(workdir)) == result
  assert (workdir / 'damaged_checkpoints' / '8' / damaged.relative_to(
      workdir / 'checkpoints' / '8')).read_bytes() == content
  a, b = final_state(original, 8), final_state(workdir, 8)
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tensorboard_after_resumes_shows_each_step_once(tmp_path):
  def run(first, last, rate, resume_from=None):
    time.sleep(0.05)  # files of successive runs get successive mtimes
    writer = metric_writers.MetricWriter(str(tmp_path))
    if resume_from is not None:
      writer.truncate_after(resume_from)
    for step in range(first, last + 1):
      writer.write({'step': step, 'loss': 1.0 / step, 'images_per_sec': rate})
    writer.close()

  run(1, 6, rate=10.0)
  run(4, 7, rate=20.0, resume_from=3)  # killed after 7, resumed from 5
  # A kill during the rewrite leaves an old file next to the new one.
  leftover = tmp_path / 'leftover'
  shutil.copytree(tmp_path / 'tensorboard', leftover)
  run(6, 9, rate=30.0, resume_from=5)
  for f in leftover.iterdir():  # with their mtimes: older than the rewrite
    shutil.copy2(f, tmp_path / 'tensorboard' / f'{f.name}.old')
  run(10, 10, rate=40.0, resume_from=9)
  series = scalars(tmp_path / 'tensorboard')
  assert [s for s, _ in series['loss']] == list(range(1, 11))
  assert [v for _, v in series['loss']] == pytest.approx(
      [1.0 / s for s in range(1, 11)])
  assert [v for _, v in series['images_per_sec']] == (
      [10.0] * 3 + [20.0] * 2 + [30.0] * 4 + [40.0])
  assert [r['step'] for r in metric_writers.read_records(tmp_path)] == list(
      range(1, 11))
