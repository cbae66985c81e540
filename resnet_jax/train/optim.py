"""Optax optimiser and learning-rate schedule from a run's `optim` section."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from resnet_jax.durations import Steps


def create_schedule(optim: Any, steps: Steps) -> optax.Schedule:
  """constant, piecewise (step decay) or cosine (to 0 at the end of the run),
  each after a linear warmup from 0 over `steps.warmup` steps."""
  lr = float(optim.learning_rate)
  warmup = steps.warmup
  if optim.schedule == 'cosine':
    if warmup >= steps.total:  # the whole run is warmup
      return optax.linear_schedule(0.0, lr, steps.total)
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=steps.total)
  if optim.schedule == 'piecewise':
    base = optax.piecewise_constant_schedule(
        lr, dict(zip((int(b) for b in optim.lr_boundaries),
                     (float(s) for s in optim.lr_scales))))
  else:
    base = optax.constant_schedule(lr)
  if not warmup:
    return base
  # Boundaries stay where the recipe put them (optax.join_schedules would
  # shift the second schedule by the warmup).
  return lambda step: jnp.minimum(1.0, step / warmup) * base(step)


def decay_mask(params: Any, decay_bn_and_bias: bool) -> Any:
  """True where weight decay applies: kernels only, unless asked otherwise.

  BN scales/offsets and biases are 1-D; conv and dense kernels are not.
  """
  return jax.tree.map(lambda p: decay_bn_and_bias or p.ndim > 1, params)


def create_optimizer(optim: Any, schedule: optax.Schedule,
                     params: Any) -> optax.GradientTransformation:
  """Clip (optional) -> decay -> SGD (momentum / Nesterov) or AdamW."""
  mask = decay_mask(params, optim.decay_bn_and_bias)
  parts = []
  if optim.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  if optim.optimizer == 'sgd':
    # Coupled decay (added to the gradient before momentum), as in PyTorch's
    # SGD and the papers' recipes.
    if optim.weight_decay > 0:
      parts.append(optax.add_decayed_weights(optim.weight_decay, mask))
    parts.append(optax.sgd(schedule, momentum=optim.momentum or None,
                           nesterov=bool(optim.nesterov and optim.momentum)))
  else:  # 'adamw' (config.validate admits no other)
    parts.append(optax.adamw(schedule, weight_decay=optim.weight_decay,
                             mask=mask))
  return optax.chain(*parts)
