"""Training: sharded == single device, every config runs, the CLI's outputs
and errors, and a short real run that learns."""

import json
import os

import numpy as np
import pytest

from helpers import ROOT, run_check, tiny_config, write_stream_dataset
from resnet_jax.train import train_loop

CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if p.stem != '__init__')


@pytest.mark.full
@pytest.mark.parametrize('conv_impl,model', [
    ('xla', 'cifar_resnet20'), ('onednn', 'cifar_resnet20'),
    ('chunked', 'cifar_resnet20'), ('auto', 'd2l_resnet18')])
def test_sharded_step_equals_single_device_step(conv_impl, model):
  """XLA's convolutions; oneDNN's custom calls; the patch convolutions with
  their batch-chunk loops; and 'auto' on the textbook model (oneDNN, patch
  and native max-pool custom calls). Custom calls and chunk loops are
  opaque to XLA's partitioner, which gathered the whole batch onto every
  device for them (x20 and x49 all-gathers on ResNet-20) until
  `sharding.per_device` ran them on each device's slice."""
  r = run_check('sharded_step', conv_impl, model)
  assert r['devices'] == 8
  assert r['all_gathers'] == 0
  assert (r['onednn_calls'] > 0) == (conv_impl in ('onednn', 'auto'))
  assert (r['pool_calls'] > 0) == (model == 'd2l_resnet18')
  np.testing.assert_allclose(r['loss'][0], r['loss'][1], rtol=1e-5)
  # Gradients are sums in another order on 8 devices: BN bias gradients
  # differ by up to ~1e-2 relative in float32, their norm by ~1e-4.
  np.testing.assert_allclose(r['grad_norm'][0], r['grad_norm'][1], rtol=1e-3)
  assert r['correct'][0] == r['correct'][1]
  # BatchNorm over the global batch: with 4 examples per device, per-device
  # statistics would differ from the single-device ones by far more.
  assert r['batch_stats_max_rel'] < 1e-5
  # Updated parameters differ by the gradients' summation-order noise (up to
  # ~1e-2 relative for BN bias gradients) times the step: a few percent of
  # the largest update at most. Unsynchronised BN would differ by far more.
  assert r['params_max_abs'] < 0.05 * r['update_max_abs']


@pytest.mark.full
def test_imagenet_config_streams_and_trains(tmp_path):
  # The recipe (bfloat16, Nesterov, label smoothing, warmup + cosine, the
  # streamed Inception crop) on a narrow ResNet-50 at 32x32, over a tiny
  # ImageNet of JPEGs in TFDS's ArrayRecord layout.
  data_dir = str(tmp_path / 'tfds')
  write_stream_dataset(data_dir, 'imagenet2012',
                       {'train': 40, 'validation': 21}, shape=None,
                       num_classes=1000)
  config = tiny_config('imagenet_resnet50', data_dir, **{
      'model.width': 8, 'data.image_size': 32, 'data.eval_batch_size': 16,
      'optim.warmup_steps': 1, 'data.stream_workers': 0})
  result = train_loop.train_and_evaluate(config, str(tmp_path / 'run'))
  # ImageNet's labelled evaluation split is TFDS 'validation', named 'val'.
  assert result['val_count'] == 21  # every validation image, once
  assert np.isfinite(result['val_loss'])
  assert 0 <= result['val_accuracy'] <= result['val_top5_accuracy'] <= 1


@pytest.mark.full
def test_short_real_run_learns(fashion_mnist_data_dir, tmp_path):
  config = tiny_config('default', fashion_mnist_data_dir, **{
      'model.width': 8, 'data.batch_size': 64, 'run.num_train_steps': 120,
      'optim.learning_rate': 0.1, 'run.log_every_steps': 40,
      'run.checkpoint_every_steps': 1000, 'data.eval_batch_size': 1000})
  result = train_loop.train_and_evaluate(config, str(tmp_path))
  assert result['test_count'] == 10_000
  # Chance is 0.10 (loss 2.30); 120 steps of a narrow ResNet reach ~0.62.
  assert result['test_accuracy'] > 0.5, result
  assert result['test_loss'] < 1.5, result


def test_epoch_line_names_the_split_it_evaluated():
  record = {'epoch': 3, 'train_loss': 0.25, 'train_accuracy': 0.9,
            'test_accuracy': 0.88, 'val_accuracy': 0.87,
            'examples_per_sec': 100.0}
  assert train_loop.epoch_line(record, 'test') == (
      'epoch 3: loss 0.250, train acc 0.900, test acc 0.880, 100.0 '
      'examples/sec')
  assert train_loop.epoch_line(record, 'val') == (
      'epoch 3: loss 0.250, train acc 0.900, val acc 0.870, 100.0 '
      'examples/sec')


def test_epoch_line_of_a_run_cut_mid_epoch():
  record = {'epoch': 120 / 234, 'train_loss': 0.729, 'train_accuracy': 0.76,
            'test_accuracy': 0.822, 'examples_per_sec': 43.3}
  assert train_loop.epoch_line(record, 'test') == (
      'epoch 0.51: loss 0.729, train acc 0.760, test acc 0.822, '
      '43.3 examples/sec')


def test_validation_split_is_evaluated_and_selects_the_best(fake_data_dir,
                                                            tmp_path):
  # 56 of the 256 fake training images held out: every epoch evaluates on
  # them under the 'val' name (never 'test'), the best checkpoint is chosen
  # by val_accuracy, and eval mode reports both named splits.
  config = tiny_config('default', fake_data_dir, **{
      'model.width': 4, 'data.validation_examples': 56,
      'data.batch_size': 40, 'run.num_train_steps': 10,
      'run.log_every_steps': 5, 'run.checkpoint_every_steps': 100,
      'run.keep_checkpoints': 1})
  result = train_loop.train_and_evaluate(config, str(tmp_path))
  assert result['val_count'] == 56 and not any('test' in k for k in result)
  records = [json.loads(l) for l in
             (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  epochs = [r for r in records if 'epoch' in r]
  assert [r['step'] for r in epochs] == [5, 10]  # 200 / 40 = 5 per epoch
  assert all('val_accuracy' in r and 'test_accuracy' not in r for r in epochs)
  # keep 1 plus the best by val_accuracy.
  best = max(epochs, key=lambda r: r['val_accuracy'])['step']
  kept = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints'))
  assert kept == sorted({10, best})
  config.run.mode = 'eval'
  evaluated = train_loop.evaluate_checkpoint(config, str(tmp_path))
  assert evaluated['val_count'] == 56 and evaluated['test_count'] == 100
  assert evaluated['val_accuracy'] == pytest.approx(result['val_accuracy'])


def test_eval_step_counts_top1_and_top5_over_the_mask():
  import types  # pylint: disable=g-import-not-at-top
  from resnet_jax.train import train_step
  # 7 classes; the label's rank: 1st, 3rd, 5th, 6th, and a padded row.
  logits = np.array([[9, 1, 2, 3, 4, 5, 6], [1, 9, 8, 3, 4, 5, 6],
                     [1, 2, 3, 4, 9, 8, 7], [6, 5, 4, 3, 2, 1, 0],
                     [0, 1, 2, 3, 4, 5, 6]], np.float32)
  state = types.SimpleNamespace(variables=lambda weights: None,
                                apply_fn=lambda v, x, train: logits)
  batch = {'image': np.zeros((5, 1)), 'label': np.array([0, 6, 2, 5, 0]),
           'mask': np.array([True, True, True, True, False])}
  identity = lambda x, rng: x
  m = train_step.eval_step(state, batch, options=train_step.StepOptions(
      preprocess=identity, eval_preprocess=identity, num_classes=7,
      steps=None))
  assert (float(m['correct']), float(m['correct5']), float(m['count'])) == (
      1.0, 3.0, 4.0)
