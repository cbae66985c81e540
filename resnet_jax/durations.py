"""A run's durations in steps, resolved once from its config (`resolve_steps`),
and the predicates that say which periodic actions follow a step.

Every epoch computation of the project lives here: the loop asks `Steps`
when to log, evaluate and checkpoint, the schedule takes its total and
warmup from it, the train step resets its running metric sums with it, and
the data continue from (epoch, offset) = divmod(step, per_epoch).
"""

import dataclasses
import math
from typing import Any, Callable

from resnet_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Steps:
  """Every duration of a run in steps, resolved once (`resolve_steps`).

  Training ends after `total` steps; an epoch is `per_epoch` steps (the last
  incomplete batch of each epoch is dropped). The predicates say which
  periodic actions happen after a step; they work on Python ints and on
  traced step counters alike (the train step resets its running metric sums
  with them).
  """
  total: int
  per_epoch: int
  warmup: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  def is_log(self, step):
    """A metrics record: every log_every steps, at epoch ends and at the end."""
    return ((step % self.log_every == 0) | (step % self.per_epoch == 0)
            | (step == self.total))

  def is_eval(self, step):
    return (step % self.eval_every == 0) | (step == self.total)

  def is_checkpoint(self, step):
    return (step % self.checkpoint_every == 0) | self.is_eval(step)

  def is_epoch_start(self, step):
    return step % self.per_epoch == 0

  def epoch(self, step: int) -> float:
    """Epochs completed after `step` (a fraction mid-epoch)."""
    return step / self.per_epoch


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches in an epoch (the incomplete last batch is dropped)."""
  if not 0 < batch_size <= num_examples:
    raise UserError(f'config field data.batch_size={batch_size} is invalid: '
                    f'must be in [1, {num_examples}] (the number of training '
                    'examples)')
  return num_examples // batch_size


def resolve_steps(config: Any, num_train_examples: int,
                  warn: Callable[[str], None] | None = None) -> Steps:
  """Steps from the run's step or epoch counts; a warmup longer than the run
  is shortened to the run (and `warn` is told)."""
  per_epoch = steps_per_epoch(num_train_examples, config.data.batch_size)
  r, o = config.run, config.optim
  total = (r.num_train_steps if r.num_train_steps is not None else
           max(1, math.ceil(r.num_epochs * per_epoch)))
  warmup = (o.warmup_steps if o.warmup_steps is not None else
            round(o.warmup_epochs * per_epoch))
  if warmup > total:
    if warn:
      warn(f'warmup of {warmup} steps is longer than the run ({total} steps); '
           f'shortened to {total}')
    warmup = total
  return Steps(total=total, per_epoch=per_epoch, warmup=warmup,
               log_every=r.log_every_steps,
               eval_every=r.eval_every_epochs * per_epoch,
               checkpoint_every=r.checkpoint_every_steps)
