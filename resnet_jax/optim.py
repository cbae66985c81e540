"""Optax optimiser and learning-rate schedule from a run's config."""

from typing import Any

import jax
import optax

from resnet_jax.errors import UserError

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('constant', 'piecewise', 'cosine')


def warmup_steps(config: Any, steps_per_epoch: int) -> int:
  if config.warmup_steps > 0:
    return int(config.warmup_steps)
  return int(round(config.warmup_epochs * steps_per_epoch))


def create_schedule(config: Any, total_steps: int,
                    steps_per_epoch: int) -> optax.Schedule:
  """constant, piecewise (step decay) or cosine, with optional linear warmup."""
  lr = float(config.learning_rate)
  warmup = warmup_steps(config, steps_per_epoch)
  if config.schedule == 'piecewise':
    if len(config.lr_boundaries) != len(config.lr_scales):
      raise UserError('lr_boundaries and lr_scales must have the same length '
                      f'(got {len(config.lr_boundaries)} and '
                      f'{len(config.lr_scales)})')
    return optax.piecewise_constant_schedule(
        lr, dict(zip((int(b) for b in config.lr_boundaries),
                     (float(s) for s in config.lr_scales))))
  if config.schedule == 'cosine':
    if warmup >= total_steps:
      raise UserError(f'warmup ({warmup} steps) must be shorter than the run '
                      f'({total_steps} steps); lower --config.warmup_epochs')
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=total_steps)
  if config.schedule == 'constant':
    if warmup:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
          [warmup])
    return optax.constant_schedule(lr)
  raise UserError(f'unknown schedule {config.schedule!r}; choose one of: '
                  f'{", ".join(SCHEDULES)}')


def decay_mask(params: Any, decay_bn_and_bias: bool) -> Any:
  """True where weight decay applies: kernels only, unless asked otherwise.

  BN scales/offsets and biases are 1-D; conv and dense kernels are not.
  """
  return jax.tree.map(lambda p: decay_bn_and_bias or p.ndim > 1, params)


def create_optimizer(config: Any, schedule: optax.Schedule,
                     params: Any) -> optax.GradientTransformation:
  """Clip (optional) -> decay -> SGD (momentum / Nesterov) or AdamW."""
  mask = decay_mask(params, config.decay_bn_and_bias)
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == 'sgd':
    # Coupled decay (added to the gradient before momentum), as in PyTorch's
    # SGD and the papers' recipes.
    if config.weight_decay > 0:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                           nesterov=bool(config.nesterov and config.momentum)))
  elif config.optimizer == 'adamw':
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay,
                             mask=mask))
  else:
    raise UserError(f'unknown optimizer {config.optimizer!r}; choose one of: '
                    f'{", ".join(OPTIMIZERS)}')
  return optax.chain(*parts)
