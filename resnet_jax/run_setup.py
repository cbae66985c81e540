"""A run from its config: checked names, data on the devices, the model, the
schedule, the initial (or warm-started) state and the compiled steps.

Used by the training loop, evaluation and the benchmark, so that all three
run exactly the same model, preprocessing and steps.
"""

import dataclasses
import math
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from resnet_jax import (checkpointing, convert, device_data, input_pipeline,
                        models, optim, sharding, train_step)
from resnet_jax.blocks import ImageNetStem
from resnet_jax.errors import UserError

MODES = ('train', 'eval')


@dataclasses.dataclass
class Run:
  """Everything derived from a config before the first step."""
  config: Any
  mesh: jax.sharding.Mesh
  data: device_data.InMemoryData
  model: models.ResNet
  image_size: int
  steps_per_epoch: int
  total_steps: int
  schedule: Any

  @property
  def replicated(self):
    return sharding.replicated(self.mesh)


def build(config: Any) -> Run:
  """Checks the config, loads the data, builds the model and optimiser."""
  if config.mode not in MODES:
    raise UserError(f'unknown mode {config.mode!r}; choose one of: '
                    f'{", ".join(MODES)}')
  models.model_defaults(config.model)  # an unknown name: the registry's error
  if config.optimizer not in optim.OPTIMIZERS:
    raise UserError(f'unknown optimizer {config.optimizer!r}; choose one of: '
                    f'{", ".join(optim.OPTIMIZERS)}')
  if config.schedule not in optim.SCHEDULES:
    raise UserError(f'unknown schedule {config.schedule!r}; choose one of: '
                    f'{", ".join(optim.SCHEDULES)}')
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.batch_size)
  sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  data = device_data.load(config, mesh, config.image_size)
  model = model_from_config(config, data.info.num_classes)
  image_size = config.image_size or data.info.image_shape[0]
  check_image_size(model, image_size)
  steps_per_epoch = input_pipeline.steps_per_epoch(data.info.num_train,
                                                   config.batch_size)
  total_steps = (config.num_train_steps if config.num_train_steps > 0 else
                 int(math.ceil(config.num_epochs * steps_per_epoch)))
  schedule = optim.create_schedule(config, total_steps, steps_per_epoch)
  return Run(config, mesh, data, model, image_size, steps_per_epoch,
             total_steps, schedule)


def model_label(config: Any) -> str:
  """The model's name with the config's structural overrides, for log lines
  (the default config is cifar_resnet20 with one block per stage)."""
  extras = [f'{key}={config.get(key)}' for key in ('width', 'stage_sizes')
            if config.get(key)]
  return config.model + (f' ({", ".join(extras)})' if extras else '')


def model_from_config(config: Any, num_classes: int) -> models.ResNet:
  """The model a config names, with its options (width, stage sizes, ...)."""
  overrides = {}
  if config.get('stage_sizes'):
    overrides['stage_sizes'] = tuple(config.stage_sizes)
  return models.create_model(
      config.model, num_classes=num_classes, conv_impl=config.conv_impl,
      width=config.width or None, zero_init_residual=config.zero_init_residual,
      dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
      **overrides)


def check_image_size(model: models.ResNet, image_size: int) -> None:
  """Each stride halves the map (rounding up, as the padding does), so any
  size gives at least 1x1 at the end; a size is too small when the map is
  already 1x1 before the last downsampling, where the remaining stages could
  only see single pixels. The textbook ResNet-18 at 28x28 (maps 14, 7, 4, 2,
  1) is fine; at 16 it is not."""
  stem = 4 if model.stem_cls is ImageNetStem else 1
  factor = stem * 2 ** (len(model.stage_sizes) - 1)
  smallest = factor // 2 + 1
  if image_size < smallest:
    raise UserError(f'image_size={image_size} is too small for this model, '
                    f'which downsamples by {factor}: its last stages would '
                    'see only 1x1 maps; use --config.image_size of at least '
                    f'{smallest}')


def init_state(run: Run) -> train_step.TrainState:
  """Fresh parameters, optimizer state, step 0 and RNG, replicated."""
  c = run.data.info.image_shape[-1]
  shape = (1, run.image_size, run.image_size, c)

  def init(rng):
    variables = jax.eval_shape(lambda: run.model.init(
        rng, jnp.zeros(shape, run.model.dtype), train=False))
    tx = optim.create_optimizer(run.config, run.schedule, variables['params'])
    return train_step.create_train_state(run.model, tx, rng, shape)

  rng = jax.random.key(run.config.seed)
  return jax.jit(init, out_shardings=run.replicated)(rng)


def warm_start(run: Run, state: train_step.TrainState) -> train_step.TrainState:
  """params and batch_stats from `init_from` (DIR or DIR:STEP); a head of
  another size is left freshly initialised, and an RGB stem is adapted to the
  data's channels. Optimizer state and step are the new run's."""
  source, _, step = run.config.init_from.partition(':')
  if not os.path.isdir(os.path.join(source, checkpointing.CHECKPOINT_DIR)):
    raise UserError(f'init_from={run.config.init_from!r}: no checkpoints under '
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
  logging.info('initialised params and batch_stats from %s', run.config.init_from)
  return state.replace(params=loaded['params'],
                       batch_stats=loaded['batch_stats'])


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
  kwargs = dict(num_classes=run.data.info.num_classes)
  dtype = run.model.dtype
  return train_step.jit_steps(
      run.replicated, sharding.batch_sharded(run.mesh),
      preprocess=device_data.make_preprocess(run.config, run.data.info,
                                             run.image_size, dtype, True),
      eval_preprocess=device_data.make_preprocess(run.config, run.data.info,
                                                  run.image_size, dtype, False),
      label_smoothing=run.config.label_smoothing, **kwargs)


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
