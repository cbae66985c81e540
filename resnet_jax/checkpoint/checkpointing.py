"""Orbax checkpoints: everything needed to continue a run, and nothing lost.

A checkpoint is a step folder `<workdir>/checkpoints/<step>/` with two items:
`state` (the whole TrainState: params, batch_stats, optimizer state, step,
RNG key data, the running sums of the training metrics and, when the run
keeps one, the EMA model) and `meta` (JSON:
the step and, if the step was evaluated, its evaluation metrics). The run's
config is the workdir's config.json. Orbax writes a step into a temporary
folder and renames it when complete, so a kill during an (asynchronous) save
never leaves a half checkpoint that a restore would pick. Kept: the last
`keep` steps plus the best by `best_metric` (the accuracy on the run's first
evaluation split: 'val' when one is held out, else the dataset's own).

Faults: `meta` records a checksum of every array (faults.py), so a
damaged file that still reads (a flipped bit in a compressed chunk restores
without an error) is found like one that does not; a damaged latest
checkpoint is skipped with a warning naming it, and a training run moves it
to `<workdir>/damaged_checkpoints/` before it saves that step again (nothing
is deleted). A save that fails to write (a full disk) is one `UserError`
naming the file and the step still the latest.
"""

import contextlib
import os
import shutil
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization
from jax.experimental import multihost_utils

from resnet_jax.checkpoint import faults
from resnet_jax.errors import UserError
from resnet_jax.models.resnet import network_order

CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'damaged_checkpoints'


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (a full disk, a failing device)."""


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Restore targets: shapes and dtypes of `tree`, placed with `sharding`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Checkpointer:
  """Saves and restores training state in one workdir."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False, best_metric: str = 'test_accuracy'):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    policies = ocp.checkpoint_managers
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=max(keep, 1)),
        # Orbax sorts ascending and keeps the last n: the highest accuracy.
        policies.BestN(get_metric_fn=lambda m: m[best_metric],
                       reverse=False, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    # A writer holds the workdir's lock (workdir.py), so temporary
    # folders left by a save that a kill or a full disk interrupted are no
    # other run's: Orbax removes them (they are never restored either way).
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation, create=not read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save, read_only=read_only)
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
    self._saving = None  # the step of the save in flight
    self._failed = False

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, state: Any, metrics: dict[str, float] | None = None) -> None:
    """Starts an (asynchronous) save of `state` at its step, with the step's
    evaluation `metrics` if it was evaluated, and its arrays' checksums."""
    self._save(int(jax.device_get(state.step)),
               serialization.to_state_dict(state), metrics)

  def save_weights(self, variables: dict[str, Any], **source: str) -> None:
    """Step 0 holding only a network's params and batch_stats (converted
    weights), `source` recorded in its meta: `restore_variables` and warm
    starts read it like a training run's checkpoint."""
    self._save(0, {'params': variables['params'],
                   'batch_stats': variables['batch_stats']}, None, source)
    self.wait()

  def _save(self, step: int, tree: Any, metrics: dict[str, float] | None,
            extra_meta: dict[str, str] | None = None) -> None:
    self.wait()  # a failure of the previous save is reported as its own
    meta = {'step': step, 'metrics': metrics or {},
            'fingerprint': faults.fingerprint(tree), **(extra_meta or {})}
    self._saving = step
    with self._write_errors():
      self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                        meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)

  def wait(self) -> None:
    with self._write_errors():
      self._manager.wait_until_finished()
    self._saving = None

  def close(self) -> None:
    """Waits for the save in flight; after a failed save (already reported)
    only releases Orbax's threads."""
    if self._failed:
      for finish in (self._manager.wait_until_finished, self._manager.close):
        with contextlib.suppress(Exception):
          finish()
      return
    try:
      self.wait()
    finally:
      self._manager.close()

  @contextlib.contextmanager
  def _write_errors(self) -> Iterator[None]:
    """An error writing the files of the save in flight becomes one
    CheckpointWriteError; other exceptions (bugs) keep their traceback."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      reason = faults.os_error(e)
      if reason is None:
        raise
      self._failed = True
      done = self._finished_steps()
      kept = (f'the checkpoint of step {done[-1]} is still the latest and '
              'restorable' if done else 'no checkpoint was written')
      raise CheckpointWriteError(
          f'cannot save the checkpoint of step {self._saving} in '
          f'{self.directory}: {reason}; {kept}: free space (or fix the file '
          'system) and resume with the same command') from None

  def _finished_steps(self) -> list[int]:
    """Steps whose folder is complete (Orbax renames a save's temporary
    folder as its last act)."""
    try:
      return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
    except OSError:
      return []

  def restore(self, target: Any, sharding: jax.sharding.Sharding,
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure of `target` (a TrainState).

    Without `step`, the latest checkpoint that reads back; a corrupt or
    incomplete one is skipped with a warning (nothing is deleted).
    """
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise UserError(f'no checkpoint at step {step} in {self.directory}; '
                        f'available: {steps or "none"}')
      candidates = [step]
    else:
      candidates = steps[::-1]
    if not candidates:
      raise UserError(f'no checkpoint in {self.directory}')
    template = serialization.to_state_dict(target)
    stored = self._read_shapes(candidates[0]) or {}
    check_compatible(stored, template)
    check_same_sums(stored, template, self.directory)
    damaged = []
    for s in candidates:
      try:
        restored = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(template, sharding)),
            meta=ocp.args.JsonRestore()))
        problem = faults.mismatch(
            restored['state'], restored['meta'].get('fingerprint'))
      except Exception as e:  # pylint: disable=broad-except
        problem = faults.read_error(e)
      if problem:
        logging.warning('checkpoint of step %d (%s) is damaged, %s; %s', s,
                        os.path.join(self.directory, str(s)), problem,
                        'trying the previous one' if s != candidates[-1] else
                        'no earlier one is left')
        damaged.append(s)
        continue
      if damaged and not self.read_only:
        self._set_aside(damaged)
      state = serialization.from_state_dict(target, restored['state'])
      return state, dict(restored['meta'])
    raise UserError(f'no readable checkpoint in {self.directory} (tried steps '
                    f'{damaged}, each damaged: see the warnings); start a new '
                    'workdir or fix the files')

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged step folders out of Orbax's directory (this run saves
    those steps again), to `<workdir>/damaged_checkpoints/`."""
    target = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    if jax.process_index() == 0:
      os.makedirs(target, exist_ok=True)
      for s in steps:
        dest, n = os.path.join(target, str(s)), 1
        while os.path.exists(dest):
          n += 1
          dest = os.path.join(target, f'{s}-{n}')
        shutil.move(os.path.join(self.directory, str(s)), dest)
        logging.warning('moved the damaged checkpoint of step %d to %s '
                        '(nothing is deleted)', s, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('damaged checkpoints set aside')
    self._manager.reload()

  def restore_variables(self, step: int | None = None, weights: str = 'raw'
                        ) -> tuple[dict, dict]:
    """params and batch_stats on this host's first device, whatever device
    count wrote them (for warm starts, prediction and export): the trained
    ones ('raw') or the EMA model's ('ema')."""
    steps = self.all_steps()
    if not steps:
      raise UserError(f'no checkpoint in {self.directory}')
    s = steps[-1] if step is None else step
    if s not in steps:
      raise UserError(f'no checkpoint at step {s} in {self.directory}; '
                      f'available: {steps}')
    state, meta = self.restore_raw(s)
    if weights == 'ema':
      if not state.get('ema'):
        raise UserError(f'the checkpoint at step {s} in {self.directory} has '
                        'no EMA weights (its run had optim.ema_decay=0); use '
                        'the raw weights')
      state = state['ema']
    variables = {'params': state['params'],
                 'batch_stats': state.get('batch_stats', {})}
    return variables, meta

  def restore_raw(self, step: int) -> tuple[dict, dict]:
    """The stored state tree as written (nested dicts), on one local device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        self._stored_tree(step), is_leaf=lambda m: hasattr(m, 'shape'))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    problem = faults.mismatch(
        restored['state'], restored['meta'].get('fingerprint'))
    if problem:
      raise UserError(f'the checkpoint of step {step} in {self.directory} is '
                      f'damaged: {problem}; use another step')
    return restored['state'], dict(restored['meta'])

  def _read_shapes(self, step: int) -> dict[str, Any] | None:
    """Shapes stored for `step`, to name the first mismatch before restoring."""
    try:
      return jax.tree.map(lambda m: tuple(m.shape), self._stored_tree(step),
                          is_leaf=lambda m: hasattr(m, 'shape'))
    except Exception:  # pylint: disable=broad-except
      return None

  def _stored_tree(self, step: int) -> dict[str, Any]:
    """Orbax's metadata (shape, dtype, ...) of the stored state, as a dict."""
    tree = self._manager.item_metadata(step)['state']
    return dict(tree.tree if hasattr(tree, 'tree') else tree)


def check_compatible(stored: dict[str, Any], expected: dict[str, Any],
                     sections: tuple[str, ...] = ('params', 'batch_stats')
                     ) -> None:
  """Raises UserError naming the first parameter whose path or shape differs."""
  for section in sections:
    if section not in stored or section not in expected:
      continue
    have = _flatten(stored[section], section)
    want = _flatten(expected[section], section)
    for path, shape in want.items():
      if path not in have:
        raise UserError(f'checkpoint does not fit the model: {path} {shape} is '
                        'missing from the checkpoint (another architecture?)')
      if tuple(have[path]) != tuple(shape):
        raise UserError(f'checkpoint does not fit the model: {path} has shape '
                        f'{tuple(have[path])} in the checkpoint but '
                        f'{tuple(shape)} in the model (another architecture '
                        'or number of classes?)')
    for path in have:
      if path not in want:
        raise UserError(f'checkpoint does not fit the model: {path} '
                        f'{tuple(have[path])} is in the checkpoint but not in '
                        'the model (another architecture?)')


def check_same_sums(stored: dict[str, Any], expected: dict[str, Any],
                    directory: str) -> None:
  """Raises UserError when the checkpoint keeps other running sums of the
  training metrics than this version's train step (e.g. one written before
  the parameter and update norms were added)."""
  have = set((stored.get('metric_sums') or {}).get('window') or {})
  want = set(expected['metric_sums']['window'])
  if have and have != want:
    raise UserError(
        f'the checkpoints in {directory} were written by another version of '
        f'resnet_jax (metric sums {sorted(have)}; this version keeps '
        f'{sorted(want)}); resume with that version, or train in a new '
        'workdir (--config.run.init_from=OLD_WORKDIR starts from its weights)')


def _flatten(tree: Any, prefix: str) -> dict[str, tuple[int, ...]]:
  """path -> shape, in network order (stem, layer1_0, ..., fc), so the first
  mismatch reported is the first in the network (pytrees sort their keys)."""
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    flat = {}
    for key in sorted(tree, key=network_order):
      flat.update(_flatten(tree[key], f'{prefix}/{key}'))
    return flat
  return {prefix: tuple(tree if isinstance(tree, tuple) else tree.shape)}
