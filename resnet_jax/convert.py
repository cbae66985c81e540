"""Converts torchvision ResNet checkpoints into resnet_jax variables.

The Flax modules are named after torchvision's (`conv1`, `bn1`,
`layer1_0/downsample_conv`, `fc`, ...), so the conversion is a rename plus a
layout change: conv kernels OIHW -> HWIO (grouped convs included: torch's
(O, I/groups, kh, kw) is Flax's (kh, kw, I/groups, O)), the dense kernel
(out, in) -> (in, out), BatchNorm running_mean/var -> `batch_stats` mean/var.

The expected keys and shapes come from the Flax model itself
(`jax.eval_shape` of its init), so every key of the state_dict is checked
against the model before anything is returned.

Command line (torch is needed only to read a .pth file; .npz also works):

  python -m resnet_jax.convert --model=resnet50 --src=resnet50.pth --dst=DIR
"""

import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.errors import UserError
from resnet_jax.models import from_config

__all__ = ['TORCHVISION_MODELS', 'from_torchvision', 'load_state_dict',
           'adapt_input_channels', 'replace_head', 'converted_config',
           'write_converted', 'main']

Variables = dict[str, Any]
FlaxPath = tuple[str, ...]

# Models whose torchvision namesake has the same architecture and names.
TORCHVISION_MODELS = ('resnet18', 'resnet34', 'resnet50', 'resnet101',
                      'resnet152', 'resnext50_32x4d', 'resnext101_32x8d',
                      'wide_resnet50_2')

# Flax leaf name -> torch parameter name, per module kind.
_BN_LEAVES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
              'var': 'running_var'}
_OTHER_LEAVES = {'kernel': 'weight', 'bias': 'bias'}
# Modules whose torch name differs from the Flax name.
_MODULE_NAMES = {'downsample_conv': 'downsample.0',
                 'downsample_bn': 'downsample.1'}
# Buffers torchvision saves that have no counterpart in Flax.
_DROPPED_SUFFIXES = ('.num_batches_tracked',)


def _torch_key(path: FlaxPath) -> str:
  """('layer1_0', 'downsample_bn', 'mean') -> 'layer1.0.downsample.1.running_mean'."""
  *modules, leaf = path
  if modules and modules[0] == 'stem':  # torchvision's stem is top level.
    modules = modules[1:]
  names = []
  for module in modules:
    if module.startswith('layer'):
      names.append(module.replace('_', '.'))  # layer1_0 -> layer1.0
    else:
      names.append(_MODULE_NAMES.get(module, module))
  is_bn = modules[-1].startswith('bn') or modules[-1] == 'downsample_bn'
  names.append((_BN_LEAVES if is_bn else _OTHER_LEAVES)[leaf])
  return '.'.join(names)


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
  """torch layout -> Flax layout: OIHW -> HWIO, (out, in) -> (in, out)."""
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:
    return array.T
  return array


def _to_torch_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """The torch shape of a Flax leaf of `shape` (inverse of _to_flax_layout)."""
  if len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  if len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _as_numpy(value: Any) -> np.ndarray:
  """A torch tensor or array-like as float32 numpy, without importing torch."""
  if hasattr(value, 'detach'):  # torch.Tensor (bfloat16 has no numpy dtype).
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, dtype=np.float32)


def _expected_leaves(model_name: str, num_classes: int
                     ) -> dict[str, tuple[str, FlaxPath, tuple[int, ...]]]:
  """torch key -> (collection, Flax path, torch shape), in model order."""
  model = from_config(converted_config(model_name, num_classes).model)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False))
  expected = {}
  for collection in ('params', 'batch_stats'):
    flat = jax.tree_util.tree_flatten_with_path(shapes[collection])[0]
    for key_path, leaf in flat:
      path = tuple(k.key for k in key_path)
      expected[_torch_key(path)] = (collection, path,
                                    _to_torch_shape(leaf.shape))
  return expected


def _flax_shape(torch_shape: Sequence[int]) -> tuple[int, ...]:
  return _to_flax_layout(np.empty(torch_shape, np.bool_)).shape


def _describe(collection: str, path: FlaxPath) -> str:
  return '/'.join((collection,) + path)


def _check_keys(state: Mapping[str, np.ndarray],
                expected: Mapping[str, tuple[str, FlaxPath, tuple[int, ...]]],
                model_name: str) -> None:
  """Raises a UserError naming the first problem and counting the rest."""
  problems = []
  for key, value in state.items():
    if key not in expected:
      problems.append(f'unexpected key {key!r} with shape {tuple(value.shape)} '
                      f'(no counterpart in {model_name})')
      continue
    collection, path, shape = expected[key]
    if tuple(value.shape) != shape:
      problems.append(
          f'key {key!r} has shape {tuple(value.shape)} but {model_name} '
          f'expects {shape} (Flax {_describe(collection, path)}: '
          f'{_flax_shape(shape)})')
  for key, (collection, path, shape) in expected.items():
    if key not in state:
      problems.append(f'missing key {key!r} with shape {shape} (Flax '
                      f'{_describe(collection, path)}: {_flax_shape(shape)})')
  if problems:
    more = f' (and {len(problems) - 1} more problems)' if len(problems) > 1 else ''
    hint = (' Is this a torchvision state_dict of the same model?'
            if len(problems) > 1 else '')
    raise UserError(f'state_dict does not fit {model_name}: {problems[0]}'
                    f'{more}.{hint}')


def from_torchvision(state_dict: Mapping[str, Any], model_name: str,
                     num_classes: int | None = None) -> Variables:
  """Converts a torchvision ResNet state_dict to resnet_jax variables.

  Args:
    state_dict: `torchvision.models.<name>().state_dict()`, values torch
      tensors or numpy arrays (numpy needs no torch installed).
    model_name: one of `TORCHVISION_MODELS` (same name as torchvision's).
    num_classes: size of the head; None reads it from `fc.weight`.

  Returns:
    {'params': ..., 'batch_stats': ...}, nested dicts of float32 numpy arrays
    for `create_model(model_name, num_classes=num_classes)`.

  Raises:
    UserError: the model has no torchvision namesake, or a key of the
      state_dict is missing, unexpected or has the wrong shape.
  """
  if model_name not in TORCHVISION_MODELS:
    raise UserError(f'model {model_name!r} has no torchvision counterpart; '
                    f'choose one of: {", ".join(TORCHVISION_MODELS)}')
  state = {k: _as_numpy(v) for k, v in state_dict.items()
           if not k.endswith(_DROPPED_SUFFIXES)}
  if num_classes is None:
    if 'fc.weight' not in state or state['fc.weight'].ndim != 2:
      raise UserError('state_dict has no 2-D fc.weight to read the number of '
                      'classes from; pass num_classes')
    num_classes = state['fc.weight'].shape[0]
  expected = _expected_leaves(model_name, num_classes)
  _check_keys(state, expected, model_name)
  variables: Variables = {'params': {}, 'batch_stats': {}}
  for key, (collection, path, _) in expected.items():
    node = variables[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(_to_flax_layout(state[key]))
  return variables


def load_state_dict(path: str) -> dict[str, Any]:
  """Reads a state_dict from a .pth/.pt file (needs torch) or a .npz file.

  A checkpoint that wraps the weights ({'state_dict': ...} or
  {'model': ...}) is unwrapped.
  """
  if not os.path.isfile(path):
    raise UserError(f'--src {path!r} is not a file; pass a torchvision '
                    'state_dict (.pth) or an .npz of its arrays')
  if path.endswith('.npz'):
    with np.load(path) as data:
      return dict(data)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError('reading a .pth file needs PyTorch: pip install torch '
                    '(or save the state_dict as .npz)') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'cannot read {path!r} as a PyTorch state_dict: '
                    f'{str(e).splitlines()[0] if str(e) else type(e).__name__}'
                    ) from e
  for wrapper in ('state_dict', 'model'):
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  if not isinstance(state, dict):
    raise UserError(f'{path!r} holds a {type(state).__name__}, not a '
                    'state_dict; save model.state_dict()')
  return state


def _replace_leaf(tree: Mapping[str, Any], path: FlaxPath,
                  value: Any) -> dict[str, Any]:
  """A copy of `tree` with `path` replaced; other subtrees are shared."""
  out = dict(tree)
  if len(path) == 1:
    out[path[0]] = value
  else:
    out[path[0]] = _replace_leaf(tree[path[0]], path[1:], value)
  return out


_STEM_KERNEL = ('params', 'stem', 'conv1', 'kernel')


def adapt_input_channels(variables: Variables,
                         in_channels: int = 1) -> Variables:
  """Makes the first conv accept `in_channels` instead of 3 (RGB) channels.

  For 1 channel the kernel is summed over its input channels, so a grayscale
  image gives exactly the output the RGB model gives on that image replicated
  to 3 channels. For other counts the RGB kernel is repeated and rescaled by
  3 / in_channels (as timm), keeping activations at the same scale.
  """
  if in_channels < 1:
    raise UserError(f'in_channels must be >= 1, got {in_channels}')
  node = variables
  for name in _STEM_KERNEL:
    node = node[name]
  kernel = node  # (kh, kw, in, out)
  if in_channels == 1:
    new = kernel.sum(axis=2, keepdims=True)
  else:
    reps = math.ceil(in_channels / kernel.shape[2])
    new = np.tile(kernel, (1, 1, reps, 1))[:, :, :in_channels]
    new = new * (kernel.shape[2] / in_channels)
  return _replace_leaf(variables, _STEM_KERNEL, new.astype(kernel.dtype))


def replace_head(variables: Variables, num_classes: int,
                 rng: jax.Array) -> Variables:
  """Replaces `fc` with a freshly initialised one with `num_classes` outputs.

  The new layer is initialised as the model initialises its own head
  (nn.Dense defaults), so fine-tuning starts as training from scratch would.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  old = variables['params']['fc']
  features = old['kernel'].shape[0]
  fresh = nn.Dense(num_classes).init(rng, jnp.zeros((1, features)))['params']
  fc = {k: np.asarray(v, dtype=old[k].dtype) for k, v in fresh.items()}
  return _replace_leaf(variables, ('params', 'fc'), fc)


def converted_config(model_name: str, num_classes: int) -> Any:
  """The config.json of a converted directory: the same schema as a training
  run's, naming the network and the data it was trained on (ImageNet at
  224x224), so that predict.py, the summary, evaluation and warm starts read
  it like any workdir."""
  from resnet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
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
  """Writes DIR/checkpoints/0 and DIR/config.json, like a training workdir.

  The step folder has the items of resnet_jax.checkpointing: `state`
  ({'params', 'batch_stats'}, Orbax StandardSave) and `meta` (JSON: step 0
  and where the weights came from), so `Checkpointer(dst).restore_variables()`
  reads it.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from resnet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  dst = os.path.abspath(dst)
  ckpt_dir = os.path.join(dst, 'checkpoints')
  if os.path.exists(os.path.join(ckpt_dir, '0')):
    raise UserError(f'{ckpt_dir}/0 already exists; choose a new --dst or '
                    'delete it')
  config = converted_config(model_name, num_classes)
  state = {'params': variables['params'],
           'batch_stats': variables['batch_stats']}
  os.makedirs(dst, exist_ok=True)
  with ocp.CheckpointManager(ckpt_dir) as manager:
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({'step': 0, 'metrics': {},
                                'source': 'torchvision',
                                'src': os.path.abspath(src)})))
    manager.wait_until_finished()
  config_lib.write(dst, config)


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
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
  from absl import flags  # pylint: disable=g-import-not-at-top
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
  from resnet_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main)
