"""Every bad input a user can give: one line naming the problem and the fix,
exit code 2, no traceback; among them one case per validation rule of
resnet_jax/config.py, each naming the field and its valid range.

The message of each case is computed in-process, as train.py computes it
(the command line parsed as `cli` parses it, then the run); three cases run
train.py itself, proving the one line, the exit code and the missing
traceback of the command, and the cases that depend on the machine's
environment (TFDS offline) run it in the full tier."""

import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from helpers import EIGHT_DEVICES, ROOT, subprocess_env
from resnet_jax import cli, sharding
from resnet_jax.checkpoint import workdir as workdir_lib
from resnet_jax.errors import UserError
from resnet_jax.train import train_loop

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
     ['data.batch_size=12', '8 devices'], {'XLA_FLAGS': EIGHT_DEVICES}),
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


# Run as train.py itself: the command's one line, exit code and no traceback
# (a flag parse error, a value of the wrong type, a validation rule); and
# the environment cases (TFDS preparing offline), in the full tier.
COMMAND_CASES = ('misspelt config key', 'wrong value type',
                 'learning rate <= 0')
ENVIRONMENT_CASES = ('dataset not prepared offline',)


def _bad_config_file(folder) -> str:
  path = folder / 'typo.py'
  path.write_text(
      'from resnet_jax import config\n'
      'def get_config():\n'
      '  c = config.base_config()\n'
      '  c.optim.lerning_rate = 0.05  # a new field, not the learning rate\n'
      '  return c\n')
  return str(path)


def _argv(name, flag_list, data_dir, bad_config) -> list[str]:
  """train.py's flags for a case: --config=FILE before the overrides, the
  case's own overrides last."""
  flag_list = [f.format(bad_config=bad_config) for f in flag_list]
  files = [f for f in flag_list if f.startswith('--config=')]
  return [*files, f'--config.data.tfds_data_dir={data_dir}',
          '--config.run.num_train_steps=2', '--config.model.width=4',
          *[f for f in flag_list if f not in files]]


def _message_in_process(argv: list[str], workdir: str) -> str:
  """The error train.py reports for `argv`, computed in this process: the
  flags parsed as cli.run parses them, then training (or, in eval mode,
  the workdir's recorded config) as train.py's main does."""
  values = flags.FlagValues()
  argv = ['train.py', *argv]
  try:
    # ml_collections reads the overrides in the argv at definition time.
    holder = config_flags.DEFINE_config_file(
        'config', cli.DEFAULT_CONFIG, flag_values=values, sys_argv=argv)
    values(argv)
    config = holder.value
    config.run  # pylint: disable=pointless-statement  (loads a lazy config)
  except cli.FLAG_ERRORS as e:
    return cli.flag_error(e)
  with pytest.raises(UserError) as error:
    if config.run.mode == 'eval':
      train_loop.evaluate_checkpoint(workdir_lib.read_config(workdir),
                                     workdir)
    else:
      train_loop.train_and_evaluate(config, workdir)
  return str(error.value)


def _workdir(name, tmp_path) -> str:
  """An empty workdir (a forbidden one for its case)."""
  if name == 'unwritable workdir':
    return '/proc/forbidden/run'
  (tmp_path / 'run').mkdir(exist_ok=True)
  return str(tmp_path / 'run')


@pytest.mark.parametrize(
    'name,flag_list,words,env',
    [c for c in CASES if c[0] not in ENVIRONMENT_CASES],
    ids=[c[0] for c in CASES if c[0] not in ENVIRONMENT_CASES])
def test_bad_input_gets_one_clear_line(name, flag_list, words, env,
                                       fake_data_dir, tmp_path, monkeypatch):
  if env.get('XLA_FLAGS') == EIGHT_DEVICES:  # 8 devices, as the check sees
    mesh = sharding.make_mesh()
    monkeypatch.setattr(sharding, 'make_mesh', lambda: mesh)
    monkeypatch.setattr(sharding.jax, 'device_count', lambda: 8)
  message = _message_in_process(
      _argv(name, flag_list, fake_data_dir, _bad_config_file(tmp_path)),
      _workdir(name, tmp_path))
  assert '\n' not in message, message
  for word in words:
    assert word in message, message


def _run_train_py(cases, data_dirs, tmp_path_factory) -> dict:
  """train.py for each case, all at once (to share the cores' time)."""
  bad_config = _bad_config_file(tmp_path_factory.mktemp('configs'))
  procs = {}
  for name, flag_list, _, env in cases:
    workdir = _workdir(name, tmp_path_factory.mktemp('bad'))
    argv = _argv(name, flag_list, data_dirs.get(name) or data_dirs[None],
                 bad_config)
    procs[name] = subprocess.Popen(
        [sys.executable, str(ROOT / 'train.py'), f'--workdir={workdir}',
         *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(**env))
  return {name: (p.wait(timeout=600), p.stderr.read())
          for name, p in procs.items()}


def _assert_one_error_line(code: int, err: str, words) -> None:
  assert code == 2, err[-2000:]
  assert 'Traceback' not in err, err[-2000:]
  errors = [l for l in err.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, err[-2000:]
  for word in words:
    assert word in errors[0], errors[0]


def test_train_py_prints_one_line_and_exits_2(fake_data_dir,
                                              tmp_path_factory):
  cases = [c for c in CASES if c[0] in COMMAND_CASES]
  outcomes = _run_train_py(cases, {None: fake_data_dir}, tmp_path_factory)
  for name, _, words, _ in cases:
    _assert_one_error_line(*outcomes[name], words)


@pytest.mark.full
def test_environment_errors_of_train_py(fake_data_dir, tmp_path_factory):
  empty = str(tmp_path_factory.mktemp('empty_tfds'))
  cases = [c for c in CASES if c[0] in ENVIRONMENT_CASES]
  outcomes = _run_train_py(
      cases, {None: fake_data_dir, 'dataset not prepared offline': empty},
      tmp_path_factory)
  for name, _, words, _ in cases:
    _assert_one_error_line(*outcomes[name], words)


def test_image_size_limit_admits_the_textbook_model_at_28():
  from resnet_jax import models
  d2l = models.create_model('d2l_resnet18')
  models.check_image_size(d2l, 28)  # maps 14, 7, 4, 2, 1: valid
  models.check_image_size(d2l, 17)
  with pytest.raises(UserError, match='at least 17'):
    models.check_image_size(d2l, 16)
