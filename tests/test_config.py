"""The config schema: one declaration per field, one validation, durations
resolved to steps in one place, and config.json as the run's record."""

import importlib
import json
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from resnet_jax.checkpoint import workdir as workdir_lib

from resnet_jax import config as config_lib
from resnet_jax import durations, models
from resnet_jax.train import optim
from resnet_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if p.stem != '__init__')


@pytest.mark.parametrize('name', CONFIGS)
def test_every_recipe_validates_and_has_exactly_the_declared_fields(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config_lib.validate(config)
  flat = config_lib._flat_keys(config)  # pylint: disable=protected-access
  assert sorted(flat) == sorted(config_lib.FIELDS)


def test_the_default_recipe_is_the_schemas_defaults():
  from configs import default  # pylint: disable=g-import-not-at-top
  assert default.get_config().to_dict() == config_lib.base_config().to_dict()
  c = config_lib.base_config()
  # ResNet-8 has its own registry name: no stage override to remember.
  assert c.model.name == 'cifar_resnet8' and c.model.stage_sizes is None
  assert models.from_config(dict(c.model, num_classes=10)).stage_sizes == (
      1, 1, 1)


def test_model_section_keys_are_create_models_arguments():
  section = config_lib.base_config().model.to_dict()
  model = models.create_model(**section)  # what models.from_config does
  assert model.num_classes == 10  # unset: the registry's (the dataset's)


def test_every_field_has_a_meaning_and_the_listing_shows_it():
  for path, field in config_lib.FIELDS.items():
    assert field.meaning, path
    assert field.optional == (field.default is None), path
  out = subprocess.run([sys.executable, '-m', 'resnet_jax.tools.config'],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       check=True).stdout
  assert len(out.splitlines()) == len(config_lib.FIELDS)
  assert 'optim.learning_rate = 0.1  # peak learning rate' in out


@pytest.mark.parametrize('path,value,words', [
    ('optim.learning_rate', 0.0, '> 0'),
    ('run.num_train_steps', -5, '> 0'),
    ('data.augment.random_erasing', -0.1, '[0, 1]'),
    ('optim.learning_rate', None, 'must be set'),
    ('data.batch_size', True, 'of type int'),
    ('model.stage_sizes', (2, 0), 'positive integers'),
])
def test_validation_names_the_field_and_range(path, value, words):
  c = config_lib.base_config()
  c.update_from_flattened_dict({path: value})
  with pytest.raises(UserError) as e:
    config_lib.validate(c)
  message = str(e.value)
  assert path in message and words in message and '\n' not in message


def test_unknown_and_missing_fields_are_rejected():
  c = config_lib.base_config()
  c.optim.lerning_rate = 0.05  # a typo in a recipe file adds a field
  with pytest.raises(UserError, match="unknown config field 'optim.lerning"):
    config_lib.validate(c)
  c = config_lib.base_config()
  del c.run['seed']
  with pytest.raises(UserError, match='run.seed is missing'):
    config_lib.validate(c)


def test_config_json_round_trip(tmp_path):
  c = config_lib.base_config()
  c.model.stage_sizes = (2, 1, 1)
  c.model.width = 8
  c.optim.schedule = 'piecewise'
  c.optim.lr_boundaries = (10, 20)
  c.optim.lr_scales = (0.1, 0.1)
  workdir_lib.write_config(str(tmp_path), c)
  back = workdir_lib.read_config(str(tmp_path))
  assert back.to_dict() == c.to_dict()
  assert back.model.stage_sizes == (2, 1, 1)  # a tuple again, not a list
  # Placeholders stay typed: the record can be overridden like a recipe.
  back.update_from_flattened_dict({'run.eval_step': 3})
  assert back.run.eval_step == 3


def test_a_record_of_another_layout_is_refused_by_name(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(
      {'model': 'resnet18', 'dataset': 'imagenet2012', 'width': 0}))
  with pytest.raises(UserError, match='another version of resnet_jax'):
    workdir_lib.read_config(str(tmp_path))
  with pytest.raises(UserError, match='does not exist'):
    workdir_lib.read_config(str(tmp_path / 'nope'))
  with pytest.raises(UserError, match='no config.json'):
    workdir_lib.read_config(str(tmp_path.parent))


# ----------------------------------------------------------------- durations


def _config(**flat) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.update_from_flattened_dict(flat)
  return c


def test_steps_from_epochs_or_steps():
  # 1,000 examples, batch 64: 15 full batches an epoch (the rest dropped).
  steps = durations.resolve_steps(_config(**{'run.num_epochs': 2.5}), 1000)
  assert (steps.per_epoch, steps.total) == (15, 38)  # ceil(37.5)
  assert steps.warmup == round(0.3 * 15)
  steps = durations.resolve_steps(
      _config(**{'run.num_train_steps': 7, 'optim.warmup_steps': 2}), 1000)
  assert (steps.total, steps.warmup) == (7, 2)  # steps win over epochs
  with pytest.raises(UserError, match=r'data.batch_size=64 .* \[1, 50\]'):
    durations.resolve_steps(_config(), 50)


def test_a_warmup_longer_than_the_run_is_shortened_with_a_warning():
  # The default recipe's 0.3 epochs of warmup on Fashion-MNIST are 281
  # steps; a 20-step smoke test gets a 20-step warmup and a warning.
  warnings = []
  steps = durations.resolve_steps(_config(**{'run.num_train_steps': 20}),
                                   60_000, warnings.append)
  assert steps.warmup == steps.total == 20
  assert len(warnings) == 1 and '281' in warnings[0] and '20' in warnings[0]
  # The schedule still rises to the peak at the end and never errs.
  for name in ('cosine', 'constant', 'piecewise'):
    schedule = optim.create_schedule(
        _config(**{'optim.schedule': name}).optim, steps)
    assert float(schedule(0)) == 0.0
    assert float(schedule(20)) == pytest.approx(0.1)


def test_periodic_actions():
  steps = durations.Steps(total=25, per_epoch=10, warmup=0, log_every=4,
                           eval_every=20, checkpoint_every=6)
  logs = [s for s in range(1, 26) if steps.is_log(s)]
  assert logs == [4, 8, 10, 12, 16, 20, 24, 25]  # epoch ends and the end too
  assert [s for s in range(1, 26) if steps.is_eval(s)] == [20, 25]
  assert [s for s in range(1, 26) if steps.is_checkpoint(s)] == [
      6, 12, 18, 20, 24, 25]
  assert steps.epoch(25) == 2.5


def test_piecewise_warmup_keeps_the_recipes_boundaries():
  c = _config(**{'optim.schedule': 'piecewise', 'optim.lr_boundaries': (10,),
                 'optim.lr_scales': (0.1,), 'optim.warmup_steps': 4})
  steps = durations.Steps(total=20, per_epoch=5, warmup=4, log_every=5,
                           eval_every=5, checkpoint_every=5)
  schedule = optim.create_schedule(c.optim, steps)
  assert [round(float(schedule(s)), 4) for s in (0, 2, 4, 9, 10, 15)] == [
      0.0, 0.05, 0.1, 0.1, 0.01, 0.01]
