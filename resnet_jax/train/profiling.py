"""A trace of chosen train steps (`run.profile_start_step`,
`run.profile_num_steps`) with jax.profiler, for TensorBoard and Perfetto.

The trace goes to WORKDIR/profile: `tensorboard --logdir WORKDIR` shows it in
its Profile tab (pip install tensorboard-plugin-profile), and the
`perfetto_trace.json.gz` beside it opens in https://ui.perfetto.dev. Each
traced step is a `StepTraceAnnotation` (the profile plugin's step view), and
the device work queued before the first traced step, and by the last one, is
waited for, so the trace holds exactly those steps. Only process 0 traces.
"""

import contextlib
import glob
import os

import jax
from absl import logging

PROFILE_DIR = 'profile'


class StepProfiler:
  """Traces steps `start` .. `start + num - 1` (steps count from 1)."""

  def __init__(self, workdir: str, start: int | None, num: int,
               enabled: bool = True):
    self.logdir = os.path.join(workdir, PROFILE_DIR)
    self.first = start if enabled else None
    self.last = (start + num - 1) if start is not None else None
    self.active = False

  def step(self, step: int, state):
    """Wraps the work of train step `step` (its batch and its call) given
    the `state` it starts from."""
    if self.first is not None and step == self.first:
      jax.block_until_ready(state)  # the steps before stay out of the trace
      self._start()
    if not self.active:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation('train', step_num=step)

  def step_done(self, step: int, state) -> None:
    """After train step `step` has been dispatched with its new `state`."""
    if self.active and step >= self.last:
      jax.block_until_ready(state)
      self.stop()

  def _start(self) -> None:
    jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)
    self.active = True
    logging.info('tracing steps %d-%d into %s', self.first, self.last,
                 self.logdir)

  def stop(self) -> None:
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active = False
    traces = sorted(glob.glob(os.path.join(self.logdir, 'plugins', 'profile',
                                           '*', '*')))
    logging.info('trace of steps %d-%d written: %s (tensorboard --logdir '
                 '%s, or the perfetto_trace.json.gz in ui.perfetto.dev)',
                 self.first, self.last, ', '.join(traces), self.logdir)
