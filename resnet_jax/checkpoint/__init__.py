"""Checkpoints, workdirs and warm starts: how a run survives and resumes.

The resume contract, in full:
  1. A workdir holds one run (`workdir.py`): its config.json (written by
     config.write once the run is set up) names the network and the data,
     and a later command on the workdir must ask for the same
     (`check_same_run`); only durations, logging and how to compute
     (conv_impl, dtype) may change. One training process at a time holds
     its lock; the lock dies with the process.
  2. A checkpoint (`checkpointing.py`) is everything a step needs: the
     whole TrainState (params, batch_stats, optimizer state, step, the RNG
     key data, the running metric sums, the EMA model) plus a meta item with
     the step, its evaluation and a checksum of every array (`faults.py`).
     Orbax writes each step under a temporary name and renames it whole, so
     a kill mid-save leaves the previous checkpoint intact.
  3. Restoring takes the latest checkpoint that reads back and matches its
     checksums; a damaged one is skipped with a warning and set aside under
     damaged_checkpoints/ before that step is saved again.
  4. What follows is a pure function of the restored step: the data order
     (`data/order.py`), the augmentation keys (fold_in of the step), the
     learning rate and the periodic actions (`durations.Steps`); the
     metrics files are truncated to the step (`train/metric_writers.py`).
     So a resumed run equals an uninterrupted one bit for bit.
  5. A run that has ended prints its result and writes nothing; SIGTERM or
     SIGINT save the current step first (`train/train_loop.py`).
  6. A warm start (`init_from.py`, run.init_from) is not a resume: it takes
     only params and batch_stats from another workdir or from converted
     weights and starts a new run at step 0.
"""
