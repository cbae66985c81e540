"""Every bad input a user can give: one line naming the problem and the fix,
exit code 2, no traceback. Each case runs train.py as a user would (all at
once, to share the cores' time); among them one per validation rule of
resnet_jax/config.py, each naming the field and its valid range."""

import subprocess
import sys

import pytest

from resnet_jax.errors import UserError
from test_training import ROOT, _env

EIGHT = '--xla_force_host_platform_device_count=8'

# (name, extra flags, expected words in the message, extra environment)
CASES = [
    ('unknown model', ['--config.model.name=resnet51'],
     ['model.name', 'resnet50'], {}),
    ('unknown dataset', ['--config.data.dataset=fashion_mnits'],
     ['data.dataset', 'fashion_mnist'], {}),
    ('unknown optimizer', ['--config.optim.optimizer=adam'],
     ['optim.optimizer', 'adamw'], {}),
    ('unknown schedule', ['--config.optim.schedule=linear'],
     ['optim.schedule', 'cosine'], {}),
    ('unknown conv_impl', ['--config.model.conv_impl=fast'],
     ['model.conv_impl', 'patches'], {}),
    ('unknown dtype', ['--config.model.dtype=float16'],
     ['model.dtype', 'bfloat16'], {}),
    ('unknown mode', ['--config.run.mode=test'], ['run.mode', 'eval'], {}),
    ('misspelt config key', ['--config.optim.learning_rte=0.1'],
     ['learning_rte', 'learning_rate'], {}),
    ('field in the wrong section', ['--config.learning_rate=0.1'],
     ['learning_rate'], {}),
    ('unknown field in a config file', ['--config={bad_config}'],
     ['unknown config field', 'optim.lerning_rate'], {}),
    ('wrong value type', ['--config.data.batch_size=big'], ['batch_size'], {}),
    ('missing config file', ['--config=configs/nope.py'],
     ['configs/nope.py'], {}),
    # One validation rule each: the field and its valid range are named.
    ('learning rate <= 0', ['--config.optim.learning_rate=-0.1'],
     ['optim.learning_rate=-0.1', '> 0'], {}),
    ('negative step count', ['--config.run.num_train_steps=-5'],
     ['run.num_train_steps=-5', '> 0'], {}),
    ('zero epochs', ['--config.run.num_epochs=0'],
     ['run.num_epochs=0', '> 0'], {}),
    ('negative warmup', ['--config.optim.warmup_epochs=-1'],
     ['optim.warmup_epochs', '>= 0'], {}),
    ('batch <= 0', ['--config.data.batch_size=0'],
     ['data.batch_size=0', '> 0'], {}),
    ('eval batch <= 0', ['--config.data.eval_batch_size=-8'],
     ['data.eval_batch_size=-8', '> 0'], {}),
    ('probability above 1', ['--config.data.augment.random_erasing=1.5'],
     ['data.augment.random_erasing=1.5', '[0, 1]'], {}),
    ('label smoothing of 1', ['--config.optim.label_smoothing=1.0'],
     ['optim.label_smoothing=1.0', '[0, 1)'], {}),
    ('momentum above 1', ['--config.optim.momentum=1.5'],
     ['optim.momentum=1.5', '[0, 1)'], {}),
    ('negative weight decay', ['--config.optim.weight_decay=-1e-4'],
     ['optim.weight_decay', '>= 0'], {}),
    ('negative crop padding', ['--config.data.augment.crop_padding=-2'],
     ['data.augment.crop_padding=-2', '>= 0'], {}),
    ('zero log period', ['--config.run.log_every_steps=0'],
     ['run.log_every_steps=0', '> 0'], {}),
    ('zero eval period', ['--config.run.eval_every_epochs=0'],
     ['run.eval_every_epochs=0', '> 0'], {}),
    ('zero checkpoint period', ['--config.run.checkpoint_every_steps=0'],
     ['run.checkpoint_every_steps=0', '> 0'], {}),
    ('keep no checkpoints', ['--config.run.keep_checkpoints=0'],
     ['run.keep_checkpoints=0', '> 0'], {}),
    ('clip norm <= 0', ['--config.optim.grad_clip_norm=0.0'],
     ['optim.grad_clip_norm=0.0', '> 0'], {}),
    ('zero width', ['--config.model.width=0'], ['model.width=0', '> 0'], {}),
    ('empty stage sizes', ['--config.model.stage_sizes=()'],
     ['model.stage_sizes', 'positive integers'], {}),
    ('negative seed', ['--config.run.seed=-1'], ['run.seed=-1', '>= 0'], {}),
    ('validation split as large as train',
     ['--config.data.validation_examples=60000'],
     ['data.validation_examples=60000', '[0, 60000)'], {}),
    ('boundaries without piecewise', ['--config.optim.lr_boundaries=(10,)'],
     ['optim.lr_boundaries', 'piecewise'], {}),
    ('boundaries and scales of other lengths',
     ['--config.optim.schedule=piecewise', '--config.optim.lr_boundaries=(10,)'],
     ['optim.lr_boundaries', 'optim.lr_scales', 'same length'], {}),
    ('boundaries not increasing',
     ['--config.optim.schedule=piecewise', '--config.optim.lr_boundaries=(9,4)',
      '--config.optim.lr_scales=(0.1,0.1)'],
     ['optim.lr_boundaries', 'increasing'], {}),
    ('classes other than the dataset', ['--config.model.num_classes=5'],
     ['model.num_classes=5', '10 classes'], {}),
    ('streamed dataset without image size',
     ['--config.data.dataset=imagenet2012', '--config.model.name=resnet18'],
     ['data.image_size', 'imagenet2012'], {}),
    # Beyond the fields' ranges: the machine and the files.
    ('batch not divisible by devices', ['--config.data.batch_size=12'],
     ['data.batch_size=12', '8 devices'], {'XLA_FLAGS': EIGHT}),
    ('batch larger than the dataset', ['--config.data.batch_size=512'],
     ['data.batch_size=512', '256'], {}),
    ('image too small', ['--config.data.image_size=2'],
     ['image_size=2', 'too small'], {}),
    ('unwritable workdir', [], ['cannot write to workdir'], {}),
    ('dataset not prepared offline', ['--config.data.dataset=mnist'],
     ['mnist', 'tfds_manual_dir'], {}),
    ('init_from pointing at nothing',
     ['--config.run.init_from=/nonexistent/run'],
     ['init_from', '/nonexistent/run'], {}),
    ('eval mode on a workdir without a run', ['--config.run.mode=eval'],
     ['config.json', 'workdir'], {}),
]


@pytest.fixture(scope='module')
def outcomes(fake_data_dir, tmp_path_factory):
  empty = tmp_path_factory.mktemp('empty_tfds')
  bad_config = tmp_path_factory.mktemp('configs') / 'typo.py'
  bad_config.write_text(
      'from resnet_jax import config\n'
      'def get_config():\n'
      '  c = config.base_config()\n'
      '  c.optim.lerning_rate = 0.05  # a new field, not the learning rate\n'
      '  return c\n')
  procs = {}
  for name, flags, _, env in CASES:
    workdir = ('/proc/forbidden/run' if name == 'unwritable workdir' else
               str(tmp_path_factory.mktemp('bad')))
    data_dir = empty if name == 'dataset not prepared offline' else fake_data_dir
    flags = [f.format(bad_config=bad_config) for f in flags]
    # --config=FILE must come before the --config.FIELD overrides, and the
    # case's own overrides last.
    files = [f for f in flags if f.startswith('--config=')]
    cmd = [sys.executable, str(ROOT / 'train.py'), *files,
           f'--workdir={workdir}', f'--config.data.tfds_data_dir={data_dir}',
           '--config.run.num_train_steps=2', '--config.model.width=4',
           *[f for f in flags if f not in files]]
    procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env=_env(**env))
  return {name: (p.wait(timeout=600), p.stdout.read(), p.stderr.read())
          for name, p in procs.items()}


@pytest.mark.parametrize('name,flags,words,env', CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(outcomes, name, flags, words, env):
  del flags, env
  code, _, err = outcomes[name]
  assert code == 2, err[-2000:]
  assert 'Traceback' not in err, err[-2000:]
  errors = [l for l in err.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, err[-2000:]
  for word in words:
    assert word in errors[0], errors[0]


def test_image_size_limit_admits_the_textbook_model_at_28():
  from resnet_jax import models
  d2l = models.create_model('d2l_resnet18')
  models.check_image_size(d2l, 28)  # maps 14, 7, 4, 2, 1: valid
  models.check_image_size(d2l, 17)
  with pytest.raises(UserError, match='at least 17'):
    models.check_image_size(d2l, 16)
