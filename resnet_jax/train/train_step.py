"""The train and eval steps: pure functions of (state, batch).

A batch is `{'image': uint8 NHWC, 'label': int32}` (plus `'mask'` for
evaluation, 1 for real examples and 0 for padding). Preprocessing (resize,
normalise, augment) runs inside the step, on the device. Metrics are sums
(loss_sum, correct, count, ...) so that steps and devices add up exactly and
a padded final eval batch counts each real example once.

The train step adds its metrics into running sums kept in the state, one
since the last metrics record ('window') and one since the epoch began
('epoch'), each reset by the step that follows a record or starts an epoch
(`durations.Steps`). So the loop only reads them, and a resumed run continues
its sums exactly from the checkpoint.

Two recipe features live in the step. Gradient accumulation
(`grad_accum_steps` k > 1) splits the global batch into k micro-batches,
each a slice of every device's shard, and sums their gradients with
`lax.scan`: one step is still one optimizer update of the whole batch, and
only one micro-batch's activations are alive at a time. BatchNorm normalises
each micro-batch with its own statistics, and its running averages are
updated once per micro-batch. The weight EMA (`ema_decay` > 0) keeps an
exponential moving average of the params and of the BatchNorm running
statistics (`TrainState.ema`, a variables dict ready for `apply`), updated
after each optimizer update.
"""

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from resnet_jax.durations import Steps

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Preprocess = Callable[[jax.Array, jax.Array | None], jax.Array]


# The metrics each train step adds into the state's running sums: the loss
# sum, correct predictions and examples, and the global L2 norms of the
# gradient (before clipping), of the parameters after the update and of the
# update. The loop reads them as means (train_loop.py).
COUNT_SUMS = ('correct', 'count')                      # int32
NORM_SUMS = ('grad_norm_sum', 'param_norm_sum', 'update_norm_sum')
SUM_KEYS = ('loss_sum',) + COUNT_SUMS + NORM_SUMS
# What each eval step returns: masked sums over the batch.
EVAL_SUM_KEYS = ('loss_sum', 'correct', 'correct5', 'count')


def zero_sums() -> dict[str, dict[str, jax.Array]]:
  """Fresh zeros for each sum (distinct buffers: the state is donated)."""
  return {name: {k: jnp.zeros((), jnp.int32 if k in COUNT_SUMS else
                              jnp.float32) for k in SUM_KEYS}
          for name in ('window', 'epoch')}


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Everything the steps compute besides (state, batch), built once from a
  run's config (`run_setup.step_options`).

  Attributes:
    preprocess: uint8 batch and key -> model input, for training (augments).
    eval_preprocess: the same for evaluation (key None, no augmentation).
    num_classes: logits size (one-hot targets).
    steps: the run's durations (when the metric sums restart).
    label_smoothing: of the cross-entropy.
    grad_accum_steps: micro-batches per update (1: none).
    ema_decay: of the weight EMA (0: none); `ema_warmup` ramps it up.
  """
  preprocess: Preprocess
  eval_preprocess: Preprocess
  num_classes: int
  steps: Steps
  label_smoothing: float = 0.0
  grad_accum_steps: int = 1
  ema_decay: float = 0.0
  ema_warmup: bool = False


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (Flax's), plus BN statistics, RNG,
  the running sums of the training metrics and, when the run keeps one, the
  EMA model (`{'params', 'batch_stats'}`; None when `ema_decay` is 0).

  `rng` is raw key data (uint32) so that checkpoints hold a plain array; the
  key of step t is fold_in(rng, t), so it never needs to be updated.
  """
  batch_stats: Any = None
  rng: jax.Array | None = None
  metric_sums: Any = None
  ema: Any = None

  def variables(self, weights: str = 'raw') -> dict[str, Any]:
    """The model's variables for `apply`: the trained ('raw') or the EMA."""
    if weights == 'ema':
      return self.ema
    return {'params': self.params, 'batch_stats': self.batch_stats}


def copy_variables(state: TrainState) -> dict[str, Any]:
  """The raw variables as a fresh EMA (copies: the state is donated, and
  one buffer may not be donated twice)."""
  return jax.tree.map(jnp.copy, state.variables('raw'))


def create_train_state(model: flax.linen.Module, tx: optax.GradientTransformation,
                       rng: jax.Array, input_shape: tuple[int, ...],
                       ema: bool = False) -> TrainState:
  """Initialises the variables for inputs of `input_shape` (NHWC, batch 1);
  `ema`: with an EMA model, starting at the initial variables."""
  init_rng, step_rng = jax.random.split(rng)
  # Parameters are drawn with the 'rbg' generator: XLA compiles a ResNet's
  # init with threefry several times slower on a CPU. The step key
  # (augmentation) stays threefry, whose values do not depend on how the
  # batch is sharded.
  init_key = jax.random.key(
      jax.random.randint(init_rng, (), 0, jnp.iinfo(jnp.int32).max),
      impl='rbg')
  variables = model.init(init_key, jnp.zeros(input_shape, model.dtype),
                         train=False)
  state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                            batch_stats=variables.get('batch_stats', {}), tx=tx,
                            rng=jax.random.key_data(step_rng),
                            metric_sums=zero_sums())
  return state.replace(ema=copy_variables(state)) if ema else state


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with optional label smoothing."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """The EMA decay for the update after `step` optimizer updates: `decay`,
  or with warmup min(decay, (1 + step) / (10 + step)) (TensorFlow's
  ExponentialMovingAverage with num_updates), so that the average soon
  forgets the random initial weights."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  t = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def _micro_batches(x: jax.Array, k: int, shards: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...], micro-batch j made of the j-th slice of each
  of the `shards` contiguous device shards, so the split moves no data
  between devices (the batch dimension stays sharded)."""
  b = x.shape[0]
  x = x.reshape((shards, k, b // (shards * k)) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape((k, b // k) + x.shape[3:])


def train_step(state: TrainState, batch: Batch, *, options: StepOptions,
               shards: int = 1) -> TrainState:
  """One optimizer update on the (global, possibly sharded) batch, from
  `options.grad_accum_steps` micro-batches (`shards`: the devices the batch
  is split over)."""
  o = options
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images = o.preprocess(batch['image'], key)
  labels = batch['label']

  def grads_of(batch_stats, images, labels):
    """Gradient of the mean loss, new BN statistics, loss sum, correct."""

    def loss_fn(params):
      logits, new_vars = state.apply_fn(
          {'params': params, 'batch_stats': batch_stats}, images,
          train=True, mutable=['batch_stats'])
      loss = cross_entropy(logits, labels, o.num_classes,
                           o.label_smoothing).mean()
      return loss, (logits, new_vars.get('batch_stats', batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels, dtype=jnp.int32)
    return grads, batch_stats, loss * labels.shape[0], correct

  k = o.grad_accum_steps
  if k == 1:
    grads, batch_stats, loss_sum, correct = grads_of(state.batch_stats, images,
                                                     labels)
  else:
    def micro_step(carry, micro):
      grad_sum, batch_stats, loss_sum, correct = carry
      grads, batch_stats, loss, right = grads_of(batch_stats, *micro)
      return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats,
              loss_sum + loss, correct + right), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), state.batch_stats,
             jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (grad_sum, batch_stats, loss_sum, correct), _ = jax.lax.scan(
        micro_step, zeros, (_micro_batches(images, k, shards),
                            _micro_batches(labels, k, shards)))
    # Equal micro-batches: the mean of their mean-loss gradients is the
    # gradient of the mean loss over the global batch.
    grads = jax.tree.map(lambda g: g / k, grad_sum)

  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  count = labels.shape[0]
  metrics = {
      'loss_sum': loss_sum,
      'correct': correct,
      'count': jnp.asarray(count, jnp.int32),
      'grad_norm_sum': optax.tree.norm(grads),
      'param_norm_sum': optax.tree.norm(params),
      'update_norm_sum': optax.tree.norm(updates),
  }
  # The sums restart after a metrics record and at the start of an epoch.
  restart = {'window': o.steps.is_log(state.step),
             'epoch': o.steps.is_epoch_start(state.step)}
  sums = {name: {k: jnp.where(restart[name], 0, v) + metrics[k]
                 for k, v in state.metric_sums[name].items()}
          for name in restart}
  ema = state.ema
  if o.ema_decay > 0:
    ema = optax.tree.update_moment(
        {'params': params, 'batch_stats': batch_stats}, ema,
        ema_decay_at(state.step, o.ema_decay, o.ema_warmup), 1)
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state, batch_stats=batch_stats,
                       metric_sums=sums, ema=ema)


def eval_step(state: TrainState, batch: Batch, weights: str = 'raw', *,
              options: StepOptions) -> Metrics:
  """Masked sums (`EVAL_SUM_KEYS`) of loss, top-1 and top-5 correct
  predictions of the trained ('raw') or the EMA model ('ema'), with its
  running BatchNorm averages."""
  images = options.eval_preprocess(batch['image'], None)
  logits = state.apply_fn(state.variables(weights), images, train=False)
  mask = batch['mask'].astype(jnp.float32)
  labels = batch['label']
  loss = cross_entropy(logits, labels, options.num_classes)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  # Top-5: fewer than 5 logits above the label's (ties count as in the top
  # 5). A comparison and a sum, not lax.top_k: no sort, no custom call.
  label_logit = jnp.take_along_axis(logits, labels[:, None], -1)
  above = jnp.sum(logits > label_logit, axis=-1)
  correct5 = (above < 5).astype(jnp.float32)
  return {'loss_sum': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
          'correct5': jnp.sum(correct5 * mask), 'count': jnp.sum(mask)}


def _with_mesh(mesh: jax.sharding.Mesh, step: Callable[..., Any],
               **fixed: Any) -> Callable[..., Any]:
  """`step` with `fixed` keyword arguments, traced under `mesh`."""
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return step(*args, **fixed)
  return traced


def jit_steps(replicated: jax.sharding.NamedSharding,
              batch_sharded: jax.sharding.NamedSharding,
              options: StepOptions):
  """The train step (state donated) and the eval step (a third argument
  'ema' evaluates the EMA model), compiled for the mesh: state and metrics
  replicated, batches split along the data axis. Both are traced with the
  mesh as the context mesh, so that the CPU convolutions run on each
  device's slice of the batch (`sharding.per_device`) instead of gathering it."""
  mesh = replicated.mesh
  train = jax.jit(
      _with_mesh(mesh, train_step, options=options,
                 shards=len(batch_sharded.device_set)),
      in_shardings=(replicated, batch_sharded), out_shardings=replicated,
      donate_argnums=0)
  evaluate = jax.jit(
      _with_mesh(mesh, eval_step, options=options),
      in_shardings=(replicated, batch_sharded), out_shardings=replicated,
      static_argnums=2)
  return train, evaluate
