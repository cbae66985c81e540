"""A run from its config: validated fields, data on the devices, the model,
the durations in steps, the schedule, the initial (or warm-started) state and
the compiled steps.

Used by training, evaluation and the benchmark, so that all three run
exactly the same model, preprocessing and steps.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging

from resnet_jax import config as config_lib, durations, models, sharding
from resnet_jax.checkpoint import init_from
from resnet_jax.data import datasets, device_data, preprocess
from resnet_jax.errors import UserError
from resnet_jax.train import optim, train_step


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
  """The state with params and batch_stats from `run.init_from` (DIR or
  DIR:STEP, fitted to this network: `checkpoint/init_from.py`). Optimizer
  state and step are the new run's; an EMA starts at the loaded weights."""
  loaded = init_from.load(run.config.run.init_from, state.variables('raw'))
  loaded = jax.device_put(loaded, run.replicated)
  state = state.replace(params=loaded['params'],
                        batch_stats=loaded['batch_stats'])
  if state.ema is not None:  # the EMA starts here, as at a fresh init
    state = state.replace(ema=jax.jit(
        train_step.copy_variables, out_shardings=run.replicated)(state))
  return state


def step_options(run: Run) -> train_step.StepOptions:
  """The steps' options, from the run's config, data and model."""
  prep = preprocess.make_preprocess(run.config.data, run.data.spec,
                                    run.image_size, run.model.dtype)
  o = run.config.optim
  return train_step.StepOptions(
      preprocess=prep.train, eval_preprocess=prep.eval,
      num_classes=run.config.model.num_classes, steps=run.steps,
      label_smoothing=o.label_smoothing, grad_accum_steps=o.grad_accum_steps,
      ema_decay=o.ema_decay, ema_warmup=o.ema_warmup)


def compile_steps(run: Run):
  """The jitted train and eval steps of the run."""
  return train_step.jit_steps(run.replicated, sharding.batch_sharded(run.mesh),
                              step_options(run))
