"""run.profile_start_step traces exactly the chosen train steps, for
TensorBoard's profile plugin and for Perfetto."""

import glob
import gzip
import json
import os

from resnet_jax.train import train_loop
from helpers import tiny_config


def _trace(workdir):
  [path] = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile',
                                  '*', 'perfetto_trace.json.gz'))
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    return json.load(f)


def test_traces_the_chosen_steps(fake_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_config('default', fake_data_dir, **{
      'model.width': 4, 'run.num_train_steps': 6,
      'run.checkpoint_every_steps': 100, 'run.profile_start_step': 3,
      'run.profile_num_steps': 2})
  train_loop.train_and_evaluate(config, workdir)
  run_dirs = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile',
                                    '*'))
  assert len(run_dirs) == 1
  # TensorBoard's profile plugin reads the XSpace protobuf.
  assert glob.glob(os.path.join(run_dirs[0], '*.xplane.pb'))
  events = _trace(workdir)
  events = events['traceEvents'] if isinstance(events, dict) else events
  steps = sorted({int(e['args']['step_num']) for e in events
                  if e.get('name') == 'train' and 'step_num' in e.get('args',
                                                                       {})})
  assert steps == [3, 4]


def test_off_by_default(tmp_path):
  from resnet_jax import config as config_lib
  from resnet_jax.train import profiling
  assert config_lib.base_config().run.profile_start_step is None
  profiler = profiling.StepProfiler(str(tmp_path), None, 5)
  for step in range(1, 4):
    with profiler.step(step, None):
      pass
    profiler.step_done(step, None)
  assert not os.path.exists(tmp_path / 'profile')
