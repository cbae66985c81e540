"""Train or evaluate a ResNet: python train.py --config=configs/X.py --workdir=DIR

Overrides: --config.batch_size=512 --config.model=resnet50 ...
Evaluate a checkpoint: add --config.mode=eval (and --config.eval_step=N).
A run stopped by SIGTERM/SIGINT or killed resumes with the same command.
"""

import logging as std_logging
import os
import re
import sys

# TensorFlow (only used to prepare TFDS datasets) must not take GPU memory,
# and its C++ logging is noise here.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resnet_jax import sharding, train_loop  # noqa: E402
from resnet_jax.errors import UserError  # noqa: E402

_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError,
                OSError, SyntaxError)


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _flag_error(e: Exception) -> str:
  """One line from a flag or config-override error, keeping the hint."""
  text = str(e).replace('\\n', '\n')
  typo = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if typo:
    return (f'unknown config field {typo.group(2)!r}; did you mean '
            f'{typo.group(1)!r}? (configs/default.py lists every field)')
  lines = [line.strip(' "') for line in text.splitlines() if line.strip()]
  missing = [line for line in lines if 'No such file' in line]
  if missing:
    return f'config file not found: {missing[0]}'
  if isinstance(e, (KeyError, AttributeError)) and lines:
    return (f'unknown config field {lines[0].strip(chr(39))!r} '
            '(configs/default.py lists every field)')
  return lines[0] if lines else f'bad command line ({type(e).__name__})'


try:
  # config_flags applies --config.* overrides as soon as the flag is defined.
  _CONFIG = config_flags.DEFINE_config_file(
      'config',
      os.path.join(os.path.dirname(__file__), 'configs', 'default.py'),
      'Path to an ml_collections config file (configs/*.py).')
except _FLAG_ERRORS as err:
  _fail(_flag_error(err))
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints, logs and plots.')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with one-line errors and exit code 2 for bad flags."""
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    _fail(_flag_error(e))


class _QuietLibraries:
  """Keeps INFO lines of resnet_jax and drops the libraries' (Orbax logs
  every save at INFO); their warnings and errors still show."""

  def filter(self, record) -> bool:  # pylint: disable=invalid-name
    return (record.levelno >= std_logging.WARNING or
            'resnet_jax' in record.pathname or
            record.pathname.endswith('train.py'))


def _enable_compilation_cache() -> None:
  """Compiled steps persist across runs: a resumed or repeated run starts in
  seconds. JAX_COMPILATION_CACHE_DIR overrides the place."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(
        '~/.cache/resnet_jax/xla'))


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _enable_compilation_cache()
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; flags are --config=... '
          '--workdir=... --config.<field>=...')
  if not _WORKDIR.value:
    _fail('--workdir is required: the directory for checkpoints and logs')
  try:
    config = _CONFIG.value
    config.mode  # pylint: disable=pointless-statement  (loads a lazy config)
  except _FLAG_ERRORS as e:
    _fail(_flag_error(e))
  try:
    sharding.initialize_distributed()
    if config.mode == 'eval':
      train_loop.evaluate_checkpoint(config, _WORKDIR.value)
    else:
      train_loop.train_and_evaluate(config, _WORKDIR.value)
    sharding.shutdown_distributed()
  except train_loop.Preempted as p:
    sharding.shutdown_distributed()
    print(f'stopped at step {p.step} with a checkpoint saved; resume with the '
          f'same command: {" ".join(sys.argv)}', file=sys.stderr)
    sys.exit(p.exit_code)
  except UserError as e:
    _fail(str(e))


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=_parse_flags)
