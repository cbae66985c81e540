"""Train or evaluate a ResNet: python train.py --config=configs/X.py --workdir=DIR

Overrides: --config.data.batch_size=512 --config.model.name=resnet50 ...
(every field: python -m resnet_jax.tools.config). A run stopped by SIGTERM/SIGINT
or killed resumes with the same command. --config.run.mode=eval evaluates
the workdir's latest checkpoint (or --config.run.eval_step=N) on every
evaluation split, with the network and data the workdir's run recorded.
"""

import sys

from absl import flags, logging

from resnet_jax import cli, sharding
from resnet_jax.checkpoint import workdir as workdir_lib
from resnet_jax.errors import UserError
from resnet_jax.train import train_loop

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints, logs and plots.')


def _config(workdir: str):
  """The command line's config; in eval mode, the workdir's recorded config
  with the command line's --config.* overrides on top."""
  config = cli.config_value(_CONFIG)
  if config.run.mode == 'eval':
    recorded = workdir_lib.read_config(workdir)
    recorded.update_from_flattened_dict(cli.overrides(_CONFIG))
    return recorded
  return config


def main(argv: list[str]) -> int:
  del argv
  logging.set_verbosity(logging.INFO)
  cli.enable_compilation_cache()
  if not _WORKDIR.value:
    raise UserError('--workdir is required: the directory for checkpoints '
                    'and logs')
  config = _config(_WORKDIR.value)
  sharding.initialize_distributed()
  try:
    if config.run.mode == 'eval':
      train_loop.evaluate_checkpoint(config, _WORKDIR.value)
    else:
      train_loop.train_and_evaluate(config, _WORKDIR.value)
  except train_loop.Preempted as p:
    sharding.shutdown_distributed()
    print(f'stopped at step {p.step} with a checkpoint saved; resume with the '
          f'same command: {" ".join(sys.argv)}', file=sys.stderr)
    return p.exit_code
  sharding.shutdown_distributed()
  return 0


if __name__ == '__main__':
  cli.run(main)
