"""torchvision ResNet weights as resnet_jax variables.

The Flax modules are named after torchvision's (`conv1`, `bn1`,
`layer1_0/downsample_conv`, `fc`, ...), so the conversion is a rename plus a
layout change: conv kernels OIHW -> HWIO (grouped convs included: torch's
(O, I/groups, kh, kw) is Flax's (kh, kw, I/groups, O)), the dense kernel
(out, in) -> (in, out), BatchNorm running_mean/var -> `batch_stats` mean/var.

The expected keys and shapes come from the Flax model itself
(`jax.eval_shape` of its init), so every key of the state_dict is checked
against the model before anything is returned. torch is imported only to
read a .pth file. `python -m resnet_jax.tools.convert` writes the result as
a workdir.
"""

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.errors import UserError
from resnet_jax.models.registry import create_model

__all__ = ['TORCHVISION_MODELS', 'from_torchvision', 'load_state_dict']

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
  model = create_model(model_name, num_classes=num_classes)
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
