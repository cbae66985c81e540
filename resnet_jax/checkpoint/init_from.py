"""Warm starts (`run.init_from`): a network's weights from another workdir or
from converted weights, fitted to the new run's network.

A head of another size is left freshly initialised (fine-tuning to another
number of classes) and an RGB stem is adapted to the data's channels; any
other difference of a parameter's path or shape is one UserError naming the
first. Only params and batch_stats are taken: the optimizer state, the step
and the data order are the new run's.
"""

import os
from typing import Any

import jax
from absl import logging

from resnet_jax.checkpoint import checkpointing
from resnet_jax.errors import UserError
from resnet_jax.models import weights


def load(init_from: str, current: dict[str, Any]) -> dict[str, Any]:
  """params and batch_stats from `init_from` (DIR or DIR:STEP), fitted to
  `current` (the new network's variables; only their shapes are read)."""
  source, _, step = init_from.partition(':')
  if not os.path.isdir(os.path.join(source, checkpointing.CHECKPOINT_DIR)):
    raise UserError(f'init_from={init_from!r}: no checkpoints under '
                    f'{source!r}; give a workdir of an earlier run or a '
                    'directory written by python -m resnet_jax.tools.convert')
  variables, _ = checkpointing.Checkpointer(
      source, read_only=True, async_save=False).restore_variables(
          int(step) if step else None)
  loaded = _keep_new_head_if_resized(variables, current)
  loaded = _adapt_input_channels(loaded, current)
  checkpointing.check_compatible(
      jax.tree.map(lambda x: tuple(x.shape), loaded),
      jax.tree.map(lambda x: tuple(x.shape), current))
  logging.info('initialised params and batch_stats from %s', init_from)
  return loaded


def _keep_new_head_if_resized(loaded: dict, current: dict) -> dict:
  fc_old = loaded['params'].get('fc')
  fc_new = current['params']['fc']
  if fc_old is not None and fc_old['kernel'].shape != fc_new['kernel'].shape:
    if fc_old['kernel'].shape[0] == fc_new['kernel'].shape[0]:
      logging.info('new head: %s classes instead of %s',
                   fc_new['kernel'].shape[1], fc_old['kernel'].shape[1])
      loaded = dict(loaded, params=dict(loaded['params'], fc=fc_new))
  return loaded


def _adapt_input_channels(loaded: dict, current: dict) -> dict:
  """RGB weights for grayscale data: the stem kernel is summed over its input
  channels, so a gray image gives what the RGB model gives on it replicated
  to RGB (other counts: weights.adapt_input_channels tiles it)."""
  try:
    old = loaded['params']['stem']['conv1']['kernel']
    new = current['params']['stem']['conv1']['kernel']
  except (KeyError, TypeError):
    return loaded
  if old.ndim != 4 or old.shape[2] == new.shape[2] or (
      old.shape[:2] + old.shape[3:] != new.shape[:2] + new.shape[3:]):
    return loaded  # Same channels, or another stem: check_compatible decides.
  logging.info('stem kernel adapted from %d to %d input channels',
               old.shape[2], new.shape[2])
  return weights.adapt_input_channels(loaded, new.shape[2])
