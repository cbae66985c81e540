"""Surgery on a ResNet's variables for warm starts and fine-tuning: a stem
for another number of input channels, a fresh head for another number of
classes. Pure functions of variable trees (numpy or jax arrays)."""

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.errors import UserError

Variables = dict[str, Any]


def _replace_leaf(tree: Mapping[str, Any], path: tuple[str, ...],
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
  old = variables['params']['fc']
  features = old['kernel'].shape[0]
  fresh = nn.Dense(num_classes).init(rng, jnp.zeros((1, features)))['params']
  fc = {k: np.asarray(v, dtype=old[k].dtype) for k, v in fresh.items()}
  return _replace_leaf(variables, ('params', 'fc'), fc)
