"""A run from its config: validated fields, data on the devices, the model,
the durations in steps, the schedule, the initial (or warm-started) state and
the compiled steps.

Used by training, evaluation and the benchmark, so that all three run
exactly the same model, preprocessing and steps.
"""

import dataclasses
import os
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging

from resnet_jax import (checkpointing, config as config_lib, convert, datasets,
                        device_data, durations, models, optim, sharding,
                        train_step)
from resnet_jax.errors import UserError


@dataclasses.dataclass
class Run:
  """Everything derived from a config before the first step."""
  config: Any  # validated, model.num_classes resolved
  mesh: jax.sharding.Mesh
  data: device_data.Data
  model: models.ResNet
  image_size: int
  steps: durations.Steps
  schedule: optax.Schedule

  @property
  def replicated(self):
    return sharding.replicated(self.mesh)


def resolve(config: Any) -> Any:
  """A validated copy of `config` whose model section is complete (the
  dataset's number of classes filled in): the value config.json records."""
  config_lib.validate(config)
  resolved = config.copy_and_resolve_references()
  spec = datasets.get(resolved.data.dataset)
  num_classes = resolved.model.num_classes
  if num_classes is None:
    resolved.model.num_classes = spec.num_classes
  elif num_classes != spec.num_classes:
    raise UserError(f'config field model.num_classes={num_classes} is '
                    f'invalid: {spec.name} has {spec.num_classes} classes; '
                    'leave it unset')
  return resolved


def build(config: Any, load_data: Callable[[Any, jax.sharding.Mesh],
                                            device_data.Data] | None = None
          ) -> Run:
  """Checks the config, loads the data (`load_data`, default
  `device_data.load`; the benchmark passes synthetic data), builds the
  model, durations and schedule."""
  config = resolve(config)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.data.batch_size, 'data.batch_size',
                            config.optim.grad_accum_steps)
  sharding.check_batch_size(config.data.eval_batch_size,
                            'data.eval_batch_size')
  data = (load_data or device_data.load)(config, mesh)
  model = models.from_config(config.model)
  image_size = datasets.image_size(data.spec, config.data.image_size)
  models.check_image_size(model, image_size)
  steps = durations.resolve_steps(config, data.num_train, logging.warning)
  schedule = optim.create_schedule(config.optim, steps)
  return Run(config, mesh, data, model, image_size, steps, schedule)


def describe(run: Run) -> str:
  """One line naming the network, the data and the run's length."""
  m = run.config.model
  extras = ', '.join(f'{k}={m[k]}' for k in ('width', 'stage_sizes')
                     if m[k] is not None)
  return (f'{m.name}{f" ({extras})" if extras else ""} on '
          f'{run.data.spec.name} at {run.image_size}x{run.image_size}: '
          f'{run.steps.total} steps ({run.steps.per_epoch} per epoch) of '
          f'batch {run.config.data.batch_size} on {jax.device_count()} '
          f'devices, evaluating on {run.data.eval_splits[0]}')


def init_state(run: Run) -> train_step.TrainState:
  """Fresh parameters, optimizer state, step 0 and RNG, replicated."""
  shape = (1, run.image_size, run.image_size, run.data.spec.channels)

  def init(rng):
    variables = jax.eval_shape(lambda: run.model.init(
        rng, jnp.zeros(shape, run.model.dtype), train=False))
    tx = optim.create_optimizer(run.config.optim, run.schedule,
                                variables['params'])
    return train_step.create_train_state(
        run.model, tx, rng, shape, ema=run.config.optim.ema_decay > 0)

  rng = jax.random.key(run.config.run.seed)
  return jax.jit(init, out_shardings=run.replicated)(rng)


def warm_start(run: Run, state: train_step.TrainState) -> train_step.TrainState:
  """params and batch_stats from `run.init_from` (DIR or DIR:STEP); a head of
  another size is left freshly initialised, and an RGB stem is adapted to the
  data's channels. Optimizer state and step are the new run's."""
  init_from = run.config.run.init_from
  source, _, step = init_from.partition(':')
  if not os.path.isdir(os.path.join(source, checkpointing.CHECKPOINT_DIR)):
    raise UserError(f'init_from={init_from!r}: no checkpoints under '
                    f'{source!r}; give a workdir of an earlier run or a '
                    'directory written by python -m resnet_jax.convert')
  variables, _ = checkpointing.Checkpointer(source, read_only=True,
                                            async_save=False).restore_variables(
                                                int(step) if step else None)
  current = {'params': state.params, 'batch_stats': state.batch_stats}
  loaded = _keep_new_head_if_resized(variables, current)
  loaded = _adapt_input_channels(loaded, current)
  checkpointing.check_compatible(
      jax.tree.map(lambda x: tuple(x.shape), loaded),
      jax.tree.map(lambda x: tuple(x.shape), current))
  loaded = jax.device_put(loaded, run.replicated)
  logging.info('initialised params and batch_stats from %s', init_from)
  state = state.replace(params=loaded['params'],
                        batch_stats=loaded['batch_stats'])
  if state.ema is not None:  # the EMA starts here, as at a fresh init
    state = state.replace(ema=jax.jit(
        train_step.copy_variables, out_shardings=run.replicated)(state))
  return state


def _keep_new_head_if_resized(loaded: dict, current: dict) -> dict:
  fc_old = loaded['params'].get('fc')
  fc_new = current['params']['fc']
  if fc_old is not None and fc_old['kernel'].shape != fc_new['kernel'].shape:
    if fc_old['kernel'].shape[0] == fc_new['kernel'].shape[0]:
      logging.info('new head: %s classes instead of %s',
                   fc_new['kernel'].shape[1], fc_old['kernel'].shape[1])
      loaded = dict(loaded, params=dict(loaded['params'], fc=fc_new))
  return loaded


def _adapt_input_channels(loaded: dict, current: dict) -> dict:
  """RGB weights for grayscale data: the stem kernel is summed over its input
  channels, so a gray image gives what the RGB model gives on it replicated
  to RGB (other counts: convert.adapt_input_channels tiles it)."""
  try:
    old = loaded['params']['stem']['conv1']['kernel']
    new = current['params']['stem']['conv1']['kernel']
  except (KeyError, TypeError):
    return loaded
  if old.ndim != 4 or old.shape[2] == new.shape[2] or (
      old.shape[:2] + old.shape[3:] != new.shape[:2] + new.shape[3:]):
    return loaded  # Same channels, or another stem: check_compatible decides.
  logging.info('stem kernel adapted from %d to %d input channels',
               old.shape[2], new.shape[2])
  return convert.adapt_input_channels(loaded, new.shape[2])


def compile_steps(run: Run):
  """The jitted train and eval steps of the run."""
  prep = device_data.make_preprocess(run.config, run.data.spec, run.image_size,
                                     run.model.dtype)
  o = run.config.optim
  return train_step.jit_steps(
      run.replicated, sharding.batch_sharded(run.mesh), preprocess=prep.train,
      eval_preprocess=prep.eval, num_classes=run.config.model.num_classes,
      steps=run.steps, label_smoothing=o.label_smoothing,
      grad_accum_steps=o.grad_accum_steps, ema_decay=o.ema_decay,
      ema_warmup=o.ema_warmup)


def prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    # A uniquely named probe: every process of a multi-process run checks
    # the same workdir at the same moment (a shared name let one process
    # delete another's probe, fail, and leave the others at the shutdown
    # barrier).
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_test_'):
      pass
  except OSError as e:
    raise UserError(f'cannot write to workdir {workdir!r} ({e.strerror}); '
                    'choose a directory you can write to') from None


# What a resumed run may not change: the network's parameters and what it
# is fed (conv_impl and dtype only change how it computes).
_IDENTITY = ('model.name', 'model.num_classes', 'model.width',
             'model.stage_sizes', 'data.dataset', 'data.image_size')


def check_same_run(config: Any, workdir: str) -> None:
  """A workdir holds one run: resuming it with another network or dataset is
  refused, naming the first field that differs."""
  if not os.path.exists(os.path.join(workdir, config_lib.CONFIG_FILE)):
    return
  recorded = config_lib.read(workdir)
  for path in _IDENTITY:
    was, now = config_lib.get(recorded, path), config_lib.get(config, path)
    if was != now:
      raise UserError(
          f'{workdir!r} holds a run with {path}={was!r}, but this command '
          f'asks for {path}={now!r}; resume with the same config, or train '
          'in a new workdir')
  # The checkpoints hold an EMA model exactly when the run keeps one (its
  # decay may change; turning it on or off may not).
  was, now = recorded.optim.ema_decay, config.optim.ema_decay
  if bool(was) != bool(now):
    raise UserError(
        f'{workdir!r} holds a run with optim.ema_decay={was!r}, but this '
        f'command asks for optim.ema_decay={now!r}: its checkpoints '
        f'{"hold" if was else "have no"} EMA weights; resume with the EMA '
        f'{"on" if was else "off"}, or train in a new workdir')
