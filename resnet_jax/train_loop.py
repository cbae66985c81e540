"""train_and_evaluate(config, workdir): the main job of resnet_jax.

Data flows one way: config -> run (data, model, steps) -> state -> metrics
and checkpoints. Step metrics stay on the device and are fetched every
`log_every_steps`, before each checkpoint and at the end of each epoch; a
non-finite loss or gradient found there stops the run before anything is
saved, so the last checkpoint stays good. Resuming restores the state and
the position in the data (the order is a pure function of seed and epoch)
and rewrites the metrics log from the checkpoint's step on, identically.
"""

import math
import signal
import time
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils
import numpy as np

from resnet_jax import checkpointing, metric_writers, run_setup
from resnet_jax.errors import UserError


class NonFiniteError(UserError):
  """The loss or gradient norm became NaN or infinite."""


class Preempted(Exception):
  """Raised after a clean save on SIGTERM/SIGINT; carries the exit code."""

  def __init__(self, step: int, signum: int):
    super().__init__(f'stopped by signal {signum} at step {step}')
    self.step = step
    self.exit_code = 0 if signum == signal.SIGTERM else 128 + signum

class _Sums:
  """Host-side running sums of step metrics, added in step order."""

  def __init__(self, values: dict[str, float] | None = None):
    self.values = dict(values or {'loss_sum': 0.0, 'correct': 0.0,
                                  'count': 0.0})

  def add(self, m: dict[str, Any]) -> None:
    for k in self.values:
      self.values[k] += float(m[k])

  def loss(self) -> float:
    return self.values['loss_sum'] / max(self.values['count'], 1.0)

  def accuracy(self) -> float:
    return self.values['correct'] / max(self.values['count'], 1.0)


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


def evaluate(run: run_setup.Run, eval_fn, state) -> dict[str, float]:
  """Loss and accuracy over every eval example exactly once."""
  sums = _Sums()
  metrics = [eval_fn(state, b)
             for b in run.data.eval_batches(run.config.eval_batch_size)]
  for m in jax.device_get(metrics):
    sums.add(m)
  return {'test_loss': sums.loss(), 'test_accuracy': sums.accuracy(),
          'test_count': int(sums.values['count'])}


def _fetch(pending: list[tuple[int, Any]], sums: list[_Sums]) -> None:
  """Moves per-step metrics to the host, checking each step is finite."""
  for step, m in zip([s for s, _ in pending],
                     jax.device_get([m for _, m in pending])):
    if not (math.isfinite(float(m['loss_sum'])) and
            math.isfinite(float(m['grad_norm']))):
      raise NonFiniteError(
          f'non-finite loss or gradient at step {step} (loss_sum '
          f'{float(m["loss_sum"])}, grad_norm {float(m["grad_norm"])}); '
          'nothing after the last checkpoint was saved: lower the learning '
          'rate or enable --config.grad_clip_norm')
    for s in sums:
      s.add(m)
  pending.clear()


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
  """Trains (or resumes) in `workdir`; returns the final test metrics."""
  run_setup.prepare_workdir(workdir)
  run = run_setup.build(config)
  lead = jax.process_index() == 0
  if lead:
    checkpointing.write_config(workdir, config.to_dict())
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  state = run_setup.init_state(run)
  window, epoch_sums = _Sums(), _Sums()
  if ckpt.all_steps():
    state, meta = ckpt.restore(state, run.replicated)
    window, epoch_sums = _Sums(meta['window']), _Sums(meta['epoch_sums'])
    logging.info('resumed from step %d in %s', meta['step'], ckpt.directory)
  elif config.init_from:
    state = run_setup.warm_start(run, state)
  train_fn, eval_fn = run_setup.compile_steps(run)
  writer = metric_writers.MetricWriter(workdir, enabled=lead)
  step = int(jax.device_get(state.step))
  writer.truncate_after(step)
  spe = run.steps_per_epoch
  progress = metric_writers.Progress(config.progress_bar)
  stop = _StopSignal()
  saved_step, final = -1, {}

  def save(metrics=None):
    nonlocal saved_step
    if saved_step != step:
      epoch, offset = divmod(step, spe)
      ckpt.save(state, {'epoch': epoch, 'offset': offset,
                        'window': window.values,
                        'epoch_sums': epoch_sums.values,
                        'config': config.to_dict()}, metrics)
      saved_step = step

  logging.info('%s: %d steps (%d per epoch) of batch %d on %d devices, '
               'image size %d', run_setup.model_label(config), run.total_steps,
               spe, config.batch_size, jax.device_count(), run.image_size)
  pending: list[tuple[int, Any]] = []
  t_window = t_epoch = time.perf_counter()
  window_start = step
  try:
    batches = run.data.train_batches(step, config.batch_size, config.seed)
    while step < run.total_steps:
      state, metrics = train_fn(state, next(batches))
      step += 1
      pending.append((step, metrics))
      end_of_epoch = step % spe == 0 or step == run.total_steps
      if step % config.log_every_steps == 0 or end_of_epoch:
        _fetch(pending, [window, epoch_sums])
        now = time.perf_counter()
        rate = (step - window_start) * config.batch_size / (now - t_window)
        writer.write({'step': step, 'loss': window.loss(),
                      'accuracy': window.accuracy(),
                      'learning_rate': float(run.schedule(step - 1)),
                      'images_per_sec': rate})
        progress.update(math.ceil(step / spe), (step - 1) % spe + 1, spe,
                        window.loss(), rate)
        window, t_window, window_start = _Sums(), now, step
      if end_of_epoch and (math.ceil(step / spe) % config.eval_every_epochs == 0
                           or step == run.total_steps):
        _fetch(pending, [window, epoch_sums])
        seconds = time.perf_counter() - t_epoch
        steps_done = (step - 1) % spe + 1
        final = evaluate(run, eval_fn, state)
        record = {'step': step, 'epoch': step / spe,
                  'train_loss': epoch_sums.loss(),
                  'train_accuracy': epoch_sums.accuracy(),
                  'examples_per_sec': steps_done * config.batch_size / seconds,
                  **final}
        progress.end_line()
        _epoch_line(record, lead, config.validation_examples > 0)
        writer.write(record)
        epoch_sums = _Sums()
        save({'test_accuracy': final['test_accuracy']})
        t_epoch = t_window = time.perf_counter()
      elif end_of_epoch:
        epoch_sums, t_epoch = _Sums(), time.perf_counter()
      if step % config.checkpoint_every_steps == 0:
        _fetch(pending, [window, epoch_sums])
        save()
      if stop.agreed(step, config.log_every_steps):
        _fetch(pending, [window, epoch_sums])
        save()
        ckpt.wait()
        raise Preempted(step, stop.signum)
    _fetch(pending, [window, epoch_sums])
    save()
  finally:
    stop.restore()
    ckpt.close()
    writer.close()
  if lead:
    path = metric_writers.plot_curves(
        workdir, 'val' if config.validation_examples > 0 else 'test')
    if path:
      logging.info('learning curves: %s', path)
  return final


def _epoch_line(record: dict[str, float], lead: bool,
                on_validation: bool) -> None:
  """The textbook's line, on stdout where the researcher is looking.

  With `validation_examples` > 0 the evaluation (still logged under the
  test_* keys) is on the held-out validation split, and the line says so."""
  if lead:
    split = 'val' if on_validation else 'test'
    epoch = record['epoch']
    # Whole epochs as the textbook prints them; a run cut mid-epoch by
    # num_train_steps ends at a fraction.
    epoch_text = f'{epoch:.0f}' if epoch == int(epoch) else f'{epoch:.2f}'
    print(f'epoch {epoch_text}: loss {record["train_loss"]:.3f}, '
          f'train acc {record["train_accuracy"]:.3f}, {split} acc '
          f'{record["test_accuracy"]:.3f}, '
          f'{record["examples_per_sec"]:.1f} examples/sec', flush=True)


def evaluate_checkpoint(config: Any, workdir: str) -> dict[str, float]:
  """Test loss and accuracy of the latest (or `config.eval_step`) checkpoint."""
  run = run_setup.build(config)
  ckpt = checkpointing.Checkpointer(workdir, read_only=True, async_save=False)
  state = run_setup.init_state(run)
  step = config.eval_step if config.eval_step >= 0 else None
  state, meta = ckpt.restore(state, run.replicated, step=step)
  _, eval_fn = run_setup.compile_steps(run)
  result = evaluate(run, eval_fn, state)
  result['step'] = int(meta['step'])
  if jax.process_index() == 0:
    print(f'step {result["step"]}: test loss {result["test_loss"]:.4f}, test '
          f'acc {result["test_accuracy"]:.4f} over {result["test_count"]} '
          'examples', flush=True)
  ckpt.close()
  return result
