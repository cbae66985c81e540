"""train_and_evaluate(config, workdir): the main job of resnet_jax, and
evaluate_checkpoint for a workdir's checkpoints.

Data flows one way: config -> run (data, model, steps) -> state -> metrics
and checkpoints. The loop is one block per periodic action, each asking the
run's `Steps` whether it is time. The train step keeps the running sums of
its metrics in the state; the loop reads them for each record (checking
that they are finite, so that nothing after a NaN is ever saved) and a
resumed run continues them, and the data order, exactly from the checkpoint.
"""

import math
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from resnet_jax.checkpoint import checkpointing
from resnet_jax.checkpoint import workdir as workdir_lib
from resnet_jax.errors import UserError
from resnet_jax.train import (metric_writers, profiling, run_setup,
                              train_step, wandb_sink)


class NonFiniteError(UserError):
  """The loss or gradient norm became NaN or infinite."""


class Preempted(Exception):
  """Raised after a clean save on SIGTERM/SIGINT; carries the exit code."""

  def __init__(self, step: int, signum: int):
    super().__init__(f'stopped by signal {signum} at step {step}')
    self.step = step
    self.exit_code = 0 if signum == signal.SIGTERM else 128 + signum


class _StopSignal:
  """SIGTERM/SIGINT: finish the step, save, then exit cleanly."""

  def __init__(self):
    self.signum = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. in tests)
        pass

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.signum = signum

  def agreed(self, step: int, every: int) -> bool:
    """Whether to stop after `step`, decided the same in every process.

    One process alone saves immediately. Several processes must stop at the
    same step (saving is collective), and a scheduler's signal reaches them
    at different moments, so they compare flags every `every` steps.
    """
    if jax.process_count() == 1:
      return self.signum is not None
    if step % every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    self.signum = int(np.max(flags)) or None
    return self.signum is not None

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def evaluate(run: run_setup.Run, eval_fn, state, split: str,
             weights: str = 'raw') -> dict[str, float]:
  """Loss, top-1 and top-5 accuracy over every example of the named split
  exactly once, under the split's name (`test_accuracy`,
  `val_top5_accuracy`, `val_loss`, ...), with the EMA model's prefixed
  `ema_` (`ema_val_accuracy`)."""
  sums = dict.fromkeys(train_step.EVAL_SUM_KEYS, 0.0)
  metrics = [eval_fn(state, b, weights)
             for b in run.data.eval_batches(split)]
  for m in jax.device_get(metrics):
    for k in sums:
      sums[k] += float(m[k])
  count = max(sums['count'], 1.0)
  name = metric_prefix(weights) + split
  return {f'{name}_loss': sums['loss_sum'] / count,
          f'{name}_accuracy': sums['correct'] / count,
          f'{name}_top5_accuracy': sums['correct5'] / count,
          f'{name}_count': int(sums['count'])}


def metric_prefix(weights: str) -> str:
  """'' for the trained weights, 'ema_' for the EMA model's metrics."""
  return 'ema_' if weights == 'ema' else ''


def _train_sums(state, name: str, first: int, last: int) -> dict[str, float]:
  """The state's running sums `name` ('window' or 'epoch') as means; raises
  when the steps first..last made the loss, gradient or weights non-finite."""
  s = {k: float(v) for k, v in jax.device_get(state.metric_sums[name]).items()}
  if not all(math.isfinite(s[k]) for k in ('loss_sum',) + train_step.NORM_SUMS):
    raise NonFiniteError(
        f'non-finite loss, gradient or weights in steps {first}-{last} '
        f'(loss sum {s["loss_sum"]}, gradient norm sum {s["grad_norm_sum"]}, '
        f'parameter norm sum {s["param_norm_sum"]}); nothing '
        'after the last checkpoint was saved: lower --config.optim.'
        'learning_rate or set --config.optim.grad_clip_norm')
  count = max(s['count'], 1.0)
  return {'loss': s['loss_sum'] / count, 'accuracy': s['correct'] / count,
          'count': s['count'], **{k: s[k] for k in train_step.NORM_SUMS}}


def _norms(sums: dict[str, float], batch_size: int) -> dict[str, float]:
  """Each norm's mean over the steps of the sums (`count` examples)."""
  steps = max(sums['count'], 1.0) / batch_size
  return {k[:-len('_sum')]: sums[k] / steps for k in train_step.NORM_SUMS}


class _Rate:
  """Examples per second since the last `restart`."""

  def __init__(self, step: int, batch_size: int):
    self.batch_size = batch_size
    self.restart(step)

  def restart(self, step: int) -> None:
    self.step, self.time = step, time.perf_counter()

  def __call__(self, step: int) -> float:
    return ((step - self.step) * self.batch_size /
            max(time.perf_counter() - self.time, 1e-9))


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
  """Trains (or resumes) in `workdir`; returns the last evaluation's metrics.

  The workdir is locked for the run (a second run on it stops at once). A
  run that has already ended prints its result and writes nothing.
  """
  workdir_lib.prepare(workdir)
  with workdir_lib.held(workdir):
    return _train(config, workdir)


def _train(config: Any, workdir: str) -> dict[str, float]:
  run = run_setup.build(config)
  workdir_lib.check_same_run(run.config, workdir)
  c, steps = run.config, run.steps
  lead = jax.process_index() == 0
  if lead and c.run.wandb_project:
    wandb_sink.check_installed()  # before any work: one line if missing
  split = run.data.eval_splits[0]  # evaluated each time; selects the best
  best = f'{metric_prefix(c.run.eval_weights)}{split}_accuracy'
  ckpt = checkpointing.Checkpointer(workdir, keep=c.run.keep_checkpoints,
                                    best_metric=best)
  state = run_setup.init_state(run)
  final: dict[str, float] = {}
  try:
    if ckpt.all_steps():
      state, meta = ckpt.restore(state, run.replicated)
      final = meta.get('metrics') or {}
      logging.info('resumed from step %d in %s', meta['step'], ckpt.directory)
    elif c.run.init_from:
      state = run_setup.warm_start(run, state)
  except BaseException:
    ckpt.close()
    raise
  step = int(jax.device_get(state.step))
  if step >= steps.total:
    ckpt.close()
    if lead:
      print(ended_line(step, steps.epoch(step), final, split), flush=True)
    return final
  if lead:
    workdir_lib.write_config(workdir, c)
  return _loop(run, workdir, ckpt, state, final)


def _loop(run: run_setup.Run, workdir: str,
          ckpt: checkpointing.Checkpointer, state, final: dict[str, float]
          ) -> dict[str, float]:
  """Steps from the state's step to the end, with every periodic action;
  the curves are drawn before the last checkpoint, which marks the end."""
  c, steps = run.config, run.steps
  lead = jax.process_index() == 0
  split = run.data.eval_splits[0]
  step = saved = int(jax.device_get(state.step))
  train_fn, eval_fn = run_setup.compile_steps(run)
  writer = metric_writers.MetricWriter(workdir, enabled=lead,
                                      wandb_project=c.run.wandb_project,
                                      config=c)
  writer.truncate_after(step)
  logging.info(run_setup.describe(run))
  progress = metric_writers.Progress(c.run.progress_bar)
  stop = _StopSignal()
  window_rate = _Rate(step, c.data.batch_size)
  epoch_rate = _Rate(step, c.data.batch_size)
  checked = step  # the train sums of steps up to here were finite
  profiler = profiling.StepProfiler(workdir, c.run.profile_start_step,
                                    c.run.profile_num_steps, enabled=lead)

  def save(metrics=None):
    nonlocal saved, checked
    _train_sums(state, 'window', checked + 1, step)  # never save a NaN
    checked = step
    if saved != step:
      ckpt.save(state, metrics)
      saved = step

  batches = None
  try:
    batches = run.data.train_batches(step)
    while step < steps.total:
      with profiler.step(step + 1, state):
        state = train_fn(state, next(batches))
      step += 1
      profiler.step_done(step, state)
      evaluated = None

      if steps.is_log(step):
        w = _train_sums(state, 'window', checked + 1, step)
        checked = step
        rate = window_rate(step)
        writer.write({'step': step, 'loss': w['loss'],
                      'accuracy': w['accuracy'],
                      **_norms(w, c.data.batch_size),
                      'learning_rate': float(run.schedule(step - 1)),
                      'images_per_sec': rate})
        progress.update(math.ceil(steps.epoch(step)),
                        (step - 1) % steps.per_epoch + 1, steps.per_epoch,
                        w['loss'], rate)
        window_rate.restart(step)

      if steps.is_eval(step):
        epoch = _train_sums(state, 'epoch', checked + 1, step)
        record = {'step': step, 'epoch': steps.epoch(step),
                  'train_loss': epoch['loss'],
                  'train_accuracy': epoch['accuracy'],
                  'examples_per_sec': epoch_rate(step)}
        evaluated = evaluate(run, eval_fn, state, split)
        if state.ema is not None:
          evaluated.update(evaluate(run, eval_fn, state, split, 'ema'))
        final = evaluated
        record.update(evaluated)
        progress.end_line()
        if lead:
          print(epoch_line(record, split), flush=True)
        writer.write(record)
        window_rate.restart(step)

      if step == steps.total and lead:
        path = metric_writers.plot_curves(workdir)
        if path:
          logging.info('learning curves: %s', path)

      if steps.is_checkpoint(step):
        save(evaluated)

      if steps.is_epoch_start(step):
        epoch_rate.restart(step)

      if stop.agreed(step, c.run.log_every_steps):
        save()
        ckpt.wait()
        raise Preempted(step, stop.signum)
    save()
  finally:
    if hasattr(batches, 'close'):
      batches.close()  # a streamed dataset's decoding workers
    profiler.stop()
    stop.restore()
    ckpt.close()
    writer.close()
  return final


def ended_line(step: int, epoch: float, metrics: dict[str, float],
               split: str) -> str:
  """What the command of a run that has ended prints: its last checkpoint's
  evaluation."""
  where = f'the run ended at step {step} (epoch {_epochs(epoch)})'
  hint = ('nothing trained or saved (a larger run.num_train_steps or '
          'run.num_epochs continues it)')
  if f'{split}_accuracy' not in metrics:
    return (f'{where}; its last checkpoint holds no evaluation '
            '(--config.run.mode=eval evaluates it); ' + hint)
  return f'{where}: {split_result(metrics, split)}; {hint}'


def split_result(metrics: dict[str, float], name: str) -> str:
  """'test loss ..., test acc ... over N examples' for the metrics of `name`
  (a split, or 'ema_' and a split: 'ema test acc')."""
  label = name.replace('_', ' ')
  top5 = (f' (top-5 {metrics[f"{name}_top5_accuracy"]:.4f})'
          if f'{name}_top5_accuracy' in metrics else '')
  return (f'{label} loss {metrics[f"{name}_loss"]:.4f}, {label} acc '
          f'{metrics[f"{name}_accuracy"]:.4f}{top5} over '
          f'{metrics[f"{name}_count"]} examples')


def epoch_line(record: dict[str, float], split: str) -> str:
  """The textbook's line, naming the split it evaluated ('test acc', 'val
  acc') and, with an EMA, the EMA model's ('ema val acc'); a run cut
  mid-epoch ends at a fractional epoch."""
  ema = (f'ema {split} acc {record[f"ema_{split}_accuracy"]:.3f}, '
         if f'ema_{split}_accuracy' in record else '')
  return (f'epoch {_epochs(record["epoch"])}: loss '
          f'{record["train_loss"]:.3f}, train acc '
          f'{record["train_accuracy"]:.3f}, {split} acc '
          f'{record[f"{split}_accuracy"]:.3f}, {ema}'
          f'{record["examples_per_sec"]:.1f} examples/sec')


def _epochs(epoch: float) -> str:
  return f'{epoch:.0f}' if epoch == int(epoch) else f'{epoch:.2f}'


def evaluate_checkpoint(config: Any, workdir: str) -> dict[str, float]:
  """Every evaluation split's loss and accuracy for the latest (or
  `run.eval_step`) checkpoint of `workdir`, with the weights
  `run.eval_weights` names (the EMA model's metrics are prefixed `ema_`)."""
  run = run_setup.build(config)
  workdir_lib.check_same_run(run.config, workdir)
  ckpt = checkpointing.Checkpointer(workdir, read_only=True, async_save=False)
  try:
    state, meta = ckpt.restore(run_setup.init_state(run), run.replicated,
                               step=run.config.run.eval_step)
  finally:
    ckpt.close()
  _, eval_fn = run_setup.compile_steps(run)
  weights = run.config.run.eval_weights
  result = {'step': int(meta['step'])}
  for split in run.data.eval_splits:
    metrics = evaluate(run, eval_fn, state, split, weights)
    result.update(metrics)
    name = metric_prefix(weights) + split
    if jax.process_index() == 0:
      print(f'step {result["step"]}: {split_result(metrics, name)}',
            flush=True)
  return result
