"""Every bad input a user can give: one line naming the problem and the fix,
a non-zero exit code, no traceback. Each case runs train.py as a user would
(all at once, to share the cores' time)."""

import subprocess
import sys

import pytest

from resnet_jax.errors import UserError
from test_training import ROOT, _env

EIGHT = '--xla_force_host_platform_device_count=8'

# (name, extra flags, expected words in the message, extra environment)
CASES = [
    ('unknown model', ['--config.model=resnet51'],
     ['unknown model', 'resnet50'], {}),
    ('unknown dataset', ['--config.dataset=fashion_mnits'],
     ['fashion_mnits'], {}),
    ('unknown optimizer', ['--config.optimizer=adam'],
     ['unknown optimizer', 'adamw'], {}),
    ('unknown schedule', ['--config.schedule=linear'],
     ['unknown schedule', 'cosine'], {}),
    ('unknown conv_impl', ['--config.conv_impl=fast'],
     ['conv_impl', 'patches'], {}),
    ('misspelt config key', ['--config.learning_rte=0.1'],
     ['learning_rte', 'learning_rate'], {}),
    ('wrong value type', ['--config.batch_size=big'], ['batch_size'], {}),
    ('missing config file', ['--config=configs/nope.py'],
     ['configs/nope.py'], {}),
    ('batch not divisible by devices', ['--config.batch_size=12'],
     ['batch_size=12', '8 devices'], {'XLA_FLAGS': EIGHT}),
    ('image too small', ['--config.image_size=2'],
     ['image_size=2', 'too small'], {}),
    ('unwritable workdir', [], ['cannot write to workdir'], {}),
    ('dataset not prepared offline', ['--config.dataset=mnist'],
     ['mnist', 'tfds_manual_dir'], {}),
    ('init_from pointing at nothing', ['--config.init_from=/nonexistent/run'],
     ['init_from', '/nonexistent/run'], {}),
    ('unknown mode', ['--config.mode=test'], ['unknown mode', 'eval'], {}),
]


@pytest.fixture(scope='module')
def outcomes(fake_data_dir, tmp_path_factory):
  empty = tmp_path_factory.mktemp('empty_tfds')
  procs = {}
  for name, flags, _, env in CASES:
    workdir = ('/proc/forbidden/run' if name == 'unwritable workdir' else
               str(tmp_path_factory.mktemp('bad')))
    data_dir = empty if name == 'dataset not prepared offline' else fake_data_dir
    # --config=FILE must come before --config.FIELD overrides.
    cmd = [sys.executable, str(ROOT / 'train.py'), *flags,
           f'--workdir={workdir}', f'--config.tfds_data_dir={data_dir}',
           '--config.num_train_steps=2', '--config.warmup_epochs=0',
           '--config.width=4']
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
  from resnet_jax import models, run_setup  # pylint: disable=g-import-not-at-top
  d2l = models.create_model('d2l_resnet18')
  run_setup.check_image_size(d2l, 28)  # maps 14, 7, 4, 2, 1: valid
  run_setup.check_image_size(d2l, 17)
  with pytest.raises(UserError, match='at least 17'):
    run_setup.check_image_size(d2l, 16)
