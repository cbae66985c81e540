"""What a run leaves for researchers: log lines, metrics.jsonl, TensorBoard
event files (tensorboard_files.py), optionally a Weights & Biases run
(wandb_sink.py), and the textbook's learning-curve figure (curves.png).

Only process 0 writes; the others get a writer that does nothing, so the
training loop never asks which process it is.
"""

import json
import os
import sys
import time
from typing import Any

import jax
from absl import logging

from resnet_jax import atomic_files
from resnet_jax.train import tensorboard_files, wandb_sink


class MetricWriter:
  """Appends one JSON record per logging step or epoch, mirrors to TensorBoard
  and, when `wandb_project` is set, to Weights & Biases (`wandb_sink`)."""

  def __init__(self, workdir: str, enabled: bool = True,
               wandb_project: str | None = None, config: Any = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb_dir = os.path.join(workdir, 'tensorboard')
    self._tb = None  # opened by the first record, after `truncate_after`
    self._wandb = None
    if enabled and wandb_project:
      self._wandb = wandb_sink.WandbSink(workdir, wandb_project, config)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')
    if self._tb is None:
      self._tb = tensorboard_files.writer(self.tb_dir)
    step = int(record['step'])
    for key, value in record.items():
      if key not in ('step', 'epoch') and isinstance(value, (int, float)):
        self._tb.add_scalar(key, float(value), step)
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.write(record)

  def truncate_after(self, step: int) -> None:
    """Drops records and TensorBoard events past `step`: a resumed run
    rewrites them exactly."""
    if not self.enabled:
      return
    tensorboard_files.keep_steps_up_to(self.tb_dir, step)
    if not os.path.exists(self.path):
      return
    kept = [json.dumps(r, sort_keys=True) + '\n'
            for r in _parse_lines(self.path) if r['step'] <= step]
    atomic_files.write_text(self.path, ''.join(kept))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.close()


def read_records(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, 'metrics.jsonl')
  return _parse_lines(path) if os.path.exists(path) else []


def _parse_lines(path: str) -> list[dict[str, Any]]:
  """Records of a metrics log; a line cut short by a kill is dropped."""
  records = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def plot_curves(workdir: str) -> str | None:
  """train loss, train accuracy and the accuracy of each evaluated split
  ('test acc', 'val acc') against epoch, as in the textbook."""
  epochs = [r for r in read_records(workdir) if 'epoch' in r]
  if not epochs:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  x = [r['epoch'] for r in epochs]
  evaluated = sorted({k for r in epochs for k in r
                      if k.endswith('_accuracy') and k != 'train_accuracy'
                      and not k.endswith('_top5_accuracy')})
  fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
  styles = ['-', 'm--'] + ['g-.', 'c:', 'y-.'][:len(evaluated)]
  for key, style in zip(['train_loss', 'train_accuracy'] + evaluated, styles):
    points = [(e, r[key]) for e, r in zip(x, epochs) if key in r]
    if points:
      label = key.replace('_accuracy', ' acc').replace('_', ' ')
      ax.plot(*zip(*points), style, label=label)
  ax.set_xlabel('epoch')
  ax.set_xlim(0, max(x))
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, 'curves.png')
  with atomic_files.temporary_path(path) as tmp:  # never half a figure
    fig.savefig(tmp, format='png')
  plt.close(fig)
  return path


class Progress:
  """A one-line progress bar on a terminal; plain log lines otherwise."""

  def __init__(self, enabled: bool):
    self.tty = enabled and sys.stderr.isatty() and jax.process_index() == 0
    self._t0 = time.perf_counter()

  def update(self, epoch: int, done: int, total: int, loss: float | None,
             images_per_sec: float | None) -> None:
    text = f'epoch {epoch}: {done}/{total}'
    if loss is not None:
      text += f' loss {loss:.3f}'
    if images_per_sec:
      text += f' {images_per_sec:.1f} images/s'
    if self.tty:
      width = 24
      filled = int(width * done / max(total, 1))
      sys.stderr.write(f'\r[{"#" * filled}{"." * (width - filled)}] {text}  ')
      sys.stderr.flush()
    else:
      logging.info(text)

  def end_line(self) -> None:
    if self.tty:
      sys.stderr.write('\n')
      sys.stderr.flush()
