"""Weights & Biases, optional: the records of metrics.jsonl, also sent to a
W&B run (`run.wandb_project`; unset: off).

wandb is not a dependency: it is imported only when a project is set, only
in process 0 (the metric writer's), and a missing package stops the run
before training with one line saying how to install it or turn W&B off. The
run's config is the resolved config (config.json's). The W&B run id is kept
in the workdir (`wandb_run_id.txt`), so a resumed run logs into the same W&B
run (`resume='allow'`). Records carry the training step as the metric
`step`, the x-axis of every chart: a resumed run logs again the records
after its checkpoint, and since resuming is exact they repeat the values
already there (W&B's own step counter only increases, so the training step
cannot be W&B's step).
"""

import json
import os
import uuid
from typing import Any

from resnet_jax import config as config_lib
from resnet_jax.errors import UserError

RUN_ID_FILE = 'wandb_run_id.txt'


def check_installed() -> None:
  """Raises the one-line UserError when the wandb package is missing."""
  _import_wandb()


def _import_wandb():
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError('config field run.wandb_project is set but the wandb '
                    'package is not installed: pip install wandb, or unset '
                    '--config.run.wandb_project') from None
  return wandb


def run_id(workdir: str) -> str:
  """The workdir's W&B run id, created on the first call."""
  path = os.path.join(workdir, RUN_ID_FILE)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      existing = f.read().strip()
    if existing:
      return existing
  new = uuid.uuid4().hex[:16]
  with open(path, 'w', encoding='utf-8') as f:
    f.write(new + '\n')
  return new


class WandbSink:
  """One W&B run per workdir, fed the metric writer's records."""

  def __init__(self, workdir: str, project: str, config: Any):
    wandb = _import_wandb()
    self._run = wandb.init(
        project=project, id=run_id(workdir), resume='allow',
        name=os.path.basename(os.path.abspath(workdir)),
        dir=workdir, config=json.loads(config_lib.to_json(config)))
    self._run.define_metric('step')
    self._run.define_metric('*', step_metric='step')

  def write(self, record: dict[str, Any]) -> None:
    self._run.log({k: v for k, v in record.items()
                   if isinstance(v, (int, float))})

  def close(self) -> None:
    self._run.finish()
