"""What every command line shares: absl flags, the run config flag, and one
error wrapper (a bad flag or a `UserError` is one line on stderr and exit
code 2, never a traceback).

    from resnet_jax import cli
    CONFIG = cli.define_config_flag()
    def main(argv): ...
    if __name__ == '__main__':
      cli.run(main)
"""

import logging as std_logging
import os
import re
import sys
from typing import Any, Callable

# TensorFlow (only used to prepare TFDS datasets) must not take GPU memory,
# and its C++ logging is noise here.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402

from resnet_jax.errors import UserError  # noqa: E402

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
    'default.py')
# What absl and ml_collections raise for a bad flag or config override.
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError,
                OSError, SyntaxError)


_ENDED = []  # set by `fail`: what libraries log afterwards is dropped


def fail(message: str) -> None:
  """The one-line error of every command: 'error: ...', exit code 2."""
  print(f'error: {message}', file=sys.stderr)
  _ENDED.append(message)
  sys.exit(2)


def flag_error(e: Exception) -> str:
  """One line from a flag or config-override error, keeping the hint."""
  text = str(e).replace('\\n', '\n')
  typo = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if typo:
    return (f'unknown config field {typo.group(2)!r}; did you mean '
            f'{typo.group(1)!r}? (python -m resnet_jax.tools.config lists every '
            'field)')
  lines = [line.strip(' "') for line in text.splitlines() if line.strip()]
  missing = [line for line in lines if 'No such file' in line]
  if missing:
    return f'config file not found: {missing[0]}'
  if isinstance(e, (KeyError, AttributeError)) and lines:
    return (f'unknown config field {lines[0].strip(chr(39))!r} '
            '(python -m resnet_jax.tools.config lists every field)')
  return lines[0] if lines else f'bad command line ({type(e).__name__})'


def define_config_flag(default: str | None = DEFAULT_CONFIG):
  """--config=configs/X.py with --config.SECTION.FIELD=VALUE overrides."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    return config_flags.DEFINE_config_file(
        'config', default, 'A config file (configs/*.py) with '
        'get_config(); override any field with --config.SECTION.FIELD=VALUE.')
  except FLAG_ERRORS as e:
    fail(flag_error(e))


def config_value(holder) -> Any:
  """The config the command line asked for (not yet validated)."""
  try:
    config = holder.value
    config.run  # pylint: disable=pointless-statement  (loads a lazy config)
    return config
  except FLAG_ERRORS as e:
    fail(flag_error(e))


def overrides(holder) -> dict[str, Any]:
  """The --config.SECTION.FIELD=VALUE pairs given on the command line."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return dict(config_flags.get_override_values(flags.FLAGS[holder.name]))


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except FLAG_ERRORS as e:
    fail(flag_error(e))


class _QuietLibraries:
  """Keeps INFO lines of resnet_jax and drops the libraries' (Orbax logs
  every save and restore at INFO); their warnings and errors still show."""

  def filter(self, record) -> bool:  # pylint: disable=invalid-name
    if 'read_only' in record.getMessage() or (
        'read only' in record.getMessage()):
      return False  # Orbax on every read-only restore: nothing to act on
    library = (f'{os.sep}orbax{os.sep}' in record.pathname or
               record.name == 'asyncio')
    if library and _ENDED:
      # After the command's error line, e.g. asyncio reporting at exit the
      # futures of the failed save that nobody awaited: the error says it.
      return False
    if library:
      # A failed save's background threads (and the asyncio tasks Orbax
      # leaves) each log the same error with a traceback; the line is
      # enough (the command ends with the error).
      record.exc_info = record.exc_text = None
    return (record.levelno >= std_logging.WARNING or
            f'{os.sep}resnet_jax{os.sep}' in record.pathname or
            record.pathname.endswith('train.py'))


def enable_compilation_cache() -> None:
  """Compiled steps persist across runs: a resumed or repeated run starts in
  seconds. JAX_COMPILATION_CACHE_DIR overrides the place."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(
        '~/.cache/resnet_jax/xla'))


def _quiet_unraisable(unraisable) -> None:
  """After a failed checkpoint save, TensorStore completes the writes still
  in flight into Orbax's closed event loop: one 'Event loop is closed'
  traceback each, after the error has been reported. Others are printed."""
  if not (isinstance(unraisable.exc_value, RuntimeError) and
          'Event loop is closed' in str(unraisable.exc_value)):
    sys.__unraisablehook__(unraisable)


def run(main: Callable[[list[str]], Any], positional: bool = False) -> None:
  """absl's app.run(main) with one-line errors and exit code 2 for bad flags
  and `UserError`s; `positional`: main takes arguments besides the flags."""

  def wrapped(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    sys.unraisablehook = _quiet_unraisable
    if not positional and len(argv) > 1:
      fail(f'unexpected arguments {argv[1:]}; every option is a --flag')
    try:
      code = main(argv)
    except UserError as e:
      fail(str(e))
    sys.exit(code or 0)

  app.run(wrapped, flags_parser=_parse_flags)
