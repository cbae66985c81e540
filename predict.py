"""Top-5 classes of image files:

    python predict.py --workdir=DIR [--step=N] [--weights=raw|ema] IMAGE...

DIR is a training workdir or a directory written by
`python -m resnet_jax.tools.convert`: its config.json names the network and the
dataset, whose preprocessing the images get (resnet_jax/predictor.py).
"""

from absl import flags, logging

from resnet_jax import cli, predictor
from resnet_jax.errors import UserError

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Training workdir or converted-weights directory.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_TOP = flags.DEFINE_integer('top', 5, 'How many classes to print per image.')
_WEIGHTS = flags.DEFINE_enum(
    'weights', None, ['raw', 'ema'], 'The trained (raw) or the EMA weights '
    "(default: the run's run.eval_weights, raw unless set).")


def main(argv: list[str]) -> None:
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every restore (and warns that read-only managers don't
    # save); the answer here is the printed table. --verbosity=0 shows them.
    logging.set_verbosity(logging.ERROR)
  paths = argv[1:]
  if not paths:
    raise UserError('no images given; usage: python predict.py --workdir=DIR '
                    '[--step=N] IMAGE...')
  if _TOP.value < 1:
    raise UserError(f'--top must be at least 1, got {_TOP.value}')
  model = predictor.Predictor(_WORKDIR.value, _STEP.value, _WEIGHTS.value)
  probs = model.probabilities(model.load(paths))
  for path, p in zip(paths, probs):
    print(predictor.format_top(path, p, model.names, _TOP.value))


if __name__ == '__main__':
  cli.run(main, positional=True)
