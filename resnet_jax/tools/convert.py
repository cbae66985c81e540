"""python -m resnet_jax.tools.convert: torchvision weights into a workdir.

  python -m resnet_jax.tools.convert --model=resnet50 --src=resnet50.pth --dst=DIR

DIR then reads like a training run's workdir (checkpoints/0 and config.json):
predict.py, the summary, eval mode and `run.init_from` (warm starts) take
it. torch is needed only to read a .pth file; an .npz of the state_dict's
arrays also works. The mapping is `resnet_jax.models.torchvision_weights`.
"""

import os
from typing import Any, Sequence

from absl import flags

from resnet_jax.checkpoint import workdir as workdir_lib

from resnet_jax import cli, config as config_lib
from resnet_jax.checkpoint import checkpointing
from resnet_jax.errors import UserError
from resnet_jax.models.torchvision_weights import (TORCHVISION_MODELS,
                                                   from_torchvision,
                                                   load_state_dict)

Variables = dict[str, Any]


def converted_config(model_name: str, num_classes: int) -> Any:
  """The config.json of a converted directory: the same schema as a training
  run's, naming the network and the data it was trained on (ImageNet at
  224x224), so that predict.py, the summary, evaluation and warm starts read
  it like any workdir."""
  c = config_lib.base_config()
  c.model.name = model_name
  c.model.num_classes = int(num_classes)
  c.model.zero_init_residual = False
  c.data.dataset = 'imagenet2012'
  c.data.image_size = 224
  c.data.augment.flip = False
  config_lib.validate(c)
  return c


def write_converted(dst: str, variables: Variables, model_name: str,
                    num_classes: int, src: str) -> None:
  """Writes DIR/checkpoints/0 (the weights, as `Checkpointer.save_weights`
  writes them) and DIR/config.json, like a training workdir."""
  dst = os.path.abspath(dst)
  ckpt = checkpointing.Checkpointer(dst, async_save=False)
  try:
    if ckpt.all_steps():
      raise UserError(f'{ckpt.directory} already exists with checkpoints; '
                      'choose a new --dst or delete it')
    ckpt.save_weights(variables, source='torchvision',
                      src=os.path.abspath(src))
  finally:
    ckpt.close()
  workdir_lib.write_config(dst, converted_config(model_name, num_classes))


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  if f['from'].value != 'torchvision':
    raise UserError(f'--from={f["from"].value!r} is not supported; use '
                    '--from=torchvision')
  if f.model not in TORCHVISION_MODELS:
    raise UserError(f'--model={f.model!r} has no torchvision counterpart; '
                    f'choose one of: {", ".join(TORCHVISION_MODELS)}')
  state = load_state_dict(f.src)
  variables = from_torchvision(state, f.model, f.num_classes)
  num_classes = variables['params']['fc']['bias'].shape[0]
  write_converted(f.dst, variables, f.model, num_classes, f.src)
  print(f'wrote {f.model} ({num_classes} classes) to {f.dst}')


def _define_flags() -> None:
  flags.DEFINE_string('from', 'torchvision',
                      'Checkpoint family; only "torchvision".')
  flags.DEFINE_string('model', None,
                      f'One of {", ".join(TORCHVISION_MODELS)}.',
                      required=True)
  flags.DEFINE_string('src', None,
                      'state_dict file (.pth, or .npz of its arrays).',
                      required=True)
  flags.DEFINE_string('dst', None, 'Output directory.', required=True)
  flags.DEFINE_integer('num_classes', None,
                       'Head size (default: read from fc.weight).')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
