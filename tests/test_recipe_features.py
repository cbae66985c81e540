"""Recipe features: the weight EMA, gradient accumulation, the norms in the
metrics and the optional Weights & Biases sink.

The EMA and accumulation are checked on a tiny Dense model (with and
without BatchNorm) stepped directly; the rest on one tiny in-process run
with every feature on. Exact resume with both features on is
test_checkpoints' kill-and-resume test.
"""

import functools
import json
import math
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.checkpoint import checkpointing
from resnet_jax import config as config_lib, durations, predictor, sharding
from resnet_jax.train import train_loop, train_step, wandb_sink
from resnet_jax.errors import UserError
from helpers import run_check, tiny_batches, tiny_config, tiny_state

STEPS = durations.Steps(total=100, per_epoch=10, warmup=0, log_every=10,
                        eval_every=10, checkpoint_every=10)


def step_fn(**kwargs):
  identity = lambda images, key: images
  return jax.jit(functools.partial(
      train_step.train_step, options=train_step.StepOptions(
          preprocess=identity, eval_preprocess=identity, num_classes=10,
          steps=STEPS, **kwargs)))


def assert_trees_close(a, b, **tol):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


# ------------------------------------------------------------------- EMA


def test_ema_decay_warmup():
  at = lambda t, w: float(train_step.ema_decay_at(jnp.asarray(t), 0.999, w))
  assert at(0, False) == pytest.approx(0.999)
  assert at(0, True) == pytest.approx(0.1)      # (1 + 0) / (10 + 0)
  assert at(90, True) == pytest.approx(0.91)    # (1 + 90) / (10 + 90)
  assert at(10**6, True) == pytest.approx(0.999)


@pytest.mark.parametrize('warmup', [False, True])
def test_ema_of_params_and_batch_stats_after_each_update(warmup):
  state = tiny_state(bn=True, ema=True)
  # It starts at the initial variables, in buffers of its own (donation).
  assert_trees_close(state.ema, state.variables('raw'), rtol=0, atol=0)
  assert all(a is not b for a, b in zip(jax.tree.leaves(state.ema),
                                        jax.tree.leaves(state.params)))
  step = step_fn(ema_decay=0.8, ema_warmup=warmup)
  plain = step_fn()
  expected, raw = state.ema, state.replace(ema=None)
  for t, batch in enumerate(tiny_batches(3)):
    state = step(state, batch)
    d = min(0.8, (1 + t) / (10 + t)) if warmup else 0.8
    expected = jax.tree.map(lambda e, v, d=d: d * e + (1 - d) * v, expected,
                            state.variables('raw'))
    assert_trees_close(state.ema, expected, rtol=1e-6, atol=1e-7)
    # The EMA never feeds back: the trained weights are a run without it.
    raw = plain(raw, batch)
    assert_trees_close(state.variables('raw'), raw.variables('raw'),
                       rtol=1e-6, atol=1e-7)
  assert not np.allclose(state.ema['batch_stats']['BatchNorm_0']['mean'],
                         state.batch_stats['BatchNorm_0']['mean'])


# --------------------------------------------------- gradient accumulation


def test_micro_batches_are_slices_of_each_devices_shard():
  # 2 shards of 4 (rows 0-3, 4-7), 2 micro-batches: each takes half of both.
  micro = train_step._micro_batches(jnp.arange(8), 2, 2)  # pylint: disable=protected-access
  np.testing.assert_array_equal(micro, [[0, 1, 4, 5], [2, 3, 6, 7]])
  np.testing.assert_array_equal(
      train_step._micro_batches(jnp.arange(8), 4, 1),  # pylint: disable=protected-access
      [[0, 1], [2, 3], [4, 5], [6, 7]])


def test_accumulated_micro_batches_make_the_big_batch_update():
  # Without BatchNorm, 4 micro-batches of 4 are one batch of 16: the same
  # gradient (to float rounding), so the same SGD-with-momentum trajectory.
  one, four = tiny_state(bn=False), tiny_state(bn=False)
  big, accumulated = step_fn(), step_fn(grad_accum_steps=4)
  for batch in tiny_batches(3):
    one, four = big(one, batch), accumulated(four, batch)
  assert int(four.step) == 3  # one update per step, not per micro-batch
  assert_trees_close(one.params, four.params, rtol=1e-5, atol=1e-6)
  assert_trees_close(one.opt_state, four.opt_state, rtol=1e-5, atol=1e-6)
  w1, w4 = one.metric_sums['window'], four.metric_sums['window']
  assert int(w1['correct']) == int(w4['correct'])
  assert int(w1['count']) == int(w4['count']) == 48
  for k in ('loss_sum', 'grad_norm_sum', 'param_norm_sum', 'update_norm_sum'):
    np.testing.assert_allclose(float(w1[k]), float(w4[k]), rtol=1e-5)


def test_accumulation_with_batchnorm_updates_statistics_per_micro_batch():
  # The documented difference: with BatchNorm each micro-batch is
  # normalised by its own statistics, and the running averages move once
  # per micro-batch (here momentum 0.9, twice per step).
  one, two = tiny_state(bn=True), tiny_state(bn=True)
  batch = tiny_batches(1)[0]
  one, two = step_fn()(one, batch), step_fn(grad_accum_steps=2)(two, batch)
  var = lambda s: s.batch_stats['BatchNorm_0']['var']
  assert not np.allclose(var(one), var(two))
  # Var starts at 1: after two updates 0.81 of it is left, after one 0.9.
  h = np.asarray(nn.Dense(8).apply(
      {'params': tiny_state(bn=True).params['Dense_0']}, batch['image']))
  v0, v1 = h[:8].var(0, ddof=0), h[8:].var(0, ddof=0)
  np.testing.assert_allclose(var(two), 0.81 + 0.09 * v0 + 0.1 * v1,
                             rtol=1e-4)


@pytest.mark.full
def test_accumulation_on_eight_devices_equals_one_big_batch():
  r = run_check('accumulated_step')
  assert r['devices'] == 8
  assert r['params_max_rel'] < 1e-5, r


def test_checkpoint_of_an_older_version_is_named_as_such():
  # Written before the norms were added: its running sums lack them.
  old = {'metric_sums': {'window': dict.fromkeys(
      ('loss_sum', 'correct', 'count', 'grad_norm_sum'), ())}}
  new = {'metric_sums': train_step.zero_sums()}
  with pytest.raises(UserError, match='another version of resnet_jax'):
    checkpointing.check_same_sums(old, new, 'W')
  checkpointing.check_same_sums(new, new, 'W')


# -------------------------------------------------------- config checks


@pytest.mark.parametrize('overrides,words', [
    ({'run.eval_weights': 'ema'}, 'needs an EMA'),
    ({'optim.ema_decay': 1.0}, r'in \[0, 1\)'),
    ({'optim.grad_accum_steps': 0}, '> 0'),
    ({'run.eval_weights': 'best'}, "one of 'raw', 'ema'"),
])
def test_feature_fields_are_validated(overrides, words):
  config = config_lib.base_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(UserError, match=words):
    config_lib.validate(config)


def test_batch_must_split_into_micro_batches_on_every_device():
  # Checked where the devices are known, before any data is read.
  with pytest.raises(UserError, match='data.batch_size=60 does not divide by '
                     '8 micro-batches x 1 devices; use a multiple of 8'):
    sharding.check_batch_size(60, 'data.batch_size', 8)
  sharding.check_batch_size(64, 'data.batch_size', 8)


# ------------------------------- a run with every feature on, W&B faked


class FakeWandb(types.ModuleType):
  """The wandb calls the sink makes, recorded."""

  def __init__(self):
    super().__init__('wandb')
    self.calls = []

  def init(self, **kwargs):
    self.calls.append(('init', kwargs))
    calls = self.calls

    class Run:

      def define_metric(self, *args, **kwargs):
        calls.append(('define_metric', args, kwargs))

      def log(self, data):
        calls.append(('log', data))

      def finish(self):
        calls.append(('finish',))

    return Run()


@pytest.fixture(scope='module')
def featured(fake_data_dir, tmp_path_factory):
  """8 steps (one epoch) with EMA (warmed up), 2 micro-batches and W&B."""
  workdir = tmp_path_factory.mktemp('featured')
  config = tiny_config('default', fake_data_dir, **{
      'model.width': 4, 'data.batch_size': 32, 'run.num_train_steps': 8,
      'run.log_every_steps': 4, 'run.checkpoint_every_steps': 4,
      'data.eval_batch_size': 40, 'optim.ema_decay': 0.9,
      'optim.ema_warmup': True, 'optim.grad_accum_steps': 2,
      'run.wandb_project': 'resnet-jax-tests'})
  fake = FakeWandb()
  saved = sys.modules.get('wandb')
  sys.modules['wandb'] = fake
  try:
    result = train_loop.train_and_evaluate(config, str(workdir))
  finally:
    if saved is None:
      del sys.modules['wandb']
    else:
      sys.modules['wandb'] = saved
  return config, workdir, result, fake.calls


def _jsonl(workdir):
  return [json.loads(l) for l in
          (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_norms_are_logged_and_finite(featured):
  _, workdir, _, _ = featured
  logs = [r for r in _jsonl(workdir) if 'loss' in r]
  assert [r['step'] for r in logs] == [4, 8]
  for r in logs:
    for key in ('grad_norm', 'param_norm', 'update_norm'):
      assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert r['update_norm'] < r['param_norm']
  # TensorBoard gets the same scalars.
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in (workdir / 'tensorboard').glob('events*'):
    for event in event_file_loader.EventFileLoader(str(path)).Load():
      tags.update(v.tag for v in event.summary.value)
  assert {'param_norm', 'update_norm', 'grad_norm', 'ema_test_accuracy',
          'test_accuracy'} <= tags


def test_ema_is_evaluated_beside_the_raw_weights(featured, capsys):
  config, workdir, result, _ = featured
  epoch = [r for r in _jsonl(workdir) if 'epoch' in r][-1]
  for key in ('test_accuracy', 'ema_test_accuracy', 'ema_test_loss'):
    assert key in result and epoch[key] == pytest.approx(result[key])
  assert (workdir / 'curves.png').exists()
  # Eval mode evaluates the weights the config names.
  config = config.copy_and_resolve_references()
  config.run.mode, config.run.wandb_project = 'eval', None
  raw = train_loop.evaluate_checkpoint(config, str(workdir))
  assert raw['test_accuracy'] == pytest.approx(result['test_accuracy'])
  assert 'ema_test_accuracy' not in raw
  config.run.eval_weights = 'ema'
  ema = train_loop.evaluate_checkpoint(config, str(workdir))
  assert ema['ema_test_accuracy'] == pytest.approx(result['ema_test_accuracy'])
  assert 'step 8: ema test loss' in capsys.readouterr().out
  # predict.py's library picks either; the checkpoint holds both.
  stored, _ = checkpointing.Checkpointer(
      str(workdir), read_only=True, async_save=False).restore_raw(8)
  for weights, expected in (('raw', stored), ('ema', stored['ema'])):
    got = predictor.Predictor(str(workdir), weights=weights).variables
    assert_trees_close(got['params'], expected['params'], rtol=0, atol=0)
    assert_trees_close(got['batch_stats'], expected['batch_stats'], rtol=0,
                       atol=0)
  assert predictor.Predictor(str(workdir)).weights == 'raw'  # the run's


def test_a_warm_start_starts_the_ema_at_the_loaded_weights(featured):
  from resnet_jax.train import run_setup
  config, workdir, _, _ = featured
  config = config.copy_and_resolve_references()
  config.run.init_from, config.run.wandb_project = f'{workdir}:8', None
  run = run_setup.build(config)
  state = run_setup.warm_start(run, run_setup.init_state(run))
  source, _ = checkpointing.Checkpointer(
      str(workdir), read_only=True, async_save=False).restore_variables(8)
  assert_trees_close(state.ema, source, rtol=0, atol=0)
  assert_trees_close(state.params, source['params'], rtol=0, atol=0)
  # Buffers of its own: the train step donates the state.
  assert all(a is not b for a, b in zip(jax.tree.leaves(state.ema['params']),
                                        jax.tree.leaves(state.params)))


def test_epoch_line_shows_the_ema_models_accuracy():
  record = {'epoch': 3, 'train_loss': 0.25, 'train_accuracy': 0.9,
            'val_accuracy': 0.87, 'ema_val_accuracy': 0.881,
            'examples_per_sec': 100.0}
  assert train_loop.epoch_line(record, 'val') == (
      'epoch 3: loss 0.250, train acc 0.900, val acc 0.870, ema val acc '
      '0.881, 100.0 examples/sec')


def test_resuming_with_the_ema_turned_off_is_refused(featured):
  config, workdir, _, _ = featured
  config = config.copy_and_resolve_references()
  config.optim.ema_decay, config.run.wandb_project = 0.0, None
  with pytest.raises(UserError, match='optim.ema_decay=0.9.*EMA weights'):
    train_loop.train_and_evaluate(config, str(workdir))


def test_wandb_gets_the_records_config_and_a_stable_run_id(featured):
  _, workdir, _, calls = featured
  (_, init), *rest = calls
  run_id = (workdir / wandb_sink.RUN_ID_FILE).read_text().strip()
  assert init['id'] == run_id and init['resume'] == 'allow'
  assert init['project'] == 'resnet-jax-tests'
  assert init['config'] == json.loads((workdir / 'config.json').read_text())
  assert ('define_metric', ('*',), {'step_metric': 'step'}) in rest
  logged = [c[1] for c in rest if c[0] == 'log']
  assert logged == _jsonl(workdir)  # every record, in order
  assert rest[-1] == ('finish',)
  # A restart finds the same id in the workdir.
  assert wandb_sink.run_id(str(workdir)) == run_id


def test_missing_wandb_is_one_clear_error_before_training(
    fake_data_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # import fails
  config = tiny_config('default', fake_data_dir, **{
      'model.width': 4, 'run.wandb_project': 'p'})
  with pytest.raises(UserError, match='pip install wandb, or unset '
                     '--config.run.wandb_project'):
    train_loop.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()
