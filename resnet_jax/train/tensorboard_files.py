"""TensorBoard event files of a workdir, written without TensorFlow, with
each step once after any number of resumes.

A resumed run writes again the steps after its checkpoint. Before it does,
`keep_steps_up_to` rewrites the directory's events up to that step into one
new file (their values, wall times and tags as they were; a step written by
several runs keeps the last run's) and then deletes the files it read. A
kill at any moment leaves at worst the old files next to the new one, and
the next resume merges them again, so TensorBoard never shows a step twice.
"""

import glob
import os
import sys
import types
from typing import Any, Iterator

from absl import logging


def _without_tensorflow() -> None:
  """TensorBoard's writer imports TensorFlow whenever it is installed
  (seconds of start-up and gigabytes of address space in a training process
  that never uses it), unless the module `tensorboard.compat.notf` exists,
  which makes it take its own TF-free stub: that marker is registered here."""
  sys.modules.setdefault('tensorboard.compat.notf',
                         types.ModuleType('tensorboard.compat.notf'))


def writer(logdir: str) -> Any:
  """TensorBoard's framework-free summary writer, on a new event file."""
  _without_tensorflow()
  from tensorboard.summary import Writer  # pylint: disable=g-import-not-at-top
  return Writer(logdir)


def event_files(logdir: str) -> list[str]:
  """The directory's event files, oldest write first."""
  files = glob.glob(os.path.join(logdir, '*tfevents*'))
  return sorted(files, key=lambda f: (os.stat(f).st_mtime_ns, f))


def read_events(path: str) -> Iterator[Any]:
  """The Event protos of one file; a record cut short by a kill ends it."""
  _without_tensorflow()
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.compat.proto import event_pb2
  for raw in event_file_loader.RawEventFileLoader(path).Load():
    yield event_pb2.Event.FromString(raw)


def keep_steps_up_to(logdir: str, step: int) -> None:
  """Leaves the summaries of steps <= `step` in `logdir`, each once."""
  old = event_files(logdir)
  if not old:
    return
  kept: dict[tuple[tuple[str, ...], int], Any] = {}
  for path in old:
    for event in read_events(path):
      if event.HasField('summary') and event.step <= step:
        tags = tuple(v.tag for v in event.summary.value)
        kept.pop((tags, event.step), None)
        kept[(tags, event.step)] = event  # the last write of a step wins
  if kept:
    _without_tensorflow()
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
    out = event_file_writer.EventFileWriter(logdir)
    for event in sorted(kept.values(), key=lambda e: e.step):
      out.add_event(event)
    out.close()
  for path in old:
    os.remove(path)
  logging.info('TensorBoard events after step %d dropped (%d kept): the '
               'resumed run writes them again', step, len(kept))
