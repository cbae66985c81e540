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
"""

import functools
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


SUM_KEYS = ('loss_sum', 'correct', 'count', 'grad_norm_sum')


def zero_sums() -> dict[str, dict[str, jax.Array]]:
  """Fresh zeros for each sum (distinct buffers: the state is donated)."""
  return {name: {k: jnp.zeros((), jnp.int32 if k in ('correct', 'count') else
                              jnp.float32) for k in SUM_KEYS}
          for name in ('window', 'epoch')}


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (Flax's), plus BN statistics, RNG and
  the running sums of the training metrics.

  `rng` is raw key data (uint32) so that checkpoints hold a plain array; the
  key of step t is fold_in(rng, t), so it never needs to be updated.
  """
  batch_stats: Any = None
  rng: jax.Array | None = None
  metric_sums: Any = None


def create_train_state(model: flax.linen.Module, tx: optax.GradientTransformation,
                       rng: jax.Array, input_shape: tuple[int, ...]) -> TrainState:
  """Initialises the variables for inputs of `input_shape` (NHWC, batch 1)."""
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
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx,
                           rng=jax.random.key_data(step_rng),
                           metric_sums=zero_sums())


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with optional label smoothing."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch: Batch, *, preprocess: Preprocess,
               num_classes: int, steps: Steps, label_smoothing: float = 0.0
               ) -> TrainState:
  """One SGD step on the (global, possibly sharded) batch."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images = preprocess(batch['image'], key)
  labels = batch['label']

  def loss_fn(params):
    logits, new_vars = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, mutable=['batch_stats'])
    loss = cross_entropy(logits, labels, num_classes, label_smoothing).mean()
    return loss, (logits, new_vars['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  count = labels.shape[0]
  metrics = {
      'loss_sum': loss * count,
      'correct': jnp.sum(jnp.argmax(logits, -1) == labels, dtype=jnp.int32),
      'count': jnp.asarray(count, jnp.int32),
      'grad_norm_sum': optax.tree.norm(grads),
  }
  # The sums restart after a metrics record and at the start of an epoch.
  restart = {'window': steps.is_log(state.step),
             'epoch': steps.is_epoch_start(state.step)}
  sums = {name: {k: jnp.where(restart[name], 0, v) + metrics[k]
                 for k, v in state.metric_sums[name].items()}
          for name in restart}
  return state.apply_gradients(grads=grads, batch_stats=batch_stats,
                               metric_sums=sums)


def eval_step(state: TrainState, batch: Batch, *, preprocess: Preprocess,
              num_classes: int) -> Metrics:
  """Masked sums of loss, top-1 and top-5 correct predictions, with the
  running BatchNorm averages."""
  images = preprocess(batch['image'], None)
  logits = state.apply_fn({'params': state.params,
                           'batch_stats': state.batch_stats}, images,
                          train=False)
  mask = batch['mask'].astype(jnp.float32)
  labels = batch['label']
  loss = cross_entropy(logits, labels, num_classes)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  # Top-5: fewer than 5 logits above the label's (ties count as in the top
  # 5). A comparison and a sum, not lax.top_k: no sort, no custom call.
  label_logit = jnp.take_along_axis(logits, labels[:, None], -1)
  above = jnp.sum(logits > label_logit, axis=-1)
  correct5 = (above < 5).astype(jnp.float32)
  return {'loss_sum': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
          'correct5': jnp.sum(correct5 * mask), 'count': jnp.sum(mask)}


def jit_steps(replicated: jax.sharding.Sharding,
              batch_sharded: jax.sharding.Sharding, *, preprocess: Preprocess,
              eval_preprocess: Preprocess, num_classes: int, steps: Steps,
              label_smoothing: float = 0.0):
  """The train step (state donated) and the eval step, compiled for the mesh:
  state and metrics replicated, batches split along the data axis."""
  train = jax.jit(
      functools.partial(train_step, preprocess=preprocess,
                        num_classes=num_classes, steps=steps,
                        label_smoothing=label_smoothing),
      in_shardings=(replicated, batch_sharded), out_shardings=replicated,
      donate_argnums=0)
  evaluate = jax.jit(
      functools.partial(eval_step, preprocess=eval_preprocess,
                        num_classes=num_classes),
      in_shardings=(replicated, batch_sharded), out_shardings=replicated)
  return train, evaluate
